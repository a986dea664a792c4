"""GPU readiness checked on the CPU: host reads and dispatched operators of a training step counted by a
dispatch mode (:mod:`calopc.models.opcount`; CPU dispatch counts), fast splines in every flow, scoped
TF32, the update machinery."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("zuko")

import zuko  # noqa: E402

from calopc.models import get_model  # noqa: E402
from calopc.models.opcount import count_dispatch, training_step  # noqa: E402

#: CPU dispatch counts: operators per training step (train's loop step with the family's options, the
#: CUDA path for non-finite gradients) at the benchmark (default) model sizes on ds2, as the CPU dispatches
#: them with torch 2.13. A regression guard for the CPU code path: no bound on CUDA kernel launches (fused
#: attention and optimizers decompose differently there) and liable to move with the torch version. The
#: flows' spline formulas and the shared 4-transform shower flow dominate (see benchmarks/throughput.py).
CPU_DISPATCH_BUDGET = {"calopointflow": 3_600, "caloclouds": 1_200, "deeptree": 3_700}
#: tiny models of every family, for the whole-run count
TINY = {"calopointflow": {"latent": 4, "encoder_hidden": 16, "point_transforms": 2, "point_hidden": [16, 16],
                          "point_bins": 4, "latent_transforms": 1, "latent_hidden": [16], "shower_transforms": 1,
                          "shower_hidden": [16]},
        "caloclouds": {"widths": [16, 16], "fourier": 8, "layer_embedding": 2, "shower_transforms": 1,
                       "shower_hidden": [16]},
        "deeptree": {"branches": [2, 2, 5], "features": [8, 6, 5, 4], "n_global": 4, "gin_hidden": 16,
                     "branch_hidden": 16, "cond_hidden": 8, "head_hidden": 16, "layer_embedding": 4,
                     "critic_hidden": 16, "critic_heads": 4, "shower_transforms": 1, "shower_hidden": [16]}}


@pytest.fixture(scope="module")
def ds2(tmp_path_factory):
    """16 synthetic dataset-2 showers as a training dataset."""
    from calopc.converters import convert_file
    from calopc.models.data import ShowerDataset
    from calopc.synth import write_synthetic

    tmp = tmp_path_factory.mktemp("ds2")
    h5 = write_synthetic(tmp / "ds2.hdf5", dataset="2", n=16, seed=0)
    return ShowerDataset.from_parquet(convert_file(h5, tmp / "ds2.parquet", progress=False))


def _model_and_batch(ds, name: str, config: dict | None = None, batch: int = 4):
    from calopc.models.data import DeviceCollate, iterate_batches

    model_cls, cfg_cls = get_model(name)
    cfg = cfg_cls.from_dict(config or {})
    prep = ds.fit_preprocessor(seed=0, **cfg.preprocessing())
    torch.manual_seed(0)
    model = model_cls(cfg.with_data(prep)).train()
    b = next(iter(iterate_batches(ds, DeviceCollate(prep, "cpu", seed=0), batch, seed=0)))
    return model, b, prep


# ---------------------------------------------------------------------------------------------- syncs, launches
@pytest.mark.parametrize("name", sorted(CPU_DISPATCH_BUDGET))
def test_a_training_run_reads_back_once_per_log_record_and_never_in_between(toy_parquet, tmp_path, monkeypatch, name):
    """The whole of train() (data, schedule, forward, backward, clip, optimizer, EMA, progress, records):
    ``2L`` steps read back exactly one value more than ``L`` steps, the record at step ``L``."""
    from functools import partialmethod

    import calopc.models.train as tr

    # the CUDA path for non-finite gradients (the CPU path skips them exactly, reading one flag per step)
    monkeypatch.setattr(tr._TrainStep, "__init__", partialmethod(tr._TrainStep.__init__, cuda_path=True))
    steps = 4                                # L: 2L steps stay within one epoch of the 48 toy showers
    syncs = {}
    for n in (steps, 2 * steps):
        cfg = tr.train_config(name, steps=n, batch_size=4, log_every=steps, checkpoint_every=10 ** 6, warmup=1,
                              device="cpu", progress=False)
        syncs[n] = count_dispatch(lambda n=n, cfg=cfg: tr.train(name, toy_parquet, tmp_path / f"{name}{n}",
                                                               model_config=TINY[name], config=cfg))
    extra = syncs[2 * steps].syncs - syncs[steps].syncs
    assert extra == 1, f"{name}: {steps} more steps read back {extra} times: {syncs[2 * steps]} vs {syncs[steps]}"


@pytest.mark.parametrize("name", sorted(CPU_DISPATCH_BUDGET))
def test_training_step_reads_back_only_its_log_record_and_fits_the_cpu_dispatch_budget(ds2, name):
    model, batch, _ = _model_and_batch(ds2, name)
    one = training_step(model, batch, log_every=2)
    assert one(0) is None and one(1) is not None      # optimizer state allocated; step 2 is logged
    quiet = count_dispatch(lambda: one(2))
    logged = count_dispatch(lambda: one(3))
    assert quiet.syncs == 0, f"{name}: {quiet}"
    assert logged.syncs == 1 and logged.sync_names == {"tolist": 1}, f"{name}: {logged}"
    assert quiet.ops <= CPU_DISPATCH_BUDGET[name], f"{name}: {quiet}; top ops {quiet.top(8)}"


@pytest.mark.parametrize("name", sorted(CPU_DISPATCH_BUDGET))
def test_generation_batch_reads_back_once(ds2, name):
    """The model's sampling of a batch: one read-back (the number of points); placement in cells is apart."""
    import numpy as np

    model, _, prep = _model_and_batch(ds2, name, {"steps": 1} if name == "caloclouds" else None)
    model.eval()
    e = np.geomspace(1e3, 1e6, 6)
    with torch.no_grad():
        c = count_dispatch(lambda: model.generate(e, prep))
    assert c.syncs <= 1, f"{name}: {c}"


def test_transformer_step_syncs_nothing_and_its_launches_do_not_grow_with_the_batch(ds2):
    counts = []
    for b in (2, 4):
        model, batch, _ = _model_and_batch(ds2, "caloclouds", {"denoiser": "transformer", "dim": 16, "mlp": 16}, b)
        one = training_step(model, batch, log_every=10)
        one(0)
        counts.append(count_dispatch(lambda one=one: one(1)))
    assert [c.syncs for c in counts] == [0, 0], counts
    assert counts[0].ops == counts[1].ops


def test_band_attention_reads_nothing_back_and_has_no_per_group_work():
    from calopc.models.diffusion import band_attention

    def run(p: int, max_elements: int) -> tuple:
        g = torch.Generator().manual_seed(p)
        shower = torch.randint(0, max(1, p // 20), (p,), generator=g)
        layer = torch.randint(0, 7, (p,), generator=g)
        q, k, v = (torch.randn(p, 2, 4, generator=g) for _ in range(3))
        c = count_dispatch(lambda: band_attention(q, k, v, shower, layer, 7, 2, max_group=p, max_elements=max_elements))
        return c.syncs, c.ops

    small, large = run(40, 1 << 28), run(400, 1 << 28)
    assert small[0] == large[0] == 0
    assert small[1] == large[1]                # one attention call whatever the number of groups
    assert run(400, 1)[0] == 0                  # chunked by shapes only: still no read-back


def test_shower_model_sampling_launches_do_not_grow_with_the_batch():
    from calopc.models.flows import use_fast_splines
    from calopc.models.shower import ShowerModel, ShowerModelConfig

    m = ShowerModel(4, config=ShowerModelConfig(transforms=2, hidden=(16,)))
    use_fast_splines(m)
    a = count_dispatch(lambda: m.sample(torch.zeros(3, 1)))
    b = count_dispatch(lambda: m.sample(torch.zeros(300, 1)))
    assert a.ops == b.ops and a.syncs == b.syncs == 0
    coupling = ShowerModel(45, config=ShowerModelConfig(passes=2))
    use_fast_splines(coupling)
    assert count_dispatch(lambda: coupling.sample(torch.zeros(5, 1))).ops <= 2_000


# ---------------------------------------------------------------------------------------------- fast splines
@pytest.mark.parametrize(("name", "config"), [
    ("calopointflow", {}),                              # DeepSetFlow (set summary), latent and shower flows
    ("calopointflow", {"set_summary": False}),          # zuko coupling NSF point flow
    ("caloclouds", {}),
    ("deeptree", {}),
])
def test_fast_splines_reach_every_flow_of_every_model(ds2, monkeypatch, name, config):
    from calopc.models.flows import FastRQSTransform, use_fast_splines

    model, batch, prep = _model_and_batch(ds2, name, config, batch=2)
    built = {"zuko": 0, "fast": 0}
    zuko_init, fast_init = zuko.transforms.MonotonicRQSTransform.__init__, FastRQSTransform.__init__

    def count(kind, init):
        def wrapped(self, *a, **k):
            built[kind] += type(self) is zuko.transforms.MonotonicRQSTransform or kind == "fast"
            return init(self, *a, **k)
        return wrapped

    monkeypatch.setattr(zuko.transforms.MonotonicRQSTransform, "__init__", count("zuko", zuko_init))
    monkeypatch.setattr(FastRQSTransform, "__init__", count("fast", fast_init))

    def use():
        model.loss(batch).backward()
        model.shower_model.sample(batch.cond) if hasattr(model, "shower_model") else None
        if hasattr(model, "sample_shower"):
            model.sample_shower(batch.cond)

    assert use_fast_splines(model) > 0
    use()
    assert built["zuko"] == 0 and built["fast"] > 0, built
    use_fast_splines(model, False)             # and back: the same places build zuko's class again
    built.update(zuko=0, fast=0)
    use()
    assert built["zuko"] > 0 and built["fast"] == 0, built


# ---------------------------------------------------------------------------------------------- precision
def test_tf32_is_scoped_to_cuda_blocks():
    from calopc.models.precision import _knobs, fast_matmul

    before = [getattr(o, a) for o, a, _ in _knobs()]
    with fast_matmul(torch.device("cpu")):
        assert [getattr(o, a) for o, a, _ in _knobs()] == before
    with fast_matmul(torch.device("cuda")):   # only flags: works without a GPU
        assert [getattr(o, a) for o, a, _ in _knobs()] == [v for _, _, v in _knobs()]
    assert [getattr(o, a) for o, a, _ in _knobs()] == before


def test_tf32_settings_come_back_when_the_cuda_block_raises():
    """An exception inside ``fast_matmul("cuda")`` (flags only: no GPU needed) restores the caller's settings,
    also when they differ from torch's defaults."""
    from calopc.models.precision import _knobs, fast_matmul

    knobs = _knobs()
    saved = [getattr(o, a) for o, a, _ in knobs]
    caller = ["ieee" if isinstance(v, str) else False for _, _, v in knobs]   # not TF32, set explicitly
    try:
        for (o, a, _), v in zip(knobs, caller):
            setattr(o, a, v)
        with pytest.raises(RuntimeError, match="inside the block"):
            with fast_matmul("cuda"):
                assert [getattr(o, a) for o, a, _ in knobs] == [v for _, _, v in knobs]
                raise RuntimeError("inside the block")
        assert [getattr(o, a) for o, a, _ in knobs] == caller
    finally:
        for (o, a, _), v in zip(knobs, saved):
            setattr(o, a, v)


# ---------------------------------------------------------------------------------------------- update machinery
def test_non_finite_skip_costs_the_same_launches_for_any_number_of_parameters():
    from calopc.models.train import TrainConfig, _Stepper

    def ops(n_params: int) -> int:
        params = [torch.nn.Parameter(torch.randn(3)) for _ in range(n_params)]
        opt = torch.optim.Adam(params, foreach=True)
        st = _Stepper({"m": opt}, TrainConfig(), torch.device("cpu"), 1)
        st.exact_skip = False                   # the CUDA path
        for p in params:
            p.grad = torch.ones_like(p)
        st.update("m")                          # optimizer state allocated
        for p in params:
            p.grad = torch.full_like(p, float("nan"))
        c = count_dispatch(lambda: st.update("m"))
        assert all(torch.isfinite(p.grad).all() for p in params)
        return c.ops

    assert ops(4) == ops(40)


def test_deeptree_power_iteration_once_per_critic_update(ds2):
    from calopc.models.deeptree import _OncePerUpdateSpectralNorm

    model, batch, _ = _model_and_batch(ds2, "deeptree", batch=2)
    sn = next(m for m in model.critic.modules() if isinstance(m, _OncePerUpdateSpectralNorm))
    opts = model.configure_optimizers(None)
    cond = model.condition(batch.cond, batch.n, batch.shower)
    crit = lambda: model.critic(batch.x, batch.layer, batch.mask, cond, batch.shower)  # noqa: E731
    crit()
    u0 = sn._u.clone()
    crit()
    assert torch.equal(u0, sn._u)              # no update since the last pass: no iteration
    loss = model.critic_loss(batch, (*model._fake(batch, cond, model.layer_counts(batch))[0],
                                     model._fake(batch, cond, model.layer_counts(batch))[1]), cond)
    opts["critic"].zero_grad()
    loss.backward()
    opts["critic"].step()
    crit()
    assert not torch.equal(u0, sn._u)          # the weights changed: one iteration
    # σ_max(W / σ) ≈ 1 after a few iterations
    for _ in range(30):
        sn.pending = True
        crit()
    lin = next(m for m in model.critic.modules() if isinstance(m, torch.nn.Linear)
               and hasattr(m, "parametrizations"))
    assert torch.linalg.matrix_norm(lin.weight.detach(), ord=2) == pytest.approx(1.0, rel=0.05)


def test_compile_is_refused_loudly_for_custom_training_steps(toy_parquet, tmp_path):
    from calopc.models.train import TrainConfig, train

    with pytest.raises(ValueError, match="compile"):
        train("deeptree", toy_parquet, tmp_path / "run", config=TrainConfig(steps=1, batch_size=4, compile=True,
                                                                             device="cpu", progress=False))


def test_ranks_draw_different_model_noise():
    from calopc.models.train import rank_seed

    assert len({rank_seed(7, r) for r in range(8)}) == 8 and rank_seed(7, 0) == 7
