"""Saving and loading a :class:`~scalable_shampoo.optimizer.Shampoo`: its state dicts
(the full one, a collective under data parallelism, and the sharded one for
``torch.distributed.checkpoint``), ``load_state_dict`` with its checks, and pickling.

:class:`StateDictMethods` holds these methods of ``Shampoo`` (a base class of it); the
layouts and checks of the saved entries are in :mod:`.state_dicts`, the gather of the
ranks' blocks in :mod:`.distributed_state`.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from .config import STRUCTURAL_FIELDS, ShampooConfig
from .param_state import StateViews
from .plans import GroupPlan, build_plan
from .state_dicts import (GROUP_STEP, SHARDED_FORMAT, STATE_FORMAT, block_state,
                          check_state_dict, hyperparameters, restore_blocks, saved_entry,
                          saved_groups, warn_missing, warn_structural_changes)

# Counters that are the same on every rank (decided on whole gradients, agreed).
RANK_FREE_COUNTERS = ("nonfinite_grad_skips", "overflow_grad_skips")


class StateDictMethods:
    """``Shampoo``'s state-dict and pickling methods (see the module's docstring); they
    use the optimizer's plans, stacks, views and counters."""

    # -------------------------------------------------------------------- state dict
    def state_dict(self) -> dict[str, Any]:
        """The full state, in ``torch.optim``'s layout: per parameter with state (by
        index) its ``step`` and, per block, the factors, roots in use, grafting and
        momentum state (eigenvalue-corrected blocks: the bases in "roots", the rotated
        moments, the basis counts), and roots computed but not yet in use (waiting for
        background work in flight); per group its hyperparameters and step counter.
        Tensors are copies. Runs ``torch.optim``'s state-dict hooks.

        With data parallelism it is a collective: it gathers every rank's blocks, so that
        each rank holds the whole state (loadable at any world size), and every rank of
        the group must call it; called on some ranks only it raises ``RuntimeError``
        with the fix (see :mod:`.distributed_state`). :meth:`sharded_state_dict` gives
        this rank's blocks without communication."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        state_dict = (self._gathered_state_dict() if self._gather is not None
                      else self._full_state_dict())
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def _full_state_dict(self) -> dict[str, Any]:
        self._wait_for_roots()
        state, offset = {}, 0
        for gi, group in enumerate(self.param_groups):
            plan = self._plans[gi]
            for pi in sorted(plan.live) if plan is not None else ():
                state[offset + pi] = {
                    "step": self.state[group["params"][pi]]["step"].clone(),
                    "blocks": [block_state(plan.stacks[si], row)
                               for si, row in plan.locations[pi]]}
            offset += len(group["params"])
        return {"format": STATE_FORMAT, "state": state,
                "param_groups": saved_groups(self.param_groups, self._group_steps()),
                "counters": dict(self._counters)}

    def _gathered_state_dict(self) -> dict[str, Any]:
        plans = [p for p in self._plans if p is not None]
        self._gather.handshake(sum(len(s.members) for p in plans for s in p.stacks),
                               sum(len(where) for p in plans for where in p.locations))
        sharded = self.sharded_state_dict()
        counts, offset = {}, 0
        for group, plan in zip(self.param_groups, self._plans):
            counts.update({offset + pi: len(plan.locations[pi]) for pi in sorted(plan.live)})
            offset += len(group["params"])
        return {**sharded, "format": STATE_FORMAT,
                "state": self._gather.gather(sharded["state"], counts)}

    def _group_steps(self) -> list[int]:
        return [0 if plan is None else plan.step for plan in self._plans]

    def sharded_state_dict(self) -> dict[str, Any]:
        """The state for ``torch.distributed.checkpoint``, keyed by parameter and block
        index (strings), never by rank: per parameter with state, ``"blocks"`` holds the
        blocks this rank owns (all without data parallelism), so the ranks' union is the
        whole state at any world size; of the counters only the rank-independent
        ``nonfinite_grad_skips`` and ``overflow_grad_skips``. In an optimizer that has
        not stepped, allocates the state a first step with every gradient would (of the
        parameters that require gradients), so that it is also the template DCP loads
        into. Tensors are copies; roots computed but not yet in use are one opaque
        ``bytes`` entry per block. See :mod:`.distributed`."""
        self._wait_for_roots()
        state, offset = {}, 0
        for gi, group in enumerate(self.param_groups):
            config = ShampooConfig.from_group(group)
            plan = self._plan(gi, config)
            if plan.step == 0 and not plan.live:
                plan = self._template(gi, config)
            for stack in plan.stacks:
                stack.ensure_buffers(config)
            self._views.refresh(self.state, group["params"], plan.stacks)
            for pi in sorted(plan.live):
                state[str(offset + pi)] = {
                    "step": self.state[group["params"][pi]]["step"].clone(),
                    "blocks": {str(bi): block_state(plan.stacks[si], row)
                               for bi, (si, row) in enumerate(plan.locations[pi]) if si >= 0}}
            offset += len(group["params"])
        return {"format": SHARDED_FORMAT, "state": state,
                "param_groups": saved_groups(self.param_groups, self._group_steps()),
                "counters": {name: self._counters[name] for name in RANK_FREE_COUNTERS}}

    def _template(self, index: int, config: ShampooConfig) -> GroupPlan:
        """Gives every parameter of a group that never stepped, if it requires
        gradients, the state a first step would (zeros, step 0)."""
        params = self.param_groups[index]["params"]
        wanted = [pi for pi, p in enumerate(params) if p.requires_grad]
        return self._add_live(index, config, wanted, 0) if wanted else self._plans[index]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`'s or :meth:`sharded_state_dict`'s output, or what
        ``torch.distributed.checkpoint``'s ``get_optimizer_state_dict`` made of it
        (hyperparameters included, as ``torch.optim`` does), taking the blocks this rank
        owns from whichever blocks the state holds, and runs ``torch.optim``'s
        load-state-dict hooks. Raises ``ValueError`` for another format, a state that
        does not fit these parameters (naming the parameter and both shapes), one that
        lacks a block, or NaN/Inf values; then the optimizer is unchanged. Warns where the
        saved structure (``block_size``, ``preconditioner``, ...) differs from the
        constructor's and for parameters that require gradients but have no saved state
        (they start fresh)."""
        state_dict = dict(state_dict)  # as torch.optim: hooks may edit the top level
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        self._load(state_dict)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _load(self, state_dict: dict[str, Any]) -> None:
        saved = check_state_dict(state_dict, self.param_groups)
        entries = state_dict["state"]
        configs = [ShampooConfig.from_group({**g, **hyperparameters(s)})
                   for g, s in zip(self.param_groups, saved)]
        warn_structural_changes(saved, self.param_groups, STRUCTURAL_FIELDS)
        warn_missing(self.param_groups, saved, entries)
        plans: list[GroupPlan] = []
        steps: list[dict[int, int]] = []
        for group, config, entry in zip(self.param_groups, configs, saved):
            live = [pi for pi, key in enumerate(entry["params"])
                    if saved_entry(entries, key) is not None]
            plan = build_plan(group["params"], config, self.foreach, self._data_parallel,
                              plans[-1] if plans else None, frozenset(live))
            steps.append(restore_blocks(plan.stacks, plan.locations, entry["params"], entries,
                                        live))
            plan.step = int(entry.get(GROUP_STEP, max(steps[-1].values(), default=0)))
            plans.append(plan)
        # Everything checked: from here on nothing fails.
        for group, entry in zip(self.param_groups, saved):
            group.update(hyperparameters(entry))
        self._plans = plans
        self.state = defaultdict(dict)
        self._views = StateViews()
        for group, plan, group_steps in zip(self.param_groups, plans, steps):
            for pi, count in group_steps.items():
                self.state[group["params"][pi]] = {"step": torch.tensor(float(count))}
            self._views.refresh(self.state, group["params"], plan.stacks)
        self._counters.update(state_dict.get("counters", {}))
        self._ranks_agree = False

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim pickles only defaults/state/param_groups; ours lives beside them.
        # Work in flight is waited for, so a copy holds its result (and no thread). The
        # views are left out (a copy rebuilds them on its own stacks).
        self._wait_for_roots()
        state = super().__getstate__()
        state["state"] = defaultdict(dict, {
            p: {k: v for k, v in entry.items() if k != "blocks"}
            for p, entry in self.state.items()})
        state.update(foreach=self.foreach, _plans=self._plans, _counters=self._counters,
                     _warned=self._warned, _roots=self._roots,
                     _ranks_agree=self._ranks_agree, _described_configs=None,
                     _data_parallel=self._data_parallel, _gather=self._gather)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A pickle of an earlier version: one warning flag and no overflow counter.
        state = dict(state)
        warned = state.pop("_warned_nonfinite", False)
        state.setdefault("_warned", {"nonfinite"} if warned else set())
        state.setdefault("_ranks_agree", False)
        state.setdefault("_described_configs", None)
        super().__setstate__(state)
        self._counters.setdefault("overflow_grad_skips", 0)
        self._views = StateViews()
        self._refresh_views()
