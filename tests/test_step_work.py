"""What a training step does and does not do: the anchored optimizer's work, timm's weight-decay
groups, which parameters DDP reduces, and an evaluation that does each thing once."""
import pytest
import timm
import torch
from torch import nn

from harness.build import build_distiller
from harness.optim import AnchoredAdamW, AnchoredSGD, build_optimizer, decay_groups, set_lr, set_teachers_trainable
from tests.test_method import STUDENT_PRE, batch, models, recipe


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
