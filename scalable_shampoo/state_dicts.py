"""The optimizer's state as plain dicts (``state_dict`` / ``load_state_dict``): the two
formats, one block's state out of and into a block stack, and the checks a saved state
must pass before anything is restored.

A block's entry holds copies of its rows of the stack: factors, roots in use (bases for
eigenvalue-corrected blocks), grafting and momentum state, the root record, the stack's
extra state, and the roots computed but not yet in use (for a sharded state one opaque
``bytes`` leaf, see :func:`.async_roots.encode_pending`).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .async_roots import decode_pending, encode_pending, pending_from_rows, pending_row
from .distributed import saved_blocks
from .preconditioner import BlockStack, StackState

STATE_FORMAT = "scalable_shampoo.shampoo/1"
# Keys by parameter and block index (strings), blocks a dict that may hold a subset.
SHARDED_FORMAT = "scalable_shampoo.shampoo.sharded/1"


def saved_groups(param_groups: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The groups' hyperparameters, parameters replaced by their global indices."""
    groups, offset = [], 0
    for group in param_groups:
        count = len(group["params"])
        groups.append({**{k: v for k, v in group.items() if k != "params"},
                       "params": list(range(offset, offset + count))})
        offset += count
    return groups


def check_state_dict(state_dict: Any, param_groups: Sequence[dict[str, Any]]
                     ) -> list[dict[str, Any]]:
    """The saved groups of ``state_dict`` once its format and its groups' sizes match
    ``param_groups``; ``ValueError`` otherwise."""
    found = state_dict.get("format") if isinstance(state_dict, dict) else None
    if found not in (STATE_FORMAT, SHARDED_FORMAT):
        raise ValueError(f"not a Shampoo state dict of format {STATE_FORMAT!r} or "
                         f"{SHARDED_FORMAT!r} (found format {found!r})")
    saved = state_dict["param_groups"]
    if len(saved) != len(param_groups):
        raise ValueError(f"state dict has {len(saved)} param groups, the optimizer "
                         f"{len(param_groups)}")
    for gi, (entry, group) in enumerate(zip(saved, param_groups)):
        if len(entry["params"]) != len(group["params"]):
            raise ValueError(f"param group {gi} has {len(group['params'])} parameters, the "
                             f"state dict {len(entry['params'])}")
    return saved


def block_state(stack: BlockStack, row: int, sharded: bool = False) -> dict[str, Any]:
    """Copies of block ``row`` of ``stack``."""
    state, record = stack.state, stack.record

    def copy(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[row].clone()

    pending = pending_row(stack.pending, row)
    return {"factors": [f[row].clone() for f in state.factors],
            "roots": [r[row].clone() for r in state.roots],
            "graft": copy(state.graft), "momentum": copy(state.momentum),
            "root_computed_at": record.computed_at[row].clone(),
            "root_residual": record.residual[row].clone(),
            "root_failures": record.failures[row].clone(),
            "pending_roots": encode_pending(pending) if sharded else pending,
            **{name: t[row].clone() for name, t in stack.extra_state().items()}}


def load_block_state(stack: BlockStack, row: int, saved: dict[str, Any], where: str) -> None:
    """Copies a :func:`block_state` entry into block ``row`` of ``stack`` (its pending
    roots excepted: see :func:`restore_blocks`); ``ValueError`` naming ``where`` and the
    field for an entry that does not fit."""
    def put(target: torch.Tensor, value: Any, name: str) -> None:
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(target.shape[1:]):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{where}: {name} has shape {shape}, expected "
                             f"{tuple(target.shape[1:])}")
        target[row].copy_(value)

    state: StackState = stack.state
    for name in ("factors", "roots"):
        if len(saved[name]) != len(getattr(state, name)):
            raise ValueError(f"{where}: {len(saved[name])} {name}, expected "
                             f"{len(getattr(state, name))} (preconditioned dimensions differ)")
    for i, (factor, root) in enumerate(zip(saved["factors"], saved["roots"])):
        put(state.factors[i], factor, f"factor {i}")
        put(state.roots[i], root, f"root {i}")
    shape = (len(stack.members), *stack.block_shape)
    for name in ("graft", "momentum"):
        if saved[name] is not None:
            if getattr(state, name) is None:
                setattr(state, name, torch.zeros(shape, dtype=stack.work_dtype,
                                                  device=stack.device))
            put(getattr(state, name), saved[name], name)
    for name, target in (("root_computed_at", stack.record.computed_at),
                         ("root_residual", stack.record.residual),
                         ("root_failures", stack.record.failures),
                         *stack.extra_state().items()):
        put(target, saved.get(name), name)


def restore_blocks(stacks: Sequence[BlockStack], locations: Sequence[Sequence[tuple[int, int]]],
                   saved_params: Sequence[Any], entries: dict[Any, Any]) -> int | None:
    """Loads one group's saved parameters (``saved_params``, their keys in ``entries``)
    into the blocks this rank owns (``locations``: per parameter, per block, its
    ``(stack, row)``, stack -1 for another rank's), then each stack's pending roots.
    Returns the saved step, or None if no parameter of the group has state."""
    step = None
    # Per stack and row, the roots computed but not yet in use.
    pending: list[list[Any]] = [[None] * len(stack.members) for stack in stacks]
    for pi, key in enumerate(saved_params):
        entry = entries.get(key, entries.get(str(key)))
        if entry is None:
            continue
        step = int(entry["step"])
        where = locations[pi]
        blocks = saved_blocks(entry["blocks"], len(where),
                              [bi for bi, (si, _) in enumerate(where) if si >= 0], key)
        for bi, (si, row) in enumerate(where):
            if si >= 0:
                load_block_state(stacks[si], row, blocks[bi], f"parameter {key} block {bi}")
                pending[si][row] = decode_pending(blocks[bi].get("pending_roots"))
    for si, stack in enumerate(stacks):
        stack.pending = pending_from_rows(pending[si], stack.result_type, stack.device,
                                          f"block stack {si} of shape {stack.block_shape}")
    return step
