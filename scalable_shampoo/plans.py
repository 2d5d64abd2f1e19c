"""How a param group's parameters map onto block stacks: the plan of a group (layouts,
this rank's regions, which parameters have state, the stacks and where each block sits
in them), the gradient gather and the update's apply plan (:class:`ApplyPlan`) through
region views. Bookkeeping only: the optimizer decides what runs on the stacks.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from .blocking import BlockLayout, BlockRegion, block_layout, block_regions, region_view
from .config import STRUCTURAL_FIELDS, ShampooConfig
from .distributed import DataParallel, Exchange
from .eigenvalue_corrected import EigenvalueCorrectedStack
from .preconditioner import BlockStack
from .routing import Inbox, Routing, apply_updates, build_routing
from .sharded import Shards, is_sharded

STACK_TYPES = {"shampoo": BlockStack, "eigenvalue_corrected": EigenvalueCorrectedStack}


@dataclass(frozen=True)
class Piece:
    """A region of one parameter, stored in a stack from ``row`` on."""

    param: int
    region: BlockRegion
    row: int


@dataclass
class GroupPlan:
    """How one param group's parameters map onto block stacks.

    Attributes:
        layouts: per parameter, its block layout.
        regions: per parameter, the regions of it this rank stacks (all of them, or with
            data parallelism the boxes it owns), whether or not the parameter has state.
        live: the parameters with state (those that have had a gradient); the stacks
            hold their blocks only.
        stacks: the group's block stacks.
        pieces: per stack, the parameter regions it holds, in row order.
        locations: per parameter, per block, ``(stack index, row in the stack)``; empty
            for a parameter without state.
        structure: the structural hyperparameters the plan was built with.
        step: the group's step counter (steps where some parameter of the group had a
            gradient): it schedules statistics and root steps. Bias corrections use each
            parameter's own ``optimizer.state[p]["step"]``.
        checked_root_setting: the (root_method, exponent_multiplier) last validated.
        exchange: with data parallelism, the blocks' owners and the all-gather layout
            (of every parameter, with state or not); the stacks then hold this rank's
            blocks only, ``locations`` has ``(-1, -1)`` for the others'.
        param_refs: weak references to the parameters the plan was built for, whose
            ``optimizer.state`` entries it keys (a wrapper may swap the group's tensors
            for others of the same shapes: :func:`.sharded.adopt_swapped`).
        routing: with data parallelism and FSDP2 parameters, where their elements travel
            (:mod:`.routing`), made at the first step that routes them.
    """

    layouts: list[BlockLayout]
    regions: list[list[BlockRegion]]
    live: frozenset[int]
    stacks: list[BlockStack]
    pieces: list[list[Piece]]
    locations: list[list[tuple[int, int]]]
    structure: tuple
    step: int = 0
    checked_root_setting: tuple | None = None
    exchange: Exchange | None = None
    param_refs: list[weakref.ref] = field(default_factory=list)
    routing: Routing | None = None

    def __getstate__(self) -> dict[str, Any]:
        # weak references do not pickle; a copy re-learns its tensors at its next step
        return {**self.__dict__, "param_refs": []}


def structure(config: ShampooConfig) -> tuple:
    return tuple(getattr(config, name) for name in STRUCTURAL_FIELDS)


def _work_dtype(param_dtype: torch.dtype) -> torch.dtype:
    # Low-precision parameters keep their optimizer state and math in float32.
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def build_plan(params: list[torch.Tensor], config: ShampooConfig, batched: bool,
               data_parallel: DataParallel | None = None,
               previous: GroupPlan | None = None,
               live: frozenset[int] = frozenset()) -> GroupPlan:
    """The plan of a param group whose ``live`` parameters have state. With
    ``data_parallel``, the blocks are assigned to ranks (balancing the loads on from
    the ``previous`` group's) and the stacks get this rank's blocks only."""
    layouts = [block_layout(p.shape, config.block_size, config.max_preconditioned_dim,
                            config.precondition_1d, config.merge_dims) for p in params]
    exchange = None if data_parallel is None else Exchange.plan(
        params, layouts, data_parallel, previous.exchange if previous else None)
    regions: list[list[BlockRegion]] = []
    for pi, (param, layout) in enumerate(zip(params, layouts)):
        own = [] if param.numel() == 0 else block_regions(layout, one_block_each=not batched)
        if exchange is not None and own:  # this rank's boxes; the exchange records the others'
            own = exchange.add_param(pi, own, _work_dtype(param.dtype), param.device,
                                     gathered=not is_sharded(param))
        regions.append(own)
    plan = GroupPlan(layouts, regions, live, [], [], [], structure(config), exchange=exchange,
                     param_refs=[weakref.ref(p) for p in params])
    stack_live(plan, params, config, batched)
    return plan


def routing_of(plan: GroupPlan, params: list[torch.Tensor], routed: frozenset[int],
               data_parallel: DataParallel) -> Routing:
    """The plan's :class:`.routing.Routing` of its FSDP2 parameters ``routed``, made
    once (again only if the group's tensors were swapped for others)."""
    exchange = plan.exchange
    exchange.reroute(routed)
    if plan.routing is None or plan.routing.params != tuple(sorted(routed)):
        plan.routing = build_routing(params, plan.layouts, exchange.boxes, routed,
                                     data_parallel.world_size, data_parallel.rank)
    return plan.routing


def stack_live(plan: GroupPlan, params: list[torch.Tensor], config: ShampooConfig,
               batched: bool) -> None:
    """Builds the plan's stacks (fresh state) for its live parameters' regions."""
    stacks: list[BlockStack] = []
    pieces: list[list[Piece]] = []
    locations: list[list[tuple[int, int]]] = []
    index: dict[Any, int] = {}
    for pi, (param, layout) in enumerate(zip(params, plan.layouts)):
        if pi not in plan.live or param.numel() == 0:  # no state, or nothing to precondition
            locations.append([])
            continue
        where: list[tuple[int, int]] = [(-1, -1)] * layout.num_blocks
        for region in plan.regions[pi]:
            key = ((region.block_shape, layout.preconditioned_dims, param.dtype, param.device)
                   if batched else (pi, region.block_indices))
            if key not in index:
                index[key] = len(stacks)
                stack_type = STACK_TYPES[config.preconditioner]
                stacks.append(stack_type(region.block_shape, layout.preconditioned_dims, [],
                                         _work_dtype(param.dtype), param.device, batched))
                pieces.append([])
            si = index[key]
            stack = stacks[si]
            pieces[si].append(Piece(pi, region, len(stack.members)))
            for bi in region.block_indices:
                where[bi] = (si, len(stack.members))
                stack.members.append((pi, bi))
        locations.append(where)
    for stack in stacks:
        stack.allocate(config)
    plan.stacks, plan.pieces, plan.locations = stacks, pieces, locations


@dataclass
class Gathered:
    """The gradient blocks of one stack for one step.

    Attributes:
        rows: the stack rows present (parameters with a usable gradient).
        blocks: those rows' gradient blocks ``(len(rows), *block_shape)``, or None.
        placements: each piece present and the position of its first block in ``blocks``.
    """

    rows: list[int]
    blocks: torch.Tensor | None
    placements: list[tuple[Piece, int]]


def gather(stack: BlockStack, pieces: list[Piece], merged: list[torch.Tensor | None],
           inbox: Inbox | None = None) -> Gathered:
    """Copies the gradient blocks of ``stack`` (from ``merged``, per parameter its
    gradient in the merged shape, None to leave it out, or for routed FSDP2 parameters
    from ``inbox``: per ``(parameter, first block)`` of a box, the cuts it arrived in,
    :attr:`.routing.Router.inbox`) into one ``(rows, *block_shape)`` tensor in the work
    dtype: one strided copy per region (or cut), not per block."""
    inbox = inbox or {}
    present = [piece for piece in pieces if merged[piece.param] is not None
               or (piece.param, piece.region.block_indices[0]) in inbox]
    if not present:
        return Gathered([], None, [])
    total = sum(piece.region.num_blocks for piece in present)
    blocks = torch.empty((total, *stack.block_shape), dtype=stack.work_dtype,
                         device=stack.device)
    rows: list[int] = []
    placements = []
    position = 0
    for piece in present:
        region = piece.region
        count = region.num_blocks
        target = blocks[position:position + count].view((*region.counts, *region.block_shape))
        cuts = inbox.get((piece.param, region.block_indices[0]))
        if cuts is None:
            target.copy_(region_view(merged[piece.param], region))
        else:
            for index, values in cuts:
                target[index].copy_(values)
        rows.extend(range(piece.row, piece.row + count))
        placements.append((piece, position))
        position += count
    return Gathered(rows, blocks, placements)


@dataclass
class ApplyPlan:
    """Where the directions of one group's boxes go, prepared before the update is
    computed: parameter views, cast and assembly buffers. What then runs (:meth:`run`) is
    in-place arithmetic on tensors that exist already, the same on every rank, so that
    it cannot fail on one rank only.

    Attributes:
        params: the tensors updated: the group's parameters (an FSDP2 parameter's local
            shard in its place).
        box_params: per box, its parameter's index.
        copies: ``(box, buffer)``: the box's direction is copied into the buffer first
            (cast to the parameter's dtype, or assembled for a non-contiguous parameter).
        adds: ``(parameter index, target, delta)``: the target (a view of the parameter,
            or the parameter) gets ``delta``, a buffer of ``copies`` or a box's index
            (that box's direction as it is).
    """

    params: list[torch.Tensor]
    box_params: list[int]
    copies: list[tuple[int, torch.Tensor]]
    adds: list[tuple[int, torch.Tensor, torch.Tensor | int]]

    @classmethod
    def prepare(cls, params: list[torch.Tensor], layouts: list[BlockLayout],
                boxes: list[tuple[int, BlockRegion]],
                shards: Shards | None = None) -> "ApplyPlan":
        """For the directions of ``boxes`` (``(parameter index, region)``, in order).
        A parameter in ``shards`` (FSDP2 without data parallelism, every block on every
        rank: :mod:`.sharded`) is updated in this rank's rows only: its boxes there are
        assembled in a full-size buffer of its dtype, whose rows are added to the local
        shard. (Under data parallelism its updates arrive as its rows' cuts instead:
        :class:`.routing.Router`.)"""
        shards = shards or {}
        targets = [shards[pi].local if pi in shards else p for pi, p in enumerate(params)]
        plan = cls(targets, [pi for pi, _ in boxes], [], [])
        assembled: dict[int, torch.Tensor] = {}
        for box, (pi, region) in enumerate(boxes):
            param, shape = params[pi], layouts[pi].merged_shape
            if pi in shards:
                shard = shards[pi]
                if not shard.overlaps(region, param.shape):
                    continue
                if pi not in assembled:
                    lo, hi = shard.flat_range(param.shape)
                    assembled[pi] = torch.empty(shape, dtype=param.dtype, device=shard.local.device)
                    plan.adds.append((pi, shard.local,
                                      assembled[pi].view(-1)[lo:hi].view(shard.local.shape)))
                plan.copies.append((box, region_view(assembled[pi], region)))
                continue
            if not param.is_contiguous():  # e.g. channels_last: assemble, then one add
                if pi not in assembled:
                    assembled[pi] = torch.empty(shape, dtype=param.dtype, device=param.device)
                    plan.adds.append((pi, param, assembled[pi].view(param.shape)))
                plan.copies.append((box, region_view(assembled[pi], region)))
                continue
            target = region_view(param.view(shape), region)
            if param.dtype == _work_dtype(param.dtype):
                plan.adds.append((pi, target, box))
            else:  # low precision: the direction is rounded to it, then added
                cast = torch.empty(target.shape, dtype=param.dtype, device=param.device)
                plan.copies.append((box, cast))
                plan.adds.append((pi, target, cast))
        return plan

    def updated_params(self, directions: list[torch.Tensor | None]) -> dict[int, torch.Tensor]:
        """The parameters :meth:`run` changes, by index: those with a direction for
        their boxes."""
        return {pi: self.params[pi] for pi, d in zip(self.box_params, directions)
                if d is not None}

    def run(self, directions: list[torch.Tensor | None], config: ShampooConfig,
            scales: dict[int, float]) -> None:
        """``p <- p - lr * wd * p`` (decoupled) then ``p <- p - lr * scale * v`` for the
        parameters whose boxes have directions (``directions[box]``, None: the parameter
        is skipped), ``scale`` the parameter's (``scales``, by index: its bias correction,
        of its own step count): :func:`.routing.apply_updates`, after the casts."""
        present = self.updated_params(directions)
        if not present:
            return
        for box, buffer in self.copies:
            if directions[box] is not None:
                buffer.copy_(directions[box])
        apply_updates(present, [(pi, target, directions[delta] if isinstance(delta, int)
                                 else delta)
                                for pi, target, delta in self.adds if pi in present],
                      config, scales)
