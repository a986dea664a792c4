"""The gather–GEMM–scatter schedules agree, and kernel maps are built once per resolution without per-offset syncs."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from calopc.sparse import functional as Fs
from calopc.sparse import minkowski_available
from calopc.sparse.kernel import kernel_map, output_coords
from calopc.sparse.nn import SparseConv3d, SubMConv3d

SCHEDULES = ["loop", "batched", "grouped", "gather"]


def _run(x, conv, mode, monkeypatch):
    monkeypatch.setattr(Fs, "EXECUTION", mode)
    feats = x.feats.detach().clone().requires_grad_(True)
    conv.zero_grad()
    y = conv(x.replace(feats))
    torch.manual_seed(1)
    g = torch.randn_like(y.feats)
    (y.feats * g).sum().backward()
    return y.feats.detach(), feats.grad, conv.weight.grad.clone()


@pytest.mark.parametrize(("kernel", "stride", "output"), [(3, 1, "same"), (3, 2, "stride"), (2, 2, "stride"),
                                                          (3, 1, "full"), (2, 2, "patch")])
def test_every_schedule_equals_the_loop(sparse_factory, monkeypatch, kernel, stride, output):
    torch.manual_seed(0)
    x = sparse_factory(shape=(6, 8, 5), batch=3, channels=4, occupancy=0.4)
    conv = SparseConv3d(4, 8, kernel, stride, output=output)
    ref = _run(x, conv, "loop", monkeypatch)
    out = output_coords(x, conv.kernel, conv.stride, conv.padding, True, conv.output)
    km = kernel_map(x, out, conv.kernel, conv.stride, conv.padding, True)
    for mode in SCHEDULES[1:]:
        monkeypatch.setattr(Fs, "EXECUTION", mode)
        assert Fs.schedule(km, x.feats, 4, 8, False) == mode  # really that schedule, no silent fallback
        got = _run(x, conv, mode, monkeypatch)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_schedule_choice_and_fallbacks(sparse_factory, monkeypatch):
    x = sparse_factory(shape=(6, 8, 5), batch=2, channels=4, occupancy=0.9)
    out = output_coords(x, (3, 3, 3), (1, 1, 1), (1, 1, 1), True, "same")
    km = kernel_map(x, out, (3, 3, 3), (1, 1, 1), (1, 1, 1), True)
    assert km.symmetric and km.neighbour_table().shape == (27, len(x)) and 0.5 < km.fill <= 1
    monkeypatch.setattr(Fs, "EXECUTION", "auto")
    assert Fs.schedule(km, x.feats, 4, 8, False) == "loop"  # CPU
    assert Fs.schedule(km, x.feats.to("meta"), 4, 8, False) == "loop"
    monkeypatch.setattr(Fs, "EXECUTION", "gather")
    assert Fs.schedule(km, x.feats, 4, 8, True) == "loop"  # transposed: no table schedule
    monkeypatch.setattr(Fs, "EXECUTION", "grouped")
    assert Fs.schedule(km, x.feats.double(), 4, 8, False) == "loop"  # grouped_mm has no float64
    assert Fs.schedule(km, x.feats, 3, 8, False) == "loop"  # rows not a multiple of 16 bytes
    monkeypatch.setattr(Fs, "EXECUTION", "fast")
    with pytest.raises(ValueError, match="EXECUTION must be one of"):
        Fs.schedule(km, x.feats, 4, 8, False)


class _Count(TorchDispatchMode):
    """Counts the aten ops that read device data back to the host (data-dependent sizes)."""

    SYNC = ("nonzero", "_local_scalar_dense", "unique", "masked_select", "repeat_interleave")

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(s in func.__name__ for s in self.SYNC):
            self.n += 1
        return func(*args, **(kwargs or {}))


def test_kernel_map_syncs_once_per_resolution(sparse_factory):
    x = sparse_factory(shape=(8, 8, 6), batch=3, channels=4, occupancy=0.3)
    convs = torch.nn.ModuleList([SubMConv3d(4, 4) for _ in range(6)])
    with _Count() as c:
        y = x
        for conv in convs:
            y = conv(y)
    # one map for all six submanifold layers, built with one nonzero (a per-offset build would need 27)
    assert c.n == 1, c.n
    maps = [k for k in x.ctx if k[0] == "kmap"]
    assert len(maps) == 1
    with _Count() as c:  # a strided layer: the coarse cells (unique) and one more map
        SparseConv3d(4, 4, 2, 2)(y)
    assert c.n <= 4, c.n


@pytest.mark.parametrize("backend", ["torch", pytest.param("minkowski", marks=pytest.mark.skipif(
    not minkowski_available(), reason="MinkowskiEngine not installed"))])
@pytest.mark.parametrize("shape", [(6, 8, 5), (7, 9, 4)])
def test_patch_conv_equals_dense_on_the_ceil_grid(sparse_factory, shape, backend):
    """kernel = stride, padding 0, grid ceil(D / s): the dense conv of the input zero-padded at the far ends."""
    torch.manual_seed(0)
    x = sparse_factory(shape=shape, batch=3, channels=2, occupancy=0.3)
    conv = SparseConv3d(2, 3, 2, 2, 0, output="patch", bias=True, backend=backend)
    y = conv(x)
    assert y.shape == tuple(-(-d // 2) for d in shape)
    d = x.to_dense()
    d = torch.nn.functional.pad(d, (0, shape[2] % 2, 0, shape[1] % 2, 0, shape[0] % 2))
    dense = torch.nn.functional.conv3d(d, conv.dense_weight(), conv.bias, stride=2)
    torch.testing.assert_close(y.feats, dense.permute(0, 2, 3, 4, 1)[tuple(y.coords.T)], atol=1e-5, rtol=1e-5)
    if backend != "torch":
        return
    # every input cell lies under exactly one output: one pair per cell
    km = next(v for k, v in x.ctx.items() if k[0] == "kmap")
    assert km.n_pairs == len(x) and len(km.splits) == 8
    with pytest.raises(ValueError, match="kernel = stride and padding 0"):
        SparseConv3d(2, 3, 3, 2, 1, output="patch")(x)
