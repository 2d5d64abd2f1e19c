"""Validated hyperparameters of the Shampoo optimizer: meaning, range and default.

Every field may also be set per parameter group, as in ``torch.optim``; each group's
values are validated through :meth:`ShampooConfig.from_group` at construction and on
every step (so a scheduler that writes a bad value is caught at once).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from .matrix_functions import DEFAULT_CHECK_TOLERANCE

GRAFTING_METHODS = ("none", "sgd", "adagrad", "rmsprop", "adam")
ROOT_METHODS = ("eigh", "newton")
PRECONDITIONERS = ("shampoo", "eigenvalue_corrected")
EIGENBASIS_METHODS = ("eigh", "qr")
FIRST_MOMENTS = ("gradient", "direction")
# Where the first moment sits when ``first_moment`` is left as None.
DEFAULT_FIRST_MOMENT = {"shampoo": "gradient", "eigenvalue_corrected": "gradient"}
# The grafting method each preconditioner uses when ``grafting`` is left as None.
DEFAULT_GRAFTING = {"shampoo": "adam", "eigenvalue_corrected": "adam"}
# The eigenvalue-corrected bases' dtype when ``root_dtype`` is left as None: float64
# (float32 bases moved its trajectory by 1e-2 under a change of summation order, against
# 1e-5 with float64; a basis has no check). Classic roots keep None: see ``root_dtype``.
DEFAULT_BASIS_DTYPE = torch.float64
# Whether vectors get a factor when ``precondition_1d`` is left as None.
DEFAULT_PRECONDITION_1D = {"shampoo": True, "eigenvalue_corrected": False}
FLOAT_DTYPES = (torch.float32, torch.float64)

# Fields whose change after the first step would change the state's layout.
STRUCTURAL_FIELDS = ("block_size", "max_preconditioned_dim", "factor_dtype", "grafting",
                     "preconditioner", "precondition_1d", "merge_dims")


def _check_real(name: str, value: Any, low: float, high: float, *, low_open: bool = False,
                high_open: bool = False) -> None:
    try:
        finite = math.isfinite(value)
    except (TypeError, OverflowError):
        finite = False
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not finite:
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        hi = "inf" if math.isinf(high) else repr(high)
        raise ValueError(f"{name} must be in {left}{low!r}, {hi}{right}, got {value!r}")


def _scalar(name: str, value: Any) -> Any:
    """A one-element real tensor as a Python float (``torch.optim`` accepts a tensor lr,
    which schedulers then update in place); any other value as it is."""
    if not isinstance(value, torch.Tensor):
        return value
    if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
        raise ValueError(f"{name} must be a finite real number or a one-element real tensor, "
                         f"got a {value.dtype} tensor of shape {tuple(value.shape)}")
    return value.item()


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices!r}, got {value!r}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


@dataclass(frozen=True)
class ShampooConfig:
    """Hyperparameters of one parameter group.

    Attributes:
        lr: step size, >= 0: a number or a one-element tensor (as ``torch.optim``
            accepts; a param group keeps the tensor, so that schedulers update it in
            place, and its value is read at every step). Here always a float.
            Default 1e-3.
        betas: ``(beta1, beta2)``. ``beta1`` in [0, 1) is the momentum EMA of the
            update direction (0: no momentum); ``beta2`` in (0, 1] is the EMA of the
            Kronecker factors (unless ``factor_beta`` is set), where 1 means the plain
            running sum (Adagrad-style). With ``preconditioner="eigenvalue_corrected"``
            they are Adam's betas of the first and (rotated) second moment; there
            ``beta2 = 1`` is the running sum without bias correction. Default (0.9, 0.999).
        epsilon: > 0, the factors' eigenvalue regularization. With
            ``relative_epsilon`` (the default) it is relative to each factor's largest
            eigenvalue: the inverse root is ``(S + epsilon * lambda_max(S) I)^(-e)``
            (eigenvalues clamped at 0 first; a zero factor gives the identity), so it is
            unitless and independent of the gradients' scale. Without it, ``epsilon`` is
            added as it is, in units of squared gradient. For "eigenvalue_corrected" it
            is the threshold (in the same sense) below which a basis direction counts as
            null: the rotated coordinates along a factor's null directions share one
            second moment. Why relative and not 1e-12: factors that have seen fewer
            gradients than their size (and merged small layers, vectors) are rank
            deficient; their null-space eigenvalues are rounding noise, which an absolute
            1e-12 amplifies up to ~1e3x against the signal directions, so the trajectory
            then depends on float rounding by percents (issue 11's note). Default 1e-6.
        relative_epsilon: whether ``epsilon`` is relative to the largest eigenvalue
            (True, the default; optax's Distributed Shampoo does the same) or absolute.
        weight_decay: >= 0. Decoupled (AdamW-style, ``p -= lr * wd * p``) unless
            ``decoupled_weight_decay=False``, then added to the gradient. Default 0.
        block_size: >= 1. Adjacent dimensions are merged while their product stays
            <= block_size (with ``merge_dims``), larger ones split into chunks of
            block_size. Default 1024.
        merge_dims: whether adjacent dimensions are merged up to ``block_size`` (size-1
            dimensions are squeezed either way). True merges a conv kernel
            ``(32, 16, 3, 3)`` into ``(512, 9)`` and a ``(6, 25)`` weight into one
            150-long vector whose single full-matrix factor is rank deficient for its
            first 150 gradients; False keeps one factor per dimension, as
            pytorch-optimizer's SOAP does. Measured with the SOAP settings on ``compare``'s
            ``image`` and ``autoencoder`` (one seed, three learning rates, best held-out
            loss): 0.0015 against 0.0048 on ``image`` (within the ~1.5x one-seed noise
            of that workload) and 0.101 against 0.097 on ``autoencoder``, with no fewer
            steps to AdamW's target on either. Default True.
        max_preconditioned_dim: >= 1. A (merged) dimension above this gets no factor
            (identity) and is not split; e.g. a large embedding vocabulary. Default 8192.
        precondition_frequency: >= 1 steps between root recomputations. Default 100.
        start_preconditioning_step: >= 1, the first step that uses (and computes)
            roots; before it the grafting direction is used. None: equal to
            ``precondition_frequency`` for "shampoo"; 1 for "eigenvalue_corrected" (SOAP
            computes its first basis from the first gradient; measured in issue 6's note,
            a first basis at step 10 left the ``autoencoder`` workload on its plateau).
        statistics_frequency: >= 1; factors are updated at steps 1, 1+k, 1+2k, ...
            Default 1.
        grafting: one of "none", "sgd", "adagrad", "rmsprop", "adam": the first-order
            method whose per-block step norm the preconditioned direction takes. None
            (the default) means "adam" for both preconditioners; it is resolved here, so
            the attribute always holds a method's name (a param group keeps None and
            resolves by its own preconditioner). For "eigenvalue_corrected", "adam"
            (the grafting direction of the gradient, without momentum, or of the first
            moment with ``grafting_momentum``) keeps the step's
            size where a basis concentrates it: a factor that has seen few gradients
            (a merged small layer, any factor early on) spans few directions, and Adam
            in that basis moves along those alone, so each basis refresh cut the step
            norm 3-17x (docs/convergence.md); with "none" (SOAP's own rule) the step is
            the rotated Adam step as it is.
        grafting_momentum: eigenvalue_corrected only (classic Shampoo's ``first_moment``
            decides there). With grafting, whether each block's step takes the norm of the
            grafting method's direction of the *first moment* (True: ``m_hat / (sqrt(v_hat)
            + eps)`` for "adam", Adam's actual step, or with Nesterov of ``b1 m_hat + (1 -
            b1) g``, as classic Shampoo with ``first_moment="gradient"`` grafts) or of the
            gradient (False: ``g / (sqrt(v_hat) + eps)``, Adam's step without momentum).
            True keeps the learning rate on AdamW's scale and the step shrinking where the
            gradients' directions disagree, as Adam's does; it costs one more rotation
            per step (the first moment is stored rotated). False makes the step about
            ``sqrt((1 + b1) / (1 - b1))`` times larger where the gradient is mostly noise
            (6x for b1 = 0.95), so the best learning rate is lower (1e-3 instead of AdamW's
            3e-3 to 1e-2). Measured with the SOAP settings on ``compare``'s four
            workloads (two seeds, three learning rates): True took 0.35x AdamW's steps
            to its target on ``image`` (False 0.58x) and 0.42x on ``autoencoder``
            (0.60x), but 0.75x on ``lm`` (0.65x), and ended at a higher held-out loss on
            all four. With ``nesterov=True`` as well: 0.32x on ``image``, the lowest
            held-out loss on ``lm`` and ``image``. Default False.
        grafting_beta2: in (0, 1), second-moment EMA of rmsprop/adam grafting (1 would
            freeze the accumulator at 0). Default 0.999.
        grafting_epsilon: > 0, denominator guard of adagrad/rmsprop/adam grafting.
            Default 1e-8.
        root_method: "eigh" (symmetric eigendecomposition, the reference) or "newton"
            (coupled Newton iteration, matmul only). Default "eigh".
        root_dtype: torch.float32 or torch.float64, precision of root computations.
            With "eigh", float32 and a finite ``root_check_tolerance``, each float32
            root is checked in float64 and recomputed in float64 where the check fails
            (see ``root_check_tolerance``). None (the default): for "shampoo", float32
            (checked) for eigh roots stored in float32 or narrower (float32/bfloat16
            parameters), float64 for float64 parameters and for Newton; the check
            costs ``O(n^2)`` and float32 eigh about half of float64's where it passes
            (it keeps float64 accuracy where it does not, and the runs rounding-stable).
            float32 is tried only where cheap lower bounds on a factor's condition
            number (its diagonal's spread, a float32 Cholesky) are below 50; most
            factors of real training are above and take float64 directly.
            For "eigenvalue_corrected" None means torch.float64 (resolved here).
        root_check_tolerance: > 0 or ``math.inf``; eigh roots in float32 only: the
            largest relative residual ``||X^b (S + r I)^a z - z||`` (exponent ``a/b``,
            fixed unit probes ``z``, computed in float64; about ``b`` times the root's
            relative error) a float32 root may have; roots above it are recomputed in
            float64 (an exponent that is no such fraction always is). ``math.inf``:
            plain float32, unchecked. Default 1e-4.
        factor_dtype: torch.float32 or torch.float64, storage (and accumulation) of the
            factors. float32 factors carry rounding noise of ~1e-7 of their largest
            eigenvalue into their null spaces, which the root then scales up: measured
            over 300 steps, float32 factors moved the trajectory by 1e-3 (eigenvalue-
            corrected) and 3e-3 (classic) under a change of summation order, float64 by
            1e-5. Factors are symmetric and stored packed, ``d (d + 1) / 2`` entries
            each (a ``d x d`` float64 factor takes ``4 d (d + 1)`` bytes). Default
            torch.float64.
        exponent_multiplier: > 0; a block with k preconditioned dimensions uses the
            exponent ``exponent_multiplier / (2 k)``. Default 1.
        nesterov: Nesterov momentum. Default False.
        first_moment: where ``betas[0]``'s EMA sits (classic Shampoo). "gradient": the
            EMA of the gradient, ``m <- b1 m + (1 - b1) g``, is preconditioned and
            grafted (to ``m_hat / (sqrt(v_hat) + eps)``, Adam's actual step, with "adam"
            grafting); before preconditioning starts the step is the grafting method's
            with momentum (Adam itself with "adam"). Adam's, SOAP's and Meta's
            DistributedShampoo's placement. "direction": the EMA of the per-step
            preconditioned, grafted directions, ``m <- b1 m + (1 - b1) P``, the paper's
            and optax's placement. Nesterov uses ``b1 m_hat + (1 - b1) x`` with ``x``
            the gradient or the direction. None (the default) means "gradient":
            measured on the ``compare`` workloads it reached a much lower loss on the
            deep autoencoder (0.138 against 0.174) and a slightly higher one on the
            language model (1.503 against 1.479). "eigenvalue_corrected" always keeps
            the gradient's EMA ("gradient", the only value it accepts).
        bias_correction: divide the momentum by ``1 - beta1^t`` (eigenvalue_corrected:
            also the second moment by ``1 - beta2^t``, as Adam). Default True.
        decoupled_weight_decay: see ``weight_decay``. Default True.
        newton_max_iterations: >= 1, iteration cap of the Newton root. Default 100.
        newton_tolerance: > 0, Newton stops once ``max|M - I|`` is below it. Default 1e-6.
        root_failure_threshold: > 0; a root whose residual exceeds it is rejected and
            the previous root stays in use. Default 0.1.
        preconditioner: "shampoo" (inverse roots of the Kronecker factors) or
            "eigenvalue_corrected" (Adam in the factors' eigenbases, SOAP, see
            :mod:`.eigenvalue_corrected`; ``root_method``, ``exponent_multiplier``,
            ``newton_*`` and ``root_failure_threshold`` do not apply to it, ``epsilon``
            marks null directions). Default "shampoo".
        eigenbasis_method: eigenvalue_corrected only: how a factor's eigenbasis is
            refreshed after the first one (always "eigh"): "eigh" (recomputed) or "qr"
            (one power step ``S U`` and a QR decomposition, warm-started from the
            previous basis; cheaper, tracks slowly changing factors). Default "eigh".
        basis_refresh_tolerance: >= 0, eigenvalue_corrected only. A refresh of a
            factor's basis ``U`` is skipped while ``||offdiag(U^T S U)||_F <= tol *
            ||S||_F`` (relative, unitless); 0 refreshes always. Default 0.
        factor_beta: None or in (0, 1]: the EMA of the Kronecker factors (1: running
            sum). None uses ``betas[1]``. SOAP typically uses 0.95. Default None.
        precondition_1d: whether a parameter with at most one dimension of size > 1 (a
            bias, a norm's scale; squeezed, before merging) gets a factor: full-matrix
            preconditioning of the vector. False leaves it to the grafting method alone
            (shampoo) or to Adam (eigenvalue_corrected). None (the default) means True
            for "shampoo" (the paper's treatment) and False for "eigenvalue_corrected"
            (SOAP's; measured in issue 6's note, a preconditioned bias slowed
            eigenvalue-corrected training markedly). Resolved like ``grafting``.
        adam_epsilon: > 0, eigenvalue_corrected only: added to ``sqrt(v_hat)`` in the
            denominator of the rotated Adam step, in gradient units (at least the work
            dtype's smallest normal number). Default 1e-8.
        root_delay: steps, in [0, precondition_frequency]: roots computed from the
            statistics of step t are put in use at step t + root_delay, and the first
            preconditioned step is ``start_preconditioning_step + root_delay``. Part of
            the algorithm, not of the implementation: the trajectory is the same whether
            the roots are computed at once or on background workers (``async_roots``).
            None: 0 when synchronous (1 for "eigenvalue_corrected"), ``max(1,
            precondition_frequency // 2)`` with ``async_roots=True`` (which needs a
            delay >= 1). With eigenvalue_corrected the eigenbases are delayed the same
            way; its synchronous default of 1 is SOAP's order: a basis never rotates the
            gradient it was computed from (a basis from one gradient turns it into a few
            singular values plus rounding noise, and Adam's normalization would make
            that noise full-size steps).
    """

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    epsilon: float = 1e-6
    weight_decay: float = 0.0
    block_size: int = 1024
    max_preconditioned_dim: int = 8192
    precondition_frequency: int = 100
    start_preconditioning_step: int | None = None
    statistics_frequency: int = 1
    grafting: str | None = None
    grafting_beta2: float = 0.999
    grafting_epsilon: float = 1e-8
    root_method: str = "eigh"
    root_dtype: torch.dtype | None = None
    root_check_tolerance: float = DEFAULT_CHECK_TOLERANCE
    factor_dtype: torch.dtype = torch.float64
    exponent_multiplier: float = 1.0
    nesterov: bool = False
    bias_correction: bool = True
    decoupled_weight_decay: bool = True
    newton_max_iterations: int = 100
    newton_tolerance: float = 1e-6
    root_failure_threshold: float = 0.1
    preconditioner: str = "shampoo"
    root_delay: int | None = None
    eigenbasis_method: str = "eigh"
    basis_refresh_tolerance: float = 0.0
    factor_beta: float | None = None
    adam_epsilon: float = 1e-8
    precondition_1d: bool | None = None
    relative_epsilon: bool = True
    first_moment: str | None = None
    merge_dims: bool = True
    grafting_momentum: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr", _scalar("lr", self.lr))
        _check_real("lr", self.lr, 0.0, math.inf)
        betas = self.betas
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        _check_real("betas[0] (beta1)", betas[0], 0.0, 1.0, high_open=True)
        _check_real("betas[1] (beta2)", betas[1], 0.0, 1.0, low_open=True)
        object.__setattr__(self, "betas", (float(betas[0]), float(betas[1])))
        _check_real("epsilon", self.epsilon, 0.0, math.inf, low_open=True)
        _check_real("weight_decay", self.weight_decay, 0.0, math.inf)
        _check_int("block_size", self.block_size, 1)
        _check_int("max_preconditioned_dim", self.max_preconditioned_dim, 1)
        _check_int("precondition_frequency", self.precondition_frequency, 1)
        if self.start_preconditioning_step is not None:
            _check_int("start_preconditioning_step", self.start_preconditioning_step, 1)
        _check_int("statistics_frequency", self.statistics_frequency, 1)
        _check_choice("preconditioner", self.preconditioner, PRECONDITIONERS)
        if self.grafting is None:
            object.__setattr__(self, "grafting", DEFAULT_GRAFTING[self.preconditioner])
        _check_choice("grafting", self.grafting, GRAFTING_METHODS)
        if self.precondition_1d is None:
            object.__setattr__(self, "precondition_1d",
                               DEFAULT_PRECONDITION_1D[self.preconditioner])
        _check_bool("precondition_1d", self.precondition_1d)
        if self.first_moment is None:
            object.__setattr__(self, "first_moment",
                               DEFAULT_FIRST_MOMENT[self.preconditioner])
        _check_choice("first_moment", self.first_moment, FIRST_MOMENTS)
        if self.preconditioner == "eigenvalue_corrected" and self.first_moment != "gradient":
            raise ValueError(f"first_moment must be 'gradient' (or None) with "
                             f"preconditioner='eigenvalue_corrected', which keeps Adam's "
                             f"first moment of the gradient; got {self.first_moment!r}")
        _check_real("grafting_beta2", self.grafting_beta2, 0.0, 1.0, low_open=True,
                    high_open=True)
        _check_real("grafting_epsilon", self.grafting_epsilon, 0.0, math.inf, low_open=True)
        _check_choice("root_method", self.root_method, ROOT_METHODS)
        if self.root_dtype is None and self.preconditioner == "eigenvalue_corrected":
            object.__setattr__(self, "root_dtype", DEFAULT_BASIS_DTYPE)
        if self.root_dtype is not None:
            _check_choice("root_dtype", self.root_dtype, FLOAT_DTYPES)
        _check_choice("factor_dtype", self.factor_dtype, FLOAT_DTYPES)
        if self.root_check_tolerance != math.inf:
            _check_real("root_check_tolerance", self.root_check_tolerance, 0.0, math.inf,
                        low_open=True)
        _check_real("exponent_multiplier", self.exponent_multiplier, 0.0, math.inf,
                    low_open=True)
        _check_bool("relative_epsilon", self.relative_epsilon)
        _check_bool("merge_dims", self.merge_dims)
        _check_bool("grafting_momentum", self.grafting_momentum)
        if self.grafting_momentum and (self.preconditioner != "eigenvalue_corrected"
                                       or self.grafting == "none"):
            raise ValueError("grafting_momentum=True needs preconditioner="
                             "'eigenvalue_corrected' and a grafting method other than "
                             "'none' (classic Shampoo's first_moment decides what it "
                             f"grafts); got preconditioner={self.preconditioner!r}, "
                             f"grafting={self.grafting!r}")
        _check_bool("nesterov", self.nesterov)
        _check_bool("bias_correction", self.bias_correction)
        _check_bool("decoupled_weight_decay", self.decoupled_weight_decay)
        _check_int("newton_max_iterations", self.newton_max_iterations, 1)
        _check_real("newton_tolerance", self.newton_tolerance, 0.0, math.inf, low_open=True)
        _check_real("root_failure_threshold", self.root_failure_threshold, 0.0, math.inf,
                    low_open=True)
        if self.root_delay is not None:
            _check_int("root_delay", self.root_delay, 0)
            if self.root_delay > self.precondition_frequency:
                raise ValueError(f"root_delay must be in [0, precondition_frequency="
                                 f"{self.precondition_frequency}], got {self.root_delay}")
        _check_choice("eigenbasis_method", self.eigenbasis_method, EIGENBASIS_METHODS)
        _check_real("basis_refresh_tolerance", self.basis_refresh_tolerance, 0.0, math.inf)
        if self.factor_beta is not None:
            _check_real("factor_beta", self.factor_beta, 0.0, 1.0, low_open=True)
        _check_real("adam_epsilon", self.adam_epsilon, 0.0, math.inf, low_open=True)

    @property
    def factor_ema(self) -> float:
        """The EMA coefficient of the Kronecker factors: ``factor_beta``, else ``beta2``."""
        return self.betas[1] if self.factor_beta is None else self.factor_beta

    @property
    def preconditioning_start(self) -> int:
        """The first step that uses roots (``start_preconditioning_step`` resolved)."""
        if self.start_preconditioning_step is not None:
            return self.start_preconditioning_step
        return 1 if self.preconditioner == "eigenvalue_corrected" else self.precondition_frequency

    def is_statistics_step(self, step: int) -> bool:
        """Whether the factors are updated at ``step`` (1-based)."""
        return (step - 1) % self.statistics_frequency == 0

    def statistics_updates(self, step: int) -> int:
        """How many factor updates have happened up to and including ``step``."""
        return (step - 1) // self.statistics_frequency + 1

    def is_root_step(self, step: int) -> bool:
        """Whether roots are recomputed at ``step`` (1-based)."""
        start = self.preconditioning_start
        return step >= start and (step - start) % self.precondition_frequency == 0

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_group(cls, group: Mapping[str, Any]) -> "ShampooConfig":
        """Validates and returns the hyperparameters of a ``param_groups`` entry."""
        return cls(**{name: group[name] for name in cls.field_names() if name in group})

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.field_names()}
