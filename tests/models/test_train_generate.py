from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import awkward as ak
import numpy as np
import pytest
import torch

from calopc.converters import read_points
from calopc.io import open_showers
from calopc.models import load
from calopc.models.checkpoint import load_training_state
from calopc.models.generate import generate, parse_energies
from calopc.models.train import TrainConfig, train

from .conftest import TINY


def test_run_directory_layout(toy_run):
    files = {p.name for p in toy_run.iterdir()}
    assert {"config.json", "model.safetensors", "model_ema.safetensors", "training_state.pt", "stats.jsonl",
            "training_options.json"} <= files
    assert not [f for f in files if f.endswith(".part")]
    meta = json.loads((toy_run / "config.json").read_text())
    assert meta["model"] == "calopointflow"
    assert set(meta) >= {"config", "geometry", "preprocessing", "calopc_version", "train"}
    assert meta["config"]["latent"] == TINY["latent"]
    records = [json.loads(line) for line in (toy_run / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) for r in records)
    state = load_training_state(toy_run)  # weights_only=True
    assert state["step"] == 4 and "optimizer" in state


def test_load_rebuilds_the_model(toy_run):
    a = load(toy_run, ema=False)
    b = load(toy_run, ema=True)
    assert a.name == "calopointflow"
    assert a.geometry.name == "toy"
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    assert any(not torch.equal(sa[k], sb[k]) for k in sa)  # EMA differs from the raw weights


def test_generate_is_reproducible(toy_run, tmp_path):
    e = parse_energies("1e3,5e4", 10)
    r1 = generate(toy_run, e, output=tmp_path / "a.parquet", seed=7, batch_size=4, device="cpu")
    r2 = generate(toy_run, e, output=tmp_path / "b.parquet", seed=7, batch_size=4, device="cpu")
    generate(toy_run, e, output=tmp_path / "c.parquet", seed=8, batch_size=4, device="cpu")
    a, geo = read_points(tmp_path / "a.parquet")
    b, _ = read_points(tmp_path / "b.parquet")
    c, _ = read_points(tmp_path / "c.parquet")
    assert geo.name == "toy"
    assert len(a) == 10 and r1.n_showers == 10 and r1.showers_per_second > 0
    assert ak.to_list(a) == ak.to_list(b)
    assert ak.to_list(a) != ak.to_list(c)
    np.testing.assert_allclose(np.asarray(a.incident_energy), e)
    assert ak.all(ak.num(a.points, axis=1) >= 1)
    assert r2.n_points == r1.n_points


def test_generate_voxels_passes_format_checks(toy_run, tmp_path):
    out = tmp_path / "gen.hdf5"
    e = parse_energies("log-uniform:1e3:1e5", 16, seed=1)
    res = generate(toy_run, e, output=out, seed=0, batch_size=5, device="cpu", collisions="nearest-free")
    loaded = load(toy_run)
    with open_showers(out, geometry=loaded.geometry) as f:
        inc, sh = f.read()
    assert sh.shape == (16, loaded.geometry.n_voxels)
    np.testing.assert_allclose(inc.reshape(-1), e)
    assert np.isfinite(sh).all() and (sh >= 0).all()
    c = res.collisions
    assert c["n_points"] == res.n_points
    # one point per cell: filled cells = points kept inside, minus those that could only be merged
    kept = c["n_points"] - c["n_outside"] - c["n_merged"] - c["n_dropped"] - c["n_below_threshold"]
    assert int((sh > 0).sum()) == kept
    assert 0.0 <= c["collision_rate"] <= 1.0


def test_resume_continues(toy_parquet, tmp_path):
    from .conftest import TINY as tiny

    cfg = TrainConfig(steps=2, batch_size=8, log_every=1, device="cpu", progress=False)
    train("calopointflow", toy_parquet, tmp_path / "r", model_config=tiny, config=cfg)
    w2 = load(tmp_path / "r", ema=False).model.state_dict()
    res = train("calopointflow", toy_parquet, tmp_path / "r", config=TrainConfig(**{**cfg.__dict__, "steps": 4}),
                resume=True)
    assert res["steps"] == 4
    assert load_training_state(tmp_path / "r")["step"] == 4
    steps = [json.loads(x)["step"] for x in (tmp_path / "r" / "stats.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    w4 = load(tmp_path / "r", ema=False).model.state_dict()
    assert any(not torch.equal(w2[k], w4[k]) for k in w2)
    with pytest.raises(ValueError, match="no training_state.pt"):
        train("calopointflow", toy_parquet, tmp_path / "fresh", config=cfg, resume=True)


def test_variant_one_trains_and_generates(toy_parquet, tmp_path):
    """CaloPointFlow I (shower flow over n and ΣE, z in the point flow) through the same machinery."""
    run = tmp_path / "v1"
    train("calopointflow", toy_parquet, run, model_config={**TINY, "variant": "I"},
          config=TrainConfig(steps=2, batch_size=8, device="cpu", progress=False))
    meta = json.loads((run / "config.json").read_text())
    assert meta["config"]["variant"] == "I" and meta["preprocessing"]["variant"] == "I"
    assert meta["config"]["shower_features"] == 2 and meta["config"]["point_features"] == 4
    res = generate(run, parse_energies("1e3,1e5", 6), output=tmp_path / "v1.hdf5", seed=0, device="cpu")
    assert res.n_showers == 6 and res.n_points >= 6
    loaded = load(run)
    assert loaded.model.config.variant == "I" and loaded.preprocessor.variant == "I"


def test_default_variant_is_two(toy_run):
    meta = json.loads((toy_run / "config.json").read_text())
    assert meta["config"]["variant"] == "II" and meta["preprocessing"]["variant"] == "II"
    assert meta["config"]["n_layers"] == 3 and meta["config"]["shower_features"] == 6


def test_errors(toy_run):
    with pytest.raises(ValueError, match="expected a .parquet"):
        generate(toy_run, [1e3], output="x.txt")
    with pytest.raises(ValueError, match="collisions must be one of"):
        generate(toy_run, [1e3], collisions="bogus")
    with pytest.raises(ValueError, match="needs -n"):
        parse_energies("log-uniform:1e3:1e6")
    with pytest.raises(ValueError, match="comma-separated"):
        parse_energies("abc")
    with pytest.raises(ValueError, match="not a run directory"):
        load(toy_run.parent / "missing")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("model", ["calopointflow", "deeptree"])  # DDP wrapper / custom step with gradient all-reduce
def test_ddp_two_processes_gloo(toy_parquet, tmp_path, model):
    """2 CPU processes with the gloo backend, the same code path torchrun uses."""
    if model == "deeptree":
        pytest.importorskip("torch_geometric")
        from .test_deeptree import TINY as model_cfg
    else:
        model_cfg = TINY
    out = tmp_path / "ddp"
    script = (
        "import sys, torch; torch.set_num_threads(1)\n"
        "from calopc.models.train import train, TrainConfig\n"
        f"r = train({model!r}, {str(toy_parquet)!r}, {str(out)!r}, model_config={model_cfg!r},\n"
        "          config=TrainConfig(steps=3, batch_size=4, log_every=1, device='cpu', progress=False))\n"
        "print('RESULT', r['world_size'], r['steps'])\n"
    )
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (so, se) in zip(procs, outs):
        assert p.returncode == 0, se[-2000:]
        assert "RESULT 2 3" in so
    opts = json.loads((out / "training_options.json").read_text())
    assert opts["world_size"] == 2
    assert load_training_state(out)["step"] == 3
    assert load(out).model is not None


def test_cli_train_generate(toy_parquet, tmp_path, capsys):
    from calopc.cli import main

    run = tmp_path / "cli_run"
    sets = [a for k, v in TINY.items() for a in ("--set", f"model.{k}={json.dumps(v)}")]
    assert main(["train", "calopointflow", "--data", str(toy_parquet), "--out", str(run), "--steps", "2",
                 "--batch-size", "8", "--device", "cpu", "--no-progress", *sets, "--dry-run"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["model_config"]["latent"] == TINY["latent"] and resolved["train"]["steps"] == 2
    assert not run.exists()
    assert main(["train", "calopointflow", "--data", str(toy_parquet), "--out", str(run), "--steps", "2",
                 "--batch-size", "8", "--device", "cpu", "--no-progress", *sets]) == 0
    assert (run / "model.safetensors").exists()
    gen = tmp_path / "g.hdf5"
    assert main(["generate", str(run), "-n", "6", "--energies", "log-uniform:1e3:1e5", "-o", str(gen),
                 "--device", "cpu", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "showers/s" in text and "collisions" in text
    with open_showers(gen, geometry=load(run).geometry) as f:
        assert len(f) == 6


def test_cli_import_is_light_and_defaults_match():
    code = ("import sys, calopc.models, calopc.cli.models\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    from calopc.cli.models import _TRAIN_DEFAULTS

    cfg = TrainConfig()
    assert {k: getattr(cfg, k) for k in _TRAIN_DEFAULTS} == _TRAIN_DEFAULTS


def test_cli_config_file(toy_parquet, tmp_path, capsys):
    from calopc.cli import main

    p = tmp_path / "c.yaml"
    p.write_text("model:\n  latent: 6\ntrain:\n  lr: 0.0003\n")
    assert main(["train", "calopointflow", "--data", str(toy_parquet), "--out", str(tmp_path / "x"),
                 "--config", str(p), "--set", "train.steps=7", "--dry-run"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["model_config"]["latent"] == 6 and d["train"]["lr"] == 0.0003 and d["train"]["steps"] == 7
    p.write_text("model:\n  nope: 1\n")
    assert main(["train", "calopointflow", "--data", "x", "--out", "y", "--config", str(p), "--dry-run"]) != 0
    assert "unknown CaloPointFlow config keys ['nope']" in capsys.readouterr().err


def test_generate_parquet_points_are_placed_and_agree_with_hdf5(toy_run, tmp_path):
    """Parquet output: one point per cell with its cell index and the cell-centre coordinates; the
    same seed gives the same showers as the HDF5 output (threshold 0)."""
    from calopc.converters import points_to_voxels

    e = parse_energies("log-uniform:1e3:1e5", 12, seed=2)
    r_pq = generate(toy_run, e, output=tmp_path / "p.parquet", seed=3, batch_size=5, device="cpu")
    r_h5 = generate(toy_run, e, output=tmp_path / "p.hdf5", seed=3, batch_size=5, device="cpu", threshold=0.0)
    ev, geo = read_points(tmp_path / "p.parquet")
    cells = ev.points.cell
    assert all(len(set(c)) == len(c) for c in ak.to_list(cells))
    flat = ak.to_numpy(ak.flatten(cells))
    np.testing.assert_allclose(ak.to_numpy(ak.flatten(ev.points.r)), geo.cell_r[flat], rtol=1e-6)
    with open_showers(tmp_path / "p.hdf5", geometry=geo) as f:
        _, sh = f.read()
    np.testing.assert_allclose(points_to_voxels(ev, geo), sh, rtol=1e-6)
    assert r_pq.collisions["n_points"] == r_h5.collisions["n_points"] == r_pq.n_points
    assert set(r_pq.collisions) >= {"n_collisions", "n_merged", "n_moved", "collision_rate", "n_outside"}


def test_generated_files_record_threshold_dtype_time_and_collisions(toy_run, tmp_path):
    """generate -o x.parquet then voxelize equals generate -o x.hdf5 with the defaults; the HDF5 file carries
    the generation time and collision share that calopc compare reads."""
    import h5py

    from calopc.converters import voxelize_file

    e = parse_energies("log-uniform:1e3:1e5", 10, seed=5)
    generate(toy_run, e, output=tmp_path / "g.parquet", seed=4, batch_size=4, device="cpu", threshold=0.3)
    r = generate(toy_run, e, output=tmp_path / "g.hdf5", seed=4, batch_size=4, device="cpu", threshold=0.3)
    voxelize_file(tmp_path / "g.parquet", tmp_path / "v.hdf5")
    with h5py.File(tmp_path / "g.hdf5") as a, h5py.File(tmp_path / "v.hdf5") as b:
        assert a["showers"].dtype == b["showers"].dtype == np.float32
        np.testing.assert_array_equal(a["showers"][()], b["showers"][()])
        assert a.attrs["threshold"] == 0.3 and a.attrs["model"] == "calopointflow"
        assert a.attrs["generation_time_s"] > 0
        assert a.attrs["collision_rate"] == pytest.approx(r.collisions["collision_rate"])


def test_parse_energies_rejects_bad_files_and_counts(toy_parquet, tmp_path):
    with pytest.raises(ValueError, match=r"-n 1000: --energies .* holds only 48"):
        parse_energies(str(toy_parquet), 1000)
    with pytest.raises(ValueError, match=r"-n 0: expected a number of showers >= 1"):
        parse_energies("1e3", 0)
