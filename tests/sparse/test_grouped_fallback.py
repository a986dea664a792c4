"""A failing grouped_mm schedule (the CUDA default) falls back to the measured schedule: the same results,
one warning, and no second try in the process."""

from __future__ import annotations

import warnings

import pytest
import torch

from calopc.sparse import functional as Fs
from calopc.sparse.kernel import kernel_map, output_coords
from calopc.sparse.nn import SparseConv3d


def _conv_and_grads(x, conv):
    feats = x.feats.detach().clone().requires_grad_(True)
    conv.zero_grad()
    y = conv(x.replace(feats))
    (y.feats * torch.linspace(-1, 1, y.feats.numel()).view_as(y.feats)).sum().backward()
    return y.feats.detach(), feats.grad, conv.weight.grad.clone()


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_a_failing_grouped_schedule_falls_back_once_and_says_so(sparse_factory, monkeypatch, where):
    torch.manual_seed(0)
    x = sparse_factory(shape=(6, 8, 5), batch=3, channels=4, occupancy=0.4)
    conv = SparseConv3d(4, 8, 3, 2, output="stride")
    monkeypatch.setattr(Fs, "EXECUTION", "loop")
    ref = _conv_and_grads(x, conv)

    monkeypatch.setattr(Fs, "EXECUTION", "grouped")
    monkeypatch.setattr(Fs, "GROUPED_FAILED", None)
    calls = {"n": 0}
    grouped_mm = torch.nn.functional.grouped_mm

    def failing(*a, **k):
        calls["n"] += 1
        if where == "forward" or calls["n"] > 1:       # "backward": the forward pass's call works
            raise RuntimeError("no kernel image is available for execution on the device\nsecond line")
        return grouped_mm(*a, **k)

    monkeypatch.setattr(torch.nn.functional, "grouped_mm", failing)
    with pytest.warns(RuntimeWarning, match=r"grouped_mm schedule failed on cpu \(RuntimeError: no kernel image "
                                            r"is available for execution on the device\); using the loop schedule"):
        got = _conv_and_grads(x, conv)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    tried = calls["n"]
    assert tried == (1 if where == "forward" else 2)
    assert Fs.GROUPED_FAILED.startswith("RuntimeError: no kernel image")
    out = output_coords(x, conv.kernel, conv.stride, conv.padding, True, conv.output)
    km = kernel_map(x, out, conv.kernel, conv.stride, conv.padding, True)
    assert Fs.schedule(km, x.feats, 4, 8, False) == "loop"     # remembered for the process
    with warnings.catch_warnings():
        warnings.simplefilter("error")                          # no second warning
        again = _conv_and_grads(x, conv)
    assert calls["n"] == tried                                  # and no second try
    for a, b in zip(again, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
