"""Data-parallel Shampoo over ``torch.distributed``.

Every rank holds the whole model and, after the data-parallel all-reduce, the whole
gradient. The preconditioner work is split instead of repeated: each block is owned by
one rank (:func:`assign_blocks`, the same on every rank without communication), which
keeps that block's statistics, roots, grafting and momentum state and computes its
update direction ``v``. One all-gather per dtype bucket (flat buffers, :class:`Exchange`)
then gives every rank every direction as it was computed (a copy, nothing folded in), and
every rank applies it with the float operations one process runs, so the parameters stay
bit-identical across ranks and, given the same gradients, equal one process's.

FSDP2 parameters (a rank holds some rows of each) take part too: their blocks are those
of the full parameters, but their gradient rows travel to the blocks' owners and the
updates back to the rows' ranks (:mod:`.routing`) instead of the all-gather.

Every per-step decision is agreed on by all ranks (:meth:`DataParallel.agree`): which
parameters are skipped (no gradient or NaN/Inf anywhere), and whether some rank failed.
A rank that raises inside ``step()`` first joins the collective the other ranks wait in,
marked as failed (:meth:`DataParallel.abort`), so every rank raises instead of hanging.
The hyperparameters must be the same on every rank (:meth:`DataParallel.check`): before
the first step the structure, and every step the values, travel as a fingerprint.

Checkpoints are keyed by parameter and block index, never by rank, so they load at any
world size; :func:`save_checkpoint` / :func:`load_checkpoint` write and read them with
``torch.distributed.checkpoint``.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
import torch.distributed as dist

from .blocking import BlockLayout, BlockRegion, block_regions
from .gradient_screen import Skips, norm_limit, part_verdict, screen_parts, screen_whole

if TYPE_CHECKING:
    from .config import ShampooConfig
    from .routing import Router

# Per-parameter gradient status, agreed by an all-reduce with MAX (a NaN anywhere wins).
_PRESENT, _ABSENT, _OVERFLOW, _NONFINITE = 0, 1, 2, 3


class PeerFailure(RuntimeError):
    """Raised on every rank whose ``step()`` stopped because another rank failed."""


# ------------------------------------------------------------------- assignment
def block_cost(block_shape: Sequence[int], dims: Sequence[int]) -> int:
    """The work of one block, in rough flops: ``d^3`` per factor of size ``d`` for its
    root, plus ``numel * (sum of factor sizes + 1)`` per step for statistics,
    preconditioning and the elementwise grafting and momentum."""
    numel = math.prod(block_shape)
    sizes = [block_shape[d] for d in dims]
    return sum(d**3 for d in sizes) + numel * (sum(sizes) + 1)


def assign_blocks(costs: Sequence[int], world_size: int,
                  initial_loads: Sequence[int] | None = None) -> tuple[list[int], list[int]]:
    """Owner rank of each item, and each rank's load afterwards (``initial_loads`` plus
    its items' costs): greedy longest-processing-time, a pure function of its inputs.

    Items are taken in decreasing cost (ties by position); each goes to the least
    loaded rank (ties: the lower rank). Items of equal cost are interchangeable, so
    their ranks' shares are then handed out as contiguous runs in item order (rank 0
    first): the loads are LPT's, and equal-shape blocks of a box stay together, which
    keeps their gathers and scatters one strided copy per box. With zero initial loads
    the spread of the loads is at most the largest cost.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    loads = [0] * world_size if initial_loads is None else [int(x) for x in initial_loads]
    if len(loads) != world_size:
        raise ValueError(f"initial_loads must have world_size={world_size} entries, "
                         f"got {len(loads)}")
    if any(c < 0 for c in costs):
        raise ValueError("costs must be >= 0")
    heap = [(load, rank) for rank, load in enumerate(loads)]
    heapq.heapify(heap)
    shares: dict[int, list[int]] = {}
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, rank = heapq.heappop(heap)
        heapq.heappush(heap, (load + costs[i], rank))
        shares.setdefault(costs[i], [0] * world_size)[rank] += 1
    owners = [0] * len(costs)
    handed = {cost: (0, 0) for cost in shares}  # per cost: (rank, items it got so far)
    for i, cost in enumerate(costs):
        rank, taken = handed[cost]
        while taken == shares[cost][rank]:
            rank, taken = rank + 1, 0
        owners[i] = rank
        handed[cost] = (rank, taken + 1)
    for load, rank in heap:
        loads[rank] = load
    return owners, loads


def row_major_boxes(counts: Sequence[int], start: int,
                    stop: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Positions ``start <= i < stop`` of a row-major grid of shape ``counts``, as
    boxes ``(first index, box counts)``: at most ``2 k - 1`` of them for ``k`` dims."""
    if start >= stop:
        return []
    if not counts:
        return [((), ())]
    inner = math.prod(counts[1:])
    rest = tuple(counts[1:])

    def row(index: int, begin: int, end: int) -> list:
        return [((index, *at), (1, *size)) for at, size in row_major_boxes(rest, begin, end)]

    first, last = start // inner, (stop - 1) // inner
    head, tail = start - first * inner, stop - last * inner
    if first == last:
        return row(first, head, tail)
    boxes = []
    if head:
        boxes += row(first, head, inner)
        first += 1
    full_stop = last + 1 if tail == inner else last
    if full_stop > first:
        boxes.append(((first, *[0] * len(rest)), (full_stop - first, *rest)))
    if tail != inner:
        boxes += row(last, 0, tail)
    return boxes


def sub_region(region: BlockRegion, at: Sequence[int], counts: Sequence[int]) -> BlockRegion:
    """The box of ``region``'s blocks from block position ``at`` with ``counts``."""
    k = len(region.counts)
    grid = torch.tensor(region.block_indices, dtype=torch.long).reshape(region.counts)
    picked = grid[tuple(slice(a, a + c) for a, c in zip(at, counts))]
    return BlockRegion(
        starts=tuple(s + a * b for s, a, b in zip(region.starts, at, region.block_shape)),
        counts=tuple(counts), block_shape=region.block_shape,
        block_indices=tuple(picked.flatten().tolist()), strides=region.strides,
        offset=region.offset + sum(a * region.strides[d] for d, a in enumerate(at[:k])))


def split_region(region: BlockRegion, owners: Sequence[int]) -> list[tuple[int, BlockRegion]]:
    """``region`` cut into boxes whose blocks have one owner each, as ``(owner, box)``;
    ``owners[b]`` is the owner of layout block ``b``. Contiguous runs of one owner (in
    the region's row-major block order) stay a few boxes, not one per block."""
    ranks = [owners[b] for b in region.block_indices]
    if all(r == ranks[0] for r in ranks):
        return [(ranks[0], region)]
    parts = []
    start = 0
    for stop in range(1, len(ranks) + 1):
        if stop == len(ranks) or ranks[stop] != ranks[start]:
            parts += [(ranks[start], sub_region(region, at, counts))
                      for at, counts in row_major_boxes(region.counts, start, stop)]
            start = stop
    return parts


# ----------------------------------------------------------------------- exchange
@dataclass(frozen=True)
class Slot:
    """Where one box of blocks travels: ``numel`` elements from ``offset`` of its
    owner's segment of a bucket."""

    param: int
    region: BlockRegion
    offset: int
    numel: int


@dataclass
class Bucket:
    """One flat all-gather buffer: the directions of one work dtype and device.

    Attributes:
        dtype, device: of the directions (and the buffer).
        slots: per rank, the boxes it contributes, in order.
        lengths: per rank, the elements it contributes.
        buffer: ``world_size`` segments of ``segment`` elements each, allocated at the
            first exchange; a segment ends with one status element (0: ok, 1: failed).
    """

    dtype: torch.dtype
    device: torch.device
    slots: list[list[Slot]]
    lengths: list[int]
    buffer: torch.Tensor | None = None

    @property
    def segment(self) -> int:
        return max(self.lengths) + 1


@dataclass
class Exchange:
    """One param group's blocks across ranks: which rank owns which block, and where
    every rank's directions travel in the all-gather buffers.

    Attributes:
        world_size, rank: of the process group.
        owners: per parameter, per block, its owner rank.
        loads: per rank, the cost of the blocks it owns in this group and the groups
            before it (the next group's assignment starts from these).
        buckets: per (work dtype, device), its :class:`Bucket`, in creation order.
        targets: ``(param, first block of a box) -> view`` of the buffer where this
            rank puts that box's directions, shaped ``(*counts, *block_shape)``.
        received: ``(param, box, view)`` for every rank's boxes, views of the buffers.
            ``targets`` and ``received`` are made with the buffers (:meth:`allocate`).
        boxes: per parameter, every rank's boxes of it, ``(owner, box)``.
        kinds: per parameter, its bucket's key.
        routed: the parameters left out of the buckets: FSDP2 parameters, whose elements
            travel between their rows' ranks and their blocks' owners instead
            (:mod:`.routing`).
    """

    world_size: int
    rank: int
    owners: list[list[int]]
    loads: list[int]
    buckets: dict[tuple, Bucket] = field(default_factory=dict)
    targets: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    received: list[tuple[int, BlockRegion, torch.Tensor]] = field(default_factory=list)
    boxes: dict[int, list[tuple[int, BlockRegion]]] = field(default_factory=dict)
    kinds: dict[int, tuple] = field(default_factory=dict)
    routed: frozenset[int] = frozenset()

    @classmethod
    def plan(cls, params: Sequence[torch.Tensor], layouts: Sequence[BlockLayout],
             data_parallel: "DataParallel", previous: "Exchange | None") -> "Exchange":
        """Assigns the blocks of ``params`` to ranks, balancing the loads on from the
        ``previous`` param group's (costs from :func:`block_cost`, items in the order
        of the stacked regions, so that the assignment does not depend on ``foreach``)."""
        keys, costs = [], []
        for pi, (param, layout) in enumerate(zip(params, layouts)):
            if param.numel() == 0:
                continue
            for region in block_regions(layout):
                cost = block_cost(region.block_shape, layout.preconditioned_dims)
                keys += [(pi, b) for b in region.block_indices]
                costs += [cost] * region.num_blocks
        world_size = data_parallel.world_size
        ranks, loads = assign_blocks(costs, world_size, previous.loads if previous else None)
        owners = [[0] * layout.num_blocks for layout in layouts]
        for (pi, b), owner in zip(keys, ranks):
            owners[pi][b] = owner
        return cls(world_size, data_parallel.rank, owners, loads)

    def add_param(self, param: int, regions: Sequence[BlockRegion], dtype: torch.dtype,
                  device: torch.device, gathered: bool = True) -> list[BlockRegion]:
        """Records every rank's boxes of ``regions`` (one parameter's), in the all-gather
        buckets unless not ``gathered`` (then :attr:`routed`), and returns this rank's,
        which its block stacks then hold."""
        self.boxes[param] = [(owner, box) for region in regions
                             for owner, box in split_region(region, self.owners[param])]
        self.kinds[param] = (dtype, device)
        if gathered:
            self._add_slots(param)
        else:
            self.routed = self.routed | {param}
        return [box for owner, box in self.boxes[param] if owner == self.rank]

    def _add_slots(self, param: int) -> None:
        key = self.kinds[param]
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = Bucket(*key, [[] for _ in range(self.world_size)],
                                                [0] * self.world_size)
        for owner, box in self.boxes[param]:
            numel = box.num_blocks * math.prod(box.block_shape)
            bucket.slots[owner].append(Slot(param, box, bucket.lengths[owner], numel))
            bucket.lengths[owner] += numel

    def reroute(self, routed: frozenset[int]) -> None:
        """Makes ``routed`` the parameters left out of the buckets (the group's tensors
        were swapped for FSDP2 ones after the plan was built, or back): the buckets are
        laid out again, their buffers allocated anew."""
        if routed == self.routed:
            return
        self.routed, self.buckets, self.targets, self.received = routed, {}, {}, []
        for param in self.boxes:
            if param not in routed:
                self._add_slots(param)

    def allocate(self) -> None:
        """Allocates the buffers, once, and the views every step reuses."""
        if all(b.buffer is not None for b in self.buckets.values()):
            return
        for bucket in self.buckets.values():  # zeros: padding travels too, never NaN garbage
            bucket.buffer = torch.zeros(self.world_size * bucket.segment, dtype=bucket.dtype,
                                        device=bucket.device)
            for rank, slots in enumerate(bucket.slots):
                for slot in slots:
                    start = rank * bucket.segment + slot.offset
                    box = slot.region
                    view = bucket.buffer[start:start + slot.numel].view(
                        (*box.counts, *box.block_shape))
                    self.received.append((slot.param, box, view))
                    if rank == self.rank:
                        self.targets[(slot.param, box.block_indices[0])] = view


# ------------------------------------------------------------------ data parallel
def _bits(values: Sequence[float]) -> list[int]:
    """Non-negative floats as the int64 of their float64 bits, which order as they do
    (an all-reduce with MAX of them is one of their largest)."""
    return torch.tensor(list(values), dtype=torch.float64).view(torch.int64).tolist()


def _floats(bits: Sequence[int]) -> list[float]:
    """The inverse of :func:`_bits`."""
    return torch.tensor(list(bits), dtype=torch.int64).view(torch.float64).tolist()


def _all_gather(output: torch.Tensor, segment: torch.Tensor, group: Any) -> None:
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, segment, group=group)


# Per param group, ``(field, repr(value))`` pairs that must be the same on every rank.
Description = list[list[tuple[str, str]]]


def fingerprint(description: Description) -> int:
    """A 62-bit digest of ``description``, the same in every process (``hash()`` of a
    string is salted per process); it and its negation fit an int64."""
    digest = hashlib.blake2b(repr(description).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def first_difference(descriptions: Sequence[Description]) -> str:
    """What differs between the ranks' ``descriptions`` (one per rank), in words: the
    first param group whose fields are not all equal, each such field with its values'
    ranks."""
    def values(per_rank: Sequence[Any]) -> str:
        ranks: dict[Any, list[int]] = {}
        for rank, value in enumerate(per_rank):
            ranks.setdefault(value, []).append(rank)
        return ", ".join(f"{value} on rank(s) {r}" for value, r in ranks.items())

    counts = [len(d) for d in descriptions]
    if len(set(counts)) > 1:
        return f"the number of param groups must be the same on every rank, got {values(counts)}"
    for index in range(counts[0]):
        entries = [dict(d[index]) for d in descriptions]
        differ = {}
        for name in dict.fromkeys(name for entry in entries for name in entry):
            per_rank = [entry.get(name, "nothing") for entry in entries]
            if len(set(per_rank)) > 1:
                differ[name] = values(per_rank)
        if differ:
            return (f"param group {index}: {', '.join(differ)} must be the same on every "
                    "rank, got " + "; ".join(f"{k} = {v}" for k, v in differ.items()))
    return "the ranks' hyperparameters differ"  # only for equal reprs of unequal digests


class DataParallel:
    """The process group an optimizer shares its blocks over, and the per-step protocol.

    Within one ``step()`` the ranks run, before the first step (and after a
    ``load_state_dict`` or ``add_param_group``) one check of the structure (a small
    all-reduce, :meth:`check`), then per param group one agreement (a small all-reduce;
    group 0's carries the fingerprint of every group's hyperparameters) and, unless no
    parameter has a gradient, one all-gather per bucket. A group with FSDP2 parameters
    (:mod:`.routing`) runs, between its agreement and its all-gathers, one all-to-all per
    parameter dtype of their gradient rows to the blocks' owners (:meth:`route`), and
    after its all-gathers one more returning each rank its rows' updates. ``_next`` is
    the collective the other ranks run next (of param group ``_group``), which
    :meth:`abort` joins; ``_router`` the group's routed step, once the agreement fixed
    what travels.
    """

    def __init__(self, group: Any, rank: int, world_size: int) -> None:
        self.group, self.rank, self.world_size = group, rank, world_size
        backend = str(dist.get_backend(group))
        self.device = (torch.device("cuda", torch.cuda.current_device())
                       if backend == "nccl" else torch.device("cpu"))
        self._sizes: list[int] = []
        self._group = 0
        self._next: tuple[str, Exchange | None] | None = None
        self._router: Router | None = None
        # This step's hyperparameters (group 0's agreement checks them) and their digest.
        self._expected: Description = []
        self._expected_digest = 0

    @classmethod
    def resolve(cls, distributed: bool, process_group: Any) -> "DataParallel | None":
        """The data parallelism the optimizer's arguments ask for: None when
        ``distributed=False``, when no process group is initialized (and none given),
        or for a world of one process."""
        if not isinstance(distributed, bool):
            raise ValueError(f"distributed must be True or False, got {distributed!r}")
        if not distributed:
            if process_group is not None:
                raise ValueError("process_group is given but distributed=False")
            return None
        if not (dist.is_available() and dist.is_initialized()):
            if process_group is not None:
                raise ValueError("process_group is given but torch.distributed is not "
                                 "initialized")
            return None
        rank = dist.get_rank(process_group)
        if rank < 0:
            raise ValueError("this process is not a member of process_group")
        world_size = dist.get_world_size(process_group)
        return cls(process_group, rank, world_size) if world_size > 1 else None

    def __deepcopy__(self, memo: dict) -> "DataParallel":
        return self  # a process group is shared, not copied

    # ---------------------------------------------------------------- protocol
    def begin_step(self, sizes: Sequence[int], check: bool) -> None:
        """Starts a step over param groups whose agreements have these sizes (a status
        per parameter and a norm per FSDP2 parameter): the structure's :meth:`check` (if
        ``check``) or group 0's agreement is next."""
        self._sizes, self._group, self._router = list(sizes), 0, None
        self._next = ("check", None) if check else ("agree", None) if self._sizes else None

    def _next_group(self) -> None:
        self._group += 1
        self._router = None
        self._next = ("agree", None) if self._group < len(self._sizes) else None

    def _raise_if_failed(self, failed: Sequence[bool]) -> None:
        ranks = [r for r, f in enumerate(failed) if f]
        if ranks:
            self._next = None  # every rank knows: nothing left to join
            raise PeerFailure(f"Shampoo.step() failed on rank(s) {ranks} of {self.world_size} "
                              "(see the error raised there); no parameter was updated here")

    def _flags(self, failed: bool) -> list[int]:
        return [int(failed and rank == self.rank) for rank in range(self.world_size)]

    def _max(self, values: list[int]) -> list[int]:
        """An all-reduce with MAX of small integers."""
        vector = torch.tensor(values, dtype=torch.int64).to(self.device)
        dist.all_reduce(vector, op=dist.ReduceOp.MAX, group=self.group)
        return vector.tolist()

    def _agreement(self, statuses: list[int], failed: bool,
                   description: Description | None = None, digest: int | None = None
                   ) -> list[int]:
        """One all-reduce (MAX) of ``[failed per rank] [d, -d] [statuses]``, ``d`` the
        ``digest`` (default: the fingerprint) of ``description``; raises
        :class:`PeerFailure` if a rank failed and, on every rank, ``ValueError`` naming
        the field if the descriptions differ. Returns the agreed statuses."""
        if digest is None:
            digest = 0 if description is None else fingerprint(description)
        agreed = self._max([*self._flags(failed), digest, -digest, *statuses])
        self._raise_if_failed(agreed[:self.world_size])
        if agreed[self.world_size] != -agreed[self.world_size + 1]:  # max != min: they differ
            self._next = None  # every rank saw it: all of them gather the descriptions
            everyone: list[Any] = [None] * self.world_size
            dist.all_gather_object(everyone, description, group=self.group)
            raise ValueError(f"{first_difference(everyone)} (data-parallel Shampoo applies "
                             "one update on every rank)")
        return agreed[self.world_size + 2:]

    def check(self, structure: Description | None, values: Description) -> None:
        """Raises ``ValueError`` on every rank, naming the param group and field, unless
        every rank has the same hyperparameters. ``structure`` (the parameters' shapes
        and dtypes and everything else a plan is built from), given when
        :meth:`begin_step` was told to check, is compared now, in a collective of its
        own; ``values`` (every hyperparameter, which may change between steps, e.g. lr
        from a scheduler) travel with group 0's agreement, at no extra collective. Both
        come before any state of the step changes."""
        if structure is not None:
            self._agreement([], False, structure)
            self._next = ("agree", None) if self._sizes else None
        if values is not self._expected:  # the optimizer passes the same object unchanged
            self._expected, self._expected_digest = values, fingerprint(values)

    def agree(self, exchange: Exchange, grads: list[torch.Tensor | None],
              params: list[torch.Tensor], config: "ShampooConfig",
              router: "Router | None" = None) -> tuple[list[torch.Tensor | None], Skips]:
        """The next param group's gradients with None for every parameter skipped on some
        rank, and the parameters skipped for NaN/Inf or for squares that overflow the
        state (:mod:`.gradient_screen`): the same on every rank, even if the ranks'
        gradients differ. Checks the gradient the statistics will see (with coupled
        weight decay ``g + wd p``). Raises :class:`PeerFailure` if a rank failed, and in
        group 0 ``ValueError`` if the hyperparameters (:meth:`check`) differ.

        The ``grads`` and ``params`` of the ``router``'s parameters (FSDP2) are this
        rank's rows: a NaN/Inf in any rank's rows skips the parameter, and whether its
        squares overflow is decided on the whole gradient's norm, from the ranks' norms
        of their rows (which travel in the agreement; :meth:`_overflowing`). The router
        is then told what travels (:meth:`.routing.Router.select`)."""
        coupled = config.weight_decay and not config.decoupled_weight_decay
        checked = {i: g.add(p, alpha=config.weight_decay) if coupled else g
                   for i, (g, p) in enumerate(zip(grads, params))
                   if g is not None and g.numel() > 0}
        statuses = [_ABSENT if g is None else _PRESENT for g in grads]
        rows = () if router is None else router.params
        whole = [i for i in checked if i not in rows]
        verdicts = screen_whole([checked[i] for i in whole],
                                [norm_limit(params[i].dtype, config.factor_dtype)
                                 for i in whole])
        for i, verdict in zip(whole, verdicts):
            if verdict != "ok":
                statuses[i] = _OVERFLOW if verdict == "overflow" else _NONFINITE
        parts = [i for i in rows if i in checked]
        norms = dict(zip(parts, screen_parts([checked[i] for i in parts])))
        for i, norm in norms.items():
            if norm is None:
                statuses[i] = _NONFINITE
        statuses += _bits([norms.get(i) or 0.0 for i in rows])
        if self._group == 0:
            agreed = self._agreement(statuses, False, self._expected, self._expected_digest)
        else:
            agreed = self._agreement(statuses, False)
        agreed, largest = agreed[:len(grads)], _floats(agreed[len(grads):])
        for i in self._overflowing(rows, agreed, largest, norms,
                                   [norm_limit(params[i].dtype, config.factor_dtype)
                                    for i in rows]):
            agreed[i] = _OVERFLOW
        grads = [g if s == _PRESENT else None for g, s in zip(grads, agreed)]
        if router is not None and router.select(i for i in rows if agreed[i] == _PRESENT):
            self._router = router
        if any(g is not None for g in grads):
            self._next = ("route" if self._router else "gather", exchange)
        else:
            self._next_group()
        return grads, Skips({i for i, s in enumerate(agreed) if s == _NONFINITE},
                            {i for i, s in enumerate(agreed) if s == _OVERFLOW})

    def _overflowing(self, rows: Sequence[int], agreed: list[int], largest: list[float],
                     norms: dict[int, float | None], limits: Sequence[float]) -> list[int]:
        """Of the parameters ``rows`` (FSDP2) still present, those whose whole gradient's
        norm exceeds its limit, given the largest norm of a rank's rows (``largest``)
        and this rank's (``norms``): most are decided by the largest alone
        (:func:`.gradient_screen.part_verdict`); the rest (norms near the limit) by the
        sum of the ranks' squares, in one more small all-reduce that every rank runs."""
        verdicts = {i: part_verdict(m, limit, self.world_size)
                    for i, m, limit in zip(rows, largest, limits) if agreed[i] == _PRESENT}
        unsure = [i for i, verdict in verdicts.items() if verdict == "unsure"]
        if unsure:
            squares = torch.tensor([(norms.get(i) or 0.0) ** 2 for i in unsure],
                                   dtype=torch.float64).to(self.device)
            dist.all_reduce(squares, group=self.group)
            bound = dict(zip(rows, limits))
            for i, total in zip(unsure, squares.tolist()):
                verdicts[i] = "ok" if math.sqrt(total) <= bound[i] else "overflow"
        return [i for i, verdict in verdicts.items() if verdict == "overflow"]

    def route(self, grads: dict[int, torch.Tensor]) -> None:
        """After the agreement: the routed parameters' gradient rows (``grads``, those
        that travel) to their blocks' owners (:meth:`.routing.Router.forward`). Raises
        :class:`PeerFailure` if a rank failed."""
        _, exchange = self._next
        failures = self._router.forward(grads, failed=False)
        self._next = ("gather", exchange)
        self._raise_if_failed(failures)

    def gather(self, exchange: Exchange,
               directions: Sequence[tuple[int, BlockRegion, torch.Tensor]]) -> None:
        """Every rank's update directions into the views of ``exchange.received``: this
        rank's ``directions`` ``(param, box, v)`` are copied (exactly: nothing is folded
        in, so that every rank applies what one process would) into its segments, then
        one all-gather per bucket; those of routed parameters go back to their rows'
        ranks instead (:meth:`.routing.Router.back`). Raises :class:`PeerFailure` if a
        rank failed."""
        exchange.allocate()
        for param, region, direction in directions:
            key = (param, region.block_indices[0])
            if param in exchange.routed:
                self._router.stage(key, direction)
            else:
                exchange.targets[key].copy_(direction)
        self._raise_if_failed(self._collect(exchange, failed=False))

    def _collect(self, exchange: Exchange, failed: bool) -> list[bool]:
        """The all-gathers of one group, then the return of its routed parameters'
        updates; returns, per rank, whether it failed."""
        exchange.allocate()
        buckets = list(exchange.buckets.values())
        for bucket in buckets:
            seg = bucket.segment
            own = bucket.buffer[self.rank * seg:(self.rank + 1) * seg]
            own[-1] = float(failed)  # the status element
            _all_gather(bucket.buffer, own, self.group)
        routed = None if self._router is None else self._router.back(failed)
        self._next_group()
        if not buckets and routed is None:  # nothing to gather (only empty parameters)
            return [bool(f) for f in self._max(self._flags(failed))]
        failures = [False] * self.world_size if routed is None else routed
        if buckets:
            flags = torch.stack([b.buffer[b.segment - 1::b.segment] for b in buckets])
            failures = [a or b for a, b in zip(failures, (flags != 0).any(dim=0).tolist())]
        return failures

    def abort(self, error: BaseException) -> None:
        """After ``error`` on this rank inside ``step()``: joins, marked as failed, the
        collective the other ranks run next, so that they raise :class:`PeerFailure`
        instead of waiting; the caller then re-raises ``error``."""
        pending, self._next = self._next, None
        if pending is None or isinstance(error, PeerFailure):
            return
        kind, exchange = pending
        if kind in ("check", "agree"):
            statuses = [] if kind == "check" else [_PRESENT] * self._sizes[self._group]
            try:
                self._agreement(statuses, True)
            except PeerFailure:  # its own failure flag, which every rank now saw
                pass
        elif kind == "route":  # every rank raises after it
            self._router.forward(None, failed=True)
        else:
            self._collect(exchange, failed=True)
        self._next = None


# -------------------------------------------------------------------- checkpoints
def saved_blocks(blocks: Any, count: int, needed: Sequence[int], key: Any) -> dict[int, Any]:
    """A parameter's saved block states by block index, from a list of all ``count``
    (:meth:`Shampoo.state_dict`) or a dict keyed by index, ints or strings, holding
    any subset (:meth:`Shampoo.sharded_state_dict`); raises ``ValueError`` unless every
    block in ``needed`` is there and every index is below ``count``."""
    if isinstance(blocks, dict):
        indexed = {int(b): v for b, v in blocks.items()}
        if any(not 0 <= b < count for b in indexed):
            raise ValueError(f"parameter {key}: state has block {max(indexed)}, this optimizer "
                             f"{count} blocks (block_size or shapes differ)")
    elif len(blocks) != count:
        raise ValueError(f"parameter {key}: state has {len(blocks)} blocks, this optimizer "
                         f"{count} (block_size or shapes differ)")
    else:
        indexed = dict(enumerate(blocks))
    missing = [b for b in needed if b not in indexed]
    if missing:
        raise ValueError(f"parameter {key} block {missing[0]} is not in the state dict, which "
                         f"holds its blocks {sorted(indexed)} (one rank's sharded state? "
                         "load_checkpoint reads every rank's)")
    return indexed


def _checkpoint_state(optimizer: Any, stateful: dict[str, Any]) -> dict[str, Any]:
    for name, obj in stateful.items():
        if name == "optimizer" or not (hasattr(obj, "state_dict") and
                                       hasattr(obj, "load_state_dict")):
            raise ValueError(f"{name}= must be an object with state_dict() and "
                             "load_state_dict() (a model, a scheduler), named other than "
                             "'optimizer'")
    return {"optimizer": optimizer.sharded_state_dict(),
            **{name: obj.state_dict() for name, obj in stateful.items()}}


@contextmanager
def _dcp_arguments(optimizer: Any) -> Iterator[dict[str, Any]]:
    """DCP's process arguments: the optimizer's group, or one process when there is no
    process group (a mode DCP warns about on every call; here it is the intent)."""
    data_parallel = getattr(optimizer, "_data_parallel", None)
    no_dist = not (dist.is_available() and dist.is_initialized())
    with warnings.catch_warnings():
        if no_dist:
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield {"process_group": None if data_parallel is None else data_parallel.group,
               "no_dist": no_dist}


def save_checkpoint(checkpoint_id: Any, optimizer: Any, **stateful: Any) -> None:
    """Writes a world-size-independent checkpoint with ``torch.distributed.checkpoint``:
    ``optimizer``'s :meth:`~scalable_shampoo.Shampoo.sharded_state_dict` under
    ``"optimizer"`` and ``obj.state_dict()`` under each keyword (e.g. ``model=module``,
    the unwrapped module of a ``DistributedDataParallel``). Every rank calls it; each
    writes the blocks it owns, replicated entries are written once.

    ``checkpoint_id`` is the checkpoint directory (or a DCP storage id)."""
    import torch.distributed.checkpoint as dcp  # optional machinery, imported when used

    with _dcp_arguments(optimizer) as arguments:
        dcp.save(_checkpoint_state(optimizer, stateful), checkpoint_id=checkpoint_id,
                 **arguments)


def load_checkpoint(checkpoint_id: Any, optimizer: Any, **stateful: Any) -> None:
    """Reads a checkpoint written by :func:`save_checkpoint` at any world size (or by
    one process) into ``optimizer`` and the keyword objects, which must be built as at
    saving (same parameters, same optimizer structure). Every rank calls it and reads
    only the blocks it owns."""
    import torch.distributed.checkpoint as dcp

    state = _checkpoint_state(optimizer, stateful)
    with _dcp_arguments(optimizer) as arguments:
        dcp.load(state, checkpoint_id=checkpoint_id, **arguments)
    optimizer.load_state_dict(state["optimizer"])
    for name, obj in stateful.items():
        obj.load_state_dict(state[name])
