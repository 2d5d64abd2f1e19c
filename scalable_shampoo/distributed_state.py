"""A complete ``state_dict()`` under data parallelism.

Each rank keeps the state of the blocks it owns only. ``Shampoo.state_dict()`` is what
frameworks save (Lightning, the recipe "every rank calls ``state_dict()``, rank 0
writes it", DCP's ``get_optimizer_state_dict``), so under data parallelism it gathers
every rank's blocks: every rank then holds the whole state, in the one-process layout,
which loads at any world size (each rank takes the blocks it owns). That is a collective:
every rank of the optimizer's group must call it. A recipe that calls it on one rank
only (HF ``Trainer`` saves from rank 0; ``if rank == 0: torch.save(opt.state_dict())``)
cannot be made complete, so it fails there, at save time, with the fix: a rank that
calls ``state_dict()`` first waits (on the job's key-value store, outside the process
group, so the other ranks' collectives are not disturbed) up to :data:`TIMEOUT_S`
seconds for every rank to arrive.

:meth:`Shampoo.sharded_state_dict` (with ``torch.distributed.checkpoint``,
:func:`.distributed.save_checkpoint`) needs no gather: each rank writes its own blocks.
"""

from __future__ import annotations

import datetime
import itertools
from typing import Any

import torch
import torch.distributed as dist

# Seconds a rank calling state_dict() waits for the others before it fails. Ranks of a
# data-parallel job run in lockstep (every step all-reduces), so they arrive within a
# step's time of each other.
TIMEOUT_S = 60.0

_serials = itertools.count()


def _on_cpu(value: Any) -> Any:
    """``value`` with its tensors on the CPU (what travels through ``all_gather_object``
    must unpickle on any rank's device)."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(v) for v in value)
    return value


class StateGather:
    """Gathers the ranks' blocks into one state; one per optimizer, created on every
    rank in the same order (the handshake's keys are numbered by creation and call)."""

    def __init__(self, group: Any, rank: int, world_size: int) -> None:
        self.group, self.rank, self.world_size = group, rank, world_size
        self._serial = next(_serials)
        self._calls = 0

    def __deepcopy__(self, memo: dict) -> "StateGather":
        return self  # a process group is shared, not copied

    def handshake(self, owned_blocks: int, total_blocks: int) -> None:
        """Returns once every rank has called; raises ``RuntimeError`` with the fix if
        some rank did not within :data:`TIMEOUT_S`."""
        store = dist.distributed_c10d._get_default_store()
        self._calls += 1
        key = f"scalable_shampoo/state_dict/{self._serial}/{self._calls}"
        if store.add(f"{key}/arrived", 1) == self.world_size:
            store.set(f"{key}/everyone", "1")
        try:
            store.wait([f"{key}/everyone"], datetime.timedelta(seconds=TIMEOUT_S))
        except Exception as error:  # the store's timeout error type varies by version
            arrived = store.add(f"{key}/arrived", 0)
            raise RuntimeError(
                f"Shampoo.state_dict() under data parallelism gathers the blocks every rank "
                f"owns (rank {self.rank} of {self.world_size} owns {owned_blocks} of "
                f"{total_blocks}), so every rank must call it, but only {arrived} did within "
                f"{TIMEOUT_S:g} s. Fix: call optimizer.state_dict() on every rank (and write "
                "it on one), or use scalable_shampoo.distributed.save_checkpoint on every "
                "rank, or, where a framework saves from rank 0 only (HF Trainer), build "
                "Shampoo(..., distributed=False), which keeps every block on every rank."
            ) from error

    def gather(self, own: dict[str, dict[str, Any]],
               block_counts: dict[int, int]) -> dict[int, dict[str, Any]]:
        """The whole state from every rank's :meth:`Shampoo.sharded_state_dict` entries
        (``own``, this rank's): per parameter (``block_counts``: its number of blocks)
        its step and all its blocks, in order."""
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, _on_cpu(own), group=self.group)
        state: dict[int, dict[str, Any]] = {}
        for key, count in block_counts.items():
            blocks: dict[int, Any] = {}
            for entries in everyone:
                entry = entries[str(key)]
                blocks.update({int(b): block for b, block in entry["blocks"].items()})
            missing = [b for b in range(count) if b not in blocks]
            if missing:  # every block has one owner: only a broken group gets here
                raise RuntimeError(f"parameter {key}: blocks {missing} came from no rank")
            state[key] = {"step": own[str(key)]["step"],
                          "blocks": [blocks[b] for b in range(count)]}
        return state
