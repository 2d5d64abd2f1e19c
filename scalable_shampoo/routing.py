"""Routing FSDP2 parameters' elements between the rank that holds their rows and the
rank that owns their blocks, so that no rank ever holds a full parameter.

Under ``fully_shard`` a rank holds rows ``[start, stop)`` of a parameter and of its
gradient (:mod:`.sharded`); under data parallelism each block of the *full* parameter
is owned by one rank (:class:`.distributed.Exchange`). The owner needs its blocks'
gradients, and the rows' rank needs the update of its rows. The elements of one box of
blocks (:class:`.blocking.BlockRegion`) that lie in one rank's rows form a :class:`Cut`:
the rows are a range of the merged tensor's first dimension, so a cut is a sub-box of
the box's ``(*counts, *block_shape)`` grid (a range of its first count and of its first
block dimension; at most three per box and rank, :func:`cut_box`), a strided view both
of the box and of the rank's contiguous rows. :func:`build_routing` lists, once per
param-group plan, the cuts this rank sends (its rows, per owner) and receives (its
boxes, per rank); both sides list a pair's cuts in the same order, so that no index
travels.

Per step (:class:`Router`), per parameter dtype: one ``all_to_all_single`` sends each
owner the elements of its boxes in this rank's rows (the gradient, with coupled weight
decay ``g + wd p``, computed on the rows), each segment headed by one status element
for the failure protocol of :mod:`.distributed`; the owner copies the cuts into its
block stacks. After the owners computed their directions, a second all-to-all, the
same layout in reverse, brings each rank the update of its rows (cast to the
parameter's dtype by the owner, as one process casts it), which it adds to
``p.to_local()`` with the float operations of one process (:func:`apply_updates`).
Only parameters that every rank agreed are present travel. A rank receives about
``(world - 1) / world`` of its owned blocks' elements and of its rows' elements, and
holds transient buffers of those sizes only, freed after the step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.distributed as dist

from .blocking import BlockLayout, BlockRegion
from .distributed import row_major_boxes
from .sharded import Shards, rows_of


@dataclass(frozen=True)
class Cut:
    """The elements of one box of a parameter that lie in one rank's rows.

    Attributes:
        key: the box's first block index (with the parameter, what names the box).
        index: the cut within the box's ``(*counts, *block_shape)`` tensor.
        shape: the cut's shape.
        strides, offset: the cut as a strided view of the full, contiguous parameter.
    """

    key: int
    index: tuple[slice, ...]
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def cut_box(box: BlockRegion, merged_shape: Sequence[int], lo: int, hi: int) -> list[Cut]:
    """The cuts of ``box`` (of a parameter of ``merged_shape``) that lie in the flat
    elements ``[lo, hi)``: whole rows of the merged first dimension (a rank's rows under
    ``Shard(0)`` are whole rows of it, the merged first dimension being the product of
    the leading dimensions). At most three, in the box's row-major order."""
    if lo >= hi or not box.num_blocks:
        return []
    k = len(box.counts)
    if k == 0:  # a one-element parameter: whole in the rank that holds it
        return [Cut(box.block_indices[0], (), (), (), box.offset)] if lo <= box.offset < hi else []
    row = math.prod(merged_shape[1:])
    first, size = box.starts[0], box.block_shape[0]
    begin = max(lo // row, first)
    end = min(hi // row, first + box.counts[0] * size)
    cuts = []
    for (c, j), (nc, nj) in row_major_boxes((box.counts[0], size), begin - first, end - first):
        index = [slice(None)] * (2 * k)
        index[0], index[k] = slice(c, c + nc), slice(j, j + nj)
        shape = [*box.counts, *box.block_shape]
        shape[0], shape[k] = nc, nj
        cuts.append(Cut(box.block_indices[0], tuple(index), tuple(shape), box.strides,
                        box.offset + c * box.strides[0] + j * box.strides[k]))
    return cuts


def flat_rows(shape: Sequence[int], world_size: int, rank: int) -> tuple[int, int]:
    """The flat elements ``[lo, hi)`` of a contiguous parameter of ``shape`` that
    ``rank`` holds under ``Shard(0)``."""
    row = math.prod(shape[1:])
    start, stop = rows_of(shape[0], world_size, rank)
    return start * row, stop * row


@dataclass(frozen=True)
class Routing:
    """Where one param group's FSDP2 parameters' elements travel, seen from one rank:
    built once per plan (:func:`build_routing`), no tensors.

    Attributes:
        params: the routed parameters (indices in the group), in order.
        buckets: ``(dtype, device, parameters)``: the routed parameters by dtype and
            device, one all-to-all each.
        sends: per parameter, per owner rank, the cuts of this rank's rows in that
            owner's boxes.
        receives: per parameter, per rank, the cuts of that rank's rows in this rank's
            boxes.
        starts: per parameter, the first flat element of this rank's rows.
        layouts: the all-to-all layouts (:meth:`Router._layouts`) by the parameters that
            travel in a bucket, made at their first step.
    """

    params: tuple[int, ...]
    buckets: tuple[tuple[torch.dtype, torch.device, tuple[int, ...]], ...]
    sends: dict[int, list[list[Cut]]]
    receives: dict[int, list[list[Cut]]]
    starts: dict[int, int]
    layouts: dict[tuple[int, ...], tuple] = field(default_factory=dict, compare=False)


def build_routing(params: Sequence[torch.Tensor], layouts: Sequence[BlockLayout],
                  boxes: dict[int, list[tuple[int, BlockRegion]]], routed: Iterable[int],
                  world_size: int, rank: int) -> Routing:
    """The :class:`Routing` of parameters ``routed`` given every rank's boxes of them
    (``boxes``: per parameter, ``(owner, box)`` as :class:`.distributed.Exchange`
    records them): a pure function of shapes and the assignment, the same lists on
    every rank for a pair of ranks."""
    order = tuple(sorted(routed))
    sends: dict[int, list[list[Cut]]] = {}
    receives: dict[int, list[list[Cut]]] = {}
    starts: dict[int, int] = {}
    buckets: dict[tuple, list[int]] = {}
    for pi in order:
        shape, merged = tuple(params[pi].shape), layouts[pi].merged_shape
        spans = [flat_rows(shape, world_size, r) for r in range(world_size)]
        sends[pi] = [[] for _ in range(world_size)]
        receives[pi] = [[] for _ in range(world_size)]
        for owner, box in boxes[pi]:
            sends[pi][owner] += cut_box(box, merged, *spans[rank])
            if owner == rank:
                for r, span in enumerate(spans):
                    receives[pi][r] += cut_box(box, merged, *span)
        starts[pi] = spans[rank][0]
        buckets.setdefault((params[pi].dtype, params[pi].device), []).append(pi)
    return Routing(order, tuple((d, v, tuple(m)) for (d, v), m in buckets.items()),
                   sends, receives, starts)


def rows_view(rows: torch.Tensor, cut: Cut, start: int) -> torch.Tensor:
    """``cut`` as a view of a rank's contiguous rows ``rows`` (of the parameter or its
    gradient) whose first element is the parameter's flat element ``start``."""
    return rows.as_strided(cut.shape, cut.strides, rows.storage_offset() + cut.offset - start)


Placed = list[tuple[int, Cut, int]]  # (parameter, cut, first element in the flat buffer)
# Per (parameter, first block) of a box a rank owns: its cuts, ``(index in the box, values)``.
Inbox = dict[tuple[int, int], list[tuple[tuple[slice, ...], torch.Tensor]]]


def place(per_rank: Sequence[Sequence[tuple[int, Cut]]]) -> tuple[list[int], list[int], Placed]:
    """The layout of an all-to-all buffer: per rank its segment's size (one status
    element, then its cuts' elements, in order), each segment's status position, and
    where each cut starts."""
    sizes, heads, placed = [], [], []
    offset = 0
    for cuts in per_rank:
        heads.append(offset)
        position = offset + 1
        for param, cut in cuts:
            placed.append((param, cut, position))
            position += cut.numel
        sizes.append(position - offset)
        offset = position
    return sizes, heads, placed


def _copy(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """One fused copy (cast to the targets' dtype), unless there is nothing to copy (a
    rank without rows, or without blocks, in a bucket)."""
    if targets:
        torch._foreach_copy_(targets, sources)


def apply_updates(params: dict[int, torch.Tensor],
                  adds: Iterable[tuple[int, torch.Tensor, torch.Tensor]], config: Any,
                  scales: dict[int, float]) -> None:
    """``p <- p - lr * wd * p`` (decoupled) for ``params`` (by index), then each
    ``target <- target - lr * scale * delta`` of ``adds`` ``(index, target, delta)``,
    ``scale`` the parameter's (its bias correction): the scale folds into the step size,
    one fused add per distinct scale. The same ops, and so the same rounding, whatever
    views the targets are, in one process and on every rank."""
    if config.weight_decay and config.decoupled_weight_decay:
        torch._foreach_mul_(list(params.values()), 1 - config.lr * config.weight_decay)
    by_scale: dict[float, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for pi, target, delta in adds:
        by_scale.setdefault(scales[pi], []).append((target, delta))
    for scale, pairs in by_scale.items():
        torch._foreach_add_([t for t, _ in pairs], [d for _, d in pairs],
                            alpha=-config.lr * scale)


class Router:
    """One step of a param group's routed parameters (see the module's docstring).

    :meth:`select` (in the agreement) fixes the parameters that travel, :meth:`forward`
    brings this rank's boxes their gradients (:attr:`inbox`), :meth:`stage` takes the
    owner's directions, :meth:`back` returns each rank its rows' updates and
    :meth:`apply` adds them. ``forward`` and ``back`` are collectives; a rank that
    failed joins them with ``failed=True`` (status 1, no data) and every rank learns it.
    """

    def __init__(self, routing: Routing, shards: Shards, group: Any, world_size: int) -> None:
        self.routing, self.shards, self.group = routing, shards, group
        self.world_size = world_size
        self.present: list[int] = []
        self.inbox: Inbox = {}
        self._outbox: dict[tuple[int, int], torch.Tensor] = {}
        self._adds: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    @property
    def params(self) -> tuple[int, ...]:
        return self.routing.params

    def select(self, present: Iterable[int]) -> bool:
        """The parameters that travel this step (agreed by every rank); whether any."""
        self.present = sorted(present)
        return bool(self.present)

    def _buckets(self) -> list[tuple[torch.dtype, torch.device, list[int]]]:
        chosen = set(self.present)
        return [(dtype, device, [pi for pi in members if pi in chosen])
                for dtype, device, members in self.routing.buckets
                if any(pi in chosen for pi in members)]

    def _layouts(self, members: list[int]) -> tuple[tuple, tuple]:
        """``(sizes, heads, placed)`` of the rows' side (sent forward, received back)
        and of the owner's side (received forward, sent back), made once per set of
        parameters that travel."""
        key = tuple(members)
        if key not in self.routing.layouts:
            self.routing.layouts[key] = tuple(
                place([[(pi, c) for pi in members for c in cuts[pi][r]]
                       for r in range(self.world_size)])
                for cuts in (self.routing.sends, self.routing.receives))
        return self.routing.layouts[key]

    def _exchange(self, send: torch.Tensor, recv: torch.Tensor, send_sizes: list[int],
                  recv_sizes: list[int], heads: list[int], failures: list[bool]) -> None:
        """One all-to-all; marks in ``failures`` the ranks whose status says failed."""
        dist.all_to_all_single(recv, send, recv_sizes, send_sizes, group=self.group)
        for rank, status in enumerate(recv[heads].tolist()):
            failures[rank] = failures[rank] or status != 0

    @staticmethod
    def _outgoing(sizes: list[int], heads: list[int], dtype: torch.dtype,
                  device: torch.device, failed: bool) -> torch.Tensor:
        send = (torch.zeros if failed else torch.empty)(sum(sizes), dtype=dtype, device=device)
        send[heads] = float(failed)
        return send

    def forward(self, grads: dict[int, torch.Tensor] | None, failed: bool) -> list[bool]:
        """Sends each owner the gradient elements (``grads``: per present parameter this
        rank's rows, contiguous) of its boxes; fills :attr:`inbox`: per ``(parameter,
        first block of a box)`` this rank owns, ``(index in the box, values)`` per cut.
        Returns, per rank, whether it failed."""
        failures = [False] * self.world_size
        for dtype, device, members in self._buckets():
            (send_sizes, send_heads, send_at), (recv_sizes, recv_heads, recv_at) = \
                self._layouts(members)
            send = self._outgoing(send_sizes, send_heads, dtype, device, failed)
            if not failed:
                _copy([send[s:s + c.numel].view(c.shape) for _, c, s in send_at],
                      [rows_view(grads[pi], c, self.routing.starts[pi]) for pi, c, _ in send_at])
            recv = torch.empty(sum(recv_sizes), dtype=dtype, device=device)
            self._exchange(send, recv, send_sizes, recv_sizes, recv_heads, failures)
            del send  # transient: only the received elements stay, until gathered
            for pi, c, s in recv_at:
                self.inbox.setdefault((pi, c.key), []).append(
                    (c.index, recv[s:s + c.numel].view(c.shape)))
        return failures

    def take_inbox(self) -> Inbox:
        """:attr:`inbox`, which the router then forgets: the received buffers are freed
        once the caller drops it."""
        inbox, self.inbox = self.inbox, {}
        return inbox

    def stage(self, key: tuple[int, int], direction: torch.Tensor) -> None:
        """The direction of this rank's box ``key`` ``(parameter, first block)``,
        shaped ``(*counts, *block_shape)``, for :meth:`back`."""
        self._outbox[key] = direction

    def back(self, failed: bool) -> list[bool]:
        """Sends each rank the staged directions of its rows (cast to the parameter's
        dtype) and prepares their adds to this rank's rows (views made before the
        exchange). Returns, per rank, whether it failed."""
        failures = [False] * self.world_size
        self._adds = []
        for dtype, device, members in self._buckets():
            (recv_sizes, recv_heads, recv_at), (send_sizes, send_heads, send_at) = \
                self._layouts(members)
            send = self._outgoing(send_sizes, send_heads, dtype, device, failed)
            if not failed:
                _copy([send[s:s + c.numel].view(c.shape) for _, c, s in send_at],
                      [self._outbox[(pi, c.key)][c.index] for pi, c, _ in send_at])
            recv = torch.empty(sum(recv_sizes), dtype=dtype, device=device)
            self._adds += [(pi, rows_view(self.shards[pi].local, c, self.routing.starts[pi]),
                            recv[s:s + c.numel].view(c.shape)) for pi, c, s in recv_at]
            self._exchange(send, recv, send_sizes, recv_sizes, recv_heads, failures)
        self._outbox = {}
        return failures

    def updated(self) -> list[torch.Tensor]:
        """The local shards :meth:`apply` changes."""
        return [self.shards[pi].local for pi in self.present]

    def apply(self, config: Any, scales: dict[int, float]) -> None:
        """Adds the returned updates to this rank's rows (after :meth:`back`)."""
        if not self.present:
            return
        apply_updates({pi: self.shards[pi].local for pi in self.present}, self._adds,
                      config, scales)
        self._adds = []
