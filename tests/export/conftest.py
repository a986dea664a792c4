from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("zuko")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

#: tiny networks; CaloClouds with α modelled (nearest-free placement) and the default autoregressive shower flow
#: (90 features: one loop per transform in the graph), CaloPointFlow with a coupling shower flow (2 passes, zuko's
#: inversion) and its autoregressive latent flow
CC = {"alpha": "model", "widths": [32, 32], "fourier": 16, "layer_embedding": 4, "shower_transforms": 2,
      "shower_hidden": [32]}
CPF = {"latent": 4, "encoder_hidden": 16, "point_transforms": 2, "point_hidden": [16, 16], "point_bins": 4,
       "set_hidden": 16, "set_features": 8, "latent_transforms": 1, "latent_hidden": [16], "shower_transforms": 1,
       "shower_hidden": [16], "shower_passes": 2}


@pytest.fixture(scope="session")
def ds3_parquet(tmp_path_factory):
    """120 synthetic dataset-3 showers of 1-8 GeV (a few hundred hits each) as a points Parquet file."""
    from calopc.converters import voxels_to_points, write_points
    from calopc.geometry import Geometry
    from calopc.synth import generate

    geo = Geometry.calochallenge("3")
    rng = np.random.default_rng(0)
    e = np.exp(rng.uniform(np.log(1e3), np.log(8e3), 120))
    inc, v = generate("3", seed=1, energies=e)
    p = tmp_path_factory.mktemp("ds3") / "ds3.parquet"
    write_points(p, voxels_to_points(v, geo, incident_energies=inc), geo)
    return p


def _train(model, data, out, cfg, steps):
    from calopc.models.train import TrainConfig, train

    train(model, data, out, model_config=cfg,
          config=TrainConfig(steps=steps, batch_size=16, warmup=0, log_every=1, checkpoint_every=steps, device="cpu",
                             progress=False))
    return out


@pytest.fixture(scope="session")
def student_run(tmp_path_factory, ds3_parquet):
    """A distilled CaloClouds student (α modelled: nearest-free placement) trained for a few steps on ds3."""
    from calopc.models.distill import DistillConfig, distill

    root = tmp_path_factory.mktemp("runs")
    teacher = _train("caloclouds", ds3_parquet, root / "cc", CC, 8)
    distill(teacher, root / "cc-cm", config=DistillConfig(steps=3, batch_size=8, device="cpu", progress=False,
                                                           log_every=1))
    return root / "cc-cm"


@pytest.fixture(scope="session")
def cpf_run(tmp_path_factory, ds3_parquet):
    """A CaloPointFlow II run (CDF dequantisation, set summary, α free with ring overflow moved) on ds3."""
    return _train("calopointflow", ds3_parquet, tmp_path_factory.mktemp("runs") / "cpf", CPF, 6)


@pytest.fixture(scope="session")
def cc_free_run(tmp_path_factory, ds3_parquet):
    """A CaloClouds teacher with α free (placed per ring, overflow moved by energy) and two Heun steps on ds3.

    σ_max 2: the untrained denoiser's features stay O(1); from σ_max 80 they come out O(100), where the sigmoid of
    the uniform dequantisation saturates and float32 rounding decides whether a point lies on a ring's outer edge."""
    return _train("caloclouds", ds3_parquet, tmp_path_factory.mktemp("runs") / "cc-free",
                  {**CC, "alpha": "free", "steps": 2, "sigma_max": 2.0}, 4)


@pytest.fixture(scope="session")
def student_onnx(tmp_path_factory, student_run):
    """``calopc export`` of the student for Par04: (path, printed output)."""
    import contextlib
    import io

    from calopc.cli import main

    out = tmp_path_factory.mktemp("onnx") / "student.onnx"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["export", str(student_run), "-o", str(out)]) == 0
    return out, buf.getvalue()


@pytest.fixture(scope="session")
def cpf_onnx(tmp_path_factory, cpf_run):
    from calopc.export.graph import export_model

    out = tmp_path_factory.mktemp("onnx") / "cpf.onnx"
    return out, export_model(cpf_run, out, target="par04")


def library_showers(loaded, e_inc, latent, sampler):
    """``calopc generate``'s path for ``e_inc`` with the sampler's noise in place of torch's draws.

    The run's own ``model.generate`` and :func:`calopc.models.cells.place` (the policy of ``sampler``) run
    unchanged; only the draws are swapped: the shower model's base draw, CaloPointFlow's latent draw and
    the points' draws (CaloClouds' start noise, the point flow's base draw) come from the latent vector
    as in the exported graph. Returns ``(placed, dense)``: the :class:`~calopc.models.cells.Placed` points
    and the dense float32 cells with the readout threshold, as the HDF5 writer of ``calopc generate``.
    """
    import torch

    from calopc.export import noise as rnd
    from calopc.models.cells import place

    m, geo = loaded.model, loaded.geometry
    z = torch.as_tensor(latent, dtype=torch.float32)
    zs, zx, keys = sampler.split_latent(z)
    key = rnd.shower_key(keys)
    b = zs.shape[0]

    def draws(shower_of, features, dtype):
        counts = torch.bincount(shower_of, minlength=b)
        index = torch.arange(shower_of.shape[0]) - (torch.cumsum(counts, 0) - counts)[shower_of]
        return sampler.point_noise(key[shower_of], index, features).to(dtype)

    shower_model = m.shower if loaded.name == "caloclouds" else m.shower_flow
    shower_model.sample = lambda cond: shower_model.flow(cond).transform.inv(zs.to(cond.dtype))
    patched = [(shower_model, "sample")]
    if loaded.name == "caloclouds":
        orig = type(m).sample_points

        def sample_points(cond, s, shower_of, layer, *, steps=None, latents=None, max_group=None):
            return orig(m, cond, s, shower_of, layer, steps=steps, max_group=max_group,
                        latents=draws(shower_of, len(m.point_dims), cond.dtype))

        m.sample_points = sample_points
        patched.append((m, "sample_points"))
    else:
        nsf = m.latent_flow
        fwd = type(nsf).forward

        class Fixed:
            def __init__(self, dist):
                self.dist = dist

            def sample(self):
                return self.dist.transform.inv(zx.to(torch.float32))

        nsf.forward = lambda c: Fixed(fwd(nsf, c))

        def point_sample(context, sets):
            x = draws(sets.shower, m.flow_features, context.dtype)
            for c in reversed(m.point_flow.couplings):
                x = c.inverse(x, context, sets)
            return x

        m.point_flow.sample = point_sample
        patched += [(nsf, "forward"), (m.point_flow, "sample")]
    try:
        with torch.no_grad():
            g = m.generate(np.asarray(e_inc, dtype=np.float64), loaded.preprocessor)
            gen = torch.Generator().manual_seed(1)
            pl = place(g, geo, policy=sampler.policy, generator=gen)
    finally:
        for obj, name in patched:
            obj.__dict__.pop(name, None)
    n_vox = geo.n_voxels
    dense = torch.zeros(b * n_vox, dtype=torch.float32)
    dense[pl.shower * n_vox + pl.cell] = pl.E.to(torch.float32)
    dense = dense.masked_fill((dense > 0) & (dense < geo.threshold), 0.0)
    return pl, dense.reshape(b, n_vox).numpy()


@pytest.fixture
def library():
    return library_showers
