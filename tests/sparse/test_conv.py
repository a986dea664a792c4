from __future__ import annotations

import pytest
import torch

from calopc.sparse import functional as Fs
from calopc.sparse import minkowski_available
from calopc.sparse.kernel import out_size
from calopc.sparse.nn import (
    SparseAvgPool3d,
    SparseBatchNorm,
    SparseConv3d,
    SparseConvTranspose3d,
    SparseGlobalPool,
    SparseMaxPool3d,
    SubMConv3d,
)

BACKENDS = ["torch", pytest.param("minkowski", marks=pytest.mark.skipif(not minkowski_available(),
                                                                         reason="MinkowskiEngine not installed"))]

# (kernel, stride, padding, output policy)
CONV_CASES = [
    (3, 1, 1, "same"),
    (5, 1, 2, "same"),
    ((3, 5, 1), 1, (1, 2, 0), "same"),
    (3, 2, 1, "stride"),
    (2, 2, 0, "stride"),
    (7, 2, 3, "stride"),
    (1, 2, 0, "stride"),
    (3, 2, 1, "full"),
    (3, 1, 1, "full"),
    ((3, 3, 2), (1, 2, 2), (1, 1, 0), "stride"),
]


def _dense_at(dense: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    d = dense.permute(0, 2, 3, 4, 1)
    return d[coords[:, 0], coords[:, 1], coords[:, 2], coords[:, 3]]


def _supported(backend: str, kernel, padding) -> bool:
    k = (kernel,) * 3 if isinstance(kernel, int) else kernel
    p = (padding,) * 3 if isinstance(padding, int) else padding
    return backend == "torch" or all(pp == (kk // 2 if kk % 2 else 0) for kk, pp in zip(k, p))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("kernel", "stride", "padding", "output"), CONV_CASES)
@pytest.mark.parametrize("wrap", [True, False])
def test_conv_equals_dense(sparse_factory, backend, kernel, stride, padding, output, wrap, execution):
    if not _supported(backend, kernel, padding):
        pytest.skip("padding not expressible with MinkowskiEngine kernel regions")
    torch.manual_seed(0)
    x = sparse_factory(shape=(6, 8, 5), batch=3, channels=2)
    conv = SparseConv3d(2, 3, kernel, stride, padding, output=output, wrap_alpha=wrap, backend=backend, bias=True)
    y = conv(x)
    dense = Fs.dense_conv3d(x.to_dense(), conv.dense_weight(), stride=conv.stride, padding=conv.padding, wrap=wrap,
                            bias=conv.bias)
    assert y.shape == tuple(dense.shape[2:])
    torch.testing.assert_close(y.feats, _dense_at(dense, y.coords), atol=1e-5, rtol=1e-5)
    if output == "same":
        assert torch.equal(y.coords, x.coords)
    if output == "full":  # the support of the dense result (bias-free) is exactly the output cells
        nb = Fs.dense_conv3d(x.to_dense(), conv.dense_weight(), stride=conv.stride, padding=conv.padding, wrap=wrap)
        torch.testing.assert_close(y.replace(y.feats - conv.bias).to_dense(), nb, atol=1e-5, rtol=1e-5)
    if output == "stride":
        s = torch.tensor(conv.stride)
        expect = torch.unique(torch.cat([x.coords[:, :1], x.coords[:, 1:] // s], 1), dim=0)
        expect = expect[(expect[:, 1:] < torch.tensor(y.shape)).all(1)]
        assert torch.equal(y.coords, expect)


@pytest.mark.parametrize("backend", BACKENDS)
def test_alpha_seam(backend):
    """One cell at α = 0: a 3-wide kernel reaches α = A - 1 only with wrap-around."""
    x0 = torch.zeros(1, 1, 3, 8, 3)
    x0[0, 0, 1, 0, 1] = 1.0
    x0[0, 0, 1, 7, 1] = 2.0
    from calopc.sparse import SparseShowers

    x = SparseShowers.from_dense(x0)
    conv = SubMConv3d(1, 1, 3, backend=backend)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[(1 * 3 + 0) * 3 + 1] = 1.0  # offset j_alpha = 0: reads α - 1
    y = conv(x)
    # the cell at α = 0 reads α = -1 ≡ 7 (value 2); the cell at α = 7 reads α = 6 (empty)
    assert y.feats[:, 0].tolist() == [2.0, 0.0]
    conv_nowrap = SubMConv3d(1, 1, 3, wrap_alpha=False, backend=backend)
    conv_nowrap.load_state_dict(conv.state_dict())
    assert conv_nowrap(x).feats[:, 0].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("kernel", "stride", "padding"),
                         [(2, 2, 0), (3, 2, 1), (3, 1, 1), ((3, 3, 2), (1, 2, 2), (1, 1, 0))])
def test_transposed_is_adjoint(sparse_factory, backend, kernel, stride, padding, execution):
    if not _supported(backend, kernel, padding):
        pytest.skip("padding not expressible with MinkowskiEngine kernel regions")
    torch.manual_seed(1)
    fine = sparse_factory(shape=(6, 8, 5), batch=2, channels=3, seed=3)
    down = SparseConv3d(3, 2, kernel, stride, padding, backend=backend)
    coarse = down(fine)
    up = SparseConvTranspose3d(2, 3, kernel, stride, padding, backend=backend)
    y = up(coarse, target=fine)
    assert torch.equal(y.coords, fine.coords)
    # dense reference: the adjoint (vector-Jacobian product) of the dense circular conv
    xd = torch.zeros(2, 3, *fine.shape, requires_grad=True)
    w_fwd = Fs.dense_weight(up.weight.detach(), up.kernel).transpose(0, 1)  # the conv fine (3) -> coarse (2)
    out = Fs.dense_conv3d(xd, w_fwd, stride=up.stride, padding=up.padding)
    (g,) = torch.autograd.grad(out, xd, coarse.to_dense().detach())
    torch.testing.assert_close(y.feats, _dense_at(g, fine.coords), atol=1e-5, rtol=1e-5)
    # without a target: every reachable fine cell; its dense picture is the whole adjoint
    y2 = up(coarse, output_shape=fine.shape)
    torch.testing.assert_close(y2.to_dense(), g, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize(("kernel", "stride", "padding"), [(3, 2, 1), (2, 2, 0), (3, 1, 1)])
def test_pool_equals_dense(sparse_factory, backend, mode, kernel, stride, padding):
    x = sparse_factory(shape=(6, 8, 5), batch=2, channels=2, seed=5)
    x = x.replace(x.feats.abs() + 0.1)  # max pooling equals the dense one for non-negative features
    pool = (SparseMaxPool3d if mode == "max" else SparseAvgPool3d)(kernel, stride, padding, backend=backend)
    y = pool(x)
    k = pool.kernel
    dense = Fs.dense_pool3d(x.to_dense(), mode, kernel=k, stride=pool.stride, padding=pool.padding)
    torch.testing.assert_close(y.feats, _dense_at(dense, y.coords), atol=1e-6, rtol=1e-6)


def test_avg_pool_active_divisor(sparse_factory):
    x = sparse_factory(batch=2, channels=1, seed=6)
    y = SparseAvgPool3d(2, 2, 0, divisor="active")(x)
    s = SparseAvgPool3d(2, 2, 0)(x)
    ones = SparseAvgPool3d(2, 2, 0)(x.replace(torch.ones_like(x.feats)))
    torch.testing.assert_close(y.feats, s.feats / ones.feats)


def test_batch_norm_and_global_pool(sparse_factory):
    x = sparse_factory(batch=3, channels=4, seed=7)
    bn = SparseBatchNorm(4)
    y = bn(x)
    torch.testing.assert_close(y.feats.mean(0), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.feats.var(0, unbiased=False), torch.ones(4), atol=1e-3, rtol=0)
    dense = x.to_dense()
    torch.testing.assert_close(SparseGlobalPool("sum")(x), dense.sum((2, 3, 4)))
    n = x.counts.float()[:, None]
    torch.testing.assert_close(SparseGlobalPool("mean")(x), dense.sum((2, 3, 4)) / n)
    mx = SparseGlobalPool("max")(x)
    for b in range(3):
        torch.testing.assert_close(mx[b], x.feats[x.coords[:, 0] == b].max(0).values)


def test_gradcheck_torch_backend(sparse_factory, execution):
    x = sparse_factory(shape=(3, 4, 3), batch=2, channels=2, occupancy=0.3, seed=8, dtype=torch.float64)
    feats = x.feats.clone().requires_grad_(True)
    for conv in (SubMConv3d(2, 2, 3, backend="torch"), SparseConv3d(2, 2, 3, 2, backend="torch"),
                 SparseConv3d(2, 2, 2, 2, output="full", backend="torch")):
        conv = conv.double()
        w = conv.weight.detach().clone().requires_grad_(True)

        def f(feats, w, conv=conv):
            y = conv._impl.conv(x.replace(feats), w, conv.kernel, conv.stride, conv.padding, conv.wrap_alpha,
                                conv.output)
            return y.feats

        assert torch.autograd.gradcheck(f, (feats, w), eps=1e-6, atol=1e-6)
    up = SparseConvTranspose3d(2, 2, 2, 2, backend="torch").double()
    coarse = SparseConv3d(2, 2, 2, 2, backend="torch").double()(x)
    cf = coarse.feats.detach().clone().requires_grad_(True)
    w = up.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda cf, w: up._impl.conv_transpose(coarse.replace(cf), w, up.kernel, up.stride, up.padding, True, x).feats,
        (cf, w), eps=1e-6, atol=1e-6)


def test_kernel_map_is_cached_per_batch(sparse_factory):
    x = sparse_factory(batch=2, channels=2, seed=9)
    a, b = SubMConv3d(2, 4, backend="torch"), SubMConv3d(4, 4, backend="torch")
    y = b(a(x))
    kmaps = [k for k in x.ctx if k[0] == "kmap"]
    assert len(kmaps) == 1  # the second layer reused the first layer's map
    assert y.cid == x.cid
    d1, d2 = SparseConv3d(4, 4, 3, 2, backend="torch"), SparseConv3d(4, 4, 1, 2, backend="torch")
    assert d1(y).cid == d2(y).cid  # same stride: same output coordinates (residual branches can be added)


def test_ds3_like_grid(sparse_factory):
    x = sparse_factory(shape=(45, 50, 18), batch=2, channels=1, occupancy=0.08, seed=10)
    conv = SparseConv3d(1, 4, 7, 2, 3, backend="torch")
    y = conv(x)
    dense = Fs.dense_conv3d(x.to_dense()[:, None], conv.dense_weight(), stride=conv.stride, padding=conv.padding)
    assert y.shape == (out_size(45, 7, 2, 3), out_size(50, 7, 2, 3), out_size(18, 7, 2, 3)) == tuple(dense.shape[2:])
    torch.testing.assert_close(y.feats, _dense_at(dense, y.coords), atol=1e-5, rtol=1e-5)


def test_binary_search_and_direct_table_agree(sparse_factory, monkeypatch):
    from calopc.sparse import kernel

    x = sparse_factory(batch=3, channels=2, seed=12)
    conv = SparseConv3d(2, 3, 3, 2)
    y1 = conv(x)
    monkeypatch.setattr(kernel, "DIRECT_TABLE_MAX", 0)
    y2 = conv(x.replace(x.feats).to("cpu"))  # a fresh cache
    assert not any(k[0] == "table" for k in y2.ctx)
    assert torch.equal(y1.coords, y2.coords)
    torch.testing.assert_close(y1.feats, y2.feats)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("kernel", "stride", "padding"), [(3, 2, 1), (7, 2, 3), (1, 2, 0), (3, 1, 1)])
def test_odd_alpha_grid(sparse_factory, backend, kernel, stride, padding):
    """A = 9 (odd, like ds3 after the first stride-2 layer: 25): the seam wraps through an odd grid."""
    x = sparse_factory(shape=(7, 9, 5), batch=2, channels=2, seed=13)
    conv = SparseConv3d(2, 3, kernel, stride, padding, backend=backend)
    y = conv(x)
    dense = Fs.dense_conv3d(x.to_dense(), conv.dense_weight(), stride=conv.stride, padding=conv.padding)
    torch.testing.assert_close(y.feats, _dense_at(dense, y.coords), atol=1e-5, rtol=1e-5)
    pool = SparseMaxPool3d(kernel, stride, padding, backend=backend)
    xp = x.replace(x.feats.abs())
    dp = Fs.dense_pool3d(xp.to_dense(), "max", kernel=pool.kernel, stride=pool.stride, padding=pool.padding)
    torch.testing.assert_close(pool(xp).feats, _dense_at(dp, pool(xp).coords))


def test_segment_max_equals_scatter_reduce_with_ties_and_empty_segments():
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(40, 5, generator=g, dtype=torch.float64)
    index = torch.randint(0, 7, (40,), generator=g)
    index[index == 4] = 5                                 # segment 4 empty: 0, no gradient anywhere
    feats[[1, 2]] = 9.0                                   # a tie for the maximum (split evenly by the reference)
    index[[1, 2]] = 3
    grad = torch.randn(7, 5, generator=g, dtype=torch.float64)
    ours, ref = feats.clone().requires_grad_(True), feats.clone().requires_grad_(True)
    out = Fs.segment_max(ours, index, 7)
    want = ref.new_zeros(7, 5).scatter_reduce(0, index[:, None].expand(-1, 5), ref, "amax", include_self=False)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert torch.equal(out[4], torch.zeros(5, dtype=out.dtype))
    out.backward(grad)
    want.backward(grad)
    torch.testing.assert_close(ours.grad, ref.grad, rtol=0, atol=0)
    torch.testing.assert_close(ours.grad[1], grad[3] / 2, rtol=0, atol=0)
    x = torch.randn(12, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: Fs.segment_max(x, index[:12], 7), (x,))
