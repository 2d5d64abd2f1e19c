"""All-or-nothing steps: what a step changed, kept until it can no longer fail.

A synchronous root computation (``eigh`` not converging, running out of memory, a bug)
can raise in the middle of a step, after the statistics, roots, grafting state or
parameters of earlier block stacks and param groups were updated. Such a step keeps, just
before its first change to each, a copy of every block stack's state and root
bookkeeping, of every parameter it updates, of the step counters (the groups' and the
parameters') and of the plans and state entries it creates for parameters at their first
gradient, and puts them back if it raises. Once the last root computation of the step is
done the journal stops keeping copies: what follows (directions and updates) cannot fail
on valid input.

Only steps that compute roots on the training thread keep a journal (by default one step
in ``precondition_frequency``); it costs, for that step, a copy of the state of the
stacks it touches before its last root computation. With ``async_roots`` no journal is
needed: the step waits for the background results it uses before changing anything.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .preconditioner import BlockStack, StackState


def _copy_state(state: StackState) -> StackState:
    def copy(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.clone()
    return StackState([f.clone() for f in state.factors], [r.clone() for r in state.roots],
                      copy(state.graft), copy(state.momentum), copy(state.second_moment),
                      [e.clone() for e in state.basis_eigenvalues])


def _copy_record(record: Any) -> Any:
    return dataclasses.replace(record, **{f.name: getattr(record, f.name).clone()
                                          for f in dataclasses.fields(record)})


class StepJournal:
    """Copies of what one step changed, to undo it (see the module's docstring).

    Args:
        counters: the optimizer's counters (copied now, restored in place).
        warned: the causes of skipped steps already warned about (likewise).
        last_root_group: the index of the last param group that computes roots.

    Attributes:
        armed: whether stacks and parameters are still copied before they change;
            cleared once the step's last root computation is done.
    """

    def __init__(self, counters: dict[str, Any], warned: set[str],
                 last_root_group: int) -> None:
        self.armed = True
        self._last_root_group = last_root_group
        self._counters, self._saved_counters = counters, dict(counters)
        self._warned, self._saved_warned = warned, set(warned)
        self._stacks: dict[int, tuple[BlockStack, StackState, Any, Any]] = {}
        self._values: list[tuple[Any, str, Any]] = []
        self._items: list[tuple[Any, Any, bool, Any]] = []
        self._params: list[tuple[torch.Tensor, torch.Tensor]] = []

    def group_done(self, index: int) -> None:
        """After param group ``index``'s step: past the last root computation, disarms."""
        if index >= self._last_root_group:
            self.armed = False

    def keep_stack(self, stack: BlockStack) -> None:
        """Before the step's first change to ``stack`` (while armed)."""
        if self.armed and id(stack) not in self._stacks:
            self._stacks[id(stack)] = (stack, _copy_state(stack.state),
                                       _copy_record(stack.record), stack.pending)

    def keep_value(self, owner: Any, name: str) -> None:
        """Before the step changes ``owner.name`` (kept even once disarmed: it is free)."""
        self._values.append((owner, name, getattr(owner, name)))

    def keep_item(self, container: Any, key: Any) -> None:
        """Before the step sets ``container[key]`` (a list's item, or a dict's entry,
        which may be new: then restoring removes it). Kept even once disarmed."""
        present = key in container if isinstance(container, dict) else True
        self._items.append((container, key, present, container[key] if present else None))

    def keep_params(self, params: list[torch.Tensor]) -> None:
        """Before the step updates ``params`` (while armed)."""
        if self.armed:
            self._params += [(p, p.detach().clone()) for p in params]

    def restore(self) -> None:
        """Undoes every change kept, in reverse order."""
        with torch.no_grad():
            for param, saved in reversed(self._params):
                param.copy_(saved)
        for owner, name, value in reversed(self._values):
            setattr(owner, name, value)
        for container, key, present, value in reversed(self._items):
            if present:
                container[key] = value
            else:
                container.pop(key, None)
        for stack, state, record, pending in self._stacks.values():
            stack.state, stack.record, stack.pending = state, record, pending
        self._counters.clear()
        self._counters.update(self._saved_counters)
        self._warned.clear()
        self._warned.update(self._saved_warned)
