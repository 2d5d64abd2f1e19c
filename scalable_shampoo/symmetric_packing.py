"""Packed storage of symmetric matrices: ``d (d + 1) / 2`` entries instead of ``d^2``.

A Kronecker factor ``S = sum_t B_t B_t^T`` is symmetric, so keeping only its distinct
entries halves the largest part of the optimizer state (the factors are float64 by
default: two of them for a matrix block take 4x the block's float32 bytes full, 2x
packed). Factors are read only at root steps, where :func:`unpack_symmetric` rebuilds
the full matrix once for the ``eigh`` or Newton solver, and updated every statistics
step by :func:`pack_outer_products`.

Layout (rectangular packing, after LAPACK's "rectangular full packed" format). With
``a = d // 2`` and ``b = d - a``, split ``S = [[S11, S12], [S12^T, S22]]`` (``S11`` is
``a x a``, ``S22`` is ``b x b``). The packed vector is ``S12`` (``a x b``, row-major)
followed by one rectangle ``M`` that holds the upper triangles of ``S11`` and ``S22``:

- ``d`` even (``a == b``): ``M`` is ``(a + 1) x a``; on and above its diagonal
  (``r <= j``) ``M[r, j] = S11[r, j]``, below it ``M[r, j] = S22[j, r - 1]``;
- ``d`` odd (``b == a + 1``): ``M`` is ``b x b``; on and below its diagonal
  ``M[r, j] = S22[j, r]``, above it ``M[r, j] = S11[r, j - 1]``.

Every piece is a rectangle of a full matrix, so packing is a few strided copies and one
``where``, and the update computes the three blocks ``S11, S12, S22`` of the outer
product by three ``bmm`` (3/4 of the full product's flops) straight into their packed
places. Unpacking is one gather (``index_select``) through a cached index of the full
matrix's entries into the packed vector (``d^2`` int32 per size and device): a single
pass over the output, 0.4-0.7x the cost of the strided copies it replaced, which
matters because the inverse roots are stored packed too and unpacked every step.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

__all__ = ["packed_size", "unpacked_size", "pack_symmetric", "unpack_symmetric",
           "pack_outer_products"]

# Bound on the transient outer products :func:`pack_outer_products` forms at once, so
# packing saves memory at the peak of a step too, not only between steps.
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
def _holds_s11(d: int, device: torch.device) -> torch.Tensor:
    """For size ``d``: where ``M`` holds ``S11`` (else ``S22^T``), cached per size and
    device."""
    a, b = d // 2, d - d // 2
    rows, cols = (a + 1, a) if a == b else (b, b)
    r = torch.arange(rows, device=device)[:, None]
    j = torch.arange(cols, device=device)[None]
    return r <= j if a == b else j > r


def _rectangle(s11: torch.Tensor, s22: torch.Tensor) -> torch.Tensor:
    """``M`` of the layout from the diagonal blocks ``(..., a, a)`` and ``(..., b, b)``."""
    a, b = s11.shape[-1], s22.shape[-1]
    holds_s11 = _holds_s11(a + b, s11.device)
    if a == b:
        return torch.where(holds_s11, F.pad(s11, (0, 0, 0, 1)), F.pad(s22.mT, (0, 0, 1, 0)))
    return torch.where(holds_s11, F.pad(s11, (1, 0, 0, 1)), s22.mT)


def _regions(packed: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of ``packed`` ``(..., d (d + 1) / 2)`` as ``S12`` ``(..., a, b)`` and ``M``."""
    a, b = d // 2, d - d // 2
    shape = (a + 1, a) if a == b else (b, b)
    return (packed[..., :a * b].unflatten(-1, (a, b)),
            packed[..., a * b:].unflatten(-1, shape))


def pack_symmetric(matrices: torch.Tensor) -> torch.Tensor:
    """``(..., d, d)`` -> ``(..., d (d + 1) / 2)`` in the layout above (a new tensor).
    Only the upper triangle is read, so a matrix symmetric only up to rounding packs
    as its upper triangle."""
    d = matrices.shape[-1]
    if matrices.dim() < 2 or matrices.shape[-2] != d:
        raise ValueError(f"pack_symmetric expects square matrices, got shape "
                         f"{tuple(matrices.shape)}")
    a = d // 2
    rectangle = _rectangle(matrices[..., :a, :a], matrices[..., a:, a:])
    return torch.cat([matrices[..., :a, a:].flatten(-2), rectangle.flatten(-2)], dim=-1)


@lru_cache(maxsize=16)
def _unpack_index(d: int, device: torch.device) -> torch.Tensor:
    """``(d * d,)``: for each entry ``(i, j)`` of a full ``d x d`` matrix (row-major), its
    position in the packed vector (that of ``(j, i)`` below the diagonal). int32 while
    the positions fit (``index_select`` takes it; half the memory of int64)."""
    flat = torch.arange(d * d, dtype=torch.int64, device=device).view(d, d)
    packed_of = pack_symmetric(flat)  # the full-matrix entry each packed place holds
    position = torch.empty(d * d, dtype=torch.int64, device=device)
    position[packed_of] = torch.arange(packed_of.numel(), dtype=torch.int64, device=device)
    position = position.view(d, d)
    upper = torch.ones(d, d, dtype=torch.bool, device=device).triu()
    index = torch.where(upper, position, position.mT).reshape(-1)
    return index.to(torch.int32) if packed_size(d) < 2**31 else index


def unpack_symmetric(packed: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``(..., d (d + 1) / 2)`` -> ``(..., d, d)``: the full, exactly symmetric matrices
    (a new tensor, in ``dtype`` if given: the cast is done on the packed entries)."""
    d = unpacked_size(packed.shape[-1])
    values = packed.to(dtype) if dtype is not None else packed
    return values.index_select(-1, _unpack_index(d, packed.device)).unflatten(-1, (d, d))


def pack_outer_products(unfolded: torch.Tensor, packed: torch.Tensor, beta: float) -> None:
    """``packed <- beta packed + (1 - beta) pack(U U^T)`` (``packed += pack(U U^T)`` when
    ``beta == 1``) for ``unfolded`` ``U`` of shape ``(N, d, m)`` and ``packed`` of shape
    ``(N, d (d + 1) / 2)``: the blocks ``U_1 U_1^T``, ``U_1 U_2^T``, ``U_2 U_2^T`` of the
    row halves ``U_1, U_2`` by three ``bmm``, for a bounded number of rows at a time."""
    n, d = unfolded.shape[0], unfolded.shape[1]
    a = d // 2
    rows = max(1, _CHUNK_BYTES // max(1, 2 * d * d * unfolded.element_size()))
    for start in range(0, n, rows):
        part = unfolded[start:start + rows]
        top, bottom = part[:, :a], part[:, a:]
        s12_target, rectangle_target = _regions(packed[start:start + rows], d)
        s12 = torch.bmm(top, bottom.mT)
        rectangle = _rectangle(torch.bmm(top, top.mT), torch.bmm(bottom, bottom.mT))
        for target, value in ((s12_target, s12), (rectangle_target, rectangle)):
            if beta == 1.0:
                target.add_(value)
            else:
                target.lerp_(value, 1 - beta)
