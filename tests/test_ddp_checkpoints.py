"""Checkpoints of data-parallel Shampoo made as frameworks make them, at 2 gloo ranks
(tests/checkpoint_workers.py): every rank calling ``state_dict()`` and rank 0 writing it
(Lightning's DDPStrategy, the plain recipe), DCP's ``get_optimizer_state_dict`` /
``set_optimizer_state_dict``, each resumed onto the uninterrupted trajectory bit for bit;
rank 0 alone calling ``state_dict()`` (HF Trainer) fails there, at save time, with the
fix, and the fix (``distributed=False``) resumes exactly."""

from __future__ import annotations

import pytest
import torch

from scalable_shampoo import Shampoo
from tests import checkpoint_workers, distributed_workers as workers


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_checkpoints")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        workers.run_ranks(2, checkpoint_workers.checkpoints, out)
    finally:
        torch.set_num_threads(threads)
    return out, [torch.load(out / f"record_{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("recipe", ["rank0", "dcp", "dcp_full"])
def test_checkpoints_resume_bitwise_at_two_ranks(records, recipe):
    for record in records[1]:
        assert record["in_flight"] > 0  # saved with roots computed but not yet in use
        for a, b in zip(record[f"{recipe}_resumed"], record["uninterrupted"]):
            assert torch.equal(a, b)


def test_state_dict_gathers_every_block_and_dcp_leaves_the_state_untouched(records):
    _, (zero, one) = records
    assert zero["owned_blocks"] + one["owned_blocks"] == zero["full_blocks"] == one["full_blocks"]
    assert all(r["untouched"] for r in (zero, one))
    assert all(r["own_bytes"] < r["full_bytes"] for r in (zero, one))


def test_state_dict_on_rank_zero_alone_fails_at_save_time_with_the_fix(records):
    _, (zero, one) = records
    kind, message = zero["rank0_alone"]
    assert kind == "RuntimeError"
    assert "every rank must call it, but only 1 did" in message
    assert "distributed=False" in message and "save_checkpoint" in message
    assert "rank0_alone" not in one


def _continues_as_uninterrupted(model, opt, uninterrupted) -> None:
    """Trains one process from SAVE_AT to STEPS and compares with the 2-rank run."""
    for step in range(checkpoint_workers.SAVE_AT, checkpoint_workers.STEPS):
        opt.zero_grad()
        workers.loss_of(model, *workers.batch(step, dtype=torch.float64)).backward()
        opt.step()
    for p, q in zip(model.parameters(), uninterrupted):
        torch.testing.assert_close(p.detach(), q, rtol=1e-8, atol=1e-10)


def test_the_gathered_checkpoint_resumes_in_one_process(records):
    out, (zero, _) = records
    saved = torch.load(out / "rank0.pt", weights_only=True)
    model = workers.make_model(torch.float64)
    model.load_state_dict(saved["model"])
    opt = Shampoo(model.parameters(), **checkpoint_workers.OPTIONS)
    opt.load_state_dict(saved["optimizer"])
    _continues_as_uninterrupted(model, opt, zero["uninterrupted"])


def test_rank_zero_saving_a_replica_resumes_bitwise(records):
    out, _ = records
    for rank in range(2):
        result = torch.load(out / f"replica_{rank}.pt", weights_only=True)
        for a, b in zip(result["resumed"], result["uninterrupted"]):
            assert torch.equal(a, b)


def test_the_dcp_checkpoint_of_two_ranks_resumes_in_one_process(records):
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    out, (zero, _) = records
    saved = torch.load(out / "rank0.pt", weights_only=True)
    model = workers.make_model(torch.float64)
    model.load_state_dict(saved["model"])
    opt = Shampoo(model.parameters(), **checkpoint_workers.OPTIONS)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        template = {"optimizer": get_optimizer_state_dict(model, opt)}
        dcp.load(template, checkpoint_id=out / "dcp", no_dist=True)
    set_optimizer_state_dict(model, opt, template["optimizer"])
    assert opt.metrics()["step"] == checkpoint_workers.SAVE_AT
    _continues_as_uninterrupted(model, opt, zero["uninterrupted"])


def test_checkpoints_of_two_ranks_resume_at_three(records):
    out, (zero, _) = records
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        workers.run_ranks(3, checkpoint_workers.resume_at_three, out)
    finally:
        torch.set_num_threads(threads)
    for rank in range(3):
        result = torch.load(out / f"three_{rank}.pt", weights_only=True)
        for name in ("rank0", "dcp"):
            for p, q in zip(result[name], zero["uninterrupted"]):
                torch.testing.assert_close(p, q, rtol=1e-8, atol=1e-10)
