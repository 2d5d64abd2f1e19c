"""Checks of what users hand the optimizer beyond each hyperparameter's range (which
:mod:`.config` checks): the names other optimizers use for our arguments, parameters
with sparse gradients, and a learning rate that the parameters' dtype cannot hold.

Each check raises before any state changes, naming what is wrong and what to use instead.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, ParamSpec, Sequence

import torch

if TYPE_CHECKING:
    from .config import ShampooConfig

_BETA1 = ("use betas=(beta1, beta2): beta1 is the momentum, an EMA of the update direction, "
          "m <- beta1 m + (1 - beta1) d (its dampening is 1 - beta1); nesterov=True for "
          "Nesterov momentum")
_NO_OPTION = "Shampoo has no such option"

# Arguments of torch.optim (Adam/AdamW, SGD, RMSprop), of Meta's DistributedShampoo and of
# Google's distributed_shampoo, and what they are called here (or why they have no match).
FOREIGN_NAMES: dict[str, str] = {
    "eps": "use grafting_epsilon, the denominator guard of the Adam grafting (default "
           "1e-8), as AdamW's eps; or adam_epsilon with preconditioner="
           "'eigenvalue_corrected'. (epsilon is not AdamW's eps: it is the factors' "
           "eigenvalue regularization, see ShampooConfig)",
    "momentum": _BETA1,
    "dampening": _BETA1,
    "beta1": "use betas=(beta1, beta2)",
    "beta2": "use betas=(beta1, beta2)",
    "alpha": "RMSprop's smoothing constant is grafting_beta2 here, with grafting='rmsprop'",
    "max_preconditioner_dim": "use block_size, DistributedShampoo's max_preconditioner_dim "
                              "(dimensions are blocked into chunks of at most block_size); "
                              "max_preconditioned_dim is another thing: a dimension above "
                              "it gets no factor at all",
    "use_nesterov": "use nesterov",
    "use_bias_correction": "use bias_correction",
    "use_decoupled_weight_decay": "use decoupled_weight_decay",
    "grafting_config": "use grafting (a method's name: 'none', 'sgd', 'adagrad', 'rmsprop' or "
                       "'adam'), with grafting_beta2 and grafting_epsilon",
    "graft_type": "use grafting ('none', 'sgd', 'adagrad', 'rmsprop' or 'adam')",
    "preconditioner_dtype": "use factor_dtype (storage of the factors)",
    "inv_root_override": "use exponent_multiplier: a block with k preconditioned dimensions "
                         "uses the root exponent exponent_multiplier / (2 k)",
    "matrix_eps": "use epsilon, the factors' eigenvalue regularization (see ShampooConfig)",
    "diagonal_epsilon": "use grafting_epsilon",
    "preconditioning_compute_steps": "use precondition_frequency",
    "statistics_compute_steps": "use statistics_frequency",
    **{name: _NO_OPTION for name in ("amsgrad", "maximize", "fused", "capturable",
                                     "differentiable")},
}

P = ParamSpec("P")


def unknown_keyword_error(name: str, known: Iterable[str], where: str) -> TypeError:
    """The error for a keyword ``where`` does not take: what the name means here, for a
    name other optimizers use, else the closest known names."""
    hint = FOREIGN_NAMES.get(name)
    if hint is None:
        close = difflib.get_close_matches(name, list(known), n=3)
        hint = f"did you mean {' or '.join(map(repr, close))}?" if close else ""
    return TypeError(f"{where} got an unexpected keyword argument {name!r}"
                     + (f": {hint}" if hint else ""))


def explain_unknown_keywords(init: Callable[P, None]) -> Callable[P, None]:
    """Wraps an ``__init__`` so that an unknown keyword gets :func:`unknown_keyword_error`
    instead of Python's bare message. The signature (for ``help`` and type checkers) is
    the wrapped one."""
    known = set(inspect.signature(init).parameters)
    where = init.__qualname__.split(".")[0] + "()"

    @functools.wraps(init)
    def checked(*args: P.args, **kwargs: P.kwargs) -> None:
        for name in kwargs:
            if name not in known:
                raise unknown_keyword_error(name, known, where)
        init(*args, **kwargs)

    return checked


def check_group_keys(group: Mapping[str, Any], index: int) -> None:
    """A param group may hold keys of the user's own (as in ``torch.optim``), but not
    another optimizer's hyperparameter, which would be silently ignored."""
    for name in group:
        if name in FOREIGN_NAMES:
            raise TypeError(f"param group {index}: {name!r} is not a Shampoo "
                            f"hyperparameter: {FOREIGN_NAMES[name]}")


class SparseGradientError(TypeError, RuntimeError):
    """A parameter with sparse gradients. A ``TypeError`` (a parameter of the wrong
    kind) and, like ``torch.optim``'s optimizers' error for it, a ``RuntimeError``."""


def _sparse_error(group_index: int, param_index: int, param: torch.Tensor,
                  what: str) -> SparseGradientError:
    return SparseGradientError(
        f"param group {group_index}, parameter {param_index} (shape {tuple(param.shape)}) "
        f"{what}; Shampoo preconditions dense gradients only. Optimize this parameter "
        "with torch.optim.SparseAdam (a second optimizer over it alone), or give it dense "
        "gradients (e.g. nn.Embedding(..., sparse=False)).")


def check_dense(params: Sequence[torch.Tensor], group_index: int) -> None:
    """At construction: refuses a sparse parameter or one that already has a sparse
    gradient. (An ``nn.Embedding(sparse=True)`` weight is an ordinary tensor until its
    first backward: :func:`check_dense_grads` catches it at ``step()``.)"""
    for pi, param in enumerate(params):
        if param.layout != torch.strided:
            raise _sparse_error(group_index, pi, param, f"is a {param.layout} tensor")
        if param.grad is not None and param.grad.layout != torch.strided:
            raise _sparse_error(group_index, pi, param, "has a sparse gradient")


def check_dense_grads(param_groups: Sequence[Mapping[str, Any]]) -> None:
    """At ``step()``, before any group is touched: refuses sparse gradients."""
    for gi, group in enumerate(param_groups):
        for pi, param in enumerate(group["params"]):
            grad = param.grad
            if grad is not None and grad.layout != torch.strided:
                raise _sparse_error(gi, pi, param, "has a sparse gradient (e.g. from "
                                    "nn.Embedding(sparse=True))")


def largest_step_factor(betas: tuple[float, float], bias_correction: bool) -> float:
    """An upper bound of the factor the momentum's bias correction folds into ``lr``:
    ``1 / (1 - beta1^t) <= 1 / (1 - beta1)``."""
    beta1 = betas[0]
    return 1.0 / (1.0 - beta1) if bias_correction and beta1 > 0 else 1.0


def check_lr_fits(lr: float, weight_decay: float, step_factor: float,
                  params: Sequence[torch.Tensor], group_index: int) -> None:
    """The update is applied in each parameter's dtype with the scalar step size
    ``lr / (1 - beta1^t)`` (at most ``lr * step_factor``), and decoupled weight decay
    scales by ``1 - lr * weight_decay``: both must be finite in that dtype, or the step
    would fail halfway."""
    for dtype in sorted({p.dtype for p in params}, key=str):
        largest = torch.finfo(dtype).max
        limit = largest / max(step_factor, weight_decay, 1.0)
        if lr > limit:
            raise ValueError(
                f"lr must be at most {limit:.3g} for the {dtype} parameters of param group "
                f"{group_index} (the step size lr / (1 - beta1^t), up to {step_factor:.3g} "
                f"lr, and lr * weight_decay must be finite in {dtype}), got {lr!r}")


def check_group_lr(config: "ShampooConfig", params: Sequence[torch.Tensor],
                   group_index: int) -> None:
    """:func:`check_lr_fits` for a param group's hyperparameters."""
    weight_decay = config.weight_decay if config.decoupled_weight_decay else 0.0
    check_lr_fits(config.lr, weight_decay,
                  largest_step_factor(config.betas, config.bias_correction), params,
                  group_index)
