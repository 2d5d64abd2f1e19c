"""Packed storage of symmetric matrices: the upper triangle, row by row.

A Kronecker factor ``S = sum_t B_t B_t^T`` is symmetric, so keeping its ``d (d + 1) / 2``
distinct entries instead of ``d^2`` halves the largest part of the optimizer state (the
factors are float64 by default: two of them for a matrix block take 4x the block's
float32 bytes full, 2x packed). Factors are only read at root steps, where
:func:`unpack_symmetric` rebuilds the full matrix once for the ``eigh`` or Newton
solver, and written every statistics step through :func:`pack_symmetric` of the new
outer product, so packing costs a gather per step and a scatter per root step, both
``O(d^2)`` against the ``O(d^3)`` products around them.

Layout: for ``d = 3`` the packed vector is ``[s00, s01, s02, s11, s12, s22]``, the layout
of ``torch.triu_indices(d, d)``; stacked factors are ``(N, d (d + 1) / 2)``.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

__all__ = ["packed_size", "unpacked_size", "pack_symmetric", "unpack_symmetric",
           "pack_outer_products"]

# Bound on the transient (N, d, d) outer products :func:`pack_outer_products` forms at
# once, so packing saves memory at the peak of a step too, not only between steps.
_CHUNK_BYTES = 64 << 20


def packed_size(d: int) -> int:
    """Entries of a packed symmetric ``d x d`` matrix: ``d (d + 1) / 2``."""
    return d * (d + 1) // 2


def unpacked_size(entries: int) -> int:
    """The ``d`` with ``packed_size(d) == entries``; ``ValueError`` where there is none."""
    d = (math.isqrt(8 * entries + 1) - 1) // 2 if entries >= 0 else -1
    if d < 0 or packed_size(d) != entries:
        raise ValueError(f"{entries} entries are not a packed symmetric matrix "
                         "(d (d + 1) / 2 for a whole d)")
    return d


@lru_cache(maxsize=64)
def _indices(d: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices into a row-major ``d x d`` matrix of the packed entries, and of their
    mirror images below the diagonal (cached: one pair per size and device)."""
    rows, cols = torch.triu_indices(d, d, device=device)
    return rows * d + cols, cols * d + rows


def pack_symmetric(matrices: torch.Tensor) -> torch.Tensor:
    """``(..., d, d)`` -> ``(..., d (d + 1) / 2)``: the upper triangles, row by row (a
    new tensor). The lower triangle is not read, so for a matrix that is symmetric only
    up to rounding the result is that of its upper triangle."""
    d = matrices.shape[-1]
    if matrices.dim() < 2 or matrices.shape[-2] != d:
        raise ValueError(f"pack_symmetric expects square matrices, got shape "
                         f"{tuple(matrices.shape)}")
    upper, _ = _indices(d, matrices.device)
    return matrices.reshape(*matrices.shape[:-2], d * d).index_select(-1, upper)


def unpack_symmetric(packed: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``(..., d (d + 1) / 2)`` -> ``(..., d, d)``: the full, exactly symmetric matrices
    (a new tensor, in ``dtype`` if given: the cast is done on the packed entries)."""
    d = unpacked_size(packed.shape[-1])
    upper, lower = _indices(d, packed.device)
    values = packed.to(dtype) if dtype is not None else packed
    lead = values.shape[:-1]
    flat = values.reshape(-1, values.shape[-1])
    full = flat.new_empty(flat.shape[0], d * d)
    full.index_copy_(1, upper, flat)
    full.index_copy_(1, lower, flat)  # the diagonal twice, with the same values
    return full.reshape(*lead, d, d)


def pack_outer_products(unfolded: torch.Tensor, packed: torch.Tensor, beta: float) -> None:
    """``packed <- beta packed + (1 - beta) pack(U U^T)`` (``packed += pack(U U^T)`` when
    ``beta == 1``) for ``unfolded`` ``U`` of shape ``(N, d, m)`` and ``packed`` of shape
    ``(N, d (d + 1) / 2)``, forming the full ``U U^T`` for a bounded number of rows at
    a time."""
    n, d = unfolded.shape[0], unfolded.shape[1]
    rows = max(1, _CHUNK_BYTES // max(1, d * d * unfolded.element_size()))
    for start in range(0, n, rows):
        part = unfolded[start:start + rows]
        outer = pack_symmetric(torch.bmm(part, part.mT))
        target = packed[start:start + rows]
        if beta == 1.0:
            target.add_(outer)
        else:
            target.mul_(beta).add_(outer, alpha=1 - beta)
