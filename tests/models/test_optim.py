"""calopc's RAdam: the updates of torch's multi-tensor RAdam to the bit, no value read back per step, and
state dicts that load into either class."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from calopc.models.opcount import count_dispatch  # noqa: E402
from calopc.models.optim import RAdam  # noqa: E402


def _params(seed: int = 0) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    return [p.detach().clone().requires_grad_() for p in net.parameters()]


def _run(opt: torch.optim.Optimizer, params: list[torch.Tensor], steps: int, seed: int = 1, first: int = 0) -> None:
    """``steps`` updates with the gradients of steps ``first, first + 1, ...`` of a fixed random sequence."""
    for i in range(first, first + steps):
        g = torch.Generator().manual_seed(seed * 1000 + i)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


@pytest.mark.parametrize(("weight_decay", "decoupled"), [(0.0, False), (0.01, False), (0.01, True)])
def test_updates_equal_torchs_multi_tensor_radam(weight_decay, decoupled):
    ours, theirs = _params(), _params()
    kw = {"lr": 1e-2, "weight_decay": weight_decay, "decoupled_weight_decay": decoupled}
    _run(RAdam(ours, **kw), ours, 30)              # 30 steps: the first 5 unrectified, then rectified
    _run(torch.optim.RAdam(theirs, foreach=True, **kw), theirs, 30)
    start = _params()
    assert all(not torch.equal(a, b) for a, b in zip(ours, start))      # the parameters moved
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_a_step_reads_nothing_back():
    params = _params()
    ours, theirs = RAdam(params, lr=1e-3), torch.optim.RAdam(_params(), lr=1e-3, foreach=True)
    _run(ours, params, 2)
    _run(theirs, theirs.param_groups[0]["params"], 2)
    assert count_dispatch(ours.step).syncs == 0
    assert count_dispatch(theirs.step).syncs > 0    # torch reads each step count back


def test_state_dicts_load_into_either_class_and_resume_exactly():
    straight = _params()
    _run(torch.optim.RAdam(straight, lr=1e-2, foreach=True), straight, 12)
    # 7 steps with calopc's, saved; loaded into torch's for 5 more
    p = _params()
    ours = RAdam(p, lr=1e-2)
    _run(ours, p, 7)
    saved = ours.state_dict()
    assert [float(s["step"]) for s in saved["state"].values()] == [7.0] * len(p)
    theirs = torch.optim.RAdam(p, lr=1e-2, foreach=True)
    theirs.load_state_dict(saved)
    _run(theirs, p, 5, first=7)
    assert all(torch.equal(a, b) for a, b in zip(p, straight))
    # and back: torch's state (after 12 steps) into calopc's, which reads each count once
    q = [t.detach().clone().requires_grad_() for t in p]
    again = RAdam(q, lr=1e-2)
    again.load_state_dict(theirs.state_dict())
    for t in q:
        t.grad = torch.ones_like(t)
    assert count_dispatch(again.step).syncs == len(q)
    assert float(again.state_dict()["state"][0]["step"]) == 13.0


def test_unsupported_options_are_refused():
    with pytest.raises(TypeError, match="lr"):
        RAdam(_params(), lr=torch.tensor(1e-3))
    opt = RAdam(_params())
    sd = opt.state_dict()
    sd["param_groups"][0]["capturable"] = True
    with pytest.raises(ValueError, match="capturable"):
        opt.load_state_dict(sd)
