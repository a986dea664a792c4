from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("zuko")

#: a tiny CaloPointFlow (fast on 2 CPU cores)
TINY = {"latent": 4, "encoder_hidden": 16, "point_transforms": 2, "point_hidden": [16, 16], "point_bins": 4,
        "latent_transforms": 1, "latent_hidden": [16], "shower_transforms": 1, "shower_hidden": [16]}


@pytest.fixture(scope="session")
def toy_parquet(tmp_path_factory, toy_xml):
    """48 random showers of the 19-voxel toy geometry as a points Parquet file."""
    from calopc.converters import voxels_to_points, write_points
    from calopc.geometry import Geometry

    geo = Geometry.from_xml(toy_xml, name="toy")
    rng = np.random.default_rng(3)
    n = 48
    inc = np.exp(rng.uniform(np.log(1e3), np.log(1e5), n))
    occ = rng.random((n, geo.n_voxels)) < 0.35 + 0.3 * (np.log(inc)[:, None] - np.log(1e3)) / np.log(100)
    v = np.where(occ, rng.exponential(1.0, (n, geo.n_voxels)) * inc[:, None] / 1e3, 0.0)
    v[:, 0] = np.maximum(v[:, 0], 0.1)  # no empty shower
    p = tmp_path_factory.mktemp("toydata") / "toy.parquet"
    write_points(p, voxels_to_points(v, geo, incident_energies=inc), geo)
    return p


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory, toy_parquet):
    """A run directory trained for a few steps on the toy data."""
    from calopc.models.train import TrainConfig, train

    out = tmp_path_factory.mktemp("runs") / "toy_run"
    train("calopointflow", toy_parquet, out, model_config=TINY,
          config=TrainConfig(steps=4, batch_size=8, warmup=2, log_every=1, checkpoint_every=2, device="cpu",
                             progress=False))
    return out
