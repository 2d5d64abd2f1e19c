"""torch's own checkpoint machinery on Shampoo in one process: DCP's
``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` (full and sharded options, and
through ``dcp.save`` / ``dcp.load``) leave the optimizer untouched and resume bit for bit;
``ZeroRedundancyOptimizer`` is refused. The multi-process cases are in
tests/test_distributed.py."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)

from scalable_shampoo import Shampoo

OPTIONS = dict(lr=0.02, block_size=6, precondition_frequency=3, start_preconditioning_step=2,
               epsilon=1e-6, factor_dtype=torch.float64, root_delay=2)


def _model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _train(model, opt, start: int, stop: int) -> None:
    for step in range(start, stop):
        gen = torch.Generator().manual_seed(step)
        opt.zero_grad()
        model(torch.randn(8, 5, generator=gen)).square().mean().backward()
        opt.step()


def _same_optimizer_state(a: dict, b: dict) -> bool:
    """Per-parameter state and param groups equal (DCP drops our diagnostic counters)."""
    return all(_same_state(a[key], b[key]) for key in ("state", "param_groups"))


def _same_state(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


@pytest.fixture(scope="module")
def uninterrupted():
    model = _model()
    opt = Shampoo(model.parameters(), **OPTIONS)
    _train(model, opt, 0, 14)
    return [p.detach().clone() for p in model.parameters()]


OPTION_CASES = {"sharded": None, "full": StateDictOptions(full_state_dict=True),
                "full_cpu_offload": StateDictOptions(full_state_dict=True, cpu_offload=True)}


@pytest.mark.parametrize("case", OPTION_CASES)
def test_dcp_state_dict_functions_leave_the_optimizer_untouched_and_resume_bitwise(
        case, uninterrupted):
    options = OPTION_CASES[case]
    model = _model()
    opt = Shampoo(model.parameters(), **OPTIONS)
    _train(model, opt, 0, 8)  # step 8 launched roots that go into use at 10
    assert opt.metrics()["roots_in_flight"] > 0
    before = opt.state_dict()
    saved = get_optimizer_state_dict(model, opt, options=options)
    assert _same_state(opt.state_dict(), before)  # no zero-gradient step was run
    resumed_model = copy.deepcopy(model)
    resumed = Shampoo(resumed_model.parameters(), **{**OPTIONS, "lr": 0.5})
    set_optimizer_state_dict(resumed_model, resumed, copy.deepcopy(saved), options=options)
    assert resumed.param_groups[0]["lr"] == OPTIONS["lr"]
    assert _same_optimizer_state(resumed.state_dict(), before)
    _train(resumed_model, resumed, 8, 14)
    for a, b in zip(resumed_model.parameters(), uninterrupted):
        assert torch.equal(a, b)


def test_dcp_save_and_load_through_the_state_dict_functions(tmp_path, uninterrupted):
    model = _model()
    opt = Shampoo(model.parameters(), **OPTIONS)
    _train(model, opt, 0, 8)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=tmp_path,
                 no_dist=True)
        resumed_model = copy.deepcopy(model)
        resumed = Shampoo(resumed_model.parameters(), **OPTIONS)
        # The template: DCP steps a fresh optimizer with zero gradients at lr 0.
        template = {"optim": get_optimizer_state_dict(resumed_model, resumed)}
        dcp.load(template, checkpoint_id=tmp_path, no_dist=True)
    set_optimizer_state_dict(resumed_model, resumed, template["optim"])
    assert _same_optimizer_state(resumed.state_dict(), opt.state_dict())
    _train(resumed_model, resumed, 8, 14)
    for a, b in zip(resumed_model.parameters(), uninterrupted):
        assert torch.equal(a, b)


def test_zero_redundancy_optimizer_is_refused_at_construction(tmp_path):
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        with pytest.raises(TypeError, match="cannot run inside .*ZeroRedundancyOptimizer"):
            ZeroRedundancyOptimizer(_model().parameters(), optimizer_class=Shampoo, lr=0.01)
        Shampoo(_model().parameters())  # outside ZeRO, with a process group, as before
    finally:
        dist.destroy_process_group()
