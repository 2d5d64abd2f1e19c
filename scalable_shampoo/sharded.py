"""Lossless Shampoo for FSDP2 (``torch.distributed.fsdp.fully_shard``) parameters.

FSDP2 makes each parameter a ``DTensor`` sharded along dimension 0 over a 1-D device
mesh: a rank holds rows ``[start, stop)`` of it (``torch.chunk``'s split: chunks of
``ceil(n / world)`` rows, the last ranks' possibly shorter or empty), and after the
backward the same rows of the gradient. Shampoo's blocks are those of the *full*
parameter, so that the numerics do not depend on the world size.

Under data parallelism (the default) no rank holds a full parameter or gradient: each
block's owner (:func:`.distributed.assign_blocks`) keeps its state, and per param group
and step

1. one small all-reduce, the data-parallel agreement, decides on every rank which
   parameters are skipped (no gradient, or a NaN/Inf in some rank's rows, or a whole
   gradient whose squares overflow, decided from the ranks' norms of their rows) and
   whether a rank failed;
2. one all-to-all per parameter dtype sends each owner the elements of its blocks in
   each rank's rows (:mod:`.routing`; :meth:`ShardedStep.local` gives the rows, with
   coupled weight decay ``g + wd p`` computed on them), and the owner runs the per-block
   machinery on them;
3. one more all-to-all brings each rank the update of its rows, which it adds to
   ``p.to_local()`` with the float operations one process runs.

Root steps add no communication: roots are computed by the owner from its own
statistics.

Without data parallelism (``distributed=False``, or one process) every rank keeps every
block: one all-gather per dtype (:func:`gather_full`) gives it the full gradients (and
with coupled weight decay the parameters), and it adds its rows of the update
(:class:`Shards`, consumed by :meth:`.plans.ApplyPlan.prepare`: the directions are
assembled into a full-size buffer in the parameter's dtype, the same rounding a
one-process low-precision update has, and the rank's rows of it are added).

Only what this describes is accepted (:func:`check_placements`, at construction): a
``DTensor`` on a 1-D mesh with placement ``Shard(0)``, split as ``torch.chunk`` splits
into contiguous local shards, over the optimizer's own process group.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist

from .blocking import BlockRegion

try:  # DTensor is part of every torch.distributed build this library supports
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor, Shard = None, None


def is_sharded(tensor: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def rows_of(num_rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of dimension 0 that ``rank`` holds under ``Shard(0)``:
    ``torch.chunk``'s split into chunks of ``ceil(num_rows / world_size)``."""
    chunk = -(-num_rows // world_size) if num_rows else 0
    start = min(rank * chunk, num_rows)
    return start, min(start + chunk, num_rows)


def _name(group: dict[str, Any], index: int, param_index: int, param: torch.Tensor) -> str:
    names = group.get("param_names")
    named = f" {names[param_index]!r}" if names and param_index < len(names) else ""
    return (f"param group {index}, parameter {param_index}{named} "
            f"(shape {tuple(param.shape)})")


def check_placements(group: dict[str, Any], index: int, data_parallel: Any) -> None:
    """At construction: refuses, naming the parameter and its placement, a ``DTensor``
    that is not FSDP2's ``Shard(0)`` over a 1-D mesh (tensor parallelism, ``Shard(d)``
    with ``d != 0``, ``Replicate``/``Partial``, HSDP's 2-D meshes), one split otherwise
    than ``torch.chunk`` splits, or one whose mesh is not the optimizer's process group
    (all of them on one mesh)."""
    meshes: list[Any] = []
    for pi, param in enumerate(group["params"]):
        if not is_sharded(param):
            continue
        where = _name(group, index, pi, param)
        mesh, placements = param.device_mesh, tuple(param.placements)
        fix = ("Shampoo supports FSDP2's fully_shard parameters: Shard(0) over a 1-D mesh "
               "(not tensor parallelism, Shard(d) for d != 0, Replicate/Partial or HSDP's "
               "2-D meshes: give such parameters another optimizer)")
        if mesh.ndim != 1 or len(placements) != 1:
            raise ValueError(f"{where} is a DTensor on a {mesh.ndim}-D device mesh with "
                             f"placements {placements}; {fix}")
        if not (isinstance(placements[0], Shard) and placements[0].dim == 0):
            raise ValueError(f"{where} is a DTensor with placement {placements[0]!r}; {fix}")
        group_ranks = dist.get_process_group_ranks(mesh.get_group())
        if meshes and group_ranks != meshes[0]:
            raise ValueError(f"{where} is on a device mesh of ranks {group_ranks}, other "
                             f"parameters on ranks {meshes[0]}: Shampoo takes one mesh")
        meshes.append(group_ranks)
        if data_parallel is not None:
            own = dist.get_process_group_ranks(data_parallel.group or dist.group.WORLD)
            if own != group_ranks:
                raise ValueError(f"{where} is sharded over ranks {group_ranks}, but the "
                                 f"optimizer shares its work over ranks {own}: pass the "
                                 "mesh's group as process_group= (mesh.get_group())")
        size, rank = mesh.size(), dist.get_rank(mesh.get_group())
        start, stop = rows_of(param.shape[0] if param.dim() else 0, size, rank)
        local = tuple(param.to_local().shape)
        expected = (stop - start, *param.shape[1:])
        if param.dim() == 0 or local != expected:
            raise ValueError(f"{where} is a DTensor whose local shard on rank {rank} has "
                             f"shape {local}, not torch.chunk's {expected}; {fix}")
        if not param.to_local().is_contiguous():  # its rows are updated through views
            raise ValueError(f"{where} is a DTensor whose local shard on rank {rank} is "
                             f"not contiguous (strides {param.to_local().stride()}); {fix}")


@dataclass(frozen=True)
class Shard0:
    """This rank's share of one FSDP2 parameter: its local tensor (the parameter's
    storage) and its rows ``[start, stop)`` of dimension 0."""

    local: torch.Tensor
    start: int
    stop: int

    def flat_range(self, shape: Sequence[int]) -> tuple[int, int]:
        """The elements of the full (contiguous) parameter this rank holds."""
        row = math.prod(shape[1:])
        return self.start * row, self.stop * row

    def overlaps(self, region: BlockRegion, shape: Sequence[int]) -> bool:
        """Whether ``region`` (of the merged, contiguous parameter) may have elements
        in this rank's rows: whether the span from its first to its last element meets
        them (never False when one does; a box a stride jumps over is kept)."""
        lo, hi = self.flat_range(shape)
        if lo == hi or not region.num_blocks:
            return False
        extent = (*region.counts, *region.block_shape)
        last = region.offset + sum((n - 1) * s for n, s in zip(extent, region.strides))
        return region.offset < hi and last >= lo


Shards = dict[int, Shard0]  # by parameter index in its group


def local_shards(params: Sequence[torch.Tensor]) -> Shards:
    """The sharded parameters of a group, by index, with this rank's rows."""
    shards: Shards = {}
    for pi, param in enumerate(params):
        if is_sharded(param):
            mesh = param.device_mesh
            start, stop = rows_of(param.shape[0], mesh.size(), dist.get_rank(mesh.get_group()))
            shards[pi] = Shard0(param.to_local(), start, stop)
    return shards


def _local(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The local rows of a gradient (or parameter) of FSDP2 parameter ``param``."""
    if is_sharded(tensor):
        if tuple(tensor.placements) != tuple(param.placements):
            tensor = tensor.redistribute(param.device_mesh, param.placements)
        return tensor.to_local()
    return tensor


def gather_full(params: Sequence[torch.Tensor],
                tensors: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """The full tensors of sharded ``params`` from every rank's rows (``tensors``, per
    parameter its local gradient or parameter shard, None: absent). One all-gather per
    parameter dtype over the mesh's group; a parameter's full tensor is present if every
    rank had its rows. The copies are exact."""
    mesh = params[0].device_mesh
    group, size = mesh.get_group(), mesh.size()
    buckets: dict[tuple, list[int]] = {}
    for i, param in enumerate(params):
        buckets.setdefault((param.dtype, param.to_local().device), []).append(i)
    full: list[torch.Tensor | None] = [None] * len(params)
    rank = dist.get_rank(group)
    for (dtype, device), members in buckets.items():
        rows = [math.prod(params[i].shape[1:]) for i in members]
        chunks = [-(-params[i].shape[0] // size) * r for i, r in zip(members, rows)]
        head = len(members)  # presence flags
        segment = head + sum(chunks)
        buffer = torch.zeros(size * segment, dtype=dtype, device=device)
        own = buffer[rank * segment:(rank + 1) * segment]
        offset = head
        for j, (i, chunk) in enumerate(zip(members, chunks)):
            tensor = tensors[i]
            if tensor is not None:
                local = _local(tensor, params[i]).reshape(-1)
                own[offset:offset + local.numel()].copy_(local)
                own[j] = 1.0
            offset += chunk
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(buffer, own, group=group)
        table = buffer.view(size, segment)
        present = (table[:, :head] != 0).all(dim=0).tolist()
        offset = head
        for j, (i, chunk, row) in enumerate(zip(members, chunks, rows)):
            if present[j]:
                shape = tuple(params[i].shape)
                full[i] = table[:, offset:offset + chunk].reshape(-1)[:shape[0] * row].view(shape)
            offset += chunk
    return full


class ShardedStep:
    """The FSDP2 side of one param group's step: its sharded parameters' gradients
    (and, with coupled weight decay, parameters) as the rest of the step takes them:
    full (:meth:`full`, every block on every rank) or this rank's rows (:meth:`local`,
    routed to the blocks' owners, :mod:`.routing`)."""

    def __init__(self, group: dict[str, Any]) -> None:
        self.params = list(group["params"])
        self.indices = [pi for pi, p in enumerate(self.params) if is_sharded(p)]
        # g + wd p needs the full p (the gradient screen and the statistics see it)
        self.with_params = bool(group.get("weight_decay")) and not group.get(
            "decoupled_weight_decay", True)

    def full(self, grads: list[torch.Tensor | None]
             ) -> tuple[list[torch.Tensor | None], list[torch.Tensor]]:
        """The group's gradients with the sharded ones made full, and its parameters for
        the arithmetic on gradients (with coupled weight decay full ones for the sharded
        parameters, else the parameters themselves, of which only the dtype is read)."""
        sharded = [self.params[i] for i in self.indices]
        gathered = gather_full(sharded, [grads[i] for i in self.indices])
        params: list[torch.Tensor] = list(self.params)
        if self.with_params:
            for i, tensor in zip(self.indices, gather_full(sharded, sharded)):
                params[i] = tensor
        grads = list(grads)
        for i, tensor in zip(self.indices, gathered):
            grads[i] = tensor
        return grads, params

    def local(self, grads: list[torch.Tensor | None]
              ) -> tuple[list[torch.Tensor | None], list[torch.Tensor]]:
        """The group's gradients and parameters with, for the sharded ones, this rank's
        rows (contiguous)."""
        grads, params = list(grads), list(self.params)
        for i in self.indices:
            params[i] = self.params[i].to_local()
            if grads[i] is not None:
                grads[i] = _local(grads[i], self.params[i]).contiguous()
        return grads, params


def sharded_steps(param_groups: Sequence[dict[str, Any]]) -> dict[int, ShardedStep]:
    """A :class:`ShardedStep` per param group that has FSDP2 parameters."""
    steps = {gi: ShardedStep(group) for gi, group in enumerate(param_groups)}
    return {gi: step for gi, step in steps.items() if step.indices}


def swapped(plan: Any, params: Sequence[torch.Tensor]) -> bool:
    """Whether a group's tensors are not those ``plan`` was built for (accelerate's FSDP2
    ``prepare`` replaces an optimizer's parameters by their ``fully_shard`` DTensors in
    ``param_groups``, after the optimizer was built)."""
    refs = plan.param_refs
    return len(refs) != len(params) or any(r() is not p for r, p in zip(refs, params))


def adopt_swapped(plan: Any, params: Sequence[torch.Tensor],
                  state: dict[torch.Tensor, dict[str, Any]]) -> None:
    """After :func:`swapped`: each parameter's ``optimizer.state`` entry moves to the
    tensor that replaced it (same shapes: the caller checked them against the plan's
    layouts), and the plan follows the new tensors."""
    if len(plan.param_refs) == len(params):
        for ref, param in zip(plan.param_refs, params):
            old = ref()
            if old is not None and old is not param and old in state:
                state[param] = state.pop(old)
    plan.param_refs = [weakref.ref(p) for p in params]
