r"""Count the dispatched operators and the host reads of a piece of torch code (CPU dispatch counts).

A :class:`~torch.utils._python_dispatch.TorchDispatchMode` sees every ATen operator that
reaches a backend kernel (after autograd, composite operators already decomposed), forward
and backward. :func:`count_dispatch` counts

* ``ops``: operators that would launch a kernel: everything except views, metadata and
  allocation-only operators (``empty``, ``detach``, ``view``, …) and the syncs below.
  A multi-tensor (``_foreach_*``) or fused (``_fused_adam_``) operator counts once;
* ``syncs``: operators that make the host wait for a value of the device: reading a value
  (``.item()``, ``float(t)``, ``bool(t)``, ``if t:`` → ``_local_scalar_dense``), and
  operators whose output size depends on the data (boolean-mask indexing, ``nonzero``,
  ``masked_select``, ``unique``, ``bincount``, ``repeat_interleave`` without ``output_size``,
  ``torch.equal``, …). ``Tensor.tolist()``, ``.numpy()`` and ``.cpu()`` are no operators on the
  CPU; they are counted as syncs too while counting (a copy to the host on CUDA).

What the counts mean off the CPU: they are **CPU dispatch counts**. A read-back counted here is
one on CUDA too wherever the code takes the same path on both devices (the training loop's
CUDA path can be chosen on the CPU: :func:`training_step`); a read of a tensor that lives on the
host on CUDA as well is counted although the device is not waited for. The operator count is
no bound on CUDA kernel launches: some operators decompose differently there (scaled dot-product
attention is one fused kernel on CUDA and a math decomposition on the CPU; fused and multi-tensor
optimizers launch one kernel per chunk of tensors; ``grouped_mm``), and the counts change with
the torch version.

Example:
    >>> import torch
    >>> x = torch.randn(10)
    >>> c = count_dispatch(lambda: x[x > 0].sum())
    >>> c.syncs, c.ops
    (1, 2)
"""

from __future__ import annotations

__all__ = ["DispatchCount", "count_dispatch", "host_scalars", "training_step"]

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten

# operators that allocate, alias or read metadata only: no kernel launch
_FREE = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "lift_fresh",
         "alias", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size", "_has_compatible_shallow_copy_type",
         "set_", "resize_", "_reshape_alias", "_unsafe_view", "view", "as_strided", "expand", "permute", "t",
         "transpose", "unsqueeze", "squeeze", "select", "slice", "split", "split_with_sizes", "unbind", "narrow",
         "unfold", "diagonal", "view_as_real", "view_as_complex", "movedim", "_conj", "_neg_view", "conj",
         "resolve_conj", "resolve_neg", "record_stream", "is_pinned", "_pin_memory", "lift_fresh_copy", "dim",
         "size", "stride", "is_complex", "is_floating_point", "result_type", "_record_function_enter",
         "_record_function_enter_new", "_record_function_exit"}

# operators whose output size (or value on the host) depends on the data: a sync on CUDA
_SYNC = {"_local_scalar_dense", "nonzero", "masked_select", "_unique", "_unique2", "unique_dim", "unique_consecutive",
         "unique_dim_consecutive", "bincount", "equal", "allclose", "is_nonzero", "nonzero_numpy", "histogram",
         "masked_scatter_backward"}


def _is_bool_index(func: Any, args: tuple) -> bool:
    name = func.__name__.split(".")[0]
    if name not in ("index", "index_put", "index_put_", "_index_put_impl_"):
        return False
    idx = args[1] if len(args) > 1 else ()
    return any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in (idx or ()))


@dataclass
class DispatchCount:
    """The result of :func:`count_dispatch`: totals and per-operator counters."""

    ops: int = 0
    syncs: int = 0
    op_names: Counter = field(default_factory=Counter)
    sync_names: Counter = field(default_factory=Counter)

    def top(self, k: int = 10) -> list[tuple[str, int]]:
        return self.op_names.most_common(k)

    def __str__(self) -> str:
        s = ", ".join(f"{k} {v}" for k, v in self.sync_names.most_common())
        return f"{self.ops} ops, {self.syncs} syncs" + (f" ({s})" if s else "")


class _Counter(TorchDispatchMode):
    def __init__(self, result: DispatchCount) -> None:
        super().__init__()
        self.r = result
        self.host_scalars = False   # inside an optimizer step: CPU step counters (host-only on CUDA too)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        sync = name in _SYNC or _is_bool_index(func, args)
        if name == "repeat_interleave" and kwargs.get("output_size") is None and len(args) < 4:
            sync = True
        if sync and name == "_local_scalar_dense" and self.host_scalars:
            return func(*args, **kwargs)
        if sync:
            self.r.syncs += 1
            self.r.sync_names[name] += 1
            if name == "_local_scalar_dense":
                return func(*args, **kwargs)
        if name not in _FREE and not getattr(func, "is_view", False):
            self.r.ops += 1
            self.r.op_names[name] += 1
        return func(*args, **kwargs)


_ACTIVE: list[_Counter] = []


class host_scalars:  # noqa: N801
    """Inside :func:`count_dispatch`: value reads (``.item()``) are not counted as syncs. For the
    step counters of non-capturable torch optimizers, which live on the host on CUDA as well."""

    def __enter__(self) -> None:
        self.prev = [c.host_scalars for c in _ACTIVE]
        for c in _ACTIVE:
            c.host_scalars = True

    def __exit__(self, *exc: object) -> None:
        for c, p in zip(_ACTIVE, self.prev):
            c.host_scalars = p


def _host_read(name: str, method: Callable) -> Callable:
    def wrapped(self: torch.Tensor, *a: Any, **k: Any) -> Any:
        for c in _ACTIVE:
            if not c.host_scalars:
                c.r.syncs += 1
                c.r.sync_names[name] += 1
        return method(self, *a, **k)

    return wrapped


def count_dispatch(fn: Callable[[], Any], *, repeat: int = 1) -> DispatchCount:
    """Run ``fn()`` ``repeat`` times and count its dispatched operators and host reads (CPU dispatch counts;
    per call, rounded down)."""
    r = DispatchCount()
    counter = _Counter(r)
    _ACTIVE.append(counter)
    saved = {n: getattr(torch.Tensor, n) for n in ("tolist", "numpy", "cpu")}
    try:
        for n, m in saved.items():
            setattr(torch.Tensor, n, _host_read(n, m))
        with counter:
            for _ in range(repeat):
                fn()
    finally:
        for n, m in saved.items():
            setattr(torch.Tensor, n, m)
        _ACTIVE.remove(counter)
    if repeat > 1:
        r.ops //= repeat
        r.syncs //= repeat
    return r


def training_step(model: torch.nn.Module, batch: Any, *, device: torch.device | str = "cpu",
                  fast_splines: str = "on", ema: bool | None = None, log_every: int | None = None,
                  **train_options: Any) -> Callable[[int], dict | None]:
    """``one(i)``: step ``i + 1`` of :func:`calopc.models.train.train` on ``batch``, as the training loop
    runs it (:meth:`calopc.models.train._TrainStep.advance`): learning-rate schedule, forward (or the
    model's ``training_step``), backward, clip, non-finite skip, the optimizers, the EMA, the running
    sums and, every ``log_every`` steps, the one read-back of the record (returned; else None).

    The options are the model family's (:func:`calopc.models.train.train_config`) with
    ``train_options`` and ``log_every`` on top; ``ema`` True/False forces the EMA on (decay 0.999) or off.
    The non-finite handling takes CUDA's sync-free path on every device. Models train in place.
    Used by the GPU-readiness tests and ``benchmarks/throughput.py``.
    """
    from dataclasses import replace

    from . import available, get_model
    from .train import TrainConfig, _ema, _fast_splines, _optimizers, _TrainStep, train_config

    dev = torch.device(device)
    name = next((n for n in available() if get_model(n)[0] is type(model)), None)
    cfg = train_config(name) if name else TrainConfig()
    over: dict[str, Any] = {"batch_size": len(batch), "device": str(dev), "steps": 10 ** 6, **train_options}
    if log_every is not None:
        over["log_every"] = log_every
    if ema is not None:
        over["ema_decay"] = 0.999 if ema else 0.0
    cfg = replace(cfg, **over)
    cfg.validate()
    _fast_splines(model, fast_splines, dev)
    run = _TrainStep(model, _optimizers(model, cfg), cfg, dev, ema=_ema(model, cfg), cuda_path=True)

    def one(i: int) -> dict | None:
        return run.advance(batch, i, 0, 0.0)

    return one
