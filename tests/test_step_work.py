"""What a training step does and does not do: the anchored optimizer's work, timm's weight-decay
groups, which parameters DDP reduces, and an evaluation that does each thing once."""
import pytest
import timm
import torch
from torch import nn

from harness.build import build_distiller
from harness.optim import AnchoredAdamW, AnchoredSGD, build_optimizer, decay_groups, set_lr, set_teachers_trainable
from test_method import STUDENT_PRE, batch, models, recipe


# ----------------------------------------------------------------------------- the anchored step


def _anchored(opt_cls, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.LayerNorm(256), nn.Linear(256, 512))
    groups = [{"params": [p for p in model.parameters() if p.dim() > 1], "role": "teacher", "anchor": True,
               "anchor_weight": 2.5},
              {"params": [p for p in model.parameters() if p.dim() <= 1], "role": "teacher", "anchor": False}]
    opt = opt_cls(groups, lr=0.05, weight_decay=0.01, fused=True, **kw)
    opt.start_adaptation()
    return model, opt


@pytest.mark.parametrize("slice_", [1 << 22, 1000])
@pytest.mark.parametrize("opt_cls,base_cls,kw", [(AnchoredSGD, torch.optim.SGD, {"momentum": 0.9}),
                                                 (AnchoredAdamW, torch.optim.AdamW, {})])
def test_the_anchored_step_is_the_same_step_bit_for_bit(opt_cls, base_cls, kw, slice_, monkeypatch):
    """Five steps match torch's own optimizer given ``grad += 2 w (p - p0)`` by hand, exactly (AdamW
    would magnify any rounding difference where a gradient is near zero), also when every anchored
    tensor is worked through in slices; the kept buffer is at most a slice."""
    monkeypatch.setattr("harness.optim.SLICE", slice_)
    model, opt = _anchored(opt_cls, **kw)
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(64, 256), nn.LayerNorm(256), nn.Linear(256, 512))
    ref.load_state_dict(model.state_dict())
    anchors = {p: p.detach().clone() for p in ref.parameters() if p.dim() > 1}
    ref_opt = base_cls(ref.parameters(), lr=0.05, weight_decay=0.01, fused=True, **kw)
    g = torch.Generator().manual_seed(3)
    for step in range(5):
        opt.track_anchor = step == 4
        x = torch.randn(16, 64, generator=g)
        for net, o in ((model, opt), (ref, ref_opt)):
            net(x).square().mean().backward()
            if net is ref:
                distance = sum((p.detach() - p0).square().sum() for p, p0 in anchors.items())
                for p, p0 in anchors.items():
                    p.grad.add_(p.detach() - p0, alpha=2 * 2.5)
            o.step()
            o.zero_grad()
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(a, b), name
    assert opt.anchor_value().item() == pytest.approx(2.5 * distance.item(), rel=1e-5) and distance > 0
    assert max(b.numel() for b in opt._scratch_buffers.values()) <= min(slice_, 512 * 256)


def test_the_anchored_step_allocates_nothing():
    """After the first step (which creates the state and the scratch buffer), a step allocates nothing
    the size of an anchored tensor: no ``p - p0`` per parameter."""
    model, opt = _anchored(AnchoredSGD, momentum=0.9)
    x = torch.randn(16, 64)
    model(x).square().mean().backward()
    opt.step()
    model(x).square().mean().backward()
    smallest = min(p.numel() * p.element_size() for p in model.parameters() if p.dim() > 1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step()
    allocations = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]
    assert max(allocations, default=0) < smallest, sorted(allocations)[-3:]


def test_a_plain_step_reads_no_optimizer_state_of_its_own():
    """The anchors are looked up once per adaptation (and after a load), not at every step."""
    model, opt = _anchored(AnchoredSGD, momentum=0.9)
    x = torch.randn(16, 64)
    for _ in range(2):
        model(x).square().mean().backward()
        opt.step()
    def remembered():
        return [v for k, v in opt._anchor_cache.items() if k[0] == id(opt.param_groups[0])]

    assert len(opt._anchor_cache) == 2 and len(remembered()) == 1  # one entry per group, however many steps
    anchors_before = [opt.state[p]["anchor"] for p in opt.param_groups[0]["params"]]
    assert all(a is b for a, b in zip(remembered()[0], anchors_before))
    opt.load_state_dict(opt.state_dict())  # new state tensors: the remembered anchors are dropped
    assert not getattr(opt, "_anchor_cache", {})
    model(x).square().mean().backward()
    opt.step()
    anchors_after = remembered()[0]
    assert all(a is opt.state[p]["anchor"] for a, p in zip(anchors_after, opt.param_groups[0]["params"]))
    assert all(torch.equal(a, b) for a, b in zip(anchors_before, anchors_after))


# ----------------------------------------------------------------------------- weight-decay groups


def test_timm_decay_groups_exempt_biases_norms_and_no_weight_decay_names():
    student, teachers = models(student="test_vit", teachers=("test_vit",))
    r = recipe(teachers=("test_vit",))
    d = build_distiller(r, student, teachers, STUDENT_PRE)
    d.set_adapting(True)
    timm_cfg = r.optim.model_copy(update={"decay_groups": "timm", "weight_decay": 0.05})
    opt = build_optimizer(decay_groups(d.param_groups(), d.parts(), timm_cfg), timm_cfg, anchor_weight=1.0)
    set_teachers_trainable(opt, True)
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    names = {id(p): n for n, p in d.named_parameters()}
    exempt = {names[i] for i, wd in decay_of.items() if wd == 0}
    decayed = {names[i] for i, wd in decay_of.items() if wd > 0}
    for name in ("student.pos_embed", "student.cls_token", "teachers.0.pos_embed", "teachers.0.cls_token",
                 "student.blocks.0.norm1.weight", "student.blocks.0.attn.qkv.bias", "teachers.0.head.bias"):
        assert name in exempt, name
    for name in ("student.blocks.0.attn.qkv.weight", "teachers.0.head.weight", "teachers.0.blocks.0.mlp.fc1.weight",
                 "projectors.0.0.weight"):
        assert name in decayed, name
    # the teachers' pos_embed stays anchored (ATSC.md: every teacher weight with more than one dimension)
    anchored = {names[id(p)] for g in opt.param_groups if g.get("anchor") for p in g["params"]}
    assert "teachers.0.pos_embed" in anchored and "teachers.0.blocks.0.attn.qkv.weight" in anchored
    # as timm sorts the student alone
    from timm.optim import param_groups_weight_decay
    timm_exempt = {id(p) for g in param_groups_weight_decay(student, 0.05, no_weight_decay_list=student.no_weight_decay())
                   if g["weight_decay"] == 0 for p in g["params"]}
    assert {i for i in timm_exempt} == {id(p) for p in student.parameters() if decay_of.get(id(p)) == 0}
    # frozen teachers decay nothing, and adapting ones get their exempt groups' 0 back, not the recipe's
    set_teachers_trainable(opt, False)
    assert all(g["weight_decay"] == 0 for g in opt.param_groups if g["role"] == "teacher")
    set_teachers_trainable(opt, True)
    assert {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]} == exempt


def test_decay_on_every_weight_unless_asked():
    student, teachers = models()
    r = recipe()
    d = build_distiller(r, student, teachers, STUDENT_PRE)
    groups = decay_groups(d.param_groups(), d.parts(), r.optim)
    opt = build_optimizer(groups, r.optim, anchor_weight=1.0)
    set_teachers_trainable(opt, True)
    assert all(g["weight_decay"] == r.optim.weight_decay for g in opt.param_groups)


def test_the_vit_recipe_uses_timms_groups_and_the_paper_recipes_do_not():
    from pathlib import Path

    from harness.recipe import load_recipe

    root = Path(__file__).resolve().parents[1] / "recipes"
    assert load_recipe(str(root / "imagenet-vitl-vits.yaml"), [], check_files=False).optim.decay_groups == "timm"
    for path in [root / "imagenet.yaml", *sorted((root / "cifar100").glob("*-*.yaml"))]:
        assert load_recipe(str(path), [], check_files=False).optim.decay_groups == "all", path


# ----------------------------------------------------------------------------- what DDP reduces


def _shipped_configs() -> list[tuple[str, list[str]]]:
    """Every shipped recipe with its models small enough for CPU (test_recipes' stand-ins; the
    ImageNet-sized ResNet recipe on test_resnet), 10 classes: (name, overrides)."""
    from test_recipes import RECIPES, ROOT, STAND_INS

    from harness.recipe import load_recipe

    configs = []
    for path in RECIPES:
        name = str(path.relative_to(ROOT / "recipes"))[:-len(".yaml")]
        student, teachers, extra = STAND_INS.get(name, ("test_resnet", ["test_resnet"], ["data.image_size=32"])
                                                 if name == "imagenet" else (None, [], []))
        sets = ["data.num_classes=10", "data.batch_size=4", "runtime.ema=null", *extra]
        sets += [f"student.model={student}"] if student else []
        sets += [f"teachers.{k}.model={t}" for k, t in enumerate(teachers)]
        for k in range(len(load_recipe(path, check_files=False).teachers)):  # no weights are read: random ones
            sets += [f"teachers.{k}.hub=null", f"teachers.{k}.checkpoint=unused.pth"]
        configs.append((str(path), sets))
    return configs


def _ddp_worker(rank: int, world: int, init: str, configs: list, out: str) -> None:
    import json
    import os
    import warnings

    import torch.distributed as dist

    from harness.build import build_method
    from harness.distributed import Runtime
    from harness.bias_step import two_pass_bias_step
    from harness.ddp_engine import DDPEngine
    from harness.recipe import load_recipe

    # PyTorch's DDP warnings come from C++ (once per process), to the process's stderr
    log = open(f"{out}.stderr{rank}", "w")
    os.dup2(log.fileno(), 2)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    rt = Runtime(device=torch.device("cpu"), rank=rank, world_size=world, local_rank=rank, bf16=False, zero_stage=0)
    report = {}
    for path, sets in configs:
        r = load_recipe(path, sets, check_files=False)
        torch.manual_seed(0)
        d, _ = build_method(r, load_weights=False)
        opt = build_optimizer(decay_groups(d.param_groups(), d.parts(), r.optim), r.optim, r.method.anchor_weight)
        two_pass = r.method.name == "atsc" and r.method.bias_step == "two_pass"
        bias_opt = build_optimizer([{"params": d.bias_parameters(), "role": "teacher"}], r.optim, 0.0) if two_pass else None
        engine = DDPEngine(d, opt, rt, grad_accum=1, grad_clip=None)
        frozen_steps = 2 if r.method.name != "atsc" or r.method.adapt_after > 0 else 0
        size, facts = r.data.image_size, {"steps": []}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(frozen_steps + (2 if r.method.name == "atsc" else 0)):
                if step == frozen_steps and r.method.name == "atsc":  # what trainer.train does when adaptation starts
                    opt.start_adaptation()
                    set_teachers_trainable(opt, True)
                    d.set_adapting(True)
                elif step == 0:
                    set_teachers_trainable(opt, False)
                d.train()
                g = torch.Generator().manual_seed(100 * step + rank)  # each rank its own batch
                x, y = torch.randn(4, 3, size, size, generator=g), torch.randint(0, 10, (4,), generator=g)
                set_lr(opt.param_groups, 0.01)
                loss, _ = engine(x, y)
                engine.backward(loss)
                engine.step()
                if bias_opt is not None and d.adapting:
                    set_lr(bias_opt.param_groups, 0.01)
                    two_pass_bias_step(d, bias_opt, x, y, rt)
                names = {id(p): n for n, p in d.named_parameters()}
                reduced = {names[id(p)] for p in engine.ddp._module_parameters if id(p) in names}
                facts["steps"].append({"adapting": d.adapting, "find_unused": engine.ddp.find_unused_parameters,
                                       "teachers_reduced": sorted(n for n in reduced if n.startswith("teachers.")),
                                       "head_reduced": sorted(n for n in reduced if n.startswith("student.")
                                                              and n in _head_names(d))})
        facts["warnings"] = [str(w.message) for w in caught if "unused" in str(w.message)]
        checksum = torch.stack([p.detach().double().sum() for p in d.parameters()])
        gathered = [torch.zeros_like(checksum) for _ in range(world)]
        dist.all_gather(gathered, checksum)
        facts["ranks_agree"] = all(torch.equal(gathered[0], t) for t in gathered[1:])
        facts["method"], facts["ce_kd"] = r.method.name, bool(r.method.ce_weight or r.method.kd_weight)
        report[path] = facts
    if rank == 0:
        with open(out, "w") as f:
            json.dump(report, f)
    dist.destroy_process_group()


def _head_names(d) -> set[str]:
    head = d.student.get_classifier()
    return {f"student.{n}" for n, p in d.student.named_parameters() if any(p is q for q in head.parameters())}


def test_ddp_reduces_only_what_a_step_reaches_in_every_shipped_recipe(tmp_path):
    """Two processes, every shipped recipe's method and model families: DDP never searches for
    unused parameters (and PyTorch never warns that it found none), frozen teachers and the
    unused own head are not reduced, adapting teachers are, and both ranks end with the same
    weights (nothing that got a gradient was left out of the reduction)."""
    import json

    import torch.multiprocessing as mp

    out = tmp_path / "report.json"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), _shipped_configs(), str(out)), nprocs=2, join=True)
    report = json.loads(out.read_text())
    assert len(report) >= 20
    for rank in range(2):
        assert "unused parameters" not in (tmp_path / f"report.json.stderr{rank}").read_text()
    for path, facts in report.items():
        assert facts["warnings"] == [], path
        assert facts["ranks_agree"], path
        for step in facts["steps"]:
            assert step["find_unused"] is False, path
            if not step["adapting"]:
                assert step["teachers_reduced"] == [], path
            else:
                assert step["teachers_reduced"], path
            if facts["method"] in ("simkd", "atsc") and not facts["ce_kd"]:
                assert step["head_reduced"] == [], path


# ----------------------------------------------------------------------------- evaluation once per thing


class _Loader:
    """A validation loader's interface (``epoch``, ``shards.check_evaluated``) over fixed batches."""

    def __init__(self, batches):
        self.batches, self.shards = batches, self
        self.checked = None

    def epoch(self, epoch):
        return iter(self.batches)

    def check_evaluated(self, samples):
        self.checked = samples


class _Counting(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x):
        self.calls += 1
        return self.model(x)


def _cpu_runtime():
    from harness.distributed import Runtime

    return Runtime(device=torch.device("cpu"), rank=0, world_size=1, local_rank=0, bf16=False, zero_stage=0)


def test_the_ema_is_evaluated_without_swapping_weights_at_stages_0_to_2(monkeypatch):
    from harness.ema import EmaWeights, StudentEma
    from harness.evaluation import evaluate

    torch.manual_seed(0)
    student = timm.create_model("test_resnet", num_classes=10)
    ema = StudentEma(student, 0, decay=0.5)
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    for step in range(1, 4):
        x, y = batch(8)
        torch.nn.functional.cross_entropy(student(x + step), y).backward()
        opt.step()
        opt.zero_grad()
        ema.update(step)
    batches = [batch(8) for _ in range(3)]
    with ema.applied():  # the reference: the student holding the averages
        reference = evaluate({"m": student}, batches, _cpu_runtime(), 32)["m"]
    live = [p.detach().clone() for p in student.parameters()]
    monkeypatch.setattr(StudentEma, "applied", lambda self: pytest.fail("the EMA was swapped into the student"))
    got = evaluate({"student": student, "student_ema": EmaWeights(ema)}, batches, _cpu_runtime(), 32)
    assert got["student_ema"] == reference
    assert all(torch.equal(a, b) for a, b in zip(live, student.parameters()))  # the student's own, untouched
    before = [p.detach().clone() for p in ema.copy.parameters()]
    ema.update(4)  # the averages are the copy's own tensors: an update is what the next evaluation sees
    assert any(not torch.equal(a, b) for a, b in zip(before, ema.copy.parameters()))


def test_frozen_teachers_are_evaluated_once_and_adapted_ones_every_time():
    from harness.trainer import evaluate_run

    torch.manual_seed(0)
    student, teacher = _Counting(timm.create_model("test_resnet", num_classes=10)), \
        _Counting(timm.create_model("test_resnet", num_classes=10))
    loader = _Loader([batch(8) for _ in range(2)])
    models = {"student": student, "0:test_resnet": teacher}
    loaded = {"0:test_resnet": {"top1": 0.123, "top5": 0.5, "samples": 16}}
    frozen = evaluate_run(models, {"adapting": False, "teachers_loaded": loaded}, loader, _cpu_runtime(), 32)
    assert teacher.calls == 0 and student.calls == 2 and loader.checked == 16
    assert frozen["0:test_resnet"] == loaded["0:test_resnet"] and list(frozen) == list(models)
    adapted = evaluate_run(models, {"adapting": True, "teachers_loaded": loaded}, loader, _cpu_runtime(), 32)
    assert teacher.calls == 2 and adapted["0:test_resnet"] != loaded["0:test_resnet"]


def test_the_best_checkpoint_kept_is_one_that_was_saved(tmp_path, digits):
    """Evaluated every epoch, saved every second: a student that cannot change (no BatchNorm, lr
    ~0) scores the same every epoch, so the first evaluation is the best by top-1, but it was
    never saved: the best kept is the first saved epoch, and it survives pruning."""
    from conftest import launch, records, tiny_recipe

    recipe = tiny_recipe(tmp_path, digits, "best", student={"model": "test_vit", "model_kwargs": {"img_size": 16}},
                         data={"train_samples": 64}, optim={"lr": 1.0e-12, "weight_decay": 0.0},
                         schedule={"epochs": 4}, runtime={"eval_every": 1, "checkpoint_every": 2, "keep_checkpoints": 1})
    result = launch([str(recipe)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    evals = [r["student"]["top1"] for r in records(tmp_path / "best", "eval") if "student" in r]
    assert len(evals) == 4 and len(set(evals)) == 1
    kept = sorted(p.name for p in (tmp_path / "best" / "checkpoints").iterdir() if p.is_dir())
    assert kept == ["epoch0002", "epoch0004"]  # the newest, and the best, which was saved
    state = torch.load(tmp_path / "best" / "checkpoints" / "epoch0004" / "mp_rank_00_model_states.pt", weights_only=False)
    assert state["harness"]["best_tag"] == "epoch0002"
