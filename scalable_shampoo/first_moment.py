"""Where the first moment sits, and the scale of each update.

Classic Shampoo keeps ``betas[0]``'s EMA either of the gradient (``first_moment=
"gradient"``: Adam's, SOAP's and Meta's DistributedShampoo's placement; the EMA is
preconditioned and grafted) or of the per-step preconditioned, grafted directions
(``"direction"``: the paper's and optax's). Both return ``(v, scale)``: the update is
``u = scale * v``, where ``scale`` is the first moment's bias correction when ``v`` is the
raw first moment, so that it folds into the learning rate instead of costing a pass.
"""

from __future__ import annotations

import torch

from .config import ShampooConfig
from .grafting import graft, graft_direction_, scaled_by_graft_state, update_graft_state_
from .preconditioner import BlockStack, StackState


def _preconditioned(stack: BlockStack, state: StackState, x: torch.Tensor,
                    grafting_direction: torch.Tensor, config: ShampooConfig) -> torch.Tensor:
    """``P(x)`` by the stack's roots, grafted per block to ``grafting_direction`` (as it
    is with grafting "none")."""
    result = stack.precondition(state, x)
    if config.grafting == "none":
        return result
    return graft(result, grafting_direction, inplace=True)


def momentum_direction_(momentum: torch.Tensor | None, direction: torch.Tensor,
                        config: ShampooConfig, step: int) -> tuple[torch.Tensor, float]:
    """Momentum: ``m <- beta1 m + (1 - beta1) P``; returns ``(v, scale)`` with
    ``u = scale * v`` equal to ``m_hat`` or, with Nesterov, ``beta1 m_hat + (1 - beta1) P``
    (``P`` itself when ``beta1 == 0``). The scalar bias correction is returned, not
    applied, so that it folds into the learning rate instead of costing a pass; with
    Nesterov ``direction`` is overwritten."""
    beta1 = config.betas[0]
    if beta1 == 0.0 or momentum is None:
        return direction, 1.0
    momentum.mul_(beta1).add_(direction, alpha=1 - beta1)
    correction = 1 - beta1**step if config.bias_correction else 1.0
    if config.nesterov:
        return direction.mul_(1 - beta1).add_(momentum, alpha=beta1 / correction), 1.0
    return momentum, 1.0 / correction


def preconditioned_moment_(stack: BlockStack, state: StackState, blocks: torch.Tensor,
                           config: ShampooConfig, step: int,
                           preconditioned: bool) -> tuple[torch.Tensor, float]:
    """``first_moment="gradient"``: ``m <- beta1 m + (1 - beta1) g``, then the grafting
    direction of the first moment ``x`` (``m_hat``, or with Nesterov ``beta1 m_hat +
    (1 - beta1) g``), ``A = x / (sqrt(v_hat) + eps)`` for "adam" with ``v`` accumulated
    from ``g``; with ``preconditioned``, ``P(x)`` grafted to ``A``. Returns ``(v, scale)``
    as :func:`momentum_direction_`: without Nesterov ``x = m`` and the bias correction
    ``1 / (1 - beta1^t)`` is the returned scale (grafting and preconditioning are linear
    in ``x``). ``blocks`` (the gradient) may be overwritten."""
    update_graft_state_(config.grafting, blocks, state.graft, config.grafting_beta2)
    beta1 = config.betas[0]
    if beta1 == 0.0 or state.momentum is None:
        numerator, scale = blocks, 1.0
    else:
        state.momentum.mul_(beta1).add_(blocks, alpha=1 - beta1)
        correction = 1 - beta1**step if config.bias_correction else 1.0
        if config.nesterov:
            numerator = blocks.mul_(1 - beta1).add_(state.momentum, alpha=beta1 / correction)
            scale = 1.0
        else:
            numerator, scale = state.momentum, 1.0 / correction
    direction = scaled_by_graft_state(config.grafting, numerator, state.graft, step,
                                      config.grafting_beta2, config.grafting_epsilon)
    if preconditioned:
        direction = _preconditioned(stack, state, numerator, direction, config)
    return direction, scale


def classic_direction_(stack: BlockStack, state: StackState, blocks: torch.Tensor,
                       config: ShampooConfig, step: int,
                       preconditioned: bool) -> tuple[torch.Tensor, float]:
    """Classic Shampoo's ``(v, scale)`` for stacked gradient ``blocks`` (overwritten) with
    the first moment where ``config.first_moment`` puts it; ``preconditioned``: whether
    the roots are in use yet (before, the grafting method's direction)."""
    if config.first_moment == "gradient":
        return preconditioned_moment_(stack, state, blocks, config, step, preconditioned)
    direction = graft_direction_(config.grafting, blocks, state.graft, step,
                                 config.grafting_beta2, config.grafting_epsilon)
    if preconditioned:
        direction = _preconditioned(stack, state, blocks, direction, config)
    return momentum_direction_(state.momentum, direction, config, step)


def update_scale(config: ShampooConfig, step: int) -> float:
    """The ``scale`` of ``u = scale * v`` that every stack of a group returns with its
    directions ``v`` (:func:`momentum_direction_`, ``eigenvalue_corrected_direction_``):
    the first moment's bias correction ``1 / (1 - beta1^step)`` where ``v`` is the raw
    first moment, else 1 (no momentum or bias correction, Nesterov, the eigenvalue-
    corrected variant with grafting). A function of the config and the step, a
    parameter's own step count (the same on every rank), so that with data parallelism
    a rank that owns none of the parameter's blocks knows it too."""
    beta1 = config.betas[0]
    grafted_ec = config.preconditioner == "eigenvalue_corrected" and config.grafting != "none"
    if beta1 == 0.0 or not config.bias_correction or config.nesterov or grafted_ec:
        return 1.0
    return 1.0 / (1 - beta1**step)
