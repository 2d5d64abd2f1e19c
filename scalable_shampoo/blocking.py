"""Parameter <-> block bookkeeping: pure functions over shapes and tensors.

A parameter is reshaped to its *merged shape* (size-1 dimensions squeezed, adjacent
dimensions merged while their product stays <= ``block_size``), then cut into blocks:
every merged dimension of size at most ``max_preconditioned_dim`` but above
``block_size`` is split into chunks of ``block_size``; a dimension above
``max_preconditioned_dim`` is left whole and gets no Kronecker factor.

:func:`split_blocks` / :func:`merge_blocks` are the plain definition (one tensor per
block). The optimizer's per-step path uses :func:`block_regions` / :func:`region_view`
instead, which address a whole box of equal blocks with one strided view; tests check
the two against each other.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import torch


def merged_shape(shape: Sequence[int], block_size: int,
                 merge_dims: bool = True) -> tuple[int, ...]:
    """Squeezes size-1 dimensions, then (``merge_dims``) merges adjacent ones left to
    right while the product stays <= ``block_size``. ``(64, 3, 3, 3)`` with 1024 gives
    ``(576, 3)``; without ``merge_dims``, ``(64, 3, 3, 3)``."""
    merged: list[int] = []
    for size in shape:
        if size == 1:
            continue
        if merge_dims and merged and merged[-1] * size <= block_size:
            merged[-1] *= size
        else:
            merged.append(size)
    return tuple(merged)


def _chunks(size: int, block_size: int) -> tuple[int, ...]:
    if size == 0:
        return (0,)  # an empty dimension is one empty chunk: one (empty) block
    full, rest = divmod(size, block_size)
    return (block_size,) * full + ((rest,) if rest else ())


@dataclass(frozen=True)
class BlockLayout:
    """How one parameter is cut into blocks.

    Attributes:
        param_shape: the parameter's shape.
        merged_shape: the shape after squeezing and merging.
        chunk_sizes: per merged dimension, the sizes of its chunks along that dimension.
        preconditioned: per merged dimension, whether blocks get a factor for it.
    """

    param_shape: tuple[int, ...]
    merged_shape: tuple[int, ...]
    chunk_sizes: tuple[tuple[int, ...], ...]
    preconditioned: tuple[bool, ...]

    @property
    def block_shapes(self) -> list[tuple[int, ...]]:
        """Shapes of the blocks, in row-major order over the chunk grid."""
        return [tuple(c) for c in itertools.product(*self.chunk_sizes)]

    @property
    def num_blocks(self) -> int:
        return math.prod(len(c) for c in self.chunk_sizes)

    @property
    def preconditioned_dims(self) -> tuple[int, ...]:
        """Indices of the dimensions (of every block) that carry a factor."""
        return tuple(i for i, p in enumerate(self.preconditioned) if p)


def block_layout(shape: Sequence[int], block_size: int, max_preconditioned_dim: int,
                 precondition_1d: bool = True, merge_dims: bool = True) -> BlockLayout:
    """The :class:`BlockLayout` of a parameter of ``shape``. Without ``precondition_1d``,
    a parameter with at most one dimension of size > 1 (a vector, once squeezed) gets
    no factor at all."""
    if block_size < 1 or max_preconditioned_dim < 1:
        raise ValueError("block_size and max_preconditioned_dim must be >= 1")
    merged = merged_shape(shape, block_size, merge_dims)
    vector = sum(size > 1 for size in shape) <= 1
    preconditioned = tuple(size <= max_preconditioned_dim and (precondition_1d or not vector)
                           for size in merged)
    chunk_sizes = tuple(_chunks(size, block_size) if pre else (size,)
                        for size, pre in zip(merged, preconditioned))
    return BlockLayout(tuple(shape), merged, chunk_sizes, preconditioned)


def split_blocks(tensor: torch.Tensor, layout: BlockLayout) -> list[torch.Tensor]:
    """The blocks of ``tensor`` (shaped ``layout.param_shape``), as views where the
    tensor is contiguous, in the order of ``layout.block_shapes``."""
    if tuple(tensor.shape) != layout.param_shape:
        raise ValueError(f"tensor of shape {tuple(tensor.shape)} does not match the layout's "
                         f"parameter shape {layout.param_shape}")
    pieces = [tensor.reshape(layout.merged_shape)]
    for dim, sizes in enumerate(layout.chunk_sizes):
        if len(sizes) > 1:
            pieces = [part for piece in pieces for part in torch.split(piece, sizes, dim=dim)]
    return pieces


def merge_blocks(blocks: Sequence[torch.Tensor], layout: BlockLayout) -> torch.Tensor:
    """Inverse of :func:`split_blocks`: a tensor shaped ``layout.param_shape`` (a new
    one, except for a single block, whose reshaped view is returned)."""
    if len(blocks) != layout.num_blocks:
        raise ValueError(f"expected {layout.num_blocks} blocks, got {len(blocks)}")
    pieces = list(blocks)
    # Concatenate along the last split dimension first: row-major order makes the
    # innermost groups consecutive.
    for dim in reversed(range(len(layout.chunk_sizes))):
        count = len(layout.chunk_sizes[dim])
        if count > 1:
            pieces = [torch.cat(pieces[i:i + count], dim=dim)
                      for i in range(0, len(pieces), count)]
    return pieces[0].reshape(layout.param_shape)


@dataclass(frozen=True)
class BlockRegion:
    """A box of the merged tensor tiled by equal blocks, so that all of them can be
    gathered or scattered with one strided copy (see :func:`region_view`).

    A dimension split into chunks of ``block_size`` has at most two kinds of chunk (full
    ones and a smaller last one), so a parameter has at most ``2^k`` regions for ``k``
    merged dimensions, however many blocks it has.

    Attributes:
        starts: per merged dimension, where the region starts.
        counts: per merged dimension, how many blocks the region has along it.
        block_shape: the shape of each of its blocks.
        block_indices: the layout index (see :attr:`BlockLayout.block_shapes`) of each
            block, in row-major order over ``counts``.
        strides, offset: the region's ``(*counts, *block_shape)`` strides and element
            offset within a contiguous tensor of the merged shape (a one-call view).
    """

    starts: tuple[int, ...]
    counts: tuple[int, ...]
    block_shape: tuple[int, ...]
    block_indices: tuple[int, ...]
    strides: tuple[int, ...]
    offset: int

    @property
    def num_blocks(self) -> int:
        return len(self.block_indices)


def block_regions(layout: BlockLayout, one_block_each: bool = False) -> list[BlockRegion]:
    """The regions that tile ``layout``'s merged shape; with ``one_block_each`` every
    block is a region of its own (the one-block-at-a-time reference path)."""
    grid = torch.arange(layout.num_blocks).reshape([len(c) for c in layout.chunk_sizes])
    parts_per_dim = []  # (start offset, chunk range) per kind of chunk
    for sizes in layout.chunk_sizes:
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        if one_block_each:
            parts_per_dim.append([(offsets[i], range(i, i + 1)) for i in range(len(sizes))])
            continue
        full = sum(1 for s in sizes if s == sizes[0])
        parts = [(0, range(0, full))]
        if full < len(sizes):
            parts.append((offsets[full], range(full, len(sizes))))
        parts_per_dim.append(parts)
    merged = layout.merged_shape
    unit = [math.prod(merged[d + 1:]) for d in range(len(merged))]  # contiguous strides
    regions = []
    for combo in itertools.product(*parts_per_dim):
        chunks = [r for _, r in combo]
        index = grid[tuple(slice(r.start, r.stop) for r in chunks)]
        shape = tuple(sizes[r.start] for sizes, r in zip(layout.chunk_sizes, chunks))
        starts = tuple(start for start, _ in combo)
        strides = (*(s * u for s, u in zip(shape, unit)), *unit)
        regions.append(BlockRegion(starts, tuple(len(r) for r in chunks), shape,
                                   tuple(index.flatten().tolist()), strides,
                                   sum(a * u for a, u in zip(starts, unit))))
    return regions


def region_view(merged: torch.Tensor, region: BlockRegion) -> torch.Tensor:
    """The region's blocks as a view of ``merged`` (a tensor of the merged shape),
    shaped ``(*counts, *block_shape)``: writing into it writes into ``merged``."""
    if merged.is_contiguous():  # the per-step path: one call
        return merged.as_strided((*region.counts, *region.block_shape), region.strides,
                                 merged.storage_offset() + region.offset)
    x = merged
    for dim, (start, count, size) in enumerate(zip(region.starts, region.counts,
                                                   region.block_shape)):
        x = x.narrow(dim, start, count * size)
    k = len(region.counts)
    x = x.reshape([v for pair in zip(region.counts, region.block_shape) for v in pair])
    return x.permute([*range(0, 2 * k, 2), *range(1, 2 * k, 2)])
