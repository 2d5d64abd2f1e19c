"""Gradients that must not reach the optimizer state, whose parameter's step is skipped:

- *nonfinite*: NaN or Inf entries;
- *overflowing*: finite, but so large that their squares overflow the state's dtype.
  The factor statistics ``B B^T``, the grafting accumulators and the eigenvalue-corrected
  second moment all square the gradient: a block of norm above ``sqrt(finfo.max)``
  (1.8e19 in float32) would turn them to Inf for good and freeze the layer.

A skipped parameter is treated exactly as one without a gradient. The test is one cheap
reduction per block (a norm), decided with one host sync per param group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:
    from .preconditioner import BlockStack


@dataclass
class Skips:
    """The parameters (indices in their group) skipped at one step, by cause."""

    nonfinite: set[int] = field(default_factory=set)
    overflow: set[int] = field(default_factory=set)

    def all(self) -> set[int]:
        return self.nonfinite | self.overflow


def largest_norm(work_dtype: torch.dtype, factor_dtype: torch.dtype) -> float:
    """The largest gradient (block) norm whose square fits both state dtypes."""
    return math.sqrt(min(torch.finfo(work_dtype).max, torch.finfo(factor_dtype).max))


def screen_rows(blocks: Sequence[torch.Tensor], limits: Sequence[float]) -> list[torch.Tensor]:
    """Per stack of gradient blocks ``(N, ...)``, which rows are usable: ``(N,)`` bool,
    each block's norm at most its stack's ``limit`` (False for NaN/Inf too). The norms
    are taken in the blocks' dtype; one reduction per stack, no host sync."""
    return [torch.linalg.vector_norm(b.reshape(b.shape[0], -1), dim=1) <= limit
            for b, limit in zip(blocks, limits)]


def usable(rows_ok: Sequence[torch.Tensor]) -> bool:
    """Whether every row is usable: the one host sync of the common case."""
    if not rows_ok:
        return True
    return bool(torch.cat([ok.to(rows_ok[0].device) for ok in rows_ok]).all())


def rows_finite(blocks: torch.Tensor) -> torch.Tensor:
    """``(N,)`` bool: whether each block has only finite entries (the rare path, to tell
    a nonfinite gradient from an overflowing one)."""
    return torch.isfinite(blocks.reshape(blocks.shape[0], -1)).all(dim=1)


def norm_limit(param_dtype: torch.dtype, factor_dtype: torch.dtype) -> float:
    """:func:`largest_norm` for a parameter of ``param_dtype``, whose state is kept in
    float64 for float64 parameters and in float32 otherwise (the optimizer's work dtype)."""
    work = torch.float64 if param_dtype == torch.float64 else torch.float32
    return largest_norm(work, factor_dtype)


def norms(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per gradient its norm, as a float64 tensor (taken in float32 for low-precision
    gradients, which holds their squares; no host sync)."""
    return torch.stack([
        torch.linalg.vector_norm(g, dtype=torch.float64 if g.dtype == torch.float64
                                 else torch.float32).to(grads[0].device, torch.float64)
        for g in grads])


def screen_whole(grads: Sequence[torch.Tensor], limits: Sequence[float]) -> list[str]:
    """For whole gradients (data parallelism decides on them, the same on every rank):
    per gradient "ok", "nonfinite" or "overflow", given each one's norm limit."""
    if not grads:
        return []
    values = norms(grads)
    bound = torch.tensor(list(limits), dtype=torch.float64, device=values.device)
    if bool((values <= bound).all()):
        return ["ok"] * len(grads)
    return ["ok" if norm <= limit else
            "overflow" if bool(torch.isfinite(g).all()) else "nonfinite"
            for g, norm, limit in zip(grads, values.tolist(), limits)]


def screen_parts(parts: Sequence[torch.Tensor]) -> list[float | None]:
    """For parts of gradients (a rank's rows of FSDP2 gradients, whose squares sum, over
    the ranks, to the whole gradient's): per part its norm (Inf if finite entries
    overflowed it), or None if it has a NaN/Inf entry. One host sync."""
    if not parts:
        return []
    return [norm if math.isfinite(norm) or bool(torch.isfinite(part).all()) else None
            for part, norm in zip(parts, norms(parts).tolist())]


def part_verdict(largest: float, limit: float, parts: int) -> str:
    """Whether a gradient whose norm's square is the sum of ``parts`` parts' squares,
    the largest of norm ``largest``, exceeds ``limit``: "overflow" if that part alone
    does, "ok" if ``parts`` such parts cannot, else "unsure" (the sum decides)."""
    if largest > limit:
        return "overflow"
    return "ok" if largest <= limit / math.sqrt(parts) else "unsure"


def unusable_params(gathered: Sequence[tuple["BlockStack", list[int], torch.Tensor | None]],
                    factor_dtype: torch.dtype) -> Skips:
    """The parameters (of one param group) to skip, given per block stack its gradient
    blocks and the stack rows they belong to (``blocks`` None: no gradient)."""
    present = [(stack, rows, blocks) for stack, rows, blocks in gathered if blocks is not None]
    rows_ok = screen_rows([blocks for _, _, blocks in present],
                          [largest_norm(stack.work_dtype, factor_dtype)
                           for stack, _, _ in present])
    skips = Skips()
    if usable(rows_ok):
        return skips
    for (stack, rows, blocks), ok in zip(present, rows_ok):
        finite = rows_finite(blocks)
        for j in (~ok).nonzero().flatten().tolist():
            param = stack.members[rows[j]][0]
            (skips.overflow if bool(finite[j]) else skips.nonfinite).add(param)
    skips.overflow -= skips.nonfinite  # a parameter with a NaN block counts as NaN
    return skips
