"""Eigenvalue-corrected Shampoo (SOAP, Vyas et al. 2024): Adam run in the
eigenbases of the Kronecker factors.

The blocks, factor statistics, batching of equal-shape blocks, NaN guard and state
handling are the root preconditioner's: :class:`EigenvalueCorrectedStack` is a
:class:`~.preconditioner.BlockStack` whose *root work* is the eigenbasis refresh, through
the same three steps (so synchronous, background and distributed root computation serve
it unchanged):

- :meth:`~EigenvalueCorrectedStack.root_inputs` snapshots the factors and the bases in use;
- :meth:`~EigenvalueCorrectedStack.compute_roots` (pure) refreshes each factor's basis
  (:func:`refresh_bases`): ``eigh`` the first time, then ``eigh`` or one power step plus
  QR warm-started from the previous basis, skipped while the previous basis still nearly
  diagonalizes the factor;
- :meth:`~EigenvalueCorrectedStack.install_roots` puts finite bases in use, keeps the
  previous basis (and counts a failure) otherwise, and carries the moments over to the
  new bases.

Conventions and choices (the closing note of issue 6 discusses them):

- A stack's ``state.roots`` hold the bases ``U_i`` (orthonormal columns, the
  eigenvectors, by decreasing eigenvalue) in the work dtype; the identity until the first
  basis. Rotating into the bases is ``x x_i U_i^T``, i.e. :func:`~.preconditioner.precondition`
  with ``U_i``; rotating back uses ``U_i^T``.
- The first moment is stored rotated, ``m' = m x_i U_i^T``. SOAP as published keeps ``m`` in
  parameter space and rotates it every step; since the rotation is linear and changes
  only at refreshes, rotating the stored ``m'`` by ``C_i = U_old^T U_new`` when a basis
  changes gives the same ``m'`` with one rotation per step fewer.
- Rounding stability. The eigenvectors of a repeated eigenvalue are arbitrary, and a
  rank-deficient factor (fewer gradients than its size, a merged small layer) has a
  large (near-)null space whose basis rounding picks. Two rules keep that choice out of
  the trajectory: (1) along each factor, the basis columns whose eigenvalue estimate is
  below ``epsilon * lambda_max`` (``relative_epsilon``; ``epsilon`` itself otherwise) are
  *null directions*, whose rotated coordinates share one second moment, their mean
  (:func:`pool_null_`), so Adam's per-coordinate normalization is invariant under any
  rotation within the null space; (2) when a basis changes, ``v`` is projected onto the
  new basis, ``v <- v x_i (C_i o C_i)`` with ``C_i = U_old^T U_new``, which depends on
  the old null space only through its projector (its pooled ``v`` is one number).
  SOAP's rule, carrying ``v`` by eigenvalue rank (``v`` permuted as its QR refresh
  reorders the columns), pairs directions of the old and new null spaces arbitrarily: on
  an MLP it made the trajectory change by 2-3% under a change of gradient summation
  order, against 1e-6 with projection (issue 11's note). Together with the default
  ``root_delay=1`` (a basis never rotates the gradient it was computed from, SOAP's
  order: a basis from one gradient rotates that gradient into a few singular values and
  rounding noise, which Adam's normalization turns into full-size steps) and float64
  factors, rounding-level perturbations stay at rounding level.
- Grafting ("adam" by default; SOAP has none): each block's step takes the norm of Adam's
  step without momentum for the same gradient (with ``grafting_momentum``, of Adam's
  actual step, with the first moment rotated back to parameter space for it). A factor
  that has seen few gradients spans few directions, and Adam in its basis moves along
  those alone: without
  grafting, every refresh cut each weight's update norm 3-17x on a rank-deficient
  merged layer, and the loss of a full-batch regression ended 10x above AdamW's
  (``tests/test_eigenvalue_corrected.py``); grafted, the basis chooses the direction
  and Adam the size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Iterable

import torch

from .config import ShampooConfig
from .grafting import graft, scaled_by_graft_state, update_graft_state_
from .matrix_functions import symmetric_eigh
from .preconditioner import BlockStack, RootRecord, StackState
from .symmetric_packing import unpack_symmetric


# --------------------------------------------------------------------------- kernels
def eigenbasis(factors: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of each symmetric ``(N, d, d)`` factor as columns, by decreasing
    eigenvalue (the order the QR refresh keeps); NaN where ``eigh`` did not converge."""
    _, vectors = symmetric_eigh(factors)
    return vectors.flip(-1)


def offdiagonal_ratio(projected: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """``||offdiag(U^T S U)||_F / ||S||_F`` per matrix, given ``projected = U^T S U``
    (0 for a zero factor); float64, shape ``(N,)``."""
    off = projected - torch.diag_embed(projected.diagonal(dim1=-2, dim2=-1))
    norms = torch.linalg.matrix_norm(factors).clamp_min(torch.finfo(factors.dtype).tiny)
    return (torch.linalg.matrix_norm(off) / norms).to(torch.float64)


def power_qr_step(factor_times_basis: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """One step of orthogonal iteration warm-started from a basis ``U``: the columns of
    ``S U`` taken in ``order`` (:func:`eigenvalue_order`, largest estimate first, so that
    the dominant directions, which QR keeps most faithfully, lead), then orthonormalized."""
    ordered = factor_times_basis.gather(-1, order.unsqueeze(-2).expand_as(factor_times_basis))
    return torch.linalg.qr(ordered).Q


def eigenvalue_order(bases: torch.Tensor, factor_times_basis: torch.Tensor) -> torch.Tensor:
    """The columns of each basis ``U`` ``(N, d, d)`` by decreasing eigenvalue estimate
    ``diag(U^T S U)`` on the factor ``S`` (given ``S U``): ``(N, d)`` column indices."""
    estimates = (bases * factor_times_basis).sum(dim=-2)
    return estimates.argsort(dim=-1, descending=True)


@dataclass(frozen=True)
class BasisResult:
    """A refresh of one factor's bases for every row of a stack.

    Attributes:
        basis: ``(N, d, d)`` the new bases (the input basis where not refreshed).
        refreshed: ``(N,)`` bool, whether the row was recomputed (False: skipped).
        drift: ``(N,)`` float64, ``||offdiag(U^T S U)||_F / ||S||_F`` of the previous
            basis on the factor (how far it drifted since it was computed); measured
            only where it decides (``tolerance > 0``, a previous basis), NaN elsewhere.
        eigenvalues: ``(N, d)`` the factor's eigenvalue estimates ``diag(U^T S U)`` on
            the new basis' columns, which decide the null directions
            (:func:`null_directions`).
    """

    basis: torch.Tensor
    refreshed: torch.Tensor
    drift: torch.Tensor
    eigenvalues: torch.Tensor


def refresh_bases(factors: torch.Tensor, bases: torch.Tensor, warm_start: torch.Tensor,
                  method: str, tolerance: float) -> BasisResult:
    """New eigenbases of ``factors`` ``(N, d, d)`` given the ``bases`` in use and whether
    each row's basis can be started from (``warm_start``, ``(N,)`` bool: it has one, and
    one without null directions). Other rows get :func:`eigenbasis`; warm rows are
    skipped when ``tolerance > 0`` and their drift is at most ``tolerance``, else
    refreshed by ``method``: "eigh" or "qr" (:func:`power_qr_step`). (A basis with null
    directions is no start: which basis of its null space rounding picked would decide
    the power step's columns and the drift.) Pure; computes in the dtype of its inputs."""
    if method not in ("eigh", "qr"):
        raise ValueError(f"method must be 'eigh' or 'qr', got {method!r}")
    n, device = factors.shape[0], factors.device
    warm = warm_start.to(device)
    drift = torch.full((n,), float("nan"), dtype=torch.float64, device=device)
    skip = torch.zeros(n, dtype=torch.bool, device=device)
    new = bases.clone()
    if bool(warm.any()):
        factor_times_basis = factors @ bases
        if tolerance > 0:
            projected = bases.mT @ factor_times_basis
            drift = torch.where(warm, offdiagonal_ratio(projected, factors), drift)
            skip = warm & (drift <= tolerance)  # NaN drift: refreshed, then rejected
        order = eigenvalue_order(bases, factor_times_basis)
    by_qr = warm & ~skip if method == "qr" else torch.zeros_like(skip)
    by_eigh = ~skip & ~by_qr
    if bool(by_eigh.any()):
        new[by_eigh] = eigenbasis(factors[by_eigh])
    if bool(by_qr.any()):
        new[by_qr] = power_qr_step(factor_times_basis[by_qr], order[by_qr])
    eigenvalues = (new * (factors @ new)).sum(dim=-2)
    return BasisResult(new, ~skip, drift, eigenvalues)


def null_directions(eigenvalues: torch.Tensor, epsilon: float,
                    relative: bool = True) -> torch.Tensor:
    """``(N, d)`` bool: the basis columns whose eigenvalue estimate is below
    ``epsilon`` times the largest of their factor (``relative``; else below ``epsilon``).
    Their eigenvectors are an arbitrary (rounding-chosen) basis of a (near-)null space,
    so the rotated coordinates along them must be treated alike: :func:`pool_null_`."""
    values = eigenvalues.clamp_min(0)
    threshold = epsilon * values.amax(dim=-1, keepdim=True) if relative else epsilon
    return values < threshold


def pool_null_(second_moment: torch.Tensor, masks: list[torch.Tensor],
               dims: tuple[int, ...]) -> torch.Tensor:
    """Replaces, along each preconditioned ``dims[i]`` of the stacked ``(N, *shape)``
    second moment, its entries at the null directions ``masks[i]`` ``(N, d)`` by their
    mean. Adam's per-coordinate normalization is then invariant under any rotation
    within a null space, so the update no longer depends on which basis of it rounding
    picked (in exact arithmetic too, the eigenvectors of a repeated eigenvalue are
    arbitrary). In place; returns ``second_moment``."""
    for dim, mask in zip(dims, masks):
        # The shortcut reads the mask on the host: free on the CPU; elsewhere it would be
        # a device sync every step, so the (cheap, elementwise) pooling always runs.
        if mask.device.type == "cpu" and not bool(mask.any()):
            continue
        moved = second_moment.movedim(dim + 1, -1)
        shape = (mask.shape[0],) + (1,) * (moved.dim() - 2) + (mask.shape[1],)
        weights = mask.to(moved.dtype).view(shape)
        mean = (moved * weights).sum(dim=-1, keepdim=True) / weights.sum(
            dim=-1, keepdim=True).clamp_min(1)
        moved.copy_(torch.where(weights > 0, mean, moved))
    return second_moment


def adam_denominator(second_moment: torch.Tensor, beta2: float, step: int,
                     bias_correction: bool, epsilon: float) -> torch.Tensor:
    """``sqrt(v / c2) + epsilon`` in a new tensor, ``c2 = 1 - beta2^step`` (1 without
    bias correction or for the running sum ``beta2 == 1``); ``torch.optim.Adam``'s
    operation order. An ``epsilon`` that would underflow to 0 in ``v``'s dtype is
    raised to its smallest normal number: a rotated coordinate no gradient has reached
    has ``v = m' = 0``, and its step must be 0, not 0/0."""
    denominator = second_moment.sqrt()
    if bias_correction and beta2 < 1.0:
        denominator.div_(math.sqrt(1 - beta2**step))
    return denominator.add_(max(epsilon, torch.finfo(denominator.dtype).tiny))


# ----------------------------------------------------------------------------- state
@dataclass
class BasisRecord(RootRecord):
    """The root record of eigenvalue-corrected blocks, ``(N, k)`` on the CPU.

    ``computed_at`` is the step whose factor produced the basis in use, ``failures``
    counts rejected bases, and ``residual`` holds the drift (:class:`BasisResult`) last
    measured (with ``basis_refresh_tolerance > 0``; 0 if never). Added:

    Attributes:
        refreshes: bases recomputed (whether then installed or rejected).
        skips: refreshes skipped because the basis still diagonalized its factor.
    """

    refreshes: torch.Tensor
    skips: torch.Tensor


class EigenvalueCorrectedStack(BlockStack):
    """A block stack whose root work refreshes the factors' eigenbases.

    Its state holds the bases in ``roots``, the rotated first moment in ``momentum``
    and the rotated second moment in ``second_moment``; its record is a
    :class:`BasisRecord`.
    """

    record: BasisRecord
    result_type: ClassVar[type] = BasisResult

    def allocate(self, config: ShampooConfig) -> None:
        super().allocate(config)  # factors, identity bases, the record's first fields
        base = self.record
        self.record = BasisRecord(base.computed_at, base.residual, base.failures,
                                  torch.zeros_like(base.failures),
                                  torch.zeros_like(base.failures))
        self.state.second_moment = torch.zeros((len(self.members), *self.block_shape),
                                               dtype=self.work_dtype, device=self.device)
        self.state.basis_eigenvalues = [
            torch.zeros(len(self.members), self.block_shape[d], dtype=self.work_dtype,
                        device=self.device) for d in self.dims]

    def identity_root(self, size: int) -> torch.Tensor:
        """The basis before the first refresh: the identity, full (a basis is not
        symmetric, so it is not packed)."""
        return torch.eye(size, dtype=self.work_dtype, device=self.device)

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {"second_moment": self.state.second_moment,
                "basis_refreshes": self.record.refreshes,
                "basis_refreshes_skipped": self.record.skips,
                **{f"basis_eigenvalues_{i}": values
                   for i, values in enumerate(self.state.basis_eigenvalues)}}

    def has_basis(self) -> bool:
        """Whether any block has a basis yet (until then every basis is the identity)."""
        return bool((self.record.computed_at > 0).any())

    # ------------------------------------------------------------------- root work
    def root_inputs(self, config: ShampooConfig, step: int
                    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per factor, copies of ``(factor unpacked, basis in use, warm start)`` (in
        ``root_dtype``; the flags ``(N,)`` on the CPU: the row has a basis without null
        directions, :func:`refresh_bases`): the pure input of a refresh. The factors'
        bias correction is left out: it does not change eigenvectors or drift."""
        has_basis = self.record.computed_at > 0
        state = self.state
        return [(unpack_symmetric(factor, config.root_dtype),
                 basis.to(config.root_dtype, copy=True),
                 has_basis[:, i] & ~null_directions(values, config.epsilon,
                                                    config.relative_epsilon).any(dim=-1).cpu())
                for i, (factor, basis, values) in enumerate(zip(
                    state.factors, state.roots, state.basis_eigenvalues))]

    def compute_roots(self, inputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                      config: ShampooConfig) -> list[BasisResult]:
        """The refreshed bases of :meth:`root_inputs`; pure, safe to run elsewhere."""
        return [refresh_bases(factor, basis, warm_start, config.eigenbasis_method,
                              config.basis_refresh_tolerance)
                for factor, basis, warm_start in inputs]

    def install_roots(self, results: list[BasisResult], config: ShampooConfig,
                      computed_at: int) -> int:
        """Puts the refreshed bases in use and carries the moments over to them; a basis
        with NaN/Inf entries (in the work dtype) is rejected and the previous one stays.
        Returns the number of rejected bases.

        The first moment is rotated exactly. The second moment is projected: ``v``
        becomes the diagonal, in the new basis, of the estimate that was diagonal in the
        old, ``v <- v x_i (C_i o C_i)`` (see the module's note on rounding stability).
        The new bases' eigenvalue estimates are kept: they decide the null directions."""
        rejected = 0
        rotations: list[torch.Tensor | None] = []  # per factor: U_old^T U_new, or None
        for i, (result, basis) in enumerate(zip(results, self.state.roots)):
            # Decided where the result lives (the host, for background work), after the
            # cast to the work dtype.
            refreshed = result.refreshed
            ok = refreshed & torch.isfinite(result.basis.to(basis.dtype)).flatten(1).all(dim=1)
            ok_cpu, refreshed_cpu = ok.cpu(), refreshed.cpu()
            new = result.basis.to(basis.device, non_blocking=True).to(basis.dtype)
            ok = ok.to(basis.device, non_blocking=True)
            failed_cpu = refreshed_cpu & ~ok_cpu
            record = self.record
            record.computed_at[:, i].masked_fill_(ok_cpu, computed_at)
            drift = result.drift.detach().to("cpu", torch.float64)
            record.residual[:, i] = torch.where(torch.isfinite(drift), drift,
                                                record.residual[:, i])
            record.refreshes[:, i] += refreshed_cpu.to(torch.int64)
            record.skips[:, i] += (~refreshed_cpu).to(torch.int64)
            record.failures[:, i] += failed_cpu.to(torch.int64)
            rejected += int(failed_cpu.sum())
            if not bool(ok_cpu.any()):
                rotations.append(None)
                continue
            rotation = basis.to(config.root_dtype).mT @ new.to(config.root_dtype)
            identity = torch.eye(rotation.shape[-1], dtype=rotation.dtype, device=rotation.device)
            rotations.append(torch.where(ok.view(-1, 1, 1), rotation, identity))
            basis.copy_(torch.where(ok.view(-1, 1, 1), new, basis))
            values = result.eigenvalues.to(basis.device, non_blocking=True).to(basis.dtype)
            kept = self.state.basis_eigenvalues[i]
            kept.copy_(torch.where(ok.view(-1, 1), values, kept))
        if any(r is not None for r in rotations):
            self._change_moments_basis(rotations)
        return rejected

    def _change_moments_basis(self, rotations: list[torch.Tensor | None]) -> None:
        """``m' <- m' x_i C_i`` with ``C_i = U_old^T U_new`` (exact: ``m`` in parameter
        space is unchanged) and ``v <- v x_i (C_i o C_i)`` (the identity for factors
        left as they were)."""
        state, dtype = self.state, self.work_dtype
        n = len(self.members)

        def full(matrices: list[torch.Tensor | None]) -> list[torch.Tensor]:
            out = []
            for d, m in zip(self.dims, matrices):
                eye = torch.eye(self.block_shape[d], dtype=dtype, device=self.device)
                out.append(eye.expand(n, -1, -1) if m is None else m.to(dtype))
            return out

        if state.momentum is not None:
            state.momentum.copy_(self.multiply(state.momentum, full(rotations)))
        squares = [None if r is None else r * r for r in rotations]
        state.second_moment.copy_(self.multiply(state.second_moment, full(squares)))


# ------------------------------------------------------------------------- direction
def eigenvalue_corrected_direction_(stack: EigenvalueCorrectedStack, state: StackState,
                                    grads: torch.Tensor, config: ShampooConfig,
                                    step: int) -> tuple[torch.Tensor, float]:
    """The eigenvalue-corrected step for the rows of ``state`` (the stack's state or a
    selection of it) with gradient blocks ``grads``: returns ``(P, scale)``, the update
    ``u = scale * P``.

    ``g' = g x_i U_i^T``; ``m' <- beta1 m' + (1 - beta1) g'``;
    ``v <- beta2 v + (1 - beta2) g'^2`` (``v += g'^2`` for ``beta2 == 1``);
    ``d' = m_hat' / (sqrt(v_hat) + adam_epsilon)`` (with Nesterov the numerator is
    ``beta1 m_hat' + (1 - beta1) g'``); ``P = d' x_i U_i``. The first moment's bias
    correction is returned as ``scale`` (it folds into the step size). With grafting,
    ``P`` takes per block the norm of the grafting direction of ``g`` (:mod:`.grafting`, which
    holds no momentum) or, with ``grafting_momentum``, of the numerator rotated back to
    parameter space (``m_hat``, or Nesterov's ``beta1 m_hat + (1 - beta1) g``), and
    ``scale`` is 1. Updates ``state`` in place; ``grads`` is left as it is."""
    beta1, beta2 = config.betas
    update_graft_state_(config.grafting, grads, state.graft, config.grafting_beta2)
    rotated = bool(stack.dims) and stack.has_basis()  # before the first basis: identity
    g = stack.multiply(grads, state.roots) if rotated else grads
    if beta2 == 1.0:
        state.second_moment.addcmul_(g, g)
    else:
        state.second_moment.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    if rotated:
        masks = [null_directions(values, config.epsilon, config.relative_epsilon)
                 for values in state.basis_eigenvalues]
        pool_null_(state.second_moment, masks, stack.dims)
    denominator = adam_denominator(state.second_moment, beta2, step, config.bias_correction,
                                   config.adam_epsilon)
    scale, correction = 1.0, 1.0
    if beta1 == 0.0:
        numerator = g
    else:
        momentum = state.momentum
        momentum.lerp_(g, 1 - beta1)
        correction = 1 - beta1**step if config.bias_correction else 1.0
        if config.nesterov:
            numerator = g.mul(1 - beta1).add_(momentum, alpha=beta1 / correction)
        else:
            numerator, scale = momentum, 1.0 / correction
    direction = torch.div(numerator, denominator, out=denominator)
    back = [basis.mT for basis in state.roots]  # rotates back to parameter space
    if rotated:
        direction = stack.multiply(direction, back)
    if config.grafting == "none":
        return direction, scale
    if config.grafting_momentum and beta1 > 0.0:
        # The first moment in parameter space (rotated back: m' is stored rotated); the
        # grafting kernels only read it, so the state's own tensor may be passed.
        if rotated:
            moment = stack.multiply(numerator, back)
            grafting_numerator = moment if scale == 1.0 else moment.div_(correction)
        else:
            grafting_numerator = numerator if scale == 1.0 else numerator / correction
    else:
        grafting_numerator = grads
    grafted = scaled_by_graft_state(config.grafting, grafting_numerator, state.graft, step,
                                    config.grafting_beta2, config.grafting_epsilon)
    return graft(direction, grafted, inplace=True), 1.0


def basis_metrics(stacks: Iterable[BlockStack]) -> dict[str, int]:
    """Totals over the eigenvalue-corrected ``stacks`` (0 without any):
    ``basis_refreshes``, ``basis_refreshes_skipped`` and ``basis_failures``."""
    totals = {"basis_refreshes": 0, "basis_refreshes_skipped": 0, "basis_failures": 0}
    for stack in stacks:
        if isinstance(stack, EigenvalueCorrectedStack):
            totals["basis_refreshes"] += int(stack.record.refreshes.sum())
            totals["basis_refreshes_skipped"] += int(stack.record.skips.sum())
            totals["basis_failures"] += int(stack.record.failures.sum())
    return totals
