"""The ZeRO-0 engine (DDPEngine): the same updates as a hand-written loop, checkpoints, frozen teachers, compile."""

from pathlib import Path

import pytest
import torch

from harness.build import build_method
from harness.distributed import Runtime
from harness.engine import build_engine
from harness.ddp_engine import DDPEngine
from harness.zero import deepspeed_config
from harness.optim import build_optimizer, set_lr, set_teachers_trainable
from harness.recipe import Recipe

CPU = Runtime(device=torch.device("cpu"), rank=0, world_size=1, local_rank=0, bf16=False, zero_stage=0)


def tiny(name: str, **extra) -> Recipe:
    tree = {"output": "unused", "data": {"train": "unused", "val": "unused", "num_classes": 10, "image_size": 32,
                                         "batch_size": 8},
            "student": {"model": "test_resnet"}, "method": {"name": name, "anchor_weight": 1.0},
            "teachers": [{"model": "test_resnet", "checkpoint": "unused.pth"}],
            "optim": {"lr": 0.05, "weight_decay": 1e-4}, "schedule": {"epochs": 2}}
    for key, value in extra.items():
        tree[key] = {**tree.get(key, {}), **value}
    return Recipe.model_validate(tree)


def engine_for(recipe: Recipe, grad_accum: int = 1, adapting: bool = True):
    torch.manual_seed(0)
    distiller, _ = build_method(recipe, load_weights=False)
    optimizer = build_optimizer(distiller.param_groups(), recipe.optim, recipe.method.anchor_weight)
    engine = DDPEngine(distiller, optimizer, CPU, grad_accum, None)
    if adapting:
        optimizer.start_adaptation()
    set_teachers_trainable(optimizer, adapting)
    distiller.set_adapting(adapting)
    distiller.train()
    return engine, distiller, optimizer


def batches(n: int):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


def test_ddp_engine_steps_exactly_as_a_plain_loop_with_accumulation():
    recipe = tiny("atsc")
    engine, distiller, optimizer = engine_for(recipe, grad_accum=2)
    _, plain, plain_opt = engine_for(recipe, grad_accum=2)  # same seed: same weights
    data = batches(4)
    for x, y in data:
        set_lr(optimizer.param_groups, 0.05)
        loss, _ = engine(x, y)
        engine.backward(loss)
        boundary = engine.is_gradient_accumulation_boundary()
        engine.step()
        assert boundary == (engine.micro_steps % 2 == 0)
    for i, (x, y) in enumerate(data):  # the hand-written loop: loss / accumulation, step every 2nd
        set_lr(plain_opt.param_groups, 0.05)
        loss, _ = plain(x, y)
        (loss / 2).backward()
        if i % 2 == 1:
            plain_opt.step()
            plain_opt.zero_grad(set_to_none=True)
    for (name, a), b in zip(distiller.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name
    assert engine.global_steps == 2


def test_ddp_engine_checkpoint_round_trip(tmp_path):
    recipe = tiny("atsc")
    engine, distiller, optimizer = engine_for(recipe)
    data = batches(3)

    def step(e, x, y):
        loss, _ = e(x, y)
        e.backward(loss)
        e.step()

    step(engine, *data[0])
    engine.save_checkpoint(str(tmp_path), tag="t1", client_state={"harness": {"epoch": 7}}, save_latest=False)
    assert (tmp_path / "t1" / DDPEngine.CHECKPOINT_FILE).is_file()  # DeepSpeed's ZeRO-0 layout: export reads it
    restored, restored_distiller, _ = engine_for(recipe)
    path, client = restored.load_checkpoint(str(tmp_path), tag="t1")
    assert path is not None and client == {"harness": {"epoch": 7}}
    for x, y in data[1:]:
        step(engine, x, y)
        step(restored, x, y)
    for (name, a), b in zip(distiller.state_dict().items(), restored_distiller.state_dict().values()):
        assert torch.equal(a, b), name
    assert restored.load_checkpoint(str(tmp_path), tag="missing") == (None, None)


@pytest.mark.parametrize("method", ["simkd", "atsc"])
def test_frozen_teachers_cost_only_a_forward(method):
    """No teacher graph, no teacher gradient, no teacher optimizer state while frozen."""
    recipe = tiny(method, method={"adapt_after": 1} if method == "atsc" else {})
    engine, distiller, optimizer = engine_for(recipe, adapting=False)
    seen = []
    hook = distiller.teachers[0].conv1.register_forward_hook(lambda m, i, out: seen.append(out.requires_grad))
    for x, y in batches(2):
        loss, _ = engine(x, y)
        engine.backward(loss)
        engine.step()
    hook.remove()
    assert seen == [False, False]  # the teacher's output carries no autograd graph
    assert not distiller.teachers[0].training
    teacher_params = {id(p) for p in distiller.teachers[0].parameters()}
    assert all(p.grad is None for p in distiller.teachers[0].parameters())
    assert not [p for p in optimizer.state if id(p) in teacher_params and optimizer.state[p].get("momentum_buffer") is not None]
    if method == "simkd":
        assert not any(p.requires_grad for p in distiller.teachers[0].parameters())


def test_deepspeed_config_asks_for_no_per_step_work():
    """The throughput timers synchronise the device twice a step; the grad norm is for clipping only."""
    rt = Runtime(device=torch.device("cpu"), rank=0, world_size=1, local_rank=0, bf16=False, zero_stage=2)
    config = deepspeed_config(rt, 8, 1, None)
    assert config["timers"]["throughput"] == {"enabled": False, "synchronized": False}
    assert config["zero_optimization"]["compute_grad_norm"] is False
    assert config["zero_optimization"]["contiguous_gradients"] is False  # one cat per bucket, not a copy per grad
    assert "compute_grad_norm" not in deepspeed_config(rt, 8, 1, 1.0)["zero_optimization"]  # clipping needs it


def test_compile_traces_the_step_and_matches_eager(monkeypatch):
    """runtime.compile: the compiled distiller takes the same steps, also across the adaptation switch.

    Compiled with dynamo + AOTAutograd (backend aot_eager): the same graphs, forward and
    backward, as the default inductor backend, without its C++ code generation, which takes
    minutes on a 2-core CPU (bench/step.py --compile measures inductor on a GPU).
    """
    import functools

    import torch._dynamo

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    recipe = tiny("atsc", method={"adapt_after": 1})
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        distiller, _ = build_method(recipe, load_weights=False)
        optimizer = build_optimizer(distiller.param_groups(), recipe.optim, recipe.method.anchor_weight)
        engine = build_engine(distiller, optimizer, CPU, 8, 1, None, compile=compiled)
        assert (getattr(distiller, "_compiled_call_impl", None) is not None) == compiled
        set_teachers_trainable(optimizer, False)
        distiller.set_adapting(False)
        distiller.train()
        losses = []
        for i, (x, y) in enumerate(batches(4)):
            if i == 2:  # frozen, then adapted: the switch the run makes at `adapt_after`
                optimizer.start_adaptation()
                set_teachers_trainable(optimizer, True)
                distiller.set_adapting(True)
            set_lr(optimizer.param_groups, 0.05)
            loss, _ = engine(x, y)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        results.append((losses, {k: v.clone() for k, v in distiller.state_dict().items()}))
    (eager_losses, eager_state), (compiled_losses, compiled_state) = results
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4, abs=1e-5)
    for key, value in eager_state.items():
        assert torch.allclose(value.float(), compiled_state[key].float(), rtol=1e-3, atol=1e-4), key
    torch._dynamo.reset()


@pytest.mark.parametrize("stage, accum", [(1, 1), (2, 1), (2, 2), (3, 1)])
def test_zero_steps_the_weight_partitions_in_place(stage, accum):
    """No second fp32 copy of a rank's weight partition at ZeRO 1-3 (harness.zero._share_master_partitions).

    The optimizer's master partitions are the weights' own storage, a step moves the module's
    weights exactly as the master moved, and it equals DDPEngine's step (ZeRO-0) on the same batch.
    """
    import subprocess
    import sys

    script = f"""
import torch
from harness.distributed import init_runtime, shutdown
from harness.engine import base_optimizer, build_engine
import tests.test_engine as T

rt = init_runtime("fp32", {stage}, 1)
recipe = T.tiny("atsc")
torch.manual_seed(0)
d, _ = T.build_method(recipe, load_weights=False)
opt = T.build_optimizer(d.param_groups(), recipe.optim, recipe.method.anchor_weight)
engine = build_engine(d, opt, rt, 8, {accum}, None)
zero = engine.optimizer
if {stage} == 3:
    pairs = list(zip(zero.fp32_partitioned_groups_flat, zero.fp16_partitioned_groups_flat))
else:
    pairs = [(m, parts[0]) for m, parts in zip(zero.single_partition_of_fp32_groups, zero.parallel_partitioned_bit16_groups)]
assert pairs and all(m.data_ptr() == w.data_ptr() for m, w in pairs), "a separate fp32 master copy"
base_optimizer(engine).start_adaptation()
T.set_teachers_trainable(base_optimizer(engine), True)
d.set_adapting(True)
d.train()
local, local_d, _ = T.engine_for(recipe, grad_accum={accum})
for x, y in T.batches(3 if {accum} == 1 else 4):
    for e in (engine, local):
        loss, _ = e(x, y)
        e.backward(loss)
        e.step()
if {stage} < 3:  # the weights still view the flat buffers DeepSpeed steps (the relink is skipped)
    for flat, group in zip(zero.bit16_groups_flat, zero.bit16_groups):
        start, end = flat.data_ptr(), flat.data_ptr() + flat.numel() * flat.element_size()
        assert all(start <= w.data_ptr() < end for w in group)
import contextlib, deepspeed
with deepspeed.zero.GatheredParameters(list(d.parameters())) if {stage} == 3 else contextlib.nullcontext():
    ours = {{k: v.detach().clone() for k, v in d.named_parameters()}}
for k, v in local_d.named_parameters():
    assert torch.allclose(ours[k], v.detach(), atol=1e-5), (k, (ours[k] - v.detach()).abs().max().item(), v.abs().max().item())
shutdown()
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_a_deepspeed_patch_that_does_not_take_stops_before_training_naming_the_version():
    """harness.zero.check_patches: a DeepSpeed whose ZeRO internals moved is refused, not trained with silently."""
    import subprocess
    import sys
    from types import SimpleNamespace

    from harness.zero import DeepSpeedPatchError, check_patches

    with pytest.raises(DeepSpeedPatchError, match=r"DeepSpeed 9\.9\.9: .*neither `fp32_partitioned_groups_flat`"):
        check_patches(SimpleNamespace(step=lambda: None), 3, "9.9.9")  # internals renamed: nothing to patch
    # a real stage-2 engine whose master partitions were left unshared (the patch found nothing it could share)
    script = """
import deepspeed, pytest, torch
from harness import zero
from harness.distributed import init_runtime, shutdown
from harness.engine import build_engine
import tests.test_engine as T

rt = init_runtime("fp32", 2, 1)
recipe = T.tiny("atsc")
d, _ = T.build_method(recipe, load_weights=False)
opt = T.build_optimizer(d.param_groups(), recipe.optim, recipe.method.anchor_weight)
zero._share_master_partitions = lambda optimizer: None
with pytest.raises(zero.DeepSpeedPatchError) as raised:
    build_engine(d, opt, rt, 8, 1, None)
assert f"DeepSpeed {deepspeed.__version__}:" in str(raised.value) and "separate copy" in str(raised.value), raised.value
shutdown()
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
