"""``optimizer.state[p]``, torch.optim's per-parameter state, for Shampoo.

The numerical state lives in block stacks (:mod:`.preconditioner`): equal-shape blocks of
many parameters stacked, so one batched kernel serves them. ``optimizer.state[p]`` shows
each parameter its share of that storage, as views, so that code walking
``optimizer.state`` (inspection, DCP's "is there state?" test, ...) sees real tensors and
nothing is copied per step::

    optimizer.state[p] = {
        "step": tensor(t),      # float32, CPU: the steps this parameter was updated
        "blocks": {b: {         # b: block index; with data parallelism only
            "factors": [...],   #    the blocks this rank owns; views of the block's
            "roots": [...],     #    rows of its stack (symmetric: packed, d (d + 1) / 2)
            "graft": ...,       # (present once allocated)
            "momentum": ...,
            "second_moment": ...,  # eigenvalue-corrected blocks
        }},
    }

``step`` is the source of truth for the parameter's step count (bias corrections read
it every step, so a replaced ``step`` tensor is used); the views are the stacks'
storage, so writing into them in place changes the optimizer, but replacing a view
(``blocks[b]["momentum"] = v.to(device)``) is not seen by the stacks, which differs
from ``torch.optim``: move an optimizer with ``state_dict()`` / ``load_state_dict()``.
A parameter has an entry once it has had a gradient (frozen and never-used parameters
have none).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .preconditioner import BlockStack


def new_step() -> torch.Tensor:
    """A parameter's step counter, as ``torch.optim`` keeps it (float32, on the CPU)."""
    return torch.tensor(0.0, dtype=torch.float32)


def stack_storage(stack: BlockStack) -> tuple[torch.Tensor, ...]:
    """The tensors the views of ``stack``'s rows point into: when one of them is
    replaced (a buffer allocated, a state loaded), the views must be rebuilt."""
    return (*stack.state.tensors(), *stack.extra_state().values())


def block_views(stack: BlockStack, row: int) -> dict[str, Any]:
    """Views of block ``row`` of ``stack``, by their state-dict names."""
    state = stack.state
    views: dict[str, Any] = {"factors": [f[row] for f in state.factors],
                             "roots": [r[row] for r in state.roots]}
    for name, tensor in (("graft", state.graft), ("momentum", state.momentum)):
        if tensor is not None:
            views[name] = tensor[row]
    views.update({name: t[row] for name, t in stack.extra_state().items()})
    return views


class StateViews:
    """Keeps ``optimizer.state[p]["blocks"]`` pointing at the stacks' current storage,
    rebuilding a stack's views only when its storage changed (checked per stack, not
    per block, so the per-step cost does not grow with the number of blocks)."""

    def __init__(self) -> None:
        self._seen: dict[int, tuple[torch.Tensor, ...]] = {}  # id(stack) -> its storage

    def refresh(self, state: dict[torch.Tensor, dict[str, Any]],
                params: Sequence[torch.Tensor], stacks: Sequence[BlockStack],
                force: bool = False) -> None:
        """Rebuilds the views of every stack of one param group (``params``) whose
        storage changed since the last call (all of them with ``force``)."""
        for stack in stacks:
            storage = stack_storage(stack)
            seen = self._seen.get(id(stack))
            if not force and seen is not None and len(seen) == len(storage) and all(
                    a is b for a, b in zip(seen, storage)):
                continue
            self._seen[id(stack)] = storage
            for row, (pi, bi) in enumerate(stack.members):
                state[params[pi]].setdefault("blocks", {})[bi] = block_views(stack, row)

    def forget(self, stacks: Sequence[BlockStack]) -> None:
        for stack in stacks:
            self._seen.pop(id(stack), None)

    def __getstate__(self) -> dict[str, Any]:
        return {}  # keyed by object ids: meaningless in a copy, which rebuilds its views

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()
