"""Training machinery: custom training steps, safety (run directory, NaN guard, interrupts, corrupt files),
data validation, device-built batches, fast splines."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace

import numpy as np
import pytest
import torch
from torch import nn

from calopc.models import MODELS
from calopc.models.checkpoint import CheckpointError, load, load_training_state
from calopc.models.data import (Batch, DeviceCollate, ShowerCollate, ShowerDataset, StreamingShowerDataset,
                               iterate_batches, pack)
from calopc.models.train import TrainConfig, TrainingDiverged, train

CFG = TrainConfig(steps=4, batch_size=8, warmup=1, log_every=1, checkpoint_every=2, device="cpu", progress=False,
                  ema_decay=0.0)


@dataclass(frozen=True)
class ToyConfig:
    features: int = 3
    nan_at: int = 0            # loss is NaN from this call on (0: never)
    interrupt_at: int = 0      # KeyboardInterrupt at this call (0: never)

    @classmethod
    def from_dict(cls, d: dict) -> ToyConfig:
        return cls(**d)

    def preprocessing(self) -> dict:
        return {"variant": "II"}

    def with_data(self, prep) -> ToyConfig:
        return replace(self, features=prep.n_point_features)


class Toy(nn.Module):
    """A model with the default path: one loss."""

    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        self.config = config
        self.a = nn.Parameter(torch.zeros(config.features))
        self.b = nn.Parameter(torch.ones(1))
        self.calls = 0

    def loss(self, batch) -> torch.Tensor:
        self.calls += 1
        if self.config.interrupt_at and self.calls == self.config.interrupt_at:
            raise KeyboardInterrupt
        x = batch.x[batch.mask]
        loss = ((x - self.a) ** 2).mean() + (self.b - batch.cond.mean()) ** 2
        if self.config.nan_at and self.calls >= self.config.nan_at:
            loss = loss * float("nan")
        return loss.squeeze()

    forward = loss


class ToyGAN(Toy):
    """The custom-step contract: two optimizers, two backward calls per step."""

    def configure_optimizers(self, train_cfg) -> dict:
        return {"a": torch.optim.Adam([self.a], lr=0.1), "b": torch.optim.SGD([self.b], lr=0.01, momentum=0.9)}

    def training_step(self, batch, step, backward) -> dict:
        self.calls += 1
        if self.config.interrupt_at and self.calls == self.config.interrupt_at:
            raise KeyboardInterrupt
        x = batch.x[batch.mask]
        la = ((x - self.a) ** 2).mean()
        backward(la, "a")
        lb = ((self.b - 3.0) ** 2).sum()
        backward(lb, "b")
        return {"loss": (la + lb).detach(), "a": la.detach(), "b": lb.detach()}


@pytest.fixture
def toys(monkeypatch):
    monkeypatch.setitem(MODELS, "toy", (__name__, "Toy", "ToyConfig"))
    monkeypatch.setitem(MODELS, "toygan", (__name__, "ToyGAN", "ToyConfig"))


def test_custom_training_step_and_resume(toys, toy_parquet, tmp_path):
    run = tmp_path / "gan"
    res = train("toygan", toy_parquet, run, config=CFG)
    assert res["steps"] == 4
    state = load_training_state(run)
    assert set(state["optimizers"]) == {"a", "b"} and state["step"] == 4
    assert state["optimizers"]["b"]["state"][0]["momentum_buffer"] is not None
    m = load(run, ema=False).model
    assert float(m.b.detach()) > 1.0  # SGD moved b towards 3
    recs = [json.loads(x) for x in (run / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and {"a", "b", "loss"} <= set(recs[0])
    opts = json.loads((run / "training_options.json").read_text())
    assert opts["custom_training_step"] is True
    # both optimizers come back: after an interrupt at step 5 and --resume, b (its own loss, SGD with
    # momentum) ends exactly where one uninterrupted run ends
    cfg6 = replace(CFG, steps=6, checkpoint_every=100)
    with pytest.raises(KeyboardInterrupt):
        train("toygan", toy_parquet, tmp_path / "i", model_config={"interrupt_at": 5}, config=cfg6)
    assert load_training_state(tmp_path / "i")["step"] == 4
    train("toygan", toy_parquet, tmp_path / "i", config=cfg6, resume=True)
    train("toygan", toy_parquet, tmp_path / "once", config=cfg6)
    torch.testing.assert_close(load(tmp_path / "i", ema=False).model.b, load(tmp_path / "once", ema=False).model.b)


def test_run_directory_needs_resume_or_overwrite(toys, toy_parquet, tmp_path, capsys):
    from calopc.cli import main

    run = tmp_path / "r"
    train("toy", toy_parquet, run, config=replace(CFG, steps=2))
    with pytest.raises(ValueError, match="not empty.*--resume.*--overwrite"):
        train("toy", toy_parquet, run, config=CFG)
    res = train("toy", toy_parquet, run, config=replace(CFG, steps=3), overwrite=True)
    assert res["steps"] == 3
    steps = [json.loads(x)["step"] for x in (run / "stats.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # the old log was replaced
    with pytest.raises(ValueError, match="is also the training input"):
        train("toy", toy_parquet, toy_parquet, config=CFG)
    # -o and --out name the same option; generate refuses to overwrite its energies file
    assert main(["train", "calopointflow", "--data", str(toy_parquet), "-o", str(run), "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["out"] == str(run)
    assert main(["train", "calopointflow", "--data", str(toy_parquet), "-o", str(run), "--steps", "1",
                 "--device", "cpu", "--no-progress"]) == 2
    assert "--resume or replace it with --overwrite" in capsys.readouterr().err
    assert main(["generate", str(run), "--energies", str(toy_parquet), "-o", str(toy_parquet), "--no-progress"]) == 2
    assert "is also an input" in capsys.readouterr().err


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(toys, toy_parquet, tmp_path):
    run = tmp_path / "nan"
    with pytest.raises(TrainingDiverged, match=r"non-finite loss between steps 3 and 3.*checkpoint \(step 2\)"):
        train("toy", toy_parquet, run, model_config={"nan_at": 3}, config=CFG)
    assert load_training_state(run)["step"] == 2
    assert all(torch.isfinite(p).all() for p in load(run, ema=False).model.parameters())
    # the NaN of a step between two reads is still caught before a checkpoint
    run2 = tmp_path / "nan2"
    with pytest.raises(TrainingDiverged):
        train("toy", toy_parquet, run2, model_config={"nan_at": 2}, config=replace(CFG, log_every=100))
    assert load_training_state(run2) is None


def test_interrupt_writes_a_checkpoint(toys, toy_parquet, tmp_path, capsys):
    run = tmp_path / "int"
    with pytest.raises(KeyboardInterrupt) as err:
        train("toy", toy_parquet, run, model_config={"interrupt_at": 4}, config=replace(CFG, checkpoint_every=100))
    assert load_training_state(run)["step"] == 3
    # the command line prints this as its one line: "interrupted (Ctrl-C); RUN holds the checkpoint of step 3 ..."
    assert str(err.value) == f"{run} holds the checkpoint of step 3 (continue with --resume)"
    res = train("toy", toy_parquet, run, config=CFG, resume=True)
    assert res["steps"] == 4


def test_corrupt_run_files_are_one_line_errors(toys, toy_parquet, tmp_path):
    run = tmp_path / "c"
    train("toy", toy_parquet, run, config=replace(CFG, steps=2))
    (run / "training_state.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"training_state.pt: not a readable training state"):
        train("toy", toy_parquet, run, config=CFG, resume=True)
    (run / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match=r"model.safetensors: not a readable safetensors file"):
        load(run, ema=False)
    (run / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config.json: not valid JSON.*expected the run configuration"):
        load(run)
    (run / "config.json").write_text("[]")
    with pytest.raises(CheckpointError, match=r"config.json: expected a run configuration with keys"):
        load(run)


def test_training_data_are_validated(toy_geometry, tmp_path):
    cell = np.array([0, 1, 2, 3, 40, 5], dtype=np.int32)
    e = np.ones(6, dtype=np.float32)
    off = np.array([0, 2, 4, 6])
    with pytest.raises(ValueError, match=r"shower 2: cell 40 is outside the geometry 'toy'.*0..18"):
        ShowerDataset(cell, e, off, np.ones(3), toy_geometry)
    cell[4] = 4
    e[3] = np.nan
    with pytest.raises(ValueError, match=r"shower 1: point energy E = nan.*finite energies >= 0"):
        ShowerDataset(cell, e, off, np.ones(3), toy_geometry)
    e[3] = 1
    with pytest.raises(ValueError, match=r"shower 2: incident_energy = -1.0"):
        ShowerDataset(cell, e, off, np.array([1.0, 1.0, -1.0]), toy_geometry)
    # from a file: the file name and the shower index within the file
    import awkward as ak

    from calopc.converters import points_writer, voxels_to_points

    p = tmp_path / "bad.parquet"
    rng = np.random.default_rng(0)
    with points_writer(p, toy_geometry) as w:
        for k in range(2):
            v = rng.exponential(1.0, (5, toy_geometry.n_voxels))
            ev = voxels_to_points(v, toy_geometry, incident_energies=np.full(5, 1e3))
            if k == 1:
                c = ak.to_numpy(ak.flatten(ev.points.cell)).copy()
                c[3 * toy_geometry.n_voxels + 2] = 77
                ev = ak.with_field(ev, ak.with_field(ev.points, ak.unflatten(c, ak.num(ev.points)), "cell"), "points")
            w.append(ev)
    with pytest.raises(ValueError, match=rf"{p}: shower 8: cell 77 is outside"):
        ShowerDataset.from_parquet(p)
    with pytest.raises(ValueError, match=rf"{p}: shower 8"):
        list(iterate_batches(StreamingShowerDataset(p, buffer_showers=4), lambda items: items, 2))


@pytest.mark.parametrize("variant", ["I", "II"])
def test_device_batches_equal_the_numpy_collate(toy_parquet, variant):
    ds = ShowerDataset.from_parquet(toy_parquet)
    prep = ds.fit_preprocessor(variant=variant)
    a = list(iterate_batches(ds, ShowerCollate(prep, seed=0), 8, seed=1))
    b = list(iterate_batches(ds, DeviceCollate(prep, noise=np.random.default_rng(0)), 8, seed=1))
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        for f in ("x", "mask", "shower", "cond", "n", "layer", "points", "point_shower", "point_layer"):
            u, v = getattr(x, f), getattr(y, f)
            assert u.dtype == v.dtype and u.shape == v.shape, f
            torch.testing.assert_close(u, v, rtol=1e-6, atol=1e-6)
        # the packed layout is the padded one without the padding
        assert torch.equal(y.points, y.x[y.mask]) and torch.equal(y.point_layer, y.layer[y.mask])
        assert torch.equal(y.point_shower, torch.repeat_interleave(torch.arange(len(y)), y.n))
        # Batch.flat: the packed layout when given, the same points derived from the padding when not
        assert all(u is v for u, v in zip(y.flat(), (y.points, y.point_shower, y.point_layer)))
        bare = Batch(x=y.x, mask=y.mask, shower=y.shower, cond=y.cond, n=y.n, layer=y.layer)
        assert all(torch.equal(u, v) for u, v in zip(bare.flat(), y.flat()))
        assert torch.equal(pack(y.mask)[0], y.point_shower)
    # the torch noise: same structure, reproducible with the seed, points stay in their cells
    c1 = list(iterate_batches(ds, DeviceCollate(prep, seed=3, noise="torch"), 8, seed=1))
    c2 = list(iterate_batches(ds, DeviceCollate(prep, seed=3, noise="torch"), 8, seed=1))
    assert all(torch.equal(p.x, q.x) and torch.equal(p.mask, r.mask) for p, q, r in zip(c1, c2, a))
    assert not torch.equal(c1[0].x, a[0].x)


def test_bucketed_batches_cover_the_epoch_once(toy_parquet):
    ds = ShowerDataset.from_parquet(toy_parquet)
    prep = ds.fit_preprocessor(variant="II")
    col = DeviceCollate(prep, seed=0, pad_multiple=32)
    seen = []
    for rank in (0, 1):
        for b in iterate_batches(ds, col, 4, seed=2, rank=rank, world_size=2, bucket=True):
            assert b.x.shape[1] % 32 == 0 and b.mask.sum() == b.n.sum()
            seen += b.cond[:, 0].tolist()
    assert len(seen) == 48 and len(set(seen)) == len(set(np.round(seen, 6)))
    # bucketing sorts within windows: batches are more uniform in size than random ones
    spread = lambda bs: np.mean([float(b.n.max() - b.n.min()) for b in bs])  # noqa: E731
    rnd = list(iterate_batches(ds, col, 4, seed=2))
    bkt = list(iterate_batches(ds, col, 4, seed=2, bucket=True))
    assert spread(bkt) < spread(rnd)


def test_numpy_and_device_pipelines_train(toy_parquet, tmp_path):
    from .conftest import TINY

    for pipe in ("numpy", "device"):
        res = train("calopointflow", toy_parquet, tmp_path / pipe, model_config=TINY,
                    config=replace(CFG, steps=2, pipeline=pipe, bucket=pipe == "device", ema_decay=0.9))
        assert np.isfinite(res["final_loss"]) and res["skipped_steps"] == 0


def test_fast_splines_match_zuko(monkeypatch):
    import zuko

    from calopc.models import flows
    from calopc.models.flows import FastRQSTransform, use_fast_splines

    used = []
    for name in ("_knots_transpose", "_knots_matmul"):
        f = getattr(flows, name)
        monkeypatch.setattr(flows, name, lambda p, f=f, name=name: used.append(name) or f(p))

    torch.manual_seed(0)
    flow = zuko.flows.NSF(3, 2, transforms=2, bins=6, hidden_features=(16,), passes=2)
    x, c = torch.randn(200, 3), torch.randn(200, 2)
    ref = flow(c).log_prob(x)
    z_ref = flow(c).sample()
    for method in ("transpose", "matmul"):
        assert use_fast_splines(flow, method=method) == 2
        lp = flow(c).log_prob(x)
        torch.testing.assert_close(lp, ref, rtol=1e-5, atol=1e-5)
        assert used and used[-1] == f"_knots_{method}"
    w, h, d = torch.randn(50, 3, 6), torch.randn(50, 3, 6), torch.randn(50, 3, 5)
    from zuko.transforms import MonotonicRQSTransform

    a, b = MonotonicRQSTransform(w, h, d), FastRQSTransform(w, h, d)
    torch.testing.assert_close(a.horizontal, b.horizontal, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.vertical, b.vertical, rtol=0, atol=1e-6)
    assert use_fast_splines(flow, enabled=False) == 2
    n = len(used)
    torch.testing.assert_close(flow(c).log_prob(x), ref)
    assert len(used) == n
    assert z_ref.shape == (200, 3)


@pytest.mark.parametrize("kind", ["fused", "exact", "no-sync"])
def test_non_finite_gradients_skip_the_step(kind):
    from calopc.models.train import _Stepper

    p = nn.Parameter(torch.ones(3))
    if kind == "fused":
        opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    else:
        opt = torch.optim.SGD([p], lr=0.1)
    st = _Stepper({"m": opt}, CFG, torch.device("cpu"), 1)
    st.exact_skip = kind == "exact"   # "no-sync" is the CUDA path: gradients zeroed on the device
    p.grad = torch.tensor([1.0, float("nan"), 0.0])
    st.update("m")
    assert torch.equal(p.detach(), torch.ones(3)) and int(st.skipped) == 1
    p.grad = torch.ones(3)
    st.update("m")
    assert bool((p.detach() < 1).all()) and int(st.skipped) == 1
