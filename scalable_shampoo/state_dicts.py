"""The optimizer's state as plain dicts (``state_dict`` / ``load_state_dict``): the two
formats, one block's state out of and into a block stack, and the checks a saved state
must pass before anything is restored.

Both formats have ``torch.optim``'s shape, ``{"state": {key: entry}, "param_groups":
[...]}`` (plus ``"format"`` and ``"counters"``, which ``torch.distributed.checkpoint``'s
``get_optimizer_state_dict`` drops: its output is recognized by the ``shampoo_step`` of
its groups). A parameter's entry holds its ``step`` (a tensor, as ``torch.optim``) and
per block copies of its rows of the stack: factors, roots in use (bases for
eigenvalue-corrected blocks), grafting and momentum state, the root record, the stack's
extra state, and the roots computed but not yet in use as one opaque ``bytes`` leaf (see
:func:`.async_roots.encode_pending`; one leaf whether or not roots are pending, so that a
DCP load template has the keys of any checkpoint). Parameters without state (frozen,
never stepped) have no entry. Each saved group's ``shampoo_step`` is the group's step
counter, which schedules root and statistics steps.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import torch

from .async_roots import decode_pending, encode_pending, pending_from_rows, pending_row
from .distributed import saved_blocks
from .preconditioner import BlockStack, StackState
from .symmetric_packing import pack_symmetric, packed_size, unpacked_size

STATE_FORMAT = "scalable_shampoo.shampoo/4"
# Keys by parameter and block index (strings), blocks a dict that may hold a subset.
SHARDED_FORMAT = "scalable_shampoo.shampoo.sharded/4"
# Format 1: one step per group in every entry, pending roots as tensors in plain states.
# Formats 1 and 2: factors full (d, d), packed on load (format 3 keeps them packed).
# Formats 1 to 3: inverse roots full (d, d), packed on load (format 4 keeps them packed).
_OLD_FORMATS = tuple(f"scalable_shampoo.shampoo{kind}/{n}" for n in (1, 2, 3)
                     for kind in ("", ".sharded"))
# The key of a saved param group that holds the group's step counter (not a
# hyperparameter: load_state_dict does not copy it into the group).
GROUP_STEP = "shampoo_step"


_DTYPE_PREFIX = "torch."


def _saved_value(value: Any) -> Any:
    # torch.distributed.checkpoint takes tensors, numbers, strings, lists and dicts:
    # a dtype hyperparameter is saved by its name, "torch.float64".
    return str(value) if isinstance(value, torch.dtype) else value


def _loaded_value(name: str, value: Any) -> Any:
    if name.endswith("_dtype") and isinstance(value, str) and value.startswith(_DTYPE_PREFIX):
        dtype = getattr(torch, value[len(_DTYPE_PREFIX):], None)
        if isinstance(dtype, torch.dtype):
            return dtype
    return value


def saved_groups(param_groups: Sequence[dict[str, Any]],
                 group_steps: Sequence[int]) -> list[dict[str, Any]]:
    """The groups' hyperparameters (dtypes by name) and step counters, parameters
    replaced by their global indices."""
    groups, offset = [], 0
    for group, step in zip(param_groups, group_steps):
        count = len(group["params"])
        groups.append({**{k: _saved_value(v) for k, v in group.items() if k != "params"},
                       "params": list(range(offset, offset + count)), GROUP_STEP: step})
        offset += count
    return groups


def check_state_dict(state_dict: Any, param_groups: Sequence[dict[str, Any]]
                     ) -> list[dict[str, Any]]:
    """The saved groups of ``state_dict`` once its format and its groups' sizes match
    ``param_groups``; ``ValueError`` otherwise. A dict without ``"format"`` whose every
    group has a ``shampoo_step`` is ours as ``torch.distributed.checkpoint`` returns it."""
    found = state_dict.get("format") if isinstance(state_dict, dict) else None
    groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
    from_dcp = (found is None and isinstance(groups, list) and isinstance(
        state_dict.get("state"), dict) and all(isinstance(g, dict) and GROUP_STEP in g
                                               for g in groups))
    if found not in (STATE_FORMAT, SHARDED_FORMAT, *_OLD_FORMATS) and not from_dcp:
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


def hyperparameters(entry: dict[str, Any]) -> dict[str, Any]:
    """A saved group's hyperparameters: what ``load_state_dict`` puts in the group."""
    return {k: _loaded_value(k, v) for k, v in entry.items() if k not in ("params", GROUP_STEP)}


def warn_structural_changes(saved: Sequence[dict[str, Any]],
                            param_groups: Sequence[dict[str, Any]],
                            fields: Sequence[str]) -> None:
    """Warns, naming the fields, where a saved group's structural hyperparameters (which
    shape the state: ``fields``) differ from the group's: loading switches the optimizer
    to the saved structure, as ``torch.optim`` restores saved hyperparameters."""
    for gi, (entry, group) in enumerate(zip(saved, param_groups)):
        saved = hyperparameters(entry)
        changed = [f"{name} {group.get(name)!r} -> {saved[name]!r}" for name in fields
                   if name in saved and saved[name] != group.get(name)]
        if changed:
            warnings.warn(f"Shampoo.load_state_dict: param group {gi} takes the state dict's "
                          f"structure, which differs from the constructor's arguments: "
                          f"{', '.join(changed)}", UserWarning, stacklevel=4)


def warn_missing(param_groups: Sequence[dict[str, Any]], saved: Sequence[dict[str, Any]],
                 entries: dict[Any, Any]) -> None:
    """Reports the parameters that require gradients but have no saved state (they start
    fresh: right for parameters frozen or unused when the state was saved)."""
    missing = []
    offset = 0
    for group, entry in zip(param_groups, saved):
        for pi, (param, key) in enumerate(zip(group["params"], entry["params"])):
            if param.requires_grad and saved_entry(entries, key) is None:
                missing.append(offset + pi)
        offset += len(group["params"])
    if missing and entries:
        warnings.warn(f"Shampoo.load_state_dict: the state dict has no state for parameter(s) "
                      f"{missing} (global indices); they start fresh, as parameters frozen or "
                      "unused when it was saved do", UserWarning, stacklevel=4)


def saved_entry(entries: dict[Any, Any], key: Any) -> Any:
    """A parameter's saved entry by its key in the saved group (an index, its string,
    or a name from ``torch.distributed.checkpoint``), or None."""
    entry = entries.get(key)
    return entries.get(str(key)) if entry is None else entry


def saved_step(entry: dict[str, Any], where: str) -> int:
    """A saved entry's step count: a non-negative whole number (tensor or int)."""
    value = entry.get("step")
    number = float(value) if isinstance(value, (int, float, torch.Tensor)) and (
        not isinstance(value, torch.Tensor) or value.numel() == 1) else math.nan
    if not (math.isfinite(number) and number >= 0 and number == int(number)):
        raise ValueError(f"{where}: step must be a whole number >= 0, got {value!r}")
    return int(number)


def block_state(stack: BlockStack, row: int) -> dict[str, Any]:
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
            "pending_roots": encode_pending(pending),
            **{name: t[row].clone() for name, t in stack.extra_state().items()}}


def _saved_block_shape(saved: dict[str, Any]) -> tuple[int, ...] | str:
    """The shape of a saved block, from its elementwise state (else its factors)."""
    for name in ("momentum", "graft", "second_moment"):
        if isinstance(saved.get(name), torch.Tensor):
            return tuple(saved[name].shape)
    factors = saved.get("factors")
    if isinstance(factors, (list, tuple)) and all(isinstance(f, torch.Tensor) for f in factors):
        return f"factors of sizes {[_factor_size(f) for f in factors]}"
    return "unknown"


def _factor_size(factor: torch.Tensor) -> int | str:
    """The ``d`` of a saved factor, packed ``(d (d + 1) / 2,)`` or full ``(d, d)``."""
    if factor.dim() == 1:
        try:
            return unpacked_size(factor.shape[0])
        except ValueError:
            return f"{factor.shape[0]} packed entries"
    return factor.shape[0] if factor.dim() else "a scalar"


def _packed(value: Any, target: torch.Tensor) -> Any:
    """A saved symmetric matrix in the layout of ``target`` ``(N, ...)``: formats 1 and 2
    saved full ``(d, d)`` factors, formats 1 to 3 full roots, whose upper triangle is
    the packed one where ``target`` is packed ``(N, d (d + 1) / 2)`` (any other value is
    returned as it is, for the shape check to name)."""
    if (isinstance(value, torch.Tensor) and value.dim() == 2 and target.dim() == 2
            and value.shape[0] == value.shape[1]
            and packed_size(value.shape[0]) == target.shape[1]):
        return pack_symmetric(value)
    return value


def load_block_state(stack: BlockStack, row: int, saved: dict[str, Any], where: str,
                     check_finite: bool = True) -> None:
    """Copies a :func:`block_state` entry into block ``row`` of ``stack`` (its pending
    roots excepted: see :func:`restore_blocks`); ``ValueError`` naming ``where`` and the
    field for an entry that does not fit or (with ``check_finite``) holds NaN/Inf."""
    def put(target: torch.Tensor, value: Any, name: str, layout: str = "") -> None:
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(target.shape[1:]):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{where}: {name} has shape {shape}, expected "
                             f"{tuple(target.shape[1:])}{layout} (the saved block has shape "
                             f"{_saved_block_shape(saved)}, this one {stack.block_shape})")
        if check_finite and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{where}: {name} has NaN/Inf values")
        target[row].copy_(value)

    state: StackState = stack.state
    # A block without factors may come back from torch.distributed.checkpoint without
    # its empty "factors" and "roots" lists (DCP keeps leaves only).
    saved = {"factors": [], "roots": [], **saved}
    for name in ("factors", "roots"):
        if len(saved[name]) != len(getattr(state, name)):
            raise ValueError(f"{where}: {len(saved[name])} {name}, expected "
                             f"{len(getattr(state, name))} (the saved block has shape "
                             f"{_saved_block_shape(saved)}, this one {stack.block_shape} with "
                             f"{len(stack.dims)} preconditioned dimensions)")
    for i, (factor, root) in enumerate(zip(saved["factors"], saved["roots"])):
        d = unpacked_size(state.factors[i].shape[1])
        for name, value, target in (("factor", factor, state.factors[i]),
                                    ("root", root, state.roots[i])):
            packed = f" or ({d}, {d}): the upper triangle of a {d}x{d} {name}, packed"
            put(target, _packed(value, target), f"{name} {i}",
                packed if target.dim() == 2 else "")
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
                   saved_params: Sequence[Any], entries: dict[Any, Any],
                   live: Sequence[int]) -> dict[int, int]:
    """Loads one group's saved parameters (``saved_params``, their keys in ``entries``;
    ``live``: the group's parameters with an entry) into the blocks this rank owns
    (``locations``: per parameter, per block, its ``(stack, row)``, stack -1 for another
    rank's), then each stack's pending roots. Returns each live parameter's saved step."""
    steps: dict[int, int] = {}
    # Per stack and row, the roots computed but not yet in use.
    pending: list[list[Any]] = [[None] * len(stack.members) for stack in stacks]
    for pi in live:
        key = saved_params[pi]
        entry = saved_entry(entries, key)
        steps[pi] = saved_step(entry, f"parameter {key}")
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
    return steps
