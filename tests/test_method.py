"""The methods as plain modules: projector shapes, each loss term, what moves and what does not."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F

from harness.build import build_distiller
from harness.data import Preprocess
from harness.method import (ConvProjector, MLPProjector, SharedClassifier, align_maps, bias_only_loss, feature_loss, kl_loss)
from harness.models import feature_kind
from harness.optim import build_optimizer, set_lr, set_teachers_trainable
from harness.recipe import Recipe

SIZE = 32
# test_resnet's and test_vit's own normalisation: the teachers' views are the identity
STUDENT_PRE = Preprocess(image_size=SIZE, crop_pct=1.0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def recipe(method: str = "atsc", teachers=("test_resnet",), **method_kw) -> Recipe:
    return Recipe.model_validate({
        "output": "unused", "data": {"train": "x", "val": "x", "num_classes": 10, "image_size": SIZE},
        "student": {"model": "test_resnet"},
        "teachers": [{"model": t, "checkpoint": "unused"} for t in teachers],
        "method": {"name": method, **method_kw}, "optim": {"lr": 0.1}, "schedule": {"epochs": 2},
    })


def models(student="test_resnet", teachers=("test_resnet",)):
    torch.manual_seed(0)
    return (timm.create_model(student, num_classes=10),
            [timm.create_model(t, num_classes=10) for t in teachers])


def batch(n=8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, SIZE, SIZE, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_conv_projector_shapes_and_no_biases():
    p = ConvProjector(96, 256, factor=2)
    assert p(torch.randn(2, 96, 7, 7)).shape == (2, 256, 7, 7)
    convs = [m for m in p if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [128, 128, 256]
    assert [c.kernel_size for c in convs] == [(1, 1), (3, 3), (1, 1)]
    assert all(c.bias is None for c in convs)


def test_mlp_projector_shapes():
    p = MLPProjector(64, 384, factor=2)
    assert p(torch.randn(4, 64)).shape == (4, 384)
    assert [m.out_features for m in p if isinstance(m, torch.nn.Linear)] == [192, 192, 384]


def test_feature_kinds_of_cnn_and_token_models():
    assert feature_kind(timm.create_model("test_resnet"), SIZE) == "map"
    assert feature_kind(timm.create_model("test_vit"), SIZE) == "vector"
    assert feature_kind(timm.create_model("test_convnext"), SIZE) == "vector"  # head has a norm


def test_token_teacher_uses_mlp_projector_and_predicts():
    student, teachers = models(teachers=("test_resnet", "test_vit"))
    d = build_distiller(recipe(teachers=("test_resnet", "test_vit")), student, teachers, STUDENT_PRE)
    assert d.shared.student_taps == ["map", "vector"]
    assert isinstance(d.projectors[0], ConvProjector) and isinstance(d.projectors[1], MLPProjector)
    x, y = batch()
    loss, terms = d(x, y)
    assert set(terms) == {"feature0", "feature1"}
    assert d.deployed()(x).shape == (8, 10)


def test_spatial_alignment_pools_the_larger_map():
    s, t = align_maps(torch.ones(2, 4, 8, 8), torch.ones(2, 6, 4, 4))
    assert s.shape[-2:] == (4, 4) and t.shape[-2:] == (4, 4)
    s, t = align_maps(torch.ones(2, 4, 2, 2), torch.ones(2, 6, 4, 4))
    assert s.shape[-2:] == (2, 2) and t.shape[-2:] == (2, 2)


def test_feature_loss_is_mean_squared_error_by_hand():
    a, b = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    assert feature_loss(a, b).item() == pytest.approx((1 + 0 + 4 + 9) / 4)


def test_kl_loss_by_hand():
    s, t, temp = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), 2.0
    ps, pt = F.softmax(s / temp, -1), F.softmax(t / temp, -1)
    by_hand = (pt * (pt.log() - ps.log())).sum() * temp ** 2
    assert kl_loss(s, t, temp).item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_bias_only_loss_by_hand_and_moves_only_the_bias():
    classifier = torch.nn.Linear(3, 2)
    feats = torch.randn(4, 3, requires_grad=True)
    y = torch.tensor([0, 1, 1, 0])
    loss = bias_only_loss(feats, classifier, y)
    by_hand = F.cross_entropy(feats @ classifier.weight.T + classifier.bias, y)
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
    loss.backward()
    assert classifier.bias.grad is not None and classifier.bias.grad.abs().sum() > 0
    assert classifier.weight.grad is None and feats.grad is None


def test_atsc_loss_terms_match_hand_computation():
    student, teachers = models()
    d = build_distiller(recipe(feature_weight=2.0), student, teachers, STUDENT_PRE)
    d.set_adapting(True)
    d.train()
    x, y = batch()
    loss, terms = d(x, y)
    # recompute by hand from the same modules (BN in train mode: same batch, same statistics)
    h_s, h_t = student.forward_features(x), teachers[0].forward_features(x)
    z, h_t = align_maps(d.projectors[0](h_s), h_t)
    mse = ((z - h_t) ** 2).mean()
    fc = teachers[0].get_classifier()
    ce_bias = F.cross_entropy(h_t.mean((2, 3)) @ fc.weight.T + fc.bias, y)
    assert terms["feature0"].item() == pytest.approx(mse.item(), rel=1e-5)
    assert terms["bias0"].item() == pytest.approx(ce_bias.item(), rel=1e-5)
    assert loss.item() == pytest.approx(2.0 * mse.item() + ce_bias.item(), rel=1e-5)


def test_adapting_teacher_is_not_detached_and_frozen_teacher_gets_no_gradient():
    student, teachers = models()
    d = build_distiller(recipe(), student, teachers, STUDENT_PRE)
    x, y = batch()
    d.set_adapting(False)
    d.train()
    assert not teachers[0].training  # frozen: eval mode, running statistics untouched
    stats = teachers[0].state_dict()["bn1.running_mean"].clone()
    loss, terms = d(x, y)
    assert "bias0" not in terms
    loss.backward()
    assert all(p.grad is None for p in teachers[0].parameters())
    assert torch.equal(stats, teachers[0].state_dict()["bn1.running_mean"])
    assert any(p.grad is not None for p in student.parameters())

    d.zero_grad(set_to_none=True)
    d.set_adapting(True)
    d.train()
    assert teachers[0].training
    d(x, y)[0].backward()
    backbone = [p for n, p in teachers[0].named_parameters() if not n.startswith("fc.")]
    # every backbone weight is in the graph (zero-initialised residual BNs make some grads 0 at init)
    assert all(p.grad is not None for p in backbone)
    assert sum(p.grad.abs().sum() for p in backbone) > 0
    # W_c moves only through anchor and weight decay: its gradient from the loss is exactly zero
    assert torch.count_nonzero(teachers[0].fc.weight.grad) == 0
    assert teachers[0].fc.bias.grad.abs().sum() > 0


def anchored_at_w0(d, anchor_weight: float = 3.0):
    """``d``'s optimizer (lr 1, no momentum or decay) after its first adapted step, which takes W0 and moves nothing."""
    opt_cfg = recipe().optim.model_copy(update={"momentum": 0.0, "weight_decay": 0.0})
    opt = build_optimizer(d.param_groups(), opt_cfg, anchor_weight=anchor_weight)
    set_teachers_trainable(opt, True)
    set_lr(opt.param_groups, 1.0)
    opt.start_adaptation()
    for p in d.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    return opt


def test_anchor_touches_exactly_the_multidimensional_teacher_weights():
    student, teachers = models()
    d = build_distiller(recipe(), student, teachers, STUDENT_PRE)
    opt = anchored_at_w0(d, 3.0)
    before = {n: p.detach().clone() for n, p in d.named_parameters()}
    with torch.no_grad():
        for p in d.parameters():
            p.add_(0.1)
    opt.track_anchor = True
    opt.step()
    by_hand = 3.0 * sum(0.01 * p.numel() for p in teachers[0].parameters() if p.dim() > 1)
    assert opt.anchor_value().item() == pytest.approx(by_hand, rel=1e-4)
    teacher_ids = {id(p) for p in teachers[0].parameters()}
    for name, p in d.named_parameters():
        moved = p.detach() - before[name]
        if id(p) in teacher_ids and p.dim() > 1:
            # gradient 2w(p - p0) = 0.6, lr 1: back by 0.6 from +0.1
            assert torch.allclose(moved, torch.full_like(moved, 0.1 - 0.6), atol=1e-5), name
        else:
            assert torch.allclose(moved, torch.full_like(moved, 0.1), atol=1e-6), name


def test_anchor_reference_survives_an_optimizer_state_round_trip():
    student, teachers = models()
    d = build_distiller(recipe(), student, teachers, STUDENT_PRE)
    opt = build_optimizer(d.param_groups(), recipe().optim, anchor_weight=1.0)
    set_teachers_trainable(opt, True)
    opt.start_adaptation()
    for p in d.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    refs = {i: s["anchor"].clone() for i, s in enumerate(opt.state.values()) if "anchor" in s}
    assert refs
    fresh = build_optimizer(d.param_groups(), recipe().optim, anchor_weight=1.0)
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    restored = {i: s["anchor"] for i, s in enumerate(fresh.state.values()) if "anchor" in s}
    assert refs.keys() == restored.keys() and all(torch.equal(refs[i], restored[i]) for i in refs)
    assert all("momentum_buffer" in s for s in fresh.state.values())


def _one_step(bias_step: str):
    student, teachers = models()
    r = recipe(bias_step=bias_step)
    d = build_distiller(r, student, teachers, STUDENT_PRE)
    d.set_adapting(True)
    d.train()
    groups = d.param_groups()
    opt_cfg = r.optim.model_copy(update={"momentum": 0.0})
    opt = build_optimizer(groups, opt_cfg, anchor_weight=1.0)
    set_teachers_trainable(opt, True)
    set_lr(opt.param_groups, 0.05)
    opt.start_adaptation()
    x, y = batch(16)
    loss, _ = d(x, y)
    loss.backward()
    opt.step()
    if bias_step == "two_pass":
        bias_opt = build_optimizer([{"params": d.bias_parameters(), "role": "teacher"}], opt_cfg, anchor_weight=0.0)
        set_lr(bias_opt.param_groups, 0.05)
        d.bias_loss(x, y).backward()
        bias_opt.step()
    return d


def test_fused_and_two_pass_bias_steps_differ_only_in_the_bias_and_by_little():
    fused, two_pass = _one_step("fused"), _one_step("two_pass")
    fused_params, two_params = dict(fused.named_parameters()), dict(two_pass.named_parameters())
    start = models()[1][0].fc.bias
    for name, p in fused_params.items():
        if name.endswith("fc.bias"):
            step_fused, step_two = p - start, two_params[name] - start
            assert step_fused.abs().sum() > 0 and step_two.abs().sum() > 0
            # the two-pass step sees the teacher after the main update: close, not equal
            assert (step_fused - step_two).norm() <= 0.25 * step_fused.norm()
        else:
            assert torch.equal(p, two_params[name]), name


def test_teacher_view_renormalises_and_resizes_the_same_crop():
    from harness.method import InputView

    student_pre = Preprocess(image_size=32, crop_pct=1.0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    teacher_pre = Preprocess(image_size=48, crop_pct=1.0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    pixels = torch.rand(2, 3, 32, 32)
    as_student = (pixels - 0.5) / 0.5
    view = InputView(student_pre, teacher_pre)
    out = view(as_student)
    assert out.shape == (2, 3, 48, 48)
    expected = (F.interpolate(pixels, size=(48, 48), mode="bilinear", antialias=True, align_corners=False)
                - torch.tensor(teacher_pre.mean).view(1, 3, 1, 1)) / torch.tensor(teacher_pre.std).view(1, 3, 1, 1)
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.equal(InputView(student_pre, student_pre)(as_student), as_student)
