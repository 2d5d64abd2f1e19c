"""Root work spread over the delay on the training thread (``async_roots="spread"``):
the trajectory of the synchronous optimizer with the same ``root_delay``, bit for bit,
with each step between a root step and its activation doing a share of the work."""

from __future__ import annotations

import io

import pytest
import torch

from scalable_shampoo import Shampoo
from scalable_shampoo.eigenvalue_corrected import EigenvalueCorrectedStack
from scalable_shampoo.preconditioner import BlockStack
from tests.test_async_roots import _assert_same, _model, _options, _params, _sync_run, _train


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("delay", [1, 3, 6])
@pytest.mark.parametrize("extra", [dict(), dict(root_method="newton"),
                                   dict(preconditioner="eigenvalue_corrected")],
                         ids=["eigh", "newton", "eigenvalue_corrected"])
def test_spread_equals_sync_with_the_same_delay(delay, extra):
    expected_model = _model()
    expected_opt = Shampoo(expected_model.parameters(), **_options(root_delay=delay, **extra))
    _train(expected_model, expected_opt, 40)
    model = _model()
    opt = Shampoo(model.parameters(), **_options(root_delay=delay, **extra),
                  async_roots="spread")
    _train(model, opt, 40)
    _assert_same(_params(model), _params(expected_model))
    assert opt.metrics()["root_computations"] == expected_opt.metrics()["root_computations"] > 0


def _count_matrices(monkeypatch, stack_type=BlockStack):
    """Records, per call of ``compute_roots``, how many matrices it was given."""
    calls: list[int] = []
    original = stack_type.compute_roots

    def counting(self, inputs, config):
        calls.append(sum(x.shape[0] if isinstance(x, torch.Tensor) else 1 for x in inputs))
        return original(self, inputs, config)

    monkeypatch.setattr(stack_type, "compute_roots", counting)
    return calls


def test_each_step_of_the_delay_does_a_share(monkeypatch):
    model = _model()
    opt = Shampoo(model.parameters(), **_options(root_delay=6), async_roots="spread")
    _train(model, opt, 2)  # before the first root step (3)
    calls = _count_matrices(monkeypatch)
    per_step = []
    for i in range(2, 8):  # steps 3 (root step) .. 8 (step 9 activates and relaunches)
        before = len(calls)
        _train(model, opt, 1, start=i)
        per_step.append(sum(calls[before:]))
    total = sum(per_step)
    # the root step itself (3) computed nothing, the work went over most of the steps
    # 4..8, none did a third of it
    assert per_step[0] == 0
    assert sum(count > 0 for count in per_step) >= 4 and max(per_step) <= total / 3
    assert opt.metrics()["root_computations"] == 0  # none in use before step 9
    _train(model, opt, 1, start=8)
    assert opt.metrics()["root_computations"] == total


def test_checkpoint_in_the_middle_of_the_work_resumes_bitwise():
    total = 30
    expected, _ = _sync_run(3, steps=total)
    model = _model()
    opt = Shampoo(model.parameters(), **_options(root_delay=3), async_roots="spread")
    _train(model, opt, 10)  # step 9 was a root step: its work is under way
    assert any(stack.pending is not None and stack.pending.work is not None
               for plan in opt._plans if plan is not None for stack in plan.stacks)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    for resume_mode in ("spread", False):
        resumed = _model(seed=123)
        resumed.load_state_dict(saved["model"])
        new_opt = Shampoo(resumed.parameters(), **_options(root_delay=3),
                          async_roots=resume_mode)
        new_opt.load_state_dict(saved["opt"])
        _train(resumed, new_opt, total - 10, start=10)
        _assert_same(_params(resumed), expected)
    # the saving optimizer goes on as if nothing happened
    _train(model, opt, total - 10, start=10)
    _assert_same(_params(model), expected)
