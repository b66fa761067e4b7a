"""Non-finite losses: the step is skipped on the device, counted, and BatchNorm statistics repaired."""
import math

import pytest
import torch
from torch import nn

from harness.guard import NonFiniteGuard
from harness.optim import AnchoredAdamW, AnchoredSGD


def make(opt_cls, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(2, 3, 6, 6))
    opt = opt_cls(model.parameters(), lr=0.1, weight_decay=0.1, fused=True, **kw)
    return model, opt, NonFiniteGuard(model, [opt], torch.device("cpu"))


def train_step(model, opt, guard, x):
    loss = model(x).square().mean()
    guard.observe(loss)
    loss.backward()
    opt.step()
    opt.zero_grad()
    guard.stepped()


@pytest.mark.parametrize("opt_cls,kw", [(AnchoredSGD, {"momentum": 0.9}), (AnchoredAdamW, {})])
def test_a_nan_step_changes_nothing_and_is_counted(opt_cls, kw):
    model, opt, guard = make(opt_cls, **kw)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    nan_batch = torch.full((2, 3, 6, 6), math.nan)
    train_step(model, opt, guard, nan_batch)  # the very first step: no optimizer state yet
    params = dict(model.named_parameters())
    for name, p in params.items():
        assert torch.equal(p, before[name]), name
        for value in opt.state[p].values():  # fresh state, not uninitialised memory
            assert torch.isfinite(value).all() and not value.count_nonzero(), name
    assert not torch.isfinite(model[1].running_mean).all()  # the forward poisoned the statistics...
    assert guard.check() == (1, 1)
    assert torch.equal(model[1].running_mean, before["1.running_mean"])  # ...and the check restored them

    train_step(model, opt, guard, torch.randn(2, 3, 6, 6))
    assert not torch.equal(params["0.weight"], before["0.weight"])  # a finite step updates
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert guard.check() == (1, 0)  # one skipped in all, none in a row now


def test_a_skipped_step_matches_not_taking_it():
    """Skipping a NaN step leaves the optimizer exactly where it was: the next steps are unchanged."""
    batches = [torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    model_a, opt_a, guard_a = make(AnchoredSGD, momentum=0.9)
    model_b, opt_b, guard_b = make(AnchoredSGD, momentum=0.9)
    for x in batches:
        train_step(model_a, opt_a, guard_a, x)
    train_step(model_b, opt_b, guard_b, batches[0])
    model_b.eval()  # a NaN batch in eval mode: no BatchNorm update, only the skip is under test
    train_step(model_b, opt_b, guard_b, torch.full_like(batches[0], math.nan))
    model_b.train()
    for x in batches[1:]:
        train_step(model_b, opt_b, guard_b, x)
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name
