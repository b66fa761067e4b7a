"""The student EMA (harness/ema.py): timm's rule, by hand and against timm; exact resume; export; refusals."""
import copy

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.utils.model_ema import ModelEmaV3
from torch import nn

from conftest import launch, records, summary, tiny_recipe
from harness.ema import EmaWeights, StudentEma


@pytest.mark.parametrize("kwargs", [{"decay": 0.9}, {"decay": 0.999, "warmup": True},
                                    {"decay": 0.99, "warmup": True, "warmup_gamma": 3.0, "warmup_power": 0.75,
                                     "update_after": 4}])
def test_decay_is_timms_model_ema_v3(kwargs):
    ours = StudentEma(nn.Linear(2, 2), 0, **kwargs)
    timms = ModelEmaV3(nn.Linear(2, 2), decay=kwargs["decay"], use_warmup=kwargs.get("warmup", False),
                       warmup_gamma=kwargs.get("warmup_gamma", 1.0), warmup_power=kwargs.get("warmup_power", 2 / 3),
                       update_after_step=kwargs.get("update_after", 0))
    for step in range(0, 200):
        assert ours.decay_at(step) == timms.get_decay(step), step


def test_update_by_hand():
    layer = nn.Linear(1, 1, bias=False)
    ema = StudentEma(layer, 0, decay=0.5)
    expected = layer.weight.item()
    for step, value in enumerate([2.0, 4.0, 8.0], start=1):
        layer.weight.data.fill_(value)
        ema.update(step)
        decay = 0.0 if step == 1 else 0.5  # timm's first update copies the weights
        expected = decay * expected + (1 - decay) * value
        assert ema.shadow[0].item() == pytest.approx(expected)
    assert layer.weight.item() == 8.0  # the model is untouched


def test_matches_timm_on_a_trained_model_with_batchnorm():
    """Parameters and BatchNorm statistics, step for step, as timm's ModelEmaV3 averages them."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=5)
    ema = StudentEma(model, 0, decay=0.8, warmup=True)
    reference = ModelEmaV3(model, decay=0.8, use_warmup=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(1, 6):
        x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update(step)
        reference.update(model, step=step)
    before = copy.deepcopy(model.state_dict())
    with ema.applied():
        averaged = copy.deepcopy(model.state_dict())
    for key, value in reference.module.state_dict().items():
        if value.is_floating_point():
            assert torch.equal(averaged[key], value), key
    for key, value in model.state_dict().items():  # afterwards the model's own weights, bit for bit
        assert torch.equal(value, before[key]), key
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(EmaWeights(ema)(x), reference.module.eval()(x))


def test_state_dict_round_trip_and_mismatch():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = StudentEma(model, 0, decay=0.5)
    ema.shadow[0].add_(1.0)
    other = StudentEma(copy.deepcopy(model), 0)
    other.load_state_dict(ema.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(other.shadow, ema.shadow))
    with pytest.raises(ValueError, match="does not match"):
        StudentEma(nn.Linear(3, 5), 0).load_state_dict(ema.state_dict())


def ema_recipe(work, digits, teacher, name, **runtime):
    return tiny_recipe(work, digits, name, teachers=[{"model": "test_resnet", "checkpoint": str(teacher)}],
                       method={"name": "atsc", "anchor_weight": 1.0, "adapt_after": 1},
                       schedule={"epochs": 2, "name": "cosine"},
                       runtime={"log_every": 5, "ema": {"decay": 0.95, "warmup": True}, **runtime})


def test_resume_mid_epoch_continues_the_ema_exactly_and_exports_it(work, digits, teacher):
    from harness.export import evaluate_file, load_student

    straight = ema_recipe(work, digits, teacher, "ema-straight")
    assert launch([str(straight)], cwd=work).returncode == 0
    stopped = ema_recipe(work, digits, teacher, "ema-resumed")
    assert launch([str(stopped), "--stop-after-steps", "30"], cwd=work).returncode == 0  # mid-epoch 2, adapting
    assert launch([str(stopped), "--resume"], cwd=work).returncode == 0
    a, b = load_file(str(work / "ema-straight" / "student-ema.safetensors")), \
        load_file(str(work / "ema-resumed" / "student-ema.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    raw = load_file(str(work / "ema-straight" / "student.safetensors"))
    assert any(not torch.equal(a[k], raw[k]) for k in raw if raw[k].is_floating_point())  # an average, not a copy

    s = summary(work / "ema-straight")
    assert s["student_ema"]["samples"] == 359 and s["student_ema"]["top1"] > 0.5
    evals = records(work / "ema-straight", "eval")
    assert all("student_ema" in r for r in evals if "student" in r)
    model = load_student(work / "ema-straight" / "student-ema.safetensors")  # the export loads as any student
    assert isinstance(model, nn.Module)
    assert evaluate_file(work / "ema-straight" / "student-ema.safetensors", str(digits / "val"))["top1"] == \
        pytest.approx(s["student_ema"]["top1"], abs=1e-9)


def test_resume_with_ema_from_a_checkpoint_without_one_is_refused(work, digits, teacher):
    recipe = tiny_recipe(work, digits, "ema-missing", schedule={"epochs": 2, "name": "cosine"})
    assert launch([str(recipe), "--stop-after-epochs", "1"], cwd=work).returncode == 0
    refused = launch([str(recipe), "--resume", "--set", "runtime.ema.decay=0.9"], cwd=work)
    assert refused.returncode != 0
    assert "holds no EMA of the student" in refused.stderr and "runtime.ema=null" in refused.stderr
    assert 'harness/run.py", line' not in refused.stderr  # one message, no traceback of ours


POISON_ONE_BATCH = """
import sys
sys.path.insert(0, {root!r})
from harness import run, trainer

build_loaders = trainer.build_loaders

def poisoned_loaders(*args, **kwargs):  # batch 7 of the first epoch is all NaN: a non-finite loss, NaN BatchNorm statistics
    train, val = build_loaders(*args, **kwargs)
    epoch = train.epoch

    def batches(number, resume=None):
        for i, (x, y) in enumerate(epoch(number, resume)):
            yield (x * float("nan") if number == 0 and i == 7 else x), y

    train.epoch = batches
    return train, val

trainer.build_loaders = poisoned_loaders
if __name__ == "__main__":  # not in the loader workers, which import this module as their __main__
    sys.exit(run.main())
"""


def test_a_skipped_non_finite_step_leaves_every_ema_average_finite(work, digits):
    from conftest import LAUNCH_ENV, ROOT, launch_command
    import subprocess

    recipe = tiny_recipe(work, digits, "ema-nan", schedule={"epochs": 1},
                         runtime={"log_every": 5, "signal_check_every": 5, "ema": {"decay": 0.9}})
    script = work / "poison_one_batch.py"
    script.write_text(POISON_ONE_BATCH.format(root=str(ROOT)))
    cmd = [str(script) if c == str(ROOT / "harness" / "run.py") else c for c in launch_command([str(recipe)])]
    result = subprocess.run(cmd, cwd=work, env=LAUNCH_ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    run = work / "ema-nan"
    assert records(run, "nonfinite")[0]["skipped"] == 1  # the poisoned step was met and skipped
    averaged = load_file(str(run / "student-ema.safetensors"))
    bad = [k for k, v in averaged.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    assert not bad, bad  # BatchNorm statistics included
    assert summary(run)["student_ema"]["top1"] > 0.3
