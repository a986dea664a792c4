from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from calopc.eval.cnn import CNNConfig, DenseResNet, SparseResNet, cnn_metric  # noqa: E402
from calopc.geometry import Geometry, GeometryError  # noqa: E402
from calopc.synth import generate  # noqa: E402

# a small regular grid (12 layers x 8 alpha x 6 r) keeps the trainings to seconds
EDGES = tuple(4.65 * i for i in range(7))
GRID = Geometry(name="toy-grid", particle="electron", layer_ids=tuple(range(12)), r_edges=(EDGES,) * 12,
                n_alpha=(8,) * 12)
TINY = CNNConfig(widths=(4, 8, 8, 8), blocks=(1, 1, 1, 1), epochs=4, batch_size=20, lr=1e-3, dtype="float32",
                 bn_momentum=None)
N = 160


@pytest.fixture(scope="module")
def samples():
    torch.set_num_threads(1)
    inc_a, a = generate(GRID, N, seed=1)
    inc_b, b = generate(GRID, N, seed=2)
    return inc_a, a, inc_b, b


def test_same_distribution_is_near_half(samples):
    inc_a, a, inc_b, b = samples
    r = cnn_metric("cnn", a, inc_a, b, inc_b, GRID, config=TINY, seed=0)
    assert r.kind == "cnn" and r.epochs == 4 and r.n_train == 2 * int(N * 0.6)
    assert abs(r.auc - 0.5) < 0.2


@pytest.mark.parametrize("kind", ["cnn", "sparse"])
def test_distorted_sample_is_found(samples, kind):
    inc_a, a, inc_b, b = samples
    r = cnn_metric(kind, a * 2.0, inc_a, b, inc_b, GRID, config=TINY, seed=0)
    assert r.auc > 0.7, r


def test_networks_follow_the_official_architecture():
    g = Geometry.calochallenge("2")
    dense, sparse = DenseResNet(g), SparseResNet(g, CNNConfig(sparse_arch="resnet"))
    n_dense = sum(p.numel() for p in dense.parameters())
    n_sparse = sum(p.numel() for p in sparse.parameters())
    assert n_dense == n_sparse  # the same layers, weights of the same sizes
    convs = [m for m in dense.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs[0].kernel_size == (7, 7, 7) and convs[0].stride == (2, 2, 2) and convs[0].bias is None
    assert len([c for c in convs if c.kernel_size == (3, 3, 3)]) == 16  # 8 BasicBlocks x 2
    assert dense.fc.in_features == 128 + 1  # E_inc appended before the final layer
    x = torch.zeros(2, 1, 45, 16, 9, dtype=torch.float32)
    x[:, 0, 10, 3, 2] = 0.5
    dense.eval()
    assert dense(x, torch.ones(2, 1)).shape == (2, 1)


def test_input_checks(samples):
    inc_a, a, inc_b, b = samples
    with pytest.raises(ValueError, match="as many generated as reference"):
        cnn_metric("cnn", a[:20], inc_a[:20], b[:30], inc_b[:30], GRID, config=TINY)
    with pytest.raises(ValueError, match="kind must be 'cnn' or 'sparse'"):
        cnn_metric("resnet", a, inc_a, b, inc_b, GRID, config=TINY)
    with pytest.raises(GeometryError, match="cls-cnn classifier need a regular"):
        g1 = Geometry.calochallenge("1-photons")
        cnn_metric("cnn", np.zeros((20, g1.n_voxels)), np.ones(20), np.zeros((20, g1.n_voxels)), np.ones(20), g1)
    with pytest.raises(ValueError, match="finite positive incident energies"):
        cnn_metric("cnn", a, np.zeros(N), b, inc_b, GRID, config=TINY)


def test_evaluate_hooks_cls_cnn_and_cls_sparse(tmp_path):
    pytest.importorskip("h5py")
    import json

    from calopc.cli.eval import _metrics
    from calopc.eval.evaluate import evaluate
    from calopc.synth import write_synthetic

    assert _metrics("cls-cnn,cls-sparse") == ("cls-cnn", "cls-sparse")
    gen, ref = tmp_path / "gen.h5", tmp_path / "ref.h5"
    write_synthetic(gen, dataset="2", n=30, seed=3)
    write_synthetic(ref, dataset="2", n=30, seed=4)
    res = evaluate(gen, ref, tmp_path / "out", metrics=("cls-cnn", "cls-sparse"), cls_epochs=1, cls_seeds=1,
                   cls_batch_size=12, progress=False, device="cpu",
                   cnn_options={"widths": (2, 2, 2, 2), "blocks": (1, 1, 1, 1), "dtype": "float32"})
    for kind in ("cnn", "sparse"):
        c = res["classifier"][kind]
        assert 0.0 <= c["auc"] <= 1.0 and c["epochs"] == 1 and c["network"]["widths"] == [2, 2, 2, 2]
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(saved["classifier"]) == {"cnn", "sparse"}


def test_sparse_network_same_on_both_backends(samples):
    pytest.importorskip("MinkowskiEngine")
    from dataclasses import replace

    from calopc.eval.cnn import _Pool

    inc_a, a, inc_b, b = samples
    pool = _Pool(a, inc_a, b, inc_b, GRID, dense=False)
    idx = np.arange(0, 2 * N, 16)
    nets = [SparseResNet(GRID, replace(TINY, backend=be, periodic_alpha=True)) for be in ("torch", "minkowski")]
    nets[1].load_state_dict(nets[0].state_dict())
    outs = []
    for net in nets:
        net.train()
        x, log_e = pool(idx, torch.device("cpu"), torch.float32)
        y = net(x, log_e)
        y.sum().backward()
        outs.append((y.detach(), net.stem.conv.weight.grad.clone()))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=1e-4, rtol=1e-3)


def test_sparse_native_network_keeps_maps_small():
    """cls-sparse (native): a patch stem (one pair per occupied cell), 3×3×3 submanifold blocks, float32 default."""
    from calopc.eval.cnn import _Pool
    from calopc.sparse.kernel import KernelMap

    cfg = CNNConfig()
    assert cfg.resolved("sparse").dtype == "float32" and cfg.resolved("cnn").dtype == "float64"
    assert cfg.resolved("sparse").widths == (16, 32, 48, 64) and cfg.resolved("cnn").widths == (32, 64, 64, 128)
    g = Geometry.calochallenge("3")
    inc, v = generate(g, 4, seed=0)
    pool = _Pool(v, inc, v, inc, g, dense=False)
    net = SparseResNet(g)
    x, log_e = pool(np.arange(4), torch.device("cpu"), torch.float32)
    out = net(x, log_e)
    assert out.shape == (4, 1) and torch.isfinite(out).all()
    maps = {k: m for k, m in x.ctx.items() if isinstance(m, KernelMap)}
    stem = maps[next(k for k in maps if k[1] == x.cid)]
    assert stem.n_pairs == len(x) and len(stem.splits) == 8  # each cell read once (the 7³/2 conv1 read it ~31 times)
    assert max(len(m.splits) for m in maps.values()) == 27
    assert all(m.n_pairs <= 27 * m.n_in for m in maps.values())
    with pytest.raises(ValueError, match="sparse_arch must be"):
        SparseResNet(g, CNNConfig(sparse_arch="vit"))
