"""All-or-nothing steps: a root computation that raises in the middle of a step leaves
the parameters, the state (statistics, roots, grafting, momentum), the step counters and
the metrics as they were; the optimizer then goes on as if the step had not been tried."""

from __future__ import annotations

import time

import pytest
import torch

from scalable_shampoo import Shampoo
from scalable_shampoo.eigenvalue_corrected import EigenvalueCorrectedStack
from scalable_shampoo.preconditioner import BlockStack
from tests.state_checks import assert_same_state, optimizer_snapshot

SHAPES = [[(6, 5), (7,)], [(4, 3, 2), (5, 4), (3,)]]  # two param groups, several stacks
ROOT_STEP = 5  # start 2, frequency 3: roots at steps 2, 5, 8


def _groups(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
            for shapes in SHAPES]


def _grads(groups, step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for params in groups:
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)


def _optimizer(groups, preconditioner: str, delay: int, asynchronous: bool) -> Shampoo:
    return Shampoo([{"params": params} for params in groups], lr=0.02, block_size=4,
                   precondition_frequency=3, start_preconditioning_step=2, root_delay=delay,
                   preconditioner=preconditioner, async_roots=asynchronous, root_workers=1)


def _fail_from_call(monkeypatch, first_failing: int, seconds: float = 0.0) -> None:
    """Root computations (of both stack kinds) succeed until call ``first_failing``."""
    calls = [0]
    for stack_type in (BlockStack, EigenvalueCorrectedStack):
        original = stack_type.compute_roots

        def compute(self, inputs, config, original=original):
            calls[0] += 1
            if calls[0] >= first_failing:
                time.sleep(seconds)  # not done yet when the step that uses it starts
                raise ArithmeticError("injected root failure")
            return original(self, inputs, config)

        monkeypatch.setattr(stack_type, "compute_roots", compute)


@pytest.mark.parametrize("preconditioner, delay", [
    ("shampoo", 0), ("shampoo", 3), ("eigenvalue_corrected", 0), ("eigenvalue_corrected", 3),
])
def test_a_failing_root_computation_leaves_no_half_done_step(monkeypatch, preconditioner,
                                                             delay):
    failing, twin = _groups(), _groups()
    opt = _optimizer(failing, preconditioner, delay, asynchronous=False)
    reference = _optimizer(twin, preconditioner, delay, asynchronous=False)
    for step in range(1, ROOT_STEP):
        for groups, o in ((failing, opt), (twin, reference)):
            _grads(groups, step)
            o.step()
    # The second root computation of the root step fails: by then the first stack's
    # statistics and roots are done (with delay 3, the roots of step 2 went into use).
    _fail_from_call(monkeypatch, first_failing=2)
    _grads(failing, ROOT_STEP)
    before = optimizer_snapshot(opt)
    with pytest.raises(ArithmeticError, match="injected root failure"):
        opt.step()
    assert_same_state(opt, before)
    # Without the failure, the retried step and the rest follow the optimizer that never
    # failed, bit for bit.
    monkeypatch.undo()
    for step in range(ROOT_STEP, ROOT_STEP + 4):
        for groups, o in ((failing, opt), (twin, reference)):
            _grads(groups, step)
            o.step()
    for a, b in zip(sum(failing, []), sum(twin, [])):
        assert torch.equal(a, b)
    assert opt.metrics()["step"] == reference.metrics()["step"] == ROOT_STEP + 3


def test_a_background_failure_surfaces_before_the_step_changes_anything(monkeypatch):
    groups = _groups()
    opt = _optimizer(groups, "shampoo", delay=1, asynchronous=True)
    for step in range(1, ROOT_STEP):
        _grads(groups, step)
        opt.step()
    # The work launched at step 5 fails on the worker, slowly: still running when step 6,
    # which puts it in use, begins.
    _fail_from_call(monkeypatch, first_failing=2, seconds=0.5)
    _grads(groups, ROOT_STEP)
    opt.step()
    _grads(groups, ROOT_STEP + 1)
    before = _state_in_place(opt)  # (a state dict would wait for the failing work)
    with pytest.raises(ArithmeticError, match="injected root failure"):
        opt.step()
    after = _state_in_place(opt)
    assert len(before) == len(after)
    for a, b in zip(before, after):
        assert torch.equal(a, b)
    opt.close()


def _state_in_place(opt):
    """Parameters, every stack's state tensors and the step counters, as they are."""
    tensors = [p.detach().clone() for group in opt.param_groups for p in group["params"]]
    for plan in opt._plans:
        tensors += [t.clone() for stack in plan.stacks for t in stack.state.tensors()]
        tensors.append(torch.tensor(plan.step))
    return tensors
