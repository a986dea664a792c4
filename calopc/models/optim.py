r"""Optimizers whose step reads nothing back from a tensor.

torch's multi-tensor RAdam (``torch.optim.RAdam(foreach=True)``, not capturable) keeps each
parameter's step count in a tensor and reads it back to the host five times per parameter and
step, to compute the rectification and the bias corrections as Python numbers. On a model of 57
parameter tensors that is 285 value reads per training step. Its capturable mode computes the
same terms on the device instead, but it exists only for CUDA (not on the CPU, where the tests
count operators), and it adds two operators per parameter.

:class:`RAdam` is the same algorithm with the step counts mirrored on the host: the Python
numbers are computed from the mirror, in the same order as torch's multi-tensor code, so the
updates are those of ``torch.optim.RAdam(foreach=True)`` to the bit, and no step reads a tensor.
Its ``state_dict`` has torch's format (a checkpoint loads into either class).

Example:
    >>> import torch
    >>> w = torch.nn.Parameter(torch.ones(3))
    >>> opt = RAdam([w], lr=0.1)
    >>> w.grad = torch.ones(3)
    >>> opt.step()
"""

from __future__ import annotations

__all__ = ["RAdam"]

from collections.abc import Callable, Iterable
from typing import Any

import torch


class RAdam(torch.optim.RAdam):
    """Multi-tensor RAdam (Liu et al., 2020, https://arxiv.org/abs/1908.03265) with host-side step counts.

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        lr: learning rate (a Python number: the schedule sets it on the host).
        betas: decay rates of the first and second moments.
        eps: added to the square root of the second moment.
        weight_decay: L2 penalty (added to the gradient), or decoupled (AdamW-like) when
            ``decoupled_weight_decay``.
        decoupled_weight_decay: multiply the parameters by ``1 - lr * weight_decay`` instead.

    Raises:
        TypeError: a tensor ``lr``.
        ValueError: any value ``torch.optim.RAdam`` refuses; a state with ``maximize``, ``capturable`` or
            ``differentiable`` (not supported); a complex parameter or a sparse gradient at :meth:`step`.

    A parameter's count is read from its state once after :meth:`load_state_dict` (one read per
    parameter on the first step of a resumed run) and written back to the state by :meth:`state_dict`.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, decoupled_weight_decay: bool = False) -> None:
        if isinstance(lr, torch.Tensor):
            msg = "RAdam: lr must be a Python number (a tensor lr would be read back every step)"
            raise TypeError(msg)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         decoupled_weight_decay=decoupled_weight_decay, foreach=True)
        self._host_steps: dict[torch.Tensor, int] = {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for g in state_dict.get("param_groups", []):
            for key in ("maximize", "capturable", "differentiable"):
                if g.get(key):
                    msg = f"RAdam: a state with {key}=True cannot be loaded (not supported)"
                    raise ValueError(msg)
        super().load_state_dict(state_dict)
        self._host_steps = {}

    def state_dict(self) -> dict[str, Any]:
        for p, n in self._host_steps.items():
            self.state[p]["step"].fill_(float(n))
        return super().state_dict()

    def _count(self, p: torch.Tensor) -> int:
        """The step number of this update of ``p`` (its state created on its first update)."""
        state = self.state[p]
        if not state:
            # torch's layout: a host scalar of the default float type (float64 under a float64 default)
            state["step"] = torch.zeros((), dtype=torch.float64 if torch.get_default_dtype() == torch.float64
                                        else torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            self._host_steps[p] = 0
        elif p not in self._host_steps:  # a loaded state: read its count once
            self._host_steps[p] = int(state["step"].item())
        self._host_steps[p] += 1
        return self._host_steps[p]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["maximize"] or group["capturable"] or group["differentiable"]:
                msg = "RAdam: maximize, capturable and differentiable are not supported"
                raise ValueError(msg)
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if p.grad.is_sparse or torch.is_complex(p):
                    msg = "RAdam: sparse gradients and complex parameters are not supported"
                    raise ValueError(msg)
            t = [float(self._count(p)) for p in params]
            grads = [p.grad for p in params]
            avg = [self.state[p]["exp_avg"] for p in params]
            avg_sq = [self.state[p]["exp_avg_sq"] for p in params]
            _update(params, grads, avg, avg_sq, t, lr=float(group["lr"]), betas=group["betas"], eps=group["eps"],
                    weight_decay=group["weight_decay"], decoupled=group["decoupled_weight_decay"])
        return loss


def _update(params: list[torch.Tensor], grads: list[torch.Tensor], avg: list[torch.Tensor],
            avg_sq: list[torch.Tensor], t: list[float], *, lr: float, betas: tuple[float, float], eps: float,
            weight_decay: float, decoupled: bool) -> None:
    """The RAdam update of one parameter group; ``t``: each parameter's step number (1 on its first update)."""
    beta1, beta2 = betas
    rho_inf = 2 / (1 - beta2) - 1                  # the limit of the simple moving average's length
    rho = [rho_inf - 2 * s * (beta2 ** s) / (1 - beta2 ** s) for s in t]
    rect = [((r - 4) * (r - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * r)) ** 0.5 if r > 5 else 0
            for r in rho]
    bias1 = [1 - beta1 ** s for s in t]
    # early steps (no rectification): plain momentum, lr / bias1; later: the adaptive step below
    plain = [(lr * (0 if r > 0 else 1.0) / b) * -1 for r, b in zip(rect, bias1)]
    adaptive = [((1 - beta2 ** s) ** 0.5) * (lr * r / b) * -1 for s, r, b in zip(t, rect, bias1)]
    if weight_decay != 0:
        if decoupled:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        else:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
    torch._foreach_lerp_(avg, grads, 1 - beta1)
    torch._foreach_mul_(avg_sq, beta2)
    torch._foreach_addcmul_(avg_sq, grads, grads, 1 - beta2)
    # step = m * (sqrt(1 - beta2^t) * rect * lr / bias1 / (sqrt(v) + eps) + plain), both terms negative
    buf = torch._foreach_sqrt(avg_sq)
    torch._foreach_add_(buf, eps)
    torch._foreach_div_(buf, adaptive)
    torch._foreach_reciprocal_(buf)
    torch._foreach_add_(buf, plain)
    torch._foreach_addcmul_(params, avg, buf)
