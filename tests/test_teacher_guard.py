"""ATSC's adapting teachers: watched (their own training CE and top-1), guarded, and the remedies that keep them.

Modules and the guard by hand here; whole runs (a teacher that collapses, at 2 processes and
every ZeRO stage, stopped and resumed) in tests/test_teacher_guard_runs.py.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness.build import build_distiller
from harness.method import teacher_fit
from harness.optim import build_optimizer, set_lr, set_teachers_trainable
from harness.recipe import TeacherGuard as GuardConfig
from harness.teacher_guard import TeacherGuard, TeacherWatch, watch_state_for
from test_method import STUDENT_PRE, anchored_at_w0, batch, models, recipe

BATCHNORM = nn.modules.batchnorm._BatchNorm


def step_values(watch: TeacherWatch, top1: float, ce: float = 0.5, skipped: float = 0.0, micro: int = 1) -> None:
    for _ in range(micro):
        watch.add({"teacher0_ce": torch.tensor(ce), "teacher0_top1": torch.tensor(top1)})
    watch.close_step(torch.tensor(skipped))


# ----------------------------------------------------------------------------- the method's measurements


def test_an_adapting_teacher_reports_its_own_ce_and_top1_on_the_batch():
    student, teachers = models()
    d = build_distiller(recipe(), student, teachers, STUDENT_PRE)
    x, y = batch(16)
    d.set_adapting(False)
    d.train()
    assert not any(k.startswith("teacher0_") for k in d(x, y)[1])  # frozen: nothing to watch
    d.set_adapting(True)
    d.train()
    _, terms = d(x, y)
    logits = teachers[0](x)  # train mode, same batch: the same statistics as in the step
    assert terms["teacher0_ce"].item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert terms["teacher0_top1"].item() == pytest.approx((logits.argmax(-1) == y).float().mean().item())
    # fused mode: the bias step's CE is the teacher's own CE
    assert terms["teacher0_ce"].item() == pytest.approx(terms["bias0"].item(), rel=1e-6)
    assert not terms["teacher0_ce"].requires_grad and not terms["teacher0_top1"].requires_grad


def test_a_mixed_batch_counts_a_teacher_right_by_the_larger_label():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    mixed = torch.tensor([[0.7, 0.3], [0.4, 0.6], [0.2, 0.8]])
    ce, top1 = teacher_fit(logits, mixed)
    assert top1.item() == pytest.approx(2 / 3)
    assert ce.item() == pytest.approx(F.cross_entropy(logits, mixed).item())


# ----------------------------------------------------------------------------- the watch


def test_the_start_level_is_the_first_window_and_the_smoothed_value_an_exponential_average():
    watch = TeacherWatch(1, window=4, device=torch.device("cpu"))
    values = [0.9, 1.0, float("nan"), 0.8, 0.9, 0.5, 0.4]
    skips = [0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]  # a skipped step (its NaN included) adds nothing
    for v, s in zip(values, skips):
        step_values(watch, v, skipped=s, micro=2)
    start, smoothed, start_steps = watch.averaged()
    kept = [v for v, s in zip(values, skips) if not s]
    assert start_steps == 4 and start[0, 1].item() == pytest.approx(sum(kept[:4]) / 4)
    expected = kept[0]
    for v in kept[1:]:
        expected += (v - expected) / 4
    assert smoothed[0, 1].item() == pytest.approx(expected, rel=1e-6)
    assert smoothed[0, 0].item() == pytest.approx(0.5)  # CE alike


def test_the_watch_state_round_trips_and_merges_at_another_world_size():
    watch = TeacherWatch(2, window=3, device=torch.device("cpu"))
    for v in (0.9, 0.8, 0.7, 0.2):
        for _ in range(1):
            watch.add({"teacher0_ce": torch.tensor(1.0), "teacher0_top1": torch.tensor(v),
                       "teacher1_ce": torch.tensor(2.0), "teacher1_top1": torch.tensor(1 - v)})
        watch.close_step(torch.tensor(0.0))
    again = TeacherWatch(2, window=3, device=torch.device("cpu"))
    again.load_state_dict(watch.state_dict())
    step_values_both = {"teacher0_ce": torch.tensor(1.0), "teacher0_top1": torch.tensor(0.1),
                        "teacher1_ce": torch.tensor(2.0), "teacher1_top1": torch.tensor(0.9)}
    for w in (watch, again):
        w.add(step_values_both)
        w.close_step(torch.tensor(0.0))
    assert all(torch.equal(a, b) for a, b in zip(watch.averaged()[:2], again.averaged()[:2]))
    # saved by 2 ranks, resumed by 1: the mean of the two, which is what the guard read before
    other = {**watch.state_dict(), "smoothed": [[0.0, 0.0], [0.0, 0.0]]}
    merged = watch_state_for([watch.state_dict(), other], 0)
    assert merged["smoothed"][0][1] == pytest.approx(watch.state_dict()["smoothed"][0][1] / 2)
    assert watch_state_for([watch.state_dict()], 0) == watch.state_dict()


# ----------------------------------------------------------------------------- the guard


def guard_for(action: str, max_drop: float = 5.0, window: int = 3):
    frozen = []
    watch = TeacherWatch(1, window=window, device=torch.device("cpu"))
    guard = TeacherGuard(GuardConfig(max_drop=max_drop, action=action, window=window), ["0:resnet"], watch,
                         frozen.append)
    return guard, watch, frozen


def test_the_guard_waits_for_the_start_level_then_trips_once_naming_teacher_step_and_values():
    guard, watch, frozen = guard_for("freeze", max_drop=5.0, window=3)
    for v in (0.99, 0.99):
        step_values(watch, v)
    fields, trips = guard.read(step=2, epoch=0)
    assert trips == [] and fields["0:resnet"]["top1_start"] == pytest.approx(0.99)  # the window is not complete
    for v in (0.99, 0.96, 0.95):
        step_values(watch, v)
    assert guard.read(step=5, epoch=0)[1] == []  # smoothed 0.975: 1.5 points down, within 5
    for v in (0.2, 0.2, 0.2):
        step_values(watch, v)
    fields, trips = guard.read(step=8, epoch=1)
    assert len(trips) == 1
    trip = trips[0]
    assert trip["teacher"] == "0:resnet" and trip["step"] == 8 and trip["action"] == "freeze"
    assert trip["top1_start"] == pytest.approx(0.99) and trip["top1_smoothed"] == pytest.approx(fields["0:resnet"]["top1_smoothed"])
    assert trip["drop_points"] > 5
    message = guard.message(trip)
    assert "0:resnet" in message and "step 8" in message and "99.00%" in message and "max_drop" in message
    assert guard.act(trip) is None and frozen == [0]
    step_values(watch, 0.1)
    assert guard.read(step=9, epoch=1)[1] == []  # once per teacher
    assert guard.load_state_dict(guard.state_dict()) == [trip]


def test_stop_returns_the_message_that_names_the_way_on_and_warn_does_nothing():
    guard, watch, frozen = guard_for("stop", window=1)
    for v in (1.0, 0.0, 0.0):
        step_values(watch, v)
    (trip,) = guard.read(step=3, epoch=0)[1]
    message = guard.act(trip)
    assert "--resume" in message and "method.teacher_guard.action=freeze" in message and frozen == []
    guard.config = GuardConfig(action="warn")
    assert guard.act(trip) is None and frozen == []


def test_without_a_guard_the_teachers_are_still_watched_and_never_tripped():
    watch = TeacherWatch(1, window=1, device=torch.device("cpu"))
    guard = TeacherGuard(None, ["0:resnet"], watch, lambda k: pytest.fail("froze"))
    for v in (1.0, 0.0, 0.0):
        step_values(watch, v)
    fields, trips = guard.read(step=3, epoch=0)
    assert trips == [] and fields["0:resnet"]["top1_smoothed"] < 0.5


def test_the_guard_is_on_for_atsc_by_default_and_can_be_switched_off():
    assert recipe().method.teacher_guard == GuardConfig()
    assert GuardConfig().action == "freeze" and GuardConfig().max_drop == 2.0
    assert recipe(teacher_guard=None).method.teacher_guard is None
    with pytest.raises(ValueError, match="action"):
        recipe(teacher_guard={"action": "pause"})


# ----------------------------------------------------------------------------- freezing one teacher


def test_freezing_one_teacher_zeroes_its_lr_only_and_puts_it_in_eval_mode():
    student, teachers = models(teachers=("test_resnet", "test_resnet"))
    d = build_distiller(recipe(teachers=("test_resnet", "test_resnet")), student, teachers, STUDENT_PRE)
    opt = build_optimizer(d.param_groups(), recipe().optim, anchor_weight=1.0)
    d.set_adapting(True)
    set_teachers_trainable(opt, True)
    set_teachers_trainable(opt, False, teacher=1)
    d.hold_teacher(1)
    d.train()
    set_lr(opt.param_groups, 0.1)
    by_teacher = {g.get("teacher"): g["lr"] for g in opt.param_groups if g["role"] == "teacher"}
    assert by_teacher == {0: 0.1, 1: 0.0}
    assert teachers[0].training and not teachers[1].training and student.training
    before = [p.detach().clone() for p in teachers[1].parameters()]
    stats = teachers[1].bn1.running_mean.clone()
    opt.start_adaptation()
    x, y = batch()
    d(x, y)[0].backward()
    opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, teachers[1].parameters()))
    assert torch.equal(stats, teachers[1].bn1.running_mean)
    assert not torch.equal(teachers[0].bn1.weight, models()[1][0].bn1.weight)  # the other one adapts


# ----------------------------------------------------------------------------- the remedies


def test_teacher_bn_eval_keeps_running_statistics_and_trains_scale_and_shift():
    student, teachers = models()
    d = build_distiller(recipe(teacher_bn="eval"), student, teachers, STUDENT_PRE)
    d.set_adapting(True)
    d.train()
    bns = [m for m in teachers[0].modules() if isinstance(m, BATCHNORM)]
    assert bns and not any(m.training for m in bns) and teachers[0].training
    stats = [m.running_mean.clone() for m in bns]
    x, y = batch()
    d(x, y)[0].backward()
    assert all(torch.equal(s, m.running_mean) for s, m in zip(stats, bns))
    assert all(m.weight.grad is not None for m in bns)
    in_groups = {id(p) for g in d.param_groups() for p in g["params"]}
    assert all(id(m.weight) in in_groups for m in bns)
    d.eval()
    d.train()  # back from an evaluation: still eval statistics
    assert not any(m.training for m in bns)


def test_teacher_bn_frozen_leaves_scale_and_shift_out_of_the_optimizer():
    student, teachers = models()
    d = build_distiller(recipe(teacher_bn="frozen"), student, teachers, STUDENT_PRE)
    d.set_adapting(True)
    d.train()
    bn_params = {id(p) for m in teachers[0].modules() if isinstance(m, BATCHNORM) for p in m.parameters()}
    assert bn_params
    in_groups = {id(p) for g in d.param_groups() for p in g["params"]}
    assert not bn_params & in_groups
    assert {id(p) for p in teachers[0].parameters()} - bn_params <= in_groups  # the rest adapts
    assert not any(m.training for m in teachers[0].modules() if isinstance(m, BATCHNORM))


def test_anchor_scope_all_holds_every_teacher_parameter_near_w0():
    student, teachers = models()
    d = build_distiller(recipe(anchor_scope="all"), student, teachers, STUDENT_PRE)
    groups = [g for g in d.param_groups() if g["role"] == "teacher"]
    anchored = [p for g in groups if g["anchor"] for p in g["params"]]
    assert {id(p) for p in anchored} == {id(p) for p in teachers[0].parameters()}
    opt = anchored_at_w0(d, 3.0)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(0.1)
    opt.step()
    shift = teachers[0].bn1.bias  # a BatchNorm shift: pulled back by 2 w (p - p0) = 0.6, as a weight is
    assert torch.allclose(shift - models()[1][0].bn1.bias, torch.full_like(shift, 0.1 - 0.6), atol=1e-5)


@pytest.mark.parametrize("mult", [0.0, 0.1])
def test_teacher_lr_mult_scales_every_teacher_group(mult):
    student, teachers = models()
    r = recipe(teacher_bn="eval")
    r.optim.teacher_lr_mult = mult
    d = build_distiller(r, student, teachers, STUDENT_PRE)
    opt = build_optimizer(d.param_groups(), r.optim, anchor_weight=1.0)
    set_teachers_trainable(opt, True)
    set_lr(opt.param_groups, 0.2)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(0.2 * mult if g["role"] == "teacher" else 0.2)
