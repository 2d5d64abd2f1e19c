"""Layer-wise grafting: the Shampoo direction takes, per block, the norm of
a first-order method's direction. Functions work on stacked blocks ``(N, *shape)``.

The grafting methods keep no first moment. Where the optimizer keeps the EMA of the
gradient (``first_moment="gradient"``) the grafting direction is that of the first
moment, ``m_hat / (sqrt(v) + eps)`` (Adam's actual step for "adam"); where it keeps the
EMA of the directions (``first_moment="direction"``) momentum is applied once, to the
grafted direction.
"""

from __future__ import annotations

import math

import torch


def needs_state(method: str) -> bool:
    """Whether ``method`` keeps a per-element second-moment accumulator."""
    return method in ("adagrad", "rmsprop", "adam")


def update_graft_state_(method: str, grad: torch.Tensor, state: torch.Tensor | None,
                        beta2: float) -> None:
    """Accumulates ``grad`` into the second-moment ``state`` of ``method`` (nothing for
    "none" and "sgd"): ``v += g^2`` (adagrad), ``v = b2 v + (1 - b2) g^2`` (rmsprop, adam)."""
    if method in ("none", "sgd"):
        return
    assert state is not None, f"grafting {method!r} needs its accumulator"
    if method == "adagrad":
        state.addcmul_(grad, grad)
    elif method in ("rmsprop", "adam"):
        state.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    else:
        raise ValueError(f"unknown grafting method {method!r}")


def scaled_by_graft_state(method: str, numerator: torch.Tensor, state: torch.Tensor | None,
                          step: int, beta2: float, epsilon: float) -> torch.Tensor:
    """``numerator / (sqrt(v) + eps)`` with ``v`` the accumulated ``state`` (divided by
    Adam's ``1 - b2^step`` first for "adam"); ``numerator`` itself for "none" and "sgd".
    A new tensor unless returned as it is."""
    if method in ("none", "sgd"):
        return numerator
    assert state is not None, f"grafting {method!r} needs its accumulator"
    # One new buffer, then in place: fresh large CPU tensors cost page faults. The
    # operation order is torch.optim's, so the methods agree with it to the last bit.
    denom = state.sqrt()
    if method == "adam":
        denom.div_(math.sqrt(1 - beta2**step))
    denom.add_(epsilon)
    return torch.div(numerator, denom, out=denom)


def graft_direction_(method: str, grad: torch.Tensor, state: torch.Tensor | None, step: int,
                     beta2: float, epsilon: float) -> torch.Tensor:
    """The grafting direction ``A`` of ``grad``; updates ``state`` in place.

    - "none", "sgd": ``A = g``.
    - "adagrad": ``v += g^2``, ``A = g / (sqrt(v) + eps)`` (as ``torch.optim.Adagrad``).
    - "rmsprop": ``v = b2 v + (1 - b2) g^2``, ``A = g / (sqrt(v) + eps)`` (``RMSprop``).
    - "adam": as rmsprop with ``sqrt(v) / sqrt(1 - b2^step)`` (``Adam``, beta1 = 0).
    """
    update_graft_state_(method, grad, state, beta2)
    return scaled_by_graft_state(method, grad, state, step, beta2, epsilon)


def block_norms(blocks: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of each block of ``(N, *shape)``, shape ``(N,)``, in float64.

    Computed in the blocks' dtype first (a float64 copy of every block costs a full
    extra pass); only a norm that came out as 0 or inf, which in float32 may be an
    underflow or overflow rather than the truth, is recomputed in float64. Only that
    block's: a block's norm must not depend on which other blocks share its stack (with
    data parallelism, a rank's stacks hold its own blocks only)."""
    flat = blocks.reshape(blocks.shape[0], -1)
    norms = torch.linalg.vector_norm(flat, dim=1).double()
    if blocks.dtype != torch.float64:
        redo = ~(torch.isfinite(norms) & (norms > 0))
        if bool(redo.any()):
            norms[redo] = torch.linalg.vector_norm(flat[redo], dim=1, dtype=torch.float64)
    return norms


def graft(direction: torch.Tensor, graft_direction: torch.Tensor, *,
          inplace: bool = False) -> torch.Tensor:
    """``direction * ||graft_direction|| / ||direction||`` per block (0 where the
    direction is 0); with ``inplace`` the result is written into ``direction``."""
    direction_norm = block_norms(direction)
    scale = torch.where(direction_norm > 0, block_norms(graft_direction) / direction_norm,
                        torch.zeros_like(direction_norm))
    scale = scale.to(direction.dtype).view(-1, *([1] * (direction.dim() - 1)))
    return direction.mul_(scale) if inplace else direction * scale
