"""Streaming training data: row groups through a shuffle buffer, several files, ranks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from .conftest import TINY

torch = pytest.importorskip("torch")

from calopc.models.data import ShowerDataset, StreamingShowerDataset, open_dataset


def _raw(items):
    """A collate that keeps the items: [(cell, E, e_inc), ...]."""
    return items


@pytest.fixture(scope="module")
def files(tmp_path_factory, toy_geometry):
    """Two points files of the toy geometry, 5 row groups of 7 showers each, distinct incident energies."""
    from calopc.converters import points_writer, voxels_to_points

    rng = np.random.default_rng(11)
    d = tmp_path_factory.mktemp("stream")
    paths, truth = [], {}
    for fi in range(2):
        p = d / f"part{fi}.parquet"
        with points_writer(p, toy_geometry) as w:
            for _ in range(5):
                inc = rng.uniform(1e3, 1e5, 7)
                v = np.where(rng.random((7, toy_geometry.n_voxels)) < 0.4,
                             rng.exponential(1.0, (7, toy_geometry.n_voxels)), 0.0)
                v[:, 3] += 0.5  # at least one point
                ev = voxels_to_points(v, toy_geometry, incident_energies=inc)
                w.append(ev)
                for e, row in zip(inc, v):
                    cell = np.flatnonzero(row)
                    truth[float(e)] = (cell, row[cell])
        paths.append(p)
    return paths, truth


def _key(item):
    return float(item[2])


def test_stream_serves_every_shower_once(files):
    paths, truth = files
    ds = StreamingShowerDataset(paths, buffer_showers=10)
    assert len(ds) == 70 and ds.n_points == sum(len(c) for c, _ in truth.values())
    items = [it for b in ds.iter_batches(_raw, 4, seed=0, epoch=0, drop_last=False) for it in b]
    assert sorted(map(_key, items)) == sorted(truth)
    for cell, energy, e in items:
        want_cell, want_e = truth[float(e)]
        np.testing.assert_array_equal(cell, want_cell)
        np.testing.assert_allclose(energy, want_e, rtol=1e-6)
    full = [b for b in ds.iter_batches(_raw, 4, seed=0, epoch=0)]
    assert all(len(b) == 4 for b in full) and len(full) == 70 // 4


def test_stream_shuffles_across_row_groups_and_epochs(files):
    paths, truth = files
    block_of = {}
    for k, e in enumerate(truth):  # insertion order = file order: 7 showers per row group
        block_of[e] = k // 7
    ds = StreamingShowerDataset(paths, buffer_showers=21)
    e0 = [_key(it) for b in ds.iter_batches(_raw, 7, seed=0, epoch=0) for it in b]
    e0_again = [_key(it) for b in ds.iter_batches(_raw, 7, seed=0, epoch=0) for it in b]
    e1 = [_key(it) for b in ds.iter_batches(_raw, 7, seed=0, epoch=1) for it in b]
    assert e0 == e0_again and e0 != e1
    first = next(ds.iter_batches(_raw, 7, seed=0, epoch=0))
    assert len({block_of[_key(it)] for it in first}) > 1  # a batch mixes row groups


def test_stream_ranks_are_disjoint_and_equal(files):
    paths, _ = files
    ds = StreamingShowerDataset(paths, buffer_showers=9)
    r = [[_key(it) for b in ds.iter_batches(_raw, 3, seed=2, rank=k, world_size=2) for it in b] for k in (0, 1)]
    assert len(r[0]) == len(r[1]) > 0 and not set(r[0]) & set(r[1])
    assert len(r[0]) + len(r[1]) >= 70 - 2 * 3 * 2  # only a partial last round is dropped


def test_stream_and_memory_agree(files):
    paths, _ = files
    mem = ShowerDataset.from_parquet(paths)
    st = StreamingShowerDataset(paths)
    assert len(mem) == len(st) and mem.cell.shape[0] == st.n_points
    a = {_key(it) for b in mem.iter_batches(_raw, 5) for it in b}
    b = {_key(it) for b in st.iter_batches(_raw, 5) for it in b}
    assert a == b
    pm, ps = mem.fit_preprocessor(seed=0, variant="II"), st.fit_preprocessor(seed=0, variant="II")
    assert pm.n_max == ps.n_max
    np.testing.assert_allclose(pm.cond_mean, ps.cond_mean, rtol=1e-9)
    np.testing.assert_allclose(pm.point_mean, ps.point_mean, atol=0.05)
    limited = StreamingShowerDataset(paths, max_showers=10)
    assert len(limited) == 10 and len([it for b in limited.iter_batches(_raw, 1) for it in b]) == 10


def test_open_dataset_chooses_by_size(files):
    paths, _ = files
    assert isinstance(open_dataset(paths), ShowerDataset)
    assert isinstance(open_dataset(paths, memory_limit=100), StreamingShowerDataset)
    assert isinstance(open_dataset(paths[0], stream=True), StreamingShowerDataset)


def test_mixed_geometries_are_an_error(files, toy_parquet, tmp_path):
    from calopc.converters import voxels_to_points, write_points
    from calopc.geometry import Geometry

    paths, _ = files
    other = tmp_path / "ds1.parquet"
    g = Geometry.calochallenge("1-photons")
    write_points(other, voxels_to_points(np.ones((2, g.n_voxels)), g, incident_energies=[1e3, 2e3]), g)
    with pytest.raises(ValueError, match=r"ds1.parquet: geometry .* differs from .*part0.parquet"):
        StreamingShowerDataset([paths[0], other])


def test_train_streaming_from_two_files_cli(files, tmp_path, capsys):
    from calopc.cli import main
    from calopc.models.generate import generate, parse_energies

    paths, _ = files
    run = tmp_path / "run"
    sets = [a for k, v in TINY.items() for a in ("--set", f"model.{k}={json.dumps(v)}")]
    assert main(["train", "calopointflow", "--data", *map(str, paths), "--out", str(run), "--stream",
                 "--buffer-showers", "14", "--steps", "6", "--batch-size", "8", "--device", "cpu", "--no-progress",
                 *sets]) == 0
    assert "6 steps" in capsys.readouterr().out
    opts = json.loads((run / "training_options.json").read_text())
    assert opts["streamed"] is True and opts["data"] == [str(p) for p in paths]
    assert opts["train"]["buffer_showers"] == 14
    # the streamed run records the training range of the incident energies (read from the files' column)
    lo, hi = json.loads((run / "config.json").read_text())["train"]["incident_energy_range"]
    assert 3e3 < lo < hi < 1e5
    res = generate(run, parse_energies(f"{lo},{hi}", 4), seed=0, device="cpu")
    assert res.n_showers == 4
