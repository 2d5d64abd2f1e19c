"""Kronecker-factor statistics and inverse roots for stacks of equal-shape blocks.

Blocks of one shape (and dtype and device) are stacked along a leading dimension, so
one ``torch.bmm`` / batched ``eigh`` serves them all and the per-step Python work grows
with the number of distinct block shapes, not with the number of blocks. The
``*_reference`` kernels are the plain one-block formulation (``tensordot`` per
dimension); the optimizer's for-loop mode runs them, and tests compare the two.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, ClassVar, Sequence

import torch

from .config import ShampooConfig
from .grafting import needs_state
from .matrix_functions import RootResult, inverse_root, inverse_root_mixed
from .symmetric_packing import pack_outer_products, pack_symmetric, packed_size, unpack_symmetric

if TYPE_CHECKING:
    from .async_roots import PendingRoots


# Bound on the roots unpacked at once for a step's products (they are stored packed).
UNPACKED_ROOT_BYTES = 64 << 20


# --------------------------------------------------------------------------- kernels
def matricize(blocks: torch.Tensor, dim: int) -> torch.Tensor:
    """``(N, *shape)`` -> ``(N, shape[dim], rest)``: each block unfolded along ``dim``."""
    return blocks.movedim(dim + 1, 1).reshape(blocks.shape[0], blocks.shape[dim + 1], -1)


def update_factors_(factors: Sequence[torch.Tensor], blocks: torch.Tensor,
                    dims: Sequence[int], beta2: float) -> None:
    """``S_i <- beta2 S_i + (1 - beta2) B_(i) B_(i)^T`` for each preconditioned ``dims[i]``
    (``S_i += B_(i) B_(i)^T`` when ``beta2 == 1``); ``factors[i]`` is ``(N, d (d + 1) / 2)``,
    packed (:mod:`.symmetric_packing`)."""
    cast: dict[torch.dtype, torch.Tensor] = {}  # the blocks in each factor dtype, once
    for factor, dim in zip(factors, dims):
        if factor.dtype not in cast:
            cast[factor.dtype] = blocks.to(factor.dtype)
        pack_outer_products(matricize(cast[factor.dtype], dim), factor, beta2)


def precondition(blocks: torch.Tensor, roots: dict[int, torch.Tensor]) -> torch.Tensor:
    """``B x_1 Q_1 x_2 Q_2 ...`` for stacked blocks ``(N, *shape)``; ``roots[dim]`` is
    ``(N, d, d)`` and symmetric, dimensions without a root are left as they are. (Each
    block dimension is contracted with the matrix's first index, so a non-symmetric
    ``M`` gives ``B x_i M^T``: the eigenvalue-corrected rotations use that.)

    Each pass contracts the leading block dimension with its root and moves it last, so
    after one pass per dimension the order is restored and every product is a ``bmm``
    on a free reshape (for a matrix: ``(Q_L B)^T = B^T Q_L``, then ``(Q_L B) Q_R``).
    """
    if not roots:
        return blocks
    n, shape = blocks.shape[0], blocks.shape[1:]
    x = blocks
    for dim in range(len(shape)):
        size = x.shape[1]
        unfolded = x.reshape(n, size, -1)
        root = roots.get(dim)
        rotated = unfolded.mT.contiguous() if root is None else torch.bmm(unfolded.mT, root)
        x = rotated.reshape(n, *x.shape[2:], size)
    return x


def update_factors_reference_(factors: Sequence[torch.Tensor], block: torch.Tensor,
                              dims: Sequence[int], beta2: float) -> None:
    """One-block form of :func:`update_factors_`: ``factors[i]`` is ``(d (d + 1) / 2,)``."""
    for factor, dim in zip(factors, dims):
        other = [i for i in range(block.dim()) if i != dim]
        b = block.to(factor.dtype)
        outer = pack_symmetric(torch.tensordot(b, b, dims=(other, other)))
        if beta2 == 1.0:
            factor.add_(outer)
        else:
            factor.lerp_(outer, 1 - beta2)


def precondition_reference(block: torch.Tensor, roots: dict[int, torch.Tensor]) -> torch.Tensor:
    """One-block form of :func:`precondition`: ``roots[dim]`` is ``(d, d)``."""
    x = block
    for dim in range(block.dim()):
        root = roots.get(dim)
        x = x.movedim(0, -1) if root is None else torch.tensordot(x, root, dims=([0], [0]))
    return x


def root_dtype_of(config: ShampooConfig, work_dtype: torch.dtype) -> torch.dtype:
    """``config.root_dtype``, or for None: float32 for eigh roots stored in float32 or
    narrower (checked: :func:`checked_roots`), else float64."""
    if config.root_dtype is not None:
        return config.root_dtype
    narrow = config.root_method == "eigh" and work_dtype != torch.float64
    return torch.float32 if narrow else torch.float64


def checked_roots(config: ShampooConfig, work_dtype: torch.dtype) -> bool:
    """Whether roots are float32 eigendecompositions checked (and, where the check
    fails, recomputed) in float64: eigh roots in float32 with a finite
    ``root_check_tolerance``."""
    return (config.root_method == "eigh" and root_dtype_of(config, work_dtype) == torch.float32
            and config.root_check_tolerance != float("inf"))


# ----------------------------------------------------------------------------- state
@dataclass
class StackState:
    """Optimizer state of N stacked blocks of one shape.

    Attributes:
        factors: per preconditioned dimension, ``(N, d (d + 1) / 2)`` in ``factor_dtype``:
            the symmetric factors packed (:mod:`.symmetric_packing`).
        roots: per preconditioned dimension, ``(N, d (d + 1) / 2)`` the inverse roots in
            use, symmetric and packed like the factors, in the work dtype (identity
            until the first accepted root); for eigenvalue-corrected stacks the
            eigenbases in use, ``(N, d, d)`` (not symmetric: kept full;
            :mod:`.eigenvalue_corrected`).
        graft: ``(N, *shape)`` grafting accumulator, or None.
        momentum: ``(N, *shape)`` first moment of the update, or None (eigenvalue-
            corrected stacks: of the gradient, kept in the rotated space).
        second_moment: ``(N, *shape)`` the rotated second moment ``v`` of
            eigenvalue-corrected stacks, None for the others.
        basis_eigenvalues: eigenvalue-corrected stacks: per preconditioned dimension,
            ``(N, d)`` the eigenvalue estimates of the basis in use (0 for the identity),
            which decide its null directions; empty for the others.
    """

    factors: list[torch.Tensor]
    roots: list[torch.Tensor]
    graft: torch.Tensor | None
    momentum: torch.Tensor | None
    second_moment: torch.Tensor | None = None
    basis_eigenvalues: list[torch.Tensor] = field(default_factory=list)

    def select(self, rows: torch.Tensor) -> "StackState":
        """A copy of the state of ``rows`` (indices into the stack)."""
        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.index_select(0, rows.to(t.device))
        return StackState([pick(f) for f in self.factors], [pick(r) for r in self.roots],
                          pick(self.graft), pick(self.momentum), pick(self.second_moment),
                          [pick(e) for e in self.basis_eigenvalues])

    def assign(self, rows: torch.Tensor, other: "StackState") -> None:
        """Writes ``other`` (the state of ``rows``) back into this stack."""
        def put(target: torch.Tensor | None, value: torch.Tensor | None) -> None:
            if target is not None and value is not None:
                target.index_copy_(0, rows.to(target.device), value)
        for mine, theirs in zip(self.factors + self.roots + self.basis_eigenvalues,
                                other.factors + other.roots + other.basis_eigenvalues):
            put(mine, theirs)
        put(self.graft, other.graft)
        put(self.momentum, other.momentum)
        put(self.second_moment, other.second_moment)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in [*self.factors, *self.roots, self.graft, self.momentum,
                            self.second_moment, *self.basis_eigenvalues] if t is not None]


@dataclass
class RootRecord:
    """Per-block, per-factor bookkeeping of the roots in use, ``(N, k)`` on the CPU.

    Attributes:
        computed_at: step whose statistics produced the root in use (0: identity).
        residual: residual of the root in use (0 for the identity).
        failures: roots rejected so far.
    """

    computed_at: torch.Tensor
    residual: torch.Tensor
    failures: torch.Tensor


@dataclass
class BlockStack:
    """N blocks of one shape, dtype and device from one parameter group.

    Attributes:
        block_shape: the shape of every block.
        dims: the preconditioned dimensions of the block.
        members: per stacked row, ``(parameter index in the group, block index)``.
        work_dtype: dtype of directions, roots, grafting and momentum state.
        batched: use the stacked kernels; False runs the one-block reference kernels
            (the for-loop ground truth; such a stack then holds a single block).
        pending: root work launched but not yet in use (see :mod:`.async_roots`).
    """

    block_shape: tuple[int, ...]
    dims: tuple[int, ...]
    members: list[tuple[int, int]]
    work_dtype: torch.dtype
    device: torch.device
    batched: bool
    state: StackState = field(init=False)
    record: RootRecord = field(init=False)
    pending: PendingRoots | None = field(default=None, init=False)
    # The type of one element of compute_roots' result (rebuilt from checkpoints).
    result_type: ClassVar[type] = RootResult

    def allocate(self, config: ShampooConfig) -> None:
        n = len(self.members)
        make = dict(device=self.device)
        self.state = StackState(
            factors=[torch.zeros(n, packed_size(self.block_shape[d]),
                                 dtype=config.factor_dtype, **make) for d in self.dims],
            roots=[self._identity_rows(n, self.block_shape[d])
                   for d in self.dims],
            graft=None, momentum=None)
        k = len(self.dims)
        self.record = RootRecord(torch.zeros(n, k, dtype=torch.int64),
                                 torch.zeros(n, k, dtype=torch.float64),
                                 torch.zeros(n, k, dtype=torch.int64))

    def identity_root(self, size: int) -> torch.Tensor:
        """The root of a ``size`` dimension before the first one is computed: the
        identity, packed."""
        return pack_symmetric(torch.eye(size, dtype=self.work_dtype, device=self.device))

    def _identity_rows(self, n: int, size: int) -> torch.Tensor:
        root = self.identity_root(size)
        return root.expand(n, *root.shape).clone()

    def ensure_buffers(self, config: ShampooConfig) -> None:
        """Allocates the grafting and momentum buffers the configuration needs."""
        shape = (len(self.members), *self.block_shape)
        if needs_state(config.grafting) and self.state.graft is None:
            self.state.graft = torch.zeros(shape, dtype=self.work_dtype, device=self.device)
        if config.betas[0] > 0 and self.state.momentum is None:
            self.state.momentum = torch.zeros(shape, dtype=self.work_dtype, device=self.device)

    def exponent(self, config: ShampooConfig) -> float:
        """The root exponent of these blocks, ``exponent_multiplier / (2 k)``."""
        return config.exponent_multiplier / (2 * len(self.dims))

    # ------------------------------------------------------------------ statistics
    def update_statistics(self, state: StackState, blocks: torch.Tensor, beta2: float) -> None:
        if self.batched:
            update_factors_(state.factors, blocks, self.dims, beta2)
        else:
            for row in range(blocks.shape[0]):
                update_factors_reference_([f[row] for f in state.factors], blocks[row],
                                          self.dims, beta2)

    def precondition(self, state: StackState, blocks: torch.Tensor) -> torch.Tensor:
        """``B x_i Q_i`` for the rows of ``state``: the packed roots are unpacked for the
        product (a transient copy, a bounded number of rows at a time)."""
        n = blocks.shape[0]
        row_bytes = sum(self.block_shape[d] ** 2 for d in self.dims) * blocks.element_size()
        rows = max(1, UNPACKED_ROOT_BYTES // max(1, row_bytes))
        parts = [self.multiply(blocks[start:start + rows],
                               [unpack_symmetric(root[start:start + rows]) for root in state.roots])
                 for start in range(0, n, rows)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def multiply(self, blocks: torch.Tensor, matrices: Sequence[torch.Tensor]) -> torch.Tensor:
        """:func:`precondition` of ``blocks`` by ``matrices[i]`` ``(N, d, d)`` along each
        ``dims[i]``: ``B x_i M_i^T`` (``B x_i M_i`` for symmetric roots), batched or one
        block at a time."""
        if self.batched:
            return precondition(blocks, dict(zip(self.dims, matrices)))
        return torch.stack([
            precondition_reference(blocks[row], {d: m[row] for d, m in zip(self.dims, matrices)})
            for row in range(blocks.shape[0])])

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Per-row state beyond factors, roots, grafting, momentum and the root record,
        by state-dict name, each ``(N, ...)``: none for this stack (subclasses add)."""
        return {}

    # ----------------------------------------------------------------------- roots
    def root_inputs(self, config: ShampooConfig, step: int) -> list[torch.Tensor]:
        """Snapshots of the bias-corrected factors, unpacked, in ``root_dtype``: the
        pure input of a root computation (copies, so they may be handed to another
        thread)."""
        beta2 = config.factor_ema
        correction = 1.0 if beta2 == 1.0 else 1 - beta2**config.statistics_updates(step)
        dtype = (torch.float64 if checked_roots(config, self.work_dtype)
                 else root_dtype_of(config, self.work_dtype))
        return [unpack_symmetric(f, dtype).div_(correction) for f in self.state.factors]

    def compute_roots(self, inputs: list[torch.Tensor], config: ShampooConfig) -> list[RootResult]:
        """The inverse roots of :meth:`root_inputs`, packed; pure, safe to run elsewhere.
        Roots are formed in the work dtype (they are stored in it)."""
        exponent = self.exponent(config)
        if checked_roots(config, self.work_dtype):
            results = [inverse_root_mixed(m, exponent, config.epsilon, config.relative_epsilon,
                                          config.root_check_tolerance, self.work_dtype,
                                          symmetric_input=True, upper_only=True)
                       for m in inputs]
        else:
            results = [inverse_root(m, exponent, config.epsilon, config.root_method,
                                    config.newton_max_iterations, config.newton_tolerance,
                                    config.relative_epsilon, self.work_dtype,
                                    upper_only=True)
                       for m in inputs]
        # Packed here, where the work runs: half the bytes back from a background worker.
        return [replace(r, root=pack_symmetric(r.root)) for r in results]

    def install_roots(self, results: list[RootResult], config: ShampooConfig,
                      computed_at: int) -> int:
        """Puts accepted roots in use; a root with NaN/Inf entries or a residual above
        ``root_failure_threshold`` is rejected and the previous one stays. Returns the
        number of rejected roots. ``results`` may live on the host (background workers),
        then pinned: the copy to the device does not block."""
        rejected = 0
        for i, (result, roots) in enumerate(zip(results, self.state.roots)):
            # Full roots come only from checkpoints of format <= 3 (pending roots).
            root = pack_symmetric(result.root) if result.root.dim() == 3 else result.root
            # Decided where the result lives (the host, for background work: no device
            # sync), after the cast to the work dtype: a float64 root may overflow it.
            finite = torch.isfinite(root.to(roots.dtype)).all(dim=1)
            ok = finite & (result.residual <= config.root_failure_threshold)
            ok_cpu = ok.cpu()
            new = root.to(roots.device, non_blocking=True)
            if bool(ok_cpu.all()):
                roots.copy_(new)
            elif bool(ok_cpu.any()):
                keep = ok.to(roots.device, non_blocking=True).view(-1, 1)
                roots.copy_(torch.where(keep, new, roots))
            self.record.computed_at[:, i].masked_fill_(ok_cpu, computed_at)
            self.record.residual[:, i] = torch.where(
                ok_cpu, result.residual.detach().to("cpu", torch.float64),
                self.record.residual[:, i])
            self.record.failures[:, i] += (~ok_cpu).to(torch.int64)
            rejected += int((~ok_cpu).sum())
        return rejected

    def root_count(self) -> int:
        """Roots one computation produces: one per block and preconditioned dimension."""
        return len(self.dims) * len(self.members)
