"""The :class:`Shampoo` optimizer: param groups and step orchestration.

The math lives elsewhere: shapes and blocks in :mod:`.blocking`, roots in
:mod:`.matrix_functions`, factor statistics and preconditioning of stacked blocks in
:mod:`.preconditioner`, grafting in :mod:`.grafting`, the eigenvalue-corrected variant in
:mod:`.eigenvalue_corrected`; which blocks of which parameters a group's stacks hold, and
how updates reach the parameters, in :mod:`.plans`; saving and loading in
:mod:`.optimizer_state` and :mod:`.state_dicts`. This module decides, per step, which of
those run on which blocks.
"""

from __future__ import annotations

import numbers
import sys
import warnings
from dataclasses import replace
from typing import Any, Callable, Iterable

import torch

from .argument_checks import (check_dense, check_dense_grads, check_group_keys,
                              check_group_lr, explain_unknown_keywords)
from .async_roots import RootEvents, RootScheduler, resolve_root_delay
from .blocking import BlockRegion
from .config import STRUCTURAL_FIELDS, ShampooConfig
from .distributed import DataParallel, Description
from .distributed_state import StateGather
from .eigenvalue_corrected import (EigenvalueCorrectedStack, basis_metrics,
                                   eigenvalue_corrected_direction_)
from .first_moment import classic_direction_, update_scale
from .gradient_screen import Skips, unusable_params
from .matrix_functions import newton_fraction
from .optimizer_state import StateDictMethods
from .param_state import StateViews, new_step
from .plans import (ApplyPlan, Gathered, GroupPlan, build_plan, gather, routing_of, stack_live,
                    structure)
from .preconditioner import BlockStack, StackState, root_dtype_of
from .routing import Router
from .sharded import (adopt_swapped, check_placements, local_shards, sharded_steps,
                      swapped)
from .state_dicts import block_state, load_block_state
from .step_journal import StepJournal


def _described(fields: dict[str, Any]) -> list[tuple[str, str]]:
    """``(name, repr)`` per field, what the ranks compare (DataParallel.check): repr is
    exact for floats; numbers are made Python ints and floats first, so that equal values
    of other types (numpy's) compare equal."""
    def canonical(value: Any) -> Any:
        if isinstance(value, tuple):
            return tuple(canonical(v) for v in value)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return value
        return int(value) if isinstance(value, numbers.Integral) else float(value)

    return [(name, repr(canonical(value))) for name, value in fields.items()]


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


class Shampoo(StateDictMethods, torch.optim.Optimizer):
    """Shampoo: a Kronecker-factored preconditioner per (block of a) parameter.

    Each parameter is cut into blocks (dimensions above ``block_size`` split, small
    adjacent ones merged). For a block with ``k`` preconditioned dimensions the optimizer
    keeps, per dimension ``i``, a factor ``S_i`` (``d_i x d_i``): an EMA of ``G_(i)
    G_(i)^T``, the gradient unfolded along that dimension. Every
    ``precondition_frequency`` steps it computes the inverse roots ``S_i^(-1/(2k))``
    (regularized by ``epsilon``); the step direction is the gradient multiplied by each
    root along its dimension, then rescaled, block by block, to the norm of a first-order
    method's direction (*grafting*, Adam's by default, so learning rates are on Adam's
    scale). Momentum and decoupled weight decay follow: ``p <- p - lr (m_hat + wd p)``.
    With ``preconditioner="eigenvalue_corrected"`` (SOAP) Adam runs in the factors'
    eigenbases instead. Non-finite gradients, and gradients too large to square in the
    state's dtype, skip their parameter's step (counted in :meth:`metrics`).

    Every hyperparameter may also be set per param group, as in ``torch.optim``. The common
    ones are below; :class:`ShampooConfig` describes all of them (the rest:
    ``statistics_frequency``, ``grafting_beta2``, ``root_method``, ``root_dtype``,
    ``root_check_tolerance``, ``factor_dtype``, ``exponent_multiplier``, ``nesterov``,
    ``bias_correction``, ``decoupled_weight_decay``, ``newton_max_iterations``,
    ``newton_tolerance``, ``root_failure_threshold``, ``eigenbasis_method``,
    ``basis_refresh_tolerance``, ``factor_beta``, ``precondition_1d``,
    ``relative_epsilon``, ``first_moment``, ``merge_dims``, ``grafting_momentum``) with its
    range and default. Bad values raise a
    ``ValueError`` or ``TypeError`` naming the argument, at construction or at the next
    ``step()`` (before anything changes).

    Args:
        params: parameters or param groups, as for any ``torch.optim`` optimizer.
        lr: step size, >= 0, in parameter units per unit of the (grafted) direction: with
            the default Adam grafting, an AdamW learning rate is a good start. A float or
            a one-element tensor (schedulers update it in place). Default 1e-3.
        betas: ``(beta1, beta2)``: ``beta1`` in [0, 1) the momentum, an EMA of the step
            direction (0: none; ``torch.optim.SGD``'s ``momentum``); ``beta2`` in (0, 1]
            the EMA of the factors (1: their running sum). Default (0.9, 0.999).
        epsilon: > 0, the factors' eigenvalue regularization, relative to each factor's
            largest eigenvalue: roots of ``S + epsilon * lambda_max(S) I`` (absolute with
            ``relative_epsilon=False``; see :class:`ShampooConfig`). Not AdamW's ``eps``:
            that is ``grafting_epsilon``. Default 1e-6.
        weight_decay: >= 0, per step, decoupled as in AdamW (``p -= lr * wd * p``) unless
            ``decoupled_weight_decay=False``. Default 0.
        block_size: >= 1, the largest block dimension, in elements: larger dimensions are
            split into chunks of ``block_size`` (Meta's DistributedShampoo calls it
            ``max_preconditioner_dim``). A factor costs ``block_size^2`` memory and its
            root ``block_size^3`` time. Default 1024.
        max_preconditioned_dim: >= 1, elements; a (merged) dimension larger than this
            gets no factor at all (e.g. a large vocabulary). Default 8192.
        precondition_frequency: >= 1, steps between root recomputations. Default 100.
        start_preconditioning_step: >= 1, the first step (counted from 1) that uses roots;
            before it the grafting method's direction is used. None (default):
            ``precondition_frequency`` ("shampoo"), 1 ("eigenvalue_corrected").
        grafting: "none", "sgd", "adagrad", "rmsprop" or "adam": the method whose
            per-block step norm the preconditioned direction takes. None (default):
            "adam" ("shampoo"), "none" ("eigenvalue_corrected").
        grafting_epsilon: > 0, the denominator guard of adagrad/rmsprop/adam grafting, in
            gradient units (AdamW's ``eps``). Default 1e-8.
        preconditioner: "shampoo" or "eigenvalue_corrected" (SOAP). Default "shampoo".
        adam_epsilon: > 0, "eigenvalue_corrected" only: Adam's ``eps`` in the
            eigenbases, in gradient units. Default 1e-8.
        root_delay: >= 0 steps between the statistics a root is computed from and its
            use (the same trajectory with or without ``async_roots``). None (default): 0
            (1 for "eigenvalue_corrected"), or ``max(1, precondition_frequency // 2)``
            with ``async_roots``.
        foreach: stack equal-shape blocks and run batched kernels (default). False runs
            one block at a time through the reference kernels: slow, for testing.
        async_roots: compute inverse roots on background CPU worker threads while
            training continues (:mod:`.async_roots`); they go into use ``root_delay``
            steps after the statistics they were computed from, exactly as in the
            synchronous optimizer with the same ``root_delay``. Call :meth:`close` (or use
            the optimizer as a context manager) to stop the workers early; they also stop
            when the optimizer is garbage collected. "spread": no workers; the same
            delayed roots computed a share per step on the training thread, one matrix
            at a time, so that no step does all of them (no threads competing for the
            cores; the trajectory is again the synchronous one with that delay).
            Default False.
        root_workers: worker threads for ``async_roots`` (each runs one intra-op thread).
            None: half the cores, at most 4.
        distributed: when ``torch.distributed`` is initialized (before the optimizer is
            built) with more than one process, share the preconditioner work over its
            ranks (:mod:`.distributed`); False keeps every block on every rank.
            Every rank must then have the same param groups and hyperparameters (checked:
            ``ValueError`` on every rank). FSDP2 (``fully_shard``) parameters get
            the blocks of their full tensors, whatever the world size (:mod:`.sharded`).
            Default True.
        process_group: the group to share over; None: the default group.

    State (:mod:`.param_state`): ``optimizer.state[p]`` holds each parameter's ``step``
    (a tensor, as ``torch.optim``) and views of its blocks' rows of the stacked storage;
    parameters get state at their first gradient, and their own step count drives their
    bias corrections. Unlike ``torch.optim``, replacing an entry of ``state[p]`` is not
    seen by the optimizer (the stacks are the storage). Under data parallelism
    :meth:`state_dict` is a collective that every rank must call
    (:mod:`.distributed_state`).

    Example::

        optimizer = Shampoo(model.parameters(), lr=1e-3, weight_decay=1e-4,
                            block_size=512, precondition_frequency=50)
        for batch in loader:
            optimizer.zero_grad()
            loss_fn(model(batch)).backward()
            optimizer.step()
    """

    @explain_unknown_keywords
    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
                 lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 epsilon: float = 1e-6, weight_decay: float = 0.0, block_size: int = 1024,
                 max_preconditioned_dim: int = 8192, precondition_frequency: int = 100,
                 start_preconditioning_step: int | None = None,
                 statistics_frequency: int = 1, grafting: str | None = None,
                 grafting_beta2: float = 0.999, grafting_epsilon: float = 1e-8,
                 root_method: str = "eigh", root_dtype: torch.dtype | None = None,
                 root_check_tolerance: float = 1e-4,
                 factor_dtype: torch.dtype = torch.float64, exponent_multiplier: float = 1.0,
                 nesterov: bool = False, bias_correction: bool = True,
                 decoupled_weight_decay: bool = True, newton_max_iterations: int = 100,
                 newton_tolerance: float = 1e-6, root_failure_threshold: float = 0.1,
                 preconditioner: str = "shampoo", eigenbasis_method: str = "eigh",
                 basis_refresh_tolerance: float = 0.0, factor_beta: float | None = None,
                 adam_epsilon: float = 1e-8, root_delay: int | None = None,
                 precondition_1d: bool | None = None, relative_epsilon: bool = True,
                 first_moment: str | None = None, merge_dims: bool = True,
                 grafting_momentum: bool = False, *,
                 foreach: bool = True, async_roots: bool | str = False,
                 root_workers: int | None = None, distributed: bool = True,
                 process_group: Any = None) -> None:
        defaults = ShampooConfig(
            lr=lr, betas=betas, epsilon=epsilon, weight_decay=weight_decay,
            block_size=block_size, max_preconditioned_dim=max_preconditioned_dim,
            precondition_frequency=precondition_frequency,
            start_preconditioning_step=start_preconditioning_step,
            statistics_frequency=statistics_frequency, grafting=grafting,
            grafting_beta2=grafting_beta2, grafting_epsilon=grafting_epsilon,
            root_method=root_method, root_dtype=root_dtype,
            root_check_tolerance=root_check_tolerance, factor_dtype=factor_dtype,
            exponent_multiplier=exponent_multiplier, nesterov=nesterov,
            bias_correction=bias_correction, decoupled_weight_decay=decoupled_weight_decay,
            newton_max_iterations=newton_max_iterations, newton_tolerance=newton_tolerance,
            root_failure_threshold=root_failure_threshold, preconditioner=preconditioner,
            root_delay=root_delay,
            eigenbasis_method=eigenbasis_method, basis_refresh_tolerance=basis_refresh_tolerance,
            factor_beta=factor_beta, adam_epsilon=adam_epsilon, precondition_1d=precondition_1d,
            relative_epsilon=relative_epsilon, first_moment=first_moment,
            merge_dims=merge_dims, grafting_momentum=grafting_momentum,
        ).as_dict()
        defaults["lr"] = lr  # a tensor stays one, for schedulers (as in torch.optim)
        # None stays: each group resolves these by its own preconditioner.
        defaults["grafting"] = grafting
        defaults["precondition_1d"] = precondition_1d
        defaults["first_moment"] = first_moment
        defaults["root_dtype"] = root_dtype
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
                          "nonfinite_grad_skips": 0, "overflow_grad_skips": 0,
                          "root_seconds": 0.0, "root_wait_seconds": 0.0}
        self._warned: set[str] = set()  # the causes of skipped steps warned about
        # Whether the ranks were found to agree on the structure (DataParallel.check).
        self._ranks_agree = False
        self._described_configs: tuple[list[ShampooConfig], Description] | None = None
        self._sharded: dict = {}  # this step's FSDP2 groups (sharded.ShardedStep)
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ param groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group, index = self.param_groups[-1], len(self.param_groups) - 1
        try:
            check_group_keys(group, index)
            config = ShampooConfig.from_group(group)
            resolve_root_delay(config, self._roots.asynchronous)
            for param in group["params"]:
                if not param.is_floating_point():
                    raise TypeError(f"Shampoo optimizes real floating-point parameters, got "
                                    f"a parameter of dtype {param.dtype}")
            check_dense(group["params"], index)
            check_placements(group, index, self._data_parallel)
            check_group_lr(config, group["params"], index)
        except (ValueError, TypeError):
            self.param_groups.pop()
            raise
        self._plans.append(None)
        self._ranks_agree = False

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
        elif swapped(plan, params):  # tensors of the same shapes: accelerate's FSDP2 prepare
            check_placements(self.param_groups[index], index, self._data_parallel)
            adopt_swapped(plan, params, self.state)
            self._views.refresh(self.state, params, plan.stacks, force=True)
        root_setting = (config.root_method, config.exponent_multiplier)
        if plan.checked_root_setting != root_setting:
            _check_newton_exponents(plan, config, index)
            plan.checked_root_setting = root_setting
        return plan

    # -------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Performs one optimization step for every param group, all or nothing: bad
        hyperparameters and sparse gradients are refused before anything changes, and a
        root computation that raises leaves every parameter and state as it was (see
        :mod:`.step_journal`)."""
        if torch.compiler.is_compiling():  # torch.compile(optimizer.step): run it eagerly
            return _eager_step(self, closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        data_parallel = self._data_parallel
        self._sharded = sharded_steps(self.param_groups)  # FSDP2 parameters' groups
        if data_parallel is not None:  # agreements: a status per parameter, a norm per FSDP2 one
            data_parallel.begin_step(
                [len(g["params"]) + (len(self._sharded[gi].indices) if gi in self._sharded else 0)
                 for gi, g in enumerate(self.param_groups)], check=not self._ranks_agree)
        try:
            # Validate every group before touching any, so a bad value leaves no partial step.
            configs = [ShampooConfig.from_group(group) for group in self.param_groups]
            check_dense_grads(self.param_groups)
            for index, (group, config) in enumerate(zip(self.param_groups, configs)):
                check_group_lr(config, group["params"], index)
            delays = [resolve_root_delay(config, self._roots.asynchronous) for config in configs]
            if data_parallel is not None:  # the same on every rank, or ValueError on every rank
                described = None if self._ranks_agree else self._structure_description(configs)
                data_parallel.check(described, self._values_description(configs))
                self._ranks_agree = True
            plans = [self._plan(index, config) for index, config in enumerate(configs)]
            self._roots.raise_failures([stack for plan in plans for stack in plan.stacks])
            journal = self._journal(configs, plans)
            try:
                for index, (config, delay) in enumerate(zip(configs, delays)):
                    self._step_group(index, config, delay, journal)
                    if journal is not None:
                        journal.group_done(index)
            except BaseException:
                if journal is not None:
                    journal.restore()
                    self._refresh_views(force=True)
                raise
        except Exception as error:
            if data_parallel is not None:  # join what the other ranks wait in
                data_parallel.abort(error)
            raise
        return loss

    def _journal(self, configs: list[ShampooConfig],
                 plans: list[GroupPlan]) -> StepJournal | None:
        """What makes this step all-or-nothing (:mod:`.step_journal`): with background
        roots, waiting now for every result the step will use (a failed one raises
        before anything changed; a parameter at its first gradient puts its stacks'
        pending roots in use early); without, a journal when a group computes roots."""
        def newcomers(plan: GroupPlan, index: int) -> bool:
            params = self.param_groups[index]["params"]
            return any(p.grad is not None and pi not in plan.live for pi, p in enumerate(params))

        due = [[stack for stack in plan.stacks if stack.dims and (
                config.is_root_step(plan.step + 1) or (stack.pending is not None and (
                    stack.pending.activates_at <= plan.step + 1 or newcomers(plan, index))))]
               for index, (config, plan) in enumerate(zip(configs, plans))]
        if self._roots.asynchronous:
            self._counters["root_wait_seconds"] += self._roots.wait_all(
                [stack for stacks in due for stack in stacks])
            return None
        # A group without stacks yet may create them (parameters at their first gradient).
        root_groups = [index for index, (config, plan) in enumerate(zip(configs, plans))
                       if config.is_root_step(plan.step + 1) and (
                           due[index] or len(plan.live) < len(plan.layouts))]
        if not root_groups:
            return None
        return StepJournal(self._counters, self._warned, last_root_group=root_groups[-1])

    def _values_description(self, configs: list[ShampooConfig]) -> Description:
        """Every group's hyperparameters, for the per-step check: the same object while
        they stay the same (its fingerprint is then not recomputed)."""
        cached = self._described_configs
        if cached is None or cached[0] != configs:
            cached = self._described_configs = (configs,
                                                [_described(c.as_dict()) for c in configs])
        return cached[1]

    def _structure_description(self, configs: list[ShampooConfig]) -> Description:
        """Per group, what its plan and exchange are built from: the parameters' shapes
        and dtypes, ``foreach`` and every hyperparameter."""
        description = []
        for group, config in zip(self.param_groups, configs):
            params = group["params"]
            shapes = {f"parameter {i}": f"{tuple(p.shape)} {p.dtype}"
                      for i, p in enumerate(params)}
            description.append([("number of parameters", str(len(params))),
                                *shapes.items(), ("foreach", repr(self.foreach)),
                                *_described(config.as_dict())])
        return description

    def _step_group(self, index: int, config: ShampooConfig, delay: int,
                    journal: StepJournal | None) -> None:
        params = self.param_groups[index]["params"]
        plan = self._plans[index]
        exchange = plan.exchange
        apply = None
        sharded = self._sharded.get(index)
        shards = None if sharded is None else local_shards(params)
        router, routed = None, frozenset()
        if exchange is not None:
            # Whatever can fail in the apply (views, casts, buffers) is prepared before the
            # agreement, which a rank that fails here joins as failed: then no rank has
            # changed any state, and none can fail after the others applied the update.
            if sharded is not None:  # FSDP2: rows travel to their blocks' owners and back
                routed = frozenset(sharded.indices)
                router = Router(routing_of(plan, params, routed, self._data_parallel), shards,
                                self._data_parallel.group, self._data_parallel.world_size)
            exchange.allocate()
            apply = ApplyPlan.prepare(params, plan.layouts,
                                      [(pi, region) for pi, region, _ in exchange.received])
        grads = [p.grad for p in params]
        math_params = params  # what g + wd p reads: FSDP2 parameters' full tensors or rows
        if sharded is not None:
            grads, math_params = sharded.full(grads) if router is None else sharded.local(grads)
        skips = Skips()
        if exchange is not None:  # decided on whole gradients, the same on every rank
            grads, skips = self._data_parallel.agree(exchange, grads, math_params, config,
                                                     router)
        if all(g is None for g in grads) and not skips.all():
            return
        step = plan.step + 1
        newcomers = [pi for pi, g in enumerate(grads) if g is not None and pi not in plan.live]
        if newcomers:  # their first gradient: their state is created now
            plan = self._add_live(index, config, newcomers, step, journal)
        if config.weight_decay and not config.decoupled_weight_decay:
            grads = [None if g is None else g.add(p, alpha=config.weight_decay)
                     for g, p in zip(grads, math_params)]
        inbox = None
        if router is not None and router.present:  # this rank's blocks of the rows
            self._data_parallel.route({pi: grads[pi] for pi in router.present})
            inbox = router.take_inbox()
        merged = [g.reshape(layout.merged_shape)
                  if g is not None and g.numel() > 0 and pi not in routed else None
                  for pi, (g, layout) in enumerate(zip(grads, plan.layouts))]
        gathered = [gather(stack, pieces, merged, inbox)
                    for stack, pieces in zip(plan.stacks, plan.pieces)]
        inbox = None  # frees the received elements: the stacks' blocks hold them now
        if exchange is None:
            skips = unusable_params([(stack, batch.rows, batch.blocks) for stack, batch
                                     in zip(plan.stacks, gathered)], config.factor_dtype)
        bad = skips.all()
        if bad and exchange is None:  # rare: gather again without them, so no state of
            # theirs is touched (agree() already left them out of the exchange's grads)
            merged = [None if pi in bad else m for pi, m in enumerate(merged)]
            gathered = [gather(stack, pieces, merged)
                        for stack, pieces in zip(plan.stacks, plan.pieces)]
        if apply is None:  # one process: the boxes present, before any state changes
            apply = ApplyPlan.prepare(params, plan.layouts,
                                      [(piece.param, piece.region) for batch in gathered
                                       for piece, _ in batch.placements], shards)
        # Each updated parameter's own step count (the same on every rank) drives its bias
        # corrections, and so its update's scale.
        updated = [pi for pi, g in enumerate(grads) if g is not None and pi not in bad]
        counters = [self.state[params[pi]]["step"] for pi in updated]
        param_steps = {pi: int(t) + 1 for pi, t in zip(updated, counters)}
        scales = {pi: update_scale(config, count) for pi, count in param_steps.items()}
        if journal is not None:
            journal.keep_value(plan, "step")
            journal.keep_params(counters)
        plan.step = step
        self._note_skips(skips, step)

        own: list[tuple[int, BlockRegion, torch.Tensor]] = []  # this rank's boxes' v
        for stack, batch in zip(plan.stacks, gathered):
            if journal is not None:
                journal.keep_stack(stack)
            direction = self._stack_direction(stack, batch, config, step, delay, param_steps)
            if direction is None:
                continue
            for piece, position in batch.placements:
                region = piece.region
                update = direction[position:position + region.num_blocks]
                own.append((piece.param, region,
                            update.view((*region.counts, *region.block_shape))))
        if exchange is None:
            directions: list[torch.Tensor | None] = [v for _, _, v in own]
        else:  # every rank gets every block's v, in the boxes apply was prepared for
            # (those of routed parameters: the update of its rows, for router.apply)
            if any(g is not None for g in grads):
                self._data_parallel.gather(exchange, own)
            directions = [view if merged[pi] is not None else None
                          for pi, _, view in exchange.received]
        if journal is not None:
            journal.keep_params(list(apply.updated_params(directions).values())
                                + ([] if router is None else router.updated()))
        apply.run(directions, config, scales)
        if router is not None:
            router.apply(config, scales)
        if counters:
            torch._foreach_add_(counters, 1.0)
        self._views.refresh(self.state, params, plan.stacks)

    def _add_live(self, index: int, config: ShampooConfig, newcomers: list[int],
                  step: int, journal: StepJournal | None = None) -> GroupPlan:
        """Gives ``newcomers`` (parameters of group ``index`` at their first gradient)
        state: the group's stacks are rebuilt with their blocks and the others' rows
        copied over. Roots computed but not yet in use are put in use first (up to
        ``root_delay`` steps early: a stack's rows share one pending computation). The
        ``journal`` keeps the plan, the old stacks and the new state entries."""
        params = self.param_groups[index]["params"]
        old = self._plans[index]
        if journal is not None:
            journal.keep_item(self._plans, index)
            for stack in old.stacks:
                journal.keep_stack(stack)
            for pi in newcomers:
                journal.keep_item(self.state, params[pi])
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

    def _refresh_views(self, force: bool = False) -> None:
        """Points ``optimizer.state[p]["blocks"]`` at every stack's current storage."""
        for group, plan in zip(self.param_groups, self._plans):
            if plan is not None:
                self._views.refresh(self.state, group["params"], plan.stacks, force)

    def _note_skips(self, skips: Skips, step: int) -> None:
        """Counts the parameters skipped for NaN/Inf or overflowing gradients (each cause
        warned once)."""
        for cause, params, counter, what in (
                ("nonfinite", skips.nonfinite, "nonfinite_grad_skips", "NaN/Inf gradients"),
                ("overflow", skips.overflow, "overflow_grad_skips",
                 "gradients whose squares overflow the optimizer state's dtype")):
            if not params:
                continue
            self._counters[counter] += len(params)
            if cause not in self._warned:
                self._warned.add(cause)
                warnings.warn(f"Shampoo: skipped {len(params)} parameter(s) with {what} "
                              f"at step {step}; their state is untouched. Later skips are "
                              f"counted in metrics()[{counter!r}] without a warning.",
                              RuntimeWarning, stacklevel=6)  # the caller of optimizer.step()

    def _stack_direction(self, stack: BlockStack, batch: Gathered, config: ShampooConfig,
                         step: int, delay: int, param_steps: dict[int, int]
                         ) -> torch.Tensor | None:
        """Statistics, roots, grafting and momentum for the active rows of a stack (the
        ``batch``); returns their directions ``v`` (the update of a parameter at step
        ``t`` is ``u = update_scale(config, t) * v``), or None without active rows.
        ``step`` (the group's) schedules statistics and roots: roots launched at a root
        step go into use ``delay`` steps later (:mod:`.async_roots`); each row's
        parameter step (``param_steps``) drives its bias corrections and its start of
        preconditioning. Overwrites the batch's blocks."""
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
        # step): each count's rows apart.
        row_steps = torch.tensor([param_steps[piece.param] for piece, _ in batch.placements
                                  for _ in range(piece.region.num_blocks)])
        update = torch.empty_like(blocks)
        all_rows = torch.tensor(rows, dtype=torch.long)
        for count in sorted(steps):
            where = (row_steps == count).nonzero().flatten()
            part = all_rows[where]
            update[where] = self._direction(stack, stack.state.select(part), part,
                                            blocks[where], config, count, delay)
        return update

    def _direction(self, stack: BlockStack, state: StackState, selection: torch.Tensor | None,
                   blocks: torch.Tensor, config: ShampooConfig, step: int,
                   delay: int) -> torch.Tensor:
        """Grafting, preconditioning and momentum (eigenvalue-corrected blocks: Adam in
        the eigenbases) of rows whose parameters are at ``step``: ``state`` is theirs
        (``selection`` of the stack; None: all rows, then ``state`` is the stack's),
        written back. Returns ``v``, whose scale is ``update_scale(config, step)``."""
        if isinstance(stack, EigenvalueCorrectedStack):
            update, scale = eigenvalue_corrected_direction_(stack, state, blocks, config, step)
        else:
            started = bool(stack.dims) and step >= config.preconditioning_start + delay
            update, scale = classic_direction_(stack, state, blocks, config, step, started)
        if selection is not None:
            stack.state.assign(selection, state)
        if scale != update_scale(config, step):
            raise RuntimeError(f"internal: a block stack returned scale {scale}, "
                               f"update_scale gives {update_scale(config, step)}")
        return update

    def _count(self, events: RootEvents) -> None:
        self._counters["root_computations"] += events.computed
        self._counters["root_failures"] += events.rejected
        self._counters["root_seconds"] += events.seconds
        self._counters["root_wait_seconds"] += events.wait_seconds

    # ----------------------------------------------------------------------- metrics
    def metrics(self) -> dict[str, float]:
        """Flat diagnostics. Counters are totals since construction:

        - ``root_computations``: inverse roots computed (one per factor and refresh;
          eigenvalue-corrected blocks: basis refreshes, done or skipped).
        - ``root_failures``: roots rejected (NaN/Inf or residual above threshold); the
          previous root stayed in use (eigenvalue-corrected blocks: bases rejected).
        - ``nonfinite_grad_skips``: parameter updates skipped for NaN/Inf gradients.
        - ``overflow_grad_skips``: parameter updates skipped for finite gradients too
          large to square in the state's dtype (a block norm above 1.8e19 in float32):
          the factors and second moments would become Inf for good.
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
        - ``world_size``, ``rank``, ``owned_blocks``: with data parallelism
          (:mod:`.distributed`) a rank holds the state of its ``owned_blocks`` only; then
          every entry except ``step``, ``num_blocks`` and the ``*_grad_skips`` is this
          rank's alone.
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


    # --------------------------------------------------------------------- lifecycle
    def _wait_for_roots(self) -> None:
        self._roots.wait_all([stack for plan in self._plans if plan is not None
                              for stack in plan.stacks])

    def close(self) -> None:
        """Stops the background root workers (``async_roots``). Roots in flight are
        waited for and kept, so the optimizer stays usable: a later root step starts
        the workers again. If background computations failed, the workers are stopped
        all the same and one error is raised (the failed work is dropped, the roots in
        use are kept): a second ``close()`` raises nothing."""
        try:
            self._wait_for_roots()
        finally:
            self._roots.close()

    def __enter__(self) -> "Shampoo":
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, traceback: Any) -> None:
        if exc is None:
            self.close()
            return
        try:  # leaving on the user's exception: it stays the one raised
            self.close()
        except Exception as error:
            exc.add_note(f"Shampoo.close() on leaving the with block also failed: "
                         f"{type(error).__name__}: {error}")

    def __repr__(self) -> str:
        """As ``torch.optim``'s, with the values in effect for the hyperparameters left to
        their defaults (None): ``grafting``, ``precondition_1d``, ``first_moment``,
        ``start_preconditioning_step``, ``root_delay``, ``factor_beta``, ``root_dtype``."""
        lines = [f"{type(self).__name__} ("]
        for index, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {index}")
            values = _effective_values(group, self._roots.asynchronous)
            lines += [f"    {key}: {values[key]!r}" for key in sorted(values)]
        return "\n".join(lines + [")"])


COMPILE_WARNING = (
    "torch.compile of Shampoo.step is not supported: the step is run eagerly (no graph, "
    "no recompilation). Its cost is in batched matrix products and eigh, which a graph "
    "does not speed up (traced, it took 43 s to warm up on a tiny MLP, broke the graph 13 "
    "times and ran 2x slower than eager). Compile the model, not the optimizer step.")


@torch.compiler.disable
def _eager_step(optimizer: "Shampoo", closure: Callable[[], float] | None) -> float | None:
    """``optimizer.step(closure)`` outside any graph, with a one-time warning."""
    if not getattr(optimizer, "_warned_compile", False):
        warnings.warn(COMPILE_WARNING, UserWarning, stacklevel=3)
        optimizer._warned_compile = True
    return optimizer.step(closure)


def _effective_values(group: dict[str, Any], asynchronous: bool) -> dict[str, Any]:
    """A param group's hyperparameters with every None default resolved (as they are,
    should the group hold an invalid value: :meth:`Shampoo.step` will name it)."""
    values = {key: value for key, value in group.items() if key != "params"}
    try:
        config = ShampooConfig.from_group(group)
        delay = resolve_root_delay(config, asynchronous)
    except (ValueError, TypeError):
        return values
    values.update(grafting=config.grafting, precondition_1d=config.precondition_1d,
                  first_moment=config.first_moment, start_preconditioning_step=config.preconditioning_start,
                  root_delay=delay, factor_beta=config.factor_ema)
    # None: per the parameters' dtype (float64 ones get float64 roots).
    dtypes = sorted({str(root_dtype_of(config, p.dtype)) for p in group["params"]})
    values["root_dtype"] = dtypes[0] if len(dtypes) == 1 else tuple(dtypes)
    return values
