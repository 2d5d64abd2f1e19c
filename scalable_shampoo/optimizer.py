"""The :class:`Shampoo` optimizer: param groups and step orchestration.

The math lives elsewhere: shapes and blocks in :mod:`.blocking`, roots in
:mod:`.matrix_functions`, factor statistics and preconditioning of stacked blocks in
:mod:`.preconditioner`, grafting in :mod:`.grafting`, the eigenvalue-corrected variant in
:mod:`.eigenvalue_corrected`; a block's state in and out of dicts in :mod:`.state_dicts`.
This module decides, per step, which of those run on which blocks, and maps blocks back
to parameters.
"""

from __future__ import annotations

import sys
import warnings
from collections import defaultdict
from dataclasses import replace
from typing import Any, Callable, Iterable

import torch

from .async_roots import RootEvents, RootScheduler, resolve_root_delay
from .blocking import BlockRegion
from .config import STRUCTURAL_FIELDS, ShampooConfig
from .distributed import DataParallel
from .distributed_state import StateGather
from .eigenvalue_corrected import (EigenvalueCorrectedStack, basis_metrics,
                                   eigenvalue_corrected_direction_)
from .grafting import graft, graft_direction_
from .matrix_functions import newton_fraction
from .param_state import StateViews, new_step
from .plans import Gathered, GroupPlan, apply_updates, build_plan, gather, stack_live, structure
from .preconditioner import BlockStack, StackState
from .state_dicts import (GROUP_STEP, SHARDED_FORMAT, STATE_FORMAT, block_state,
                          check_state_dict, hyperparameters, load_block_state, restore_blocks,
                          saved_entry, saved_groups, warn_missing, warn_structural_changes)


def momentum_direction_(momentum: torch.Tensor | None, direction: torch.Tensor,
                        config: ShampooConfig, step: int) -> tuple[torch.Tensor, float]:
    """SPEC 2.5: ``m <- beta1 m + (1 - beta1) P``; returns ``(v, scale)`` with
    ``u = scale * v`` equal to ``m_hat`` or, with Nesterov, ``beta1 m_hat + (1 - beta1) P``
    (``P`` itself when ``beta1 == 0``). The scalar bias correction is returned, not
    applied, so that it folds into the learning rate instead of costing a pass; with
    Nesterov ``direction`` is overwritten."""
    beta1 = config.betas[0]
    if beta1 == 0.0 or momentum is None:
        return direction, 1.0
    momentum.mul_(beta1).add_(direction, alpha=1 - beta1)
    correction = 1 - beta1**step if config.bias_correction else 1.0
    if config.nesterov:
        return direction.mul_(1 - beta1).add_(momentum, alpha=beta1 / correction), 1.0
    return momentum, 1.0 / correction


def _built_by_zero() -> bool:
    """Whether ``torch.distributed.optim.ZeroRedundancyOptimizer`` is constructing this
    optimizer (it builds its per-rank optimizer inside its own methods)."""
    zero = getattr(sys.modules.get("torch.distributed.optim"), "ZeroRedundancyOptimizer", None)
    frame = sys._getframe(1)
    while zero is not None and frame is not None:
        if isinstance(frame.f_locals.get("self"), zero):
            return True
        frame = frame.f_back
    return False


def _check_newton_exponents(plan: GroupPlan, config: ShampooConfig, index: int) -> None:
    """Fails before the first step, not at the first root step, when the Newton root
    cannot compute some block's exponent (of any parameter, with state or not yet)."""
    if config.root_method != "newton" or config.preconditioner != "shampoo":
        return
    for layout, regions in zip(plan.layouts, plan.regions):
        dims = len(layout.preconditioned_dims)
        if dims and regions:
            try:
                newton_fraction(config.exponent_multiplier / (2 * dims))  # BlockStack.exponent
            except ValueError as error:
                raise ValueError(
                    f"param group {index}: root_method='newton' cannot serve blocks with "
                    f"{dims} preconditioned dimensions at exponent_multiplier="
                    f"{config.exponent_multiplier}: {error}") from None


class Shampoo(torch.optim.Optimizer):
    """Shampoo: a Kronecker-factored preconditioner per (block of a) parameter.

    See ``SPEC.md`` section 2 for the algorithm and :class:`ShampooConfig` for every
    hyperparameter's meaning, range and default; each may also be set per param group.

    Args:
        params: parameters or param groups, as for any ``torch.optim`` optimizer.
        foreach: stack equal-shape blocks and run batched kernels (default). False runs
            one block at a time through the reference kernels: slow, for testing.
        async_roots: compute inverse roots on background CPU worker threads while
            training continues (SPEC 4); they go into use ``root_delay`` steps after the
            statistics they were computed from, exactly as in the synchronous optimizer
            with the same ``root_delay``. Call :meth:`close` (or use the optimizer as a
            context manager) to stop the workers early; they also stop when the optimizer
            is garbage collected. Default False.
        root_workers: worker threads for ``async_roots`` (each runs one intra-op thread).
            None: half the cores, at most 4.
        distributed: when ``torch.distributed`` is initialized (before the optimizer is
            built) with more than one process, share the preconditioner work over its
            ranks (SPEC 5, :mod:`.distributed`); False keeps every block on every rank.
            Default True.
        process_group: the group to share over; None: the default group.

    State (:mod:`.param_state`): ``optimizer.state[p]`` holds each parameter's ``step``
    (a tensor, as ``torch.optim``) and views of its blocks' rows of the stacked storage;
    parameters get state at their first gradient, and their own step count drives their
    bias corrections. Unlike ``torch.optim``, replacing an entry of ``state[p]`` is not
    seen by the optimizer (the stacks are the storage). Under data parallelism
    :meth:`state_dict` is a collective that every rank must call
    (:mod:`.distributed_state`).
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
                 lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 epsilon: float = 1e-12, weight_decay: float = 0.0, block_size: int = 1024,
                 max_preconditioned_dim: int = 8192, precondition_frequency: int = 100,
                 start_preconditioning_step: int | None = None,
                 statistics_frequency: int = 1, grafting: str | None = None,
                 grafting_beta2: float = 0.999, grafting_epsilon: float = 1e-8,
                 root_method: str = "eigh", root_dtype: torch.dtype = torch.float64,
                 factor_dtype: torch.dtype = torch.float32, exponent_multiplier: float = 1.0,
                 nesterov: bool = False, bias_correction: bool = True,
                 decoupled_weight_decay: bool = True, newton_max_iterations: int = 100,
                 newton_tolerance: float = 1e-6, root_failure_threshold: float = 0.1,
                 preconditioner: str = "shampoo", eigenbasis_method: str = "eigh",
                 basis_refresh_tolerance: float = 0.0, factor_beta: float | None = None,
                 adam_epsilon: float = 1e-8, root_delay: int | None = None,
                 precondition_1d: bool | None = None, *,
                 foreach: bool = True, async_roots: bool = False,
                 root_workers: int | None = None, distributed: bool = True,
                 process_group: Any = None) -> None:
        defaults = ShampooConfig(
            lr=lr, betas=betas, epsilon=epsilon, weight_decay=weight_decay,
            block_size=block_size, max_preconditioned_dim=max_preconditioned_dim,
            precondition_frequency=precondition_frequency,
            start_preconditioning_step=start_preconditioning_step,
            statistics_frequency=statistics_frequency, grafting=grafting,
            grafting_beta2=grafting_beta2, grafting_epsilon=grafting_epsilon,
            root_method=root_method, root_dtype=root_dtype, factor_dtype=factor_dtype,
            exponent_multiplier=exponent_multiplier, nesterov=nesterov,
            bias_correction=bias_correction, decoupled_weight_decay=decoupled_weight_decay,
            newton_max_iterations=newton_max_iterations, newton_tolerance=newton_tolerance,
            root_failure_threshold=root_failure_threshold, preconditioner=preconditioner,
            root_delay=root_delay,
            eigenbasis_method=eigenbasis_method, basis_refresh_tolerance=basis_refresh_tolerance,
            factor_beta=factor_beta, adam_epsilon=adam_epsilon, precondition_1d=precondition_1d,
        ).as_dict()
        # None stays: each group resolves these by its own preconditioner.
        defaults["grafting"] = grafting
        defaults["precondition_1d"] = precondition_1d
        if not isinstance(foreach, bool):
            raise ValueError(f"foreach must be True or False, got {foreach!r}")
        if _built_by_zero():
            raise TypeError(
                "Shampoo cannot run inside torch.distributed.optim.ZeroRedundancyOptimizer: "
                "ZeRO gives each rank a subset of the parameters and writes optimizer.state "
                "directly, which Shampoo's stacked blocks do not read. Under data parallelism "
                "Shampoo already shards its state over the ranks: use "
                "Shampoo(model.parameters(), ...) itself.")
        self.foreach = foreach
        self._roots = RootScheduler(async_roots, root_workers)
        self._data_parallel = DataParallel.resolve(distributed, process_group)
        data_parallel = self._data_parallel
        self._gather = None if data_parallel is None else StateGather(
            data_parallel.group, data_parallel.rank, data_parallel.world_size)
        self._plans: list[GroupPlan | None] = []
        self._views = StateViews()
        self._counters = {"root_computations": 0, "root_failures": 0,
                          "nonfinite_grad_skips": 0, "root_seconds": 0.0,
                          "root_wait_seconds": 0.0}
        self._warned_nonfinite = False
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ param groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            resolve_root_delay(ShampooConfig.from_group(group), self._roots.asynchronous)
            for param in group["params"]:
                if not param.is_floating_point():
                    raise TypeError(f"Shampoo optimizes real floating-point parameters, got "
                                    f"a parameter of dtype {param.dtype}")
        except (ValueError, TypeError):
            self.param_groups.pop()
            raise
        self._plans.append(None)

    def _plan(self, index: int, config: ShampooConfig) -> GroupPlan:
        params = self.param_groups[index]["params"]
        plan = self._plans[index]
        if plan is None:
            plan = self._plans[index] = build_plan(params, config, self.foreach,
                                                    self._data_parallel,
                                                    self._plans[index - 1] if index else None)
        elif plan.structure != structure(config):
            changed = [name for name, old, new in
                       zip(STRUCTURAL_FIELDS, plan.structure, structure(config)) if old != new]
            raise ValueError(f"{', '.join(changed)} of param group {index} cannot change after "
                             "the optimizer state was created")
        elif len(plan.layouts) != len(params) or any(
                layout.param_shape != tuple(p.shape) for layout, p in zip(plan.layouts, params)):
            raise ValueError(f"the parameters of param group {index} changed after the "
                             "optimizer state was created")
        root_setting = (config.root_method, config.exponent_multiplier)
        if plan.checked_root_setting != root_setting:
            _check_newton_exponents(plan, config, index)
            plan.checked_root_setting = root_setting
        return plan

    # -------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Performs one optimization step (SPEC 2.2-2.5) for every param group."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._data_parallel is not None:
            self._data_parallel.begin_step([len(g["params"]) for g in self.param_groups])
        try:
            # Validate every group before touching any, so a bad value leaves no partial step.
            configs = [ShampooConfig.from_group(group) for group in self.param_groups]
            delays = [resolve_root_delay(config, self._roots.asynchronous) for config in configs]
            plans = [self._plan(index, config) for index, config in enumerate(configs)]
            self._roots.raise_failures([stack for plan in plans for stack in plan.stacks])
            for index, (config, delay) in enumerate(zip(configs, delays)):
                self._step_group(index, config, delay)
        except Exception as error:
            if self._data_parallel is not None:  # join what the other ranks wait in
                self._data_parallel.abort(error)
            raise
        return loss

    def _step_group(self, index: int, config: ShampooConfig, delay: int) -> None:
        params = self.param_groups[index]["params"]
        plan = self._plans[index]
        grads = [p.grad for p in params]
        nonfinite: set[int] = set()
        if plan.exchange is not None:  # decided on whole gradients, the same on every rank
            grads, nonfinite = self._data_parallel.agree(plan.exchange, grads, params, config)
        if all(g is None for g in grads):
            return
        for g in grads:
            if g is not None and g.is_sparse:
                raise RuntimeError("Shampoo does not support sparse gradients")
        plan.step += 1
        step = plan.step
        newcomers = [pi for pi, g in enumerate(grads) if g is not None and pi not in plan.live]
        if newcomers:  # their first gradient: their state is created now
            plan = self._add_live(index, config, newcomers, step)
        if config.weight_decay and not config.decoupled_weight_decay:
            grads = [None if g is None else g.add(p, alpha=config.weight_decay)
                     for g, p in zip(grads, params)]
        merged = [g.reshape(layout.merged_shape) if g is not None and g.numel() > 0 else None
                  for g, layout in zip(grads, plan.layouts)]
        gathered = [gather(stack, pieces, merged)
                    for stack, pieces in zip(plan.stacks, plan.pieces)]
        bad = nonfinite if plan.exchange is not None else self._nonfinite_params(plan, gathered)
        self._note_skips(bad, step)
        if bad:  # rare: gather again without them, so no state of theirs is touched
            merged = [None if pi in bad else m for pi, m in enumerate(merged)]
            gathered = [gather(stack, pieces, merged)
                        for stack, pieces in zip(plan.stacks, plan.pieces)]

        updated = [pi for pi, g in enumerate(grads) if g is not None and pi not in bad]
        counters = [self.state[params[pi]]["step"] for pi in updated]
        param_steps = {pi: int(t) + 1 for pi, t in zip(updated, counters)}
        results = [(batch, self._stack_direction(stack, batch, config, step, delay, param_steps))
                   for stack, batch in zip(plan.stacks, gathered)]
        results = [(batch, result) for batch, result in results if result is not None]
        # The momentum's bias correction u = scale v, one scalar unless the parameters'
        # step counts differ (then each stack's v is scaled here).
        scales = {scale for _, (_, scale) in results}
        mixed = len(scales) > 1
        scale = 1.0 if mixed or not scales else scales.pop()
        updates: dict[int, list[tuple[BlockRegion, torch.Tensor]]] = {}
        for batch, (direction, own_scale) in results:
            if mixed:
                direction = direction * own_scale
            for piece, position in batch.placements:
                region = piece.region
                update = direction[position:position + region.num_blocks]
                updates.setdefault(piece.param, []).append(
                    (region, update.view((*region.counts, *region.block_shape))))
        if plan.exchange is not None:  # every rank gets every block's u = scale v
            updates, scale = self._data_parallel.gather(
                plan.exchange, updates, scale, [m is not None for m in merged]), 1.0
        apply_updates(params, plan.layouts, updates, config, scale)
        if counters:
            torch._foreach_add_(counters, 1.0)
        self._views.refresh(self.state, params, plan.stacks)

    def _add_live(self, index: int, config: ShampooConfig, newcomers: list[int],
                  step: int) -> GroupPlan:
        """Gives ``newcomers`` (parameters of group ``index`` at their first gradient)
        state: the group's stacks are rebuilt with their blocks and the others' rows
        copied over. Roots computed but not yet in use are put in use first (up to
        ``root_delay`` steps early: a stack's rows share one pending computation)."""
        params = self.param_groups[index]["params"]
        old = self._plans[index]
        for stack in old.stacks:
            self._count(self._roots.activate(stack, config, step, force=True))
        plan = replace(old, live=old.live | frozenset(newcomers))
        stack_live(plan, params, config, self.foreach)
        for stack in plan.stacks:
            stack.ensure_buffers(config)
        for stack in old.stacks:
            for row, (pi, bi) in enumerate(stack.members):
                si, new_row = plan.locations[pi][bi]
                load_block_state(plan.stacks[si], new_row, block_state(stack, row),
                                 f"parameter {pi} block {bi}", check_finite=False)
        self._plans[index] = plan
        for pi in newcomers:
            self.state[params[pi]] = {"step": new_step()}
        self._views.forget(old.stacks)
        self._views.refresh(self.state, params, plan.stacks, force=True)
        return plan

    def _nonfinite_params(self, plan: GroupPlan, gathered: list[Gathered]) -> set[int]:
        """The parameters whose gradient has NaN/Inf entries."""
        bad: set[int] = set()
        present = [(stack, batch) for stack, batch in zip(plan.stacks, gathered)
                   if batch.blocks is not None]
        # A finite sum proves every entry finite in one cheap pass, and one host sync per
        # group decides; the elementwise test runs only when some sum is not finite
        # (NaN/Inf, or a sum that overflowed).
        sums = [batch.blocks.reshape(batch.blocks.shape[0], -1).sum(dim=1) for _, batch in present]
        if not sums or bool(torch.isfinite(torch.cat([s.to(sums[0].device) for s in sums])).all()):
            return bad
        for stack, batch in present:
            finite = torch.isfinite(batch.blocks.reshape(batch.blocks.shape[0], -1)).all(dim=1)
            bad.update(stack.members[batch.rows[j]][0]
                       for j in (~finite).nonzero().flatten().tolist())
        return bad

    def _note_skips(self, bad: set[int], step: int) -> None:
        """Counts the parameters skipped for NaN/Inf gradients (warned once)."""
        if bad:
            self._counters["nonfinite_grad_skips"] += len(bad)
            if not self._warned_nonfinite:
                self._warned_nonfinite = True
                warnings.warn(f"Shampoo: skipped {len(bad)} parameter(s) with NaN/Inf gradients "
                              f"at step {step}; their state is untouched. Later skips are "
                              "counted in metrics()['nonfinite_grad_skips'] without a warning.",
                              RuntimeWarning, stacklevel=6)  # the caller of optimizer.step()

    def _stack_direction(self, stack: BlockStack, batch: Gathered, config: ShampooConfig,
                         step: int, delay: int, param_steps: dict[int, int]
                         ) -> tuple[torch.Tensor, float] | None:
        """Statistics, roots, grafting and momentum for the active rows of a stack (the
        ``batch``); returns their update directions ``u`` as ``(v, scale)``, ``u = scale
        * v`` (SPEC 2.2-2.5), or None without active rows. ``step`` (the group's)
        schedules statistics and roots: roots launched at a root step go into use
        ``delay`` steps later (SPEC 4); each row's parameter step (``param_steps``)
        drives its bias corrections and its start of preconditioning. Overwrites the
        batch's blocks."""
        rows, blocks = batch.rows, batch.blocks
        stack.ensure_buffers(config)
        everyone = len(rows) == len(stack.members)
        selection = None if everyone else torch.tensor(rows, dtype=torch.long)
        state = stack.state if everyone else stack.state.select(selection)
        if rows and stack.dims and config.is_statistics_step(step):
            stack.update_statistics(state, blocks, config.factor_ema)
            if not everyone:
                stack.state.assign(selection, state)
        if stack.dims:
            events = self._roots.activate(stack, config, step)
            if config.is_root_step(step):
                events += self._roots.launch(stack, config, step, delay)
            self._count(events)
            if events.computed and not everyone:
                state = stack.state.select(selection)
        if not rows:
            return None
        steps = {param_steps[piece.param] for piece, _ in batch.placements}
        if len(steps) == 1:
            return self._direction(stack, state, selection, blocks, config, steps.pop(), delay)
        # Rows of parameters with different step counts (some started late or skipped a
        # step): each count's rows apart, the bias correction applied here.
        row_steps = torch.tensor([param_steps[piece.param] for piece, _ in batch.placements
                                  for _ in range(piece.region.num_blocks)])
        update = torch.empty_like(blocks)
        all_rows = torch.tensor(rows, dtype=torch.long)
        for count in sorted(steps):
            where = (row_steps == count).nonzero().flatten()
            part = all_rows[where]
            direction, scale = self._direction(stack, stack.state.select(part), part,
                                               blocks[where], config, count, delay)
            update[where] = direction * scale
        return update, 1.0

    def _direction(self, stack: BlockStack, state: StackState, selection: torch.Tensor | None,
                   blocks: torch.Tensor, config: ShampooConfig, step: int,
                   delay: int) -> tuple[torch.Tensor, float]:
        """Grafting, preconditioning and momentum (SPEC 2.4-2.6) of rows whose parameters
        are at ``step``: ``state`` is theirs (``selection`` of the stack; None: all rows,
        then ``state`` is the stack's), written back."""
        if isinstance(stack, EigenvalueCorrectedStack):
            return self._eigenvalue_corrected_direction(stack, state, selection, blocks,
                                                        config, step)
        direction = graft_direction_(config.grafting, blocks, state.graft, step,
                                     config.grafting_beta2, config.grafting_epsilon)
        if stack.dims and step >= config.preconditioning_start + delay:
            preconditioned = stack.precondition(state, blocks)
            direction = (preconditioned if config.grafting == "none"
                         else graft(preconditioned, direction, inplace=True))
        update, scale = momentum_direction_(state.momentum, direction, config, step)
        if selection is not None:
            stack.state.assign(selection, state)
        return update, scale

    def _count(self, events: RootEvents) -> None:
        self._counters["root_computations"] += events.computed
        self._counters["root_failures"] += events.rejected
        self._counters["root_seconds"] += events.seconds
        self._counters["root_wait_seconds"] += events.wait_seconds

    @staticmethod
    def _eigenvalue_corrected_direction(stack: EigenvalueCorrectedStack, state: StackState,
                                        selection: torch.Tensor | None, blocks: torch.Tensor,
                                        config: ShampooConfig, step: int
                                        ) -> tuple[torch.Tensor, float]:
        """SPEC 2.6 for a stack's active rows (``selection``; None: all rows): Adam in
        the factors' eigenbases, whose first moment replaces the momentum of 2.5."""
        update, scale = eigenvalue_corrected_direction_(stack, state, blocks, config, step)
        if selection is not None:
            stack.state.assign(selection, state)
        return update, scale

    # ----------------------------------------------------------------------- metrics
    def metrics(self) -> dict[str, float]:
        """Flat diagnostics (SPEC 6). Counters are totals since construction:

        - ``root_computations``: inverse roots computed (one per factor and refresh;
          eigenvalue-corrected blocks: basis refreshes, done or skipped).
        - ``root_failures``: roots rejected (NaN/Inf or residual above threshold); the
          previous root stayed in use (eigenvalue-corrected blocks: bases rejected).
        - ``nonfinite_grad_skips``: parameter updates skipped for NaN/Inf gradients.
        - ``root_seconds``: wall time spent computing roots (on the workers, with
          ``async_roots``), counted when they go into use.
        - ``root_wait_seconds``: time the training thread waited for background roots.
        - ``roots_in_flight``: block stacks whose new roots are computed but not yet in
          use (or still being computed).
        - ``root_age_max``: steps since the statistics of the oldest root in use (0
          before the first root); includes ``root_delay``.
        - ``root_residual_max``: largest residual among the roots in use
          (eigenvalue-corrected blocks: the drift ``||offdiag(U^T S U)||_F / ||S||_F``
          of the bases last measured, with ``basis_refresh_tolerance > 0``).
        - ``state_bytes``: bytes of optimizer state tensors.
        - ``basis_refreshes``, ``basis_refreshes_skipped``, ``basis_failures``: bases
          of eigenvalue-corrected blocks recomputed, skipped (``basis_refresh_tolerance``)
          and rejected (NaN/Inf; the previous basis stayed in use).
        - ``step`` (the largest group step counter), ``num_blocks`` (of the parameters
          with state), ``num_block_stacks``.
        - ``world_size``, ``rank``, ``owned_blocks``: with data parallelism (SPEC 5) a
          rank holds the state of its ``owned_blocks`` only; then every entry except
          ``step``, ``num_blocks`` and ``nonfinite_grad_skips`` is this rank's alone.
        """
        plans = [p for p in self._plans if p is not None]
        residual, age, state_bytes, blocks, stacks, in_flight = 0.0, 0, 0, 0, 0, 0
        data_parallel = self._data_parallel
        for plan in plans:
            for stack in plan.stacks:
                stacks += 1
                in_flight += stack.pending is not None
                blocks += len(stack.members)
                state_bytes += sum(t.numel() * t.element_size() for t in stack.state.tensors())
                record = stack.record
                if record.computed_at.numel():
                    residual = max(residual, float(record.residual.max()))
                    computed = record.computed_at[record.computed_at > 0]
                    if computed.numel():
                        age = max(age, plan.step - int(computed.min()))
        return {
            "step": max((p.step for p in plans), default=0),
            **{k: float(v) if k.endswith("seconds") else int(v)
               for k, v in self._counters.items()},
            "root_residual_max": residual, "root_age_max": age, "state_bytes": state_bytes,
            "num_blocks": sum(len(where) for p in plans for where in p.locations),
            "num_block_stacks": stacks, "owned_blocks": blocks, "roots_in_flight": in_flight,
            "world_size": 1 if data_parallel is None else data_parallel.world_size,
            "rank": 0 if data_parallel is None else data_parallel.rank,
            **basis_metrics(stack for plan in plans for stack in plan.stacks),
        }

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
        ``nonfinite_grad_skips``. In an optimizer that has not stepped, allocates the
        state a first step with every gradient would (of the parameters that require
        gradients), so that it is also the template DCP loads into. Tensors are copies;
        roots computed but not yet in use are one opaque ``bytes`` entry per block. See
        :mod:`.distributed`."""
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
                "counters": {"nonfinite_grad_skips": self._counters["nonfinite_grad_skips"]}}

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
                     _warned_nonfinite=self._warned_nonfinite, _roots=self._roots,
                     _data_parallel=self._data_parallel, _gather=self._gather)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._views = StateViews()
        for group, plan in zip(self.param_groups, self._plans):
            if plan is not None:
                self._views.refresh(self.state, group["params"], plan.stacks)

    # --------------------------------------------------------------------- lifecycle
    def _wait_for_roots(self) -> None:
        for plan in self._plans:
            for stack in plan.stacks if plan is not None else ():
                self._roots.wait(stack)

    def close(self) -> None:
        """Stops the background root workers (``async_roots``). Roots in flight are
        waited for and kept, so the optimizer stays usable: a later root step starts
        the workers again."""
        self._wait_for_roots()
        self._roots.close()

    def __enter__(self) -> "Shampoo":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
