"""Data-parallel Shampoo (scalable_shampoo.distributed, SPEC 5): the block-to-rank
assignment and region splitting as pure functions, the sharded state dict and DCP
checkpoints in one process, and multi-process runs (spawned gloo ranks on the CPU,
tests/distributed_workers.py) against the one-process optimizer."""

from __future__ import annotations

import builtins
import copy
import itertools
import math
import re
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scalable_shampoo import Shampoo
from scalable_shampoo.blocking import block_layout, block_regions, region_view, split_blocks
from scalable_shampoo.distributed import (Exchange, PeerFailure, assign_blocks, block_cost,
                                          fingerprint, first_difference, load_checkpoint,
                                          row_major_boxes, save_checkpoint)
from tests import distributed_workers as workers

# ------------------------------------------------------------------- assignment
costs_strategy = st.lists(st.sampled_from([0, 1, 3, 8, 27, 64, 125, 343]), max_size=40)


@settings(max_examples=150, deadline=None)
@given(costs=costs_strategy, world_size=st.integers(1, 5))
def test_assignment_gives_every_item_one_rank_and_balances(costs, world_size):
    owners, loads = assign_blocks(costs, world_size)
    assert len(owners) == len(costs) and all(0 <= r < world_size for r in owners)
    assert loads == [sum(c for c, r in zip(costs, owners) if r == rank)
                     for rank in range(world_size)]
    assert max(loads) - min(loads) <= max(costs, default=0)  # list-scheduling bound
    assert assign_blocks(list(costs), world_size) == (owners, loads)  # deterministic
    # Within equal costs every rank holds one contiguous run, in rank order.
    for cost in set(costs):
        ranks = [r for c, r in zip(costs, owners) if c == cost]
        assert ranks == sorted(ranks)


@settings(max_examples=60, deadline=None)
@given(costs=st.lists(st.integers(0, 50), min_size=1, max_size=7),
       world_size=st.integers(2, 3))
def test_assignment_is_within_four_thirds_of_the_optimum(costs, world_size):
    _, loads = assign_blocks(costs, world_size)
    best = min(max(sum(c for c, r in zip(costs, choice) if r == rank)
                   for rank in range(world_size))
               for choice in itertools.product(range(world_size), repeat=len(costs)))
    assert max(loads) * 3 <= best * 4


def test_assignment_starts_from_given_loads():
    owners, loads = assign_blocks([5, 5, 5], 2, initial_loads=[10, 0])
    assert owners == [0, 1, 1] and loads == [15, 10]  # shares handed out from rank 0


@pytest.mark.parametrize("kwargs,message", [
    (dict(costs=[1], world_size=0), "world_size must be an integer >= 1"),
    (dict(costs=[1], world_size=True), "world_size must be an integer >= 1"),
    (dict(costs=[1], world_size=2, initial_loads=[0]), "initial_loads must have world_size=2"),
    (dict(costs=[-1], world_size=2), "costs must be >= 0"),
])
def test_assignment_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        assign_blocks(**kwargs)


def test_block_cost_counts_roots_and_per_step_work():
    assert block_cost((8, 4), (0, 1)) == 8**3 + 4**3 + 32 * (12 + 1)
    assert block_cost((8, 4), (1,)) == 4**3 + 32 * 5
    assert block_cost((), ()) == 1


@settings(max_examples=200, deadline=None)
@given(counts=st.lists(st.integers(1, 4), max_size=3), data=st.data())
def test_row_major_boxes_cover_a_run_exactly(counts, data):
    total = math.prod(counts)
    start = data.draw(st.integers(0, total))
    stop = data.draw(st.integers(start, total))
    boxes = row_major_boxes(counts, start, stop)
    covered = []
    strides = [math.prod(counts[d + 1:]) for d in range(len(counts))]
    for at, size in boxes:
        for offset in itertools.product(*[range(s) for s in size]):
            covered.append(sum((a + o) * s for a, o, s in zip(at, offset, strides)))
    assert sorted(covered) == list(range(start, stop))
    assert len(boxes) <= max(1, 2 * len(counts) - 1)


SPLIT_CASES = [((24, 10), 8, 20), ((20, 24), 8, 100), ((9, 9, 9), 4, 100), ((7,), 2, 100),
               ((), 4, 100), ((13, 5), 4, 100), ((5, 1, 12), 3, 8)]


@pytest.mark.parametrize("shape,block_size,max_dim", SPLIT_CASES)
@pytest.mark.parametrize("world_size", [2, 3, 5])
def test_every_block_travels_once_through_views_of_its_owner(shape, block_size, max_dim,
                                                             world_size):
    """Exchange.plan and add_param against split_blocks, the plain definition: every
    block is in exactly one box of exactly one rank, and each box's strided view holds
    exactly the blocks it claims."""
    gen = torch.Generator().manual_seed(len(shape) + world_size)
    param = torch.randn(shape, generator=gen)
    layout = block_layout(shape, block_size, max_dim)
    blocks = split_blocks(param, layout)
    exchanges = [Exchange.plan([param], [layout], SimpleNamespace(world_size=world_size, rank=rank),
                               None) for rank in range(world_size)]
    assert all(e.owners == exchanges[0].owners for e in exchanges)
    merged = param.reshape(layout.merged_shape)
    # The same values in a non-contiguous tensor take region_view's other path.
    strided = merged.mT.contiguous().mT if merged.dim() >= 2 else merged
    seen = []
    for rank, exchange in enumerate(exchanges):
        for box in exchange.add_param(0, block_regions(layout), torch.float32, param.device):
            for source in (merged, strided):
                flat = region_view(source, box).reshape(-1, *box.block_shape)
                for position, b in enumerate(box.block_indices):
                    assert torch.equal(flat[position], blocks[b])
            assert all(exchange.owners[0][b] == rank for b in box.block_indices)
            seen += box.block_indices
    assert sorted(seen) == list(range(layout.num_blocks))
    bucket_lengths = [sum(slot.numel for slot in e.buckets[(torch.float32, param.device)]
                          .slots[e.rank]) for e in exchanges]
    assert sum(bucket_lengths) == param.numel()


def test_first_difference_names_the_group_and_fields_with_their_ranks():
    same = [("lr", "0.01"), ("block_size", "8")]
    descriptions = [[same, [("lr", "0.1"), ("block_size", "8")]],
                    [same, [("lr", "0.2"), ("block_size", "4")]],
                    [same, [("lr", "0.1"), ("block_size", "8")]]]
    assert first_difference(descriptions) == (
        "param group 1: lr, block_size must be the same on every rank, got lr = 0.1 on "
        "rank(s) [0, 2], 0.2 on rank(s) [1]; block_size = 8 on rank(s) [0, 2], 4 on rank(s) [1]")
    assert first_difference([[same], [same, same]]) == (
        "the number of param groups must be the same on every rank, got 1 on rank(s) [0], "
        "2 on rank(s) [1]")
    assert first_difference([[same], [same + [("foreach", "False")]]]) == (
        "param group 0: foreach must be the same on every rank, got foreach = nothing on "
        "rank(s) [0], False on rank(s) [1]")
    digests = {fingerprint(d) for d in descriptions}
    assert len(digests) == 2 and all(0 <= d < 2**62 for d in digests)


def test_equal_values_of_other_number_types_describe_the_same():
    import numpy as np

    from scalable_shampoo.optimizer import _described
    assert _described({"lr": np.float64(0.01), "block_size": np.int64(8),
                       "betas": (np.float32(0.5), 0.999), "nesterov": True}) == _described(
        {"lr": 0.01, "block_size": 8, "betas": (0.5, 0.999), "nesterov": True})
    assert _described({"lr": 0.01}) != _described({"lr": 0.010000000000000002})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, as each spawned rank has: the tiny models here only lose
    from more, most of all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------- one-process checkpoints
@pytest.fixture(scope="module")
def single():
    """The one-process runs the ranks must reproduce (and checkpoints resume to)."""
    return {"ddp": workers.train_single(torch.float32, grouped=False),
            "manual": workers.train_single(torch.float64, grouped=True),
            "async": workers.train_single(torch.float64, grouped=True, variant="async"),
            "bitwise": {v: workers.train_bitwise(v) for v in workers.BITWISE_VARIANTS},
            "nonfinite": workers.nonfinite_steps()}


@pytest.fixture(scope="module")
def halfway():
    """The one-process float64 run stopped at SAVE_AT (tests copy it)."""
    return workers.train_single(torch.float64, grouped=True, stop=workers.SAVE_AT)


def _finish(model, opt):
    workers.train_single(torch.float64, grouped=True, start=workers.SAVE_AT, model=model, opt=opt)


def test_sharded_state_dict_resumes_bitwise_and_has_every_block(single, halfway):
    model, opt = halfway
    sharded = opt.sharded_state_dict()
    entries = sharded["state"]
    assert all(isinstance(k, str) for k in entries)
    assert sum(len(e["blocks"]) for e in entries.values()) == opt.metrics()["num_blocks"]
    assert sharded["counters"] == {"nonfinite_grad_skips": 0, "overflow_grad_skips": 0}
    resumed = copy.deepcopy(model)
    fresh = Shampoo(workers.param_groups(resumed))
    fresh.load_state_dict(copy.deepcopy(sharded))
    _finish(resumed, fresh)
    for a, b in zip(single["manual"][0].parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_load_rejects_a_subset_that_lacks_a_block_and_foreign_indices(halfway):
    sharded = halfway[1].sharded_state_dict()
    missing = copy.deepcopy(sharded)
    del missing["state"]["0"]["blocks"]["1"]
    fresh = Shampoo(workers.param_groups(workers.make_model(torch.float64)))
    with pytest.raises(ValueError, match="parameter 0 block 1 is not in the state dict"):
        fresh.load_state_dict(missing)
    foreign = copy.deepcopy(sharded)
    foreign["state"]["0"]["blocks"]["99"] = foreign["state"]["0"]["blocks"]["0"]
    with pytest.raises(ValueError, match="state has block 99, this optimizer 2 blocks"):
        fresh.load_state_dict(foreign)


def test_dcp_checkpoint_in_one_process_resumes_bitwise(single, halfway, tmp_path):
    save_checkpoint(tmp_path / "checkpoint", halfway[1], model=halfway[0])
    resumed = workers.make_model(torch.float64)
    with torch.no_grad():
        for p in resumed.parameters():
            p.zero_()  # everything must come from the checkpoint
    fresh = Shampoo(workers.param_groups(resumed))
    load_checkpoint(tmp_path / "checkpoint", fresh, model=resumed)
    _finish(resumed, fresh)
    for a, b in zip(single["manual"][0].parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="model= must be an object with state_dict"):
        save_checkpoint(tmp_path / "other", halfway[1], model=[0.0])


@pytest.mark.parametrize("kwargs,message", [
    (dict(distributed="yes"), "distributed must be True or False"),
    (dict(distributed=False, process_group=object()), "process_group is given but distributed"),
    (dict(process_group=object()), "process_group is given but torch.distributed is not"),
])
def test_distributed_arguments_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Shampoo([torch.nn.Parameter(torch.randn(3))], **kwargs)


def test_one_process_metrics_report_a_world_of_one(halfway):
    opt = halfway[1]
    metrics = opt.metrics()
    assert (metrics["world_size"], metrics["rank"]) == (1, 0)
    expected = sum(block_layout(p.shape, g["block_size"], g["max_preconditioned_dim"]).num_blocks
                   for g in opt.param_groups for p in g["params"])
    assert metrics["owned_blocks"] == metrics["num_blocks"] == expected


# ----------------------------------------------------------------- spawned ranks
@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_ranks")
    workers.run_ranks(2, workers.train_two_ranks, out)
    return out, [torch.load(out / f"two_ranks_{r}.pt", weights_only=True) for r in range(2)]


@pytest.fixture(scope="module")
def three_ranks(two_ranks, tmp_path_factory):
    out = tmp_path_factory.mktemp("three_ranks")
    workers.run_ranks(3, workers.train_three_ranks, out, two_ranks[0] / "checkpoint")
    return [torch.load(out / f"three_ranks_{r}.pt", weights_only=True) for r in range(3)]


TOLERANCE = {"ddp": dict(rtol=2e-4, atol=2e-5), "manual": dict(rtol=1e-8, atol=1e-10),
             "async": dict(rtol=1e-8, atol=1e-10)}


def _check_ranks_match_single(results, single, runs=("ddp", "manual")):
    for run in runs:
        model, opt = single[run]
        for rank_results in results:
            assert all(rank_results[run]["identical"])  # bit-identical after every step
            for p, q in zip(model.parameters(), rank_results[run]["params"]):
                torch.testing.assert_close(q, p.detach(), **TOLERANCE[run])
        metrics = [r[run]["metrics"] for r in results]
        one = opt.metrics()
        # Each block's state lives on exactly one rank.
        assert sum(m["owned_blocks"] for m in metrics) == one["num_blocks"]
        assert sum(m["state_bytes"] for m in metrics) == one["state_bytes"]
        assert sum(m["root_computations"] for m in metrics) == one["root_computations"]
        assert all(m["state_bytes"] < one["state_bytes"] for m in metrics)
        assert [m["rank"] for m in metrics] == list(range(len(results)))


def test_two_ranks_match_one_process_and_stay_identical(two_ranks, single):
    _check_ranks_match_single(two_ranks[1], single, runs=("ddp", "manual", "async"))


def test_three_ranks_match_one_process_and_stay_identical(three_ranks, single):
    _check_ranks_match_single(three_ranks, single)


def test_a_rank_that_owns_nothing_takes_part(two_ranks, three_ranks):
    """One block over two ranks (the default group) and over an explicit pair of three
    ranks: the owner alone holds state, every rank applies the same update."""
    alone, _, _ = workers.one_block()
    pair = [r["pair"] for r in three_ranks]
    for results in ([r["one_block"] for r in two_ranks[1]], pair[:2]):
        assert sorted(r["owned_blocks"] for r in results) == [0, 1]
        for r in results:
            assert r["identical"]
            torch.testing.assert_close(r["param"], alone, rtol=1e-5, atol=1e-6)
    assert pair[2] == ("ValueError", "this process is not a member of process_group")


def test_checkpoint_of_two_ranks_resumes_in_one_process(two_ranks):
    out, results = two_ranks
    model = workers.make_model(torch.float64)
    opt = Shampoo(workers.param_groups(model))
    load_checkpoint(out / "checkpoint", opt, model=model)
    assert opt.metrics()["step"] == workers.SAVE_AT
    _finish(model, opt)
    for p, q in zip(model.parameters(), results[0]["manual"]["params"]):
        torch.testing.assert_close(p.detach(), q, **TOLERANCE["manual"])


def test_checkpoint_of_two_ranks_resumes_at_three(two_ranks, three_ranks):
    uninterrupted = two_ranks[1][0]["manual"]["params"]
    for rank_results in three_ranks:
        assert all(rank_results["resumed"]["identical"])
        for p, q in zip(rank_results["resumed"]["params"], uninterrupted):
            torch.testing.assert_close(p, q, **TOLERANCE["manual"])


def test_a_failing_rank_makes_every_rank_raise(two_ranks):
    records = [results["failures"] for results in two_ranks[1]]
    zero, one = records
    assert one["bad_config"][0] == "ValueError" and "lr must be" in one["bad_config"][1]
    assert zero["bad_config"][0] == "PeerFailure"
    assert "failed on rank(s) [1] of 2" in zero["bad_config"][1]
    assert zero["root_error"] == ("ArithmeticError", "injected root failure")
    assert one["root_error"][0] == "PeerFailure" and "rank(s) [0]" in one["root_error"][1]
    for record in records:
        assert record["root_step"] == 8
        assert record["bad_config_untouched"] and record["root_error_untouched"]
        assert record["after_bad_config"] == ("ok", "")
        assert record["identical_after_bad_config"]
        # A NaN on one rank only: every rank skips the parameter, warns and counts it.
        assert record["nan"] == ("ok", "") and record["nan_warned"]
        assert record["nan_param_untouched"] and record["nan_skips"] == 1
        assert record["identical_after_nan"]
        assert record["peer_failure_is_runtime_error"]


def test_async_eigenvalue_corrected_checkpoint_in_flight_resumes_at_three(two_ranks,
                                                                          three_ranks):
    """Background roots and eigenvalue-corrected bases on each rank's own blocks; the
    checkpoint at 2 ranks holds roots computed but not yet in use, and 3 ranks resume
    from it onto the uninterrupted trajectory."""
    assert all(r["async"]["in_flight_at_save"] > 0 for r in two_ranks[1])
    uninterrupted = two_ranks[1][0]["async"]["params"]
    for rank_results in three_ranks:
        assert all(rank_results["async_resumed"]["identical"])
        for p, q in zip(rank_results["async_resumed"]["params"], uninterrupted):
            torch.testing.assert_close(p, q, **TOLERANCE["async"])


@pytest.mark.parametrize("variant", list(workers.BITWISE_VARIANTS))
def test_ranks_equal_one_process_bitwise_in_float32(two_ranks, three_ranks, single, variant):
    """The same gradients on every rank (the whole batch's, on each replica): after
    BITWISE_STEPS steps every rank's float32 parameters equal one process's bit for bit,
    at 2 and 3 ranks, every rank owning some of the blocks (one intra-op thread
    everywhere: the thread count changes the rounding of matmul and eigh)."""
    alone = single["bitwise"][variant]
    start = workers.bitwise_params().values()
    assert all(torch.linalg.vector_norm(p - q) > 0.02 * torch.linalg.vector_norm(q)
               for p, q in zip(alone["params"], start))  # every parameter went somewhere
    for results in ([r["bitwise"][variant] for r in two_ranks[1]],
                    [r["bitwise"][variant] for r in three_ranks]):
        assert all(r["owned_blocks"] > 0 for r in results)
        assert sum(r["owned_blocks"] for r in results) == alone["num_blocks"]
        for rank_result in results:
            for p, q in zip(alone["params"], rank_result["params"]):
                assert p.dtype == torch.float32 and torch.equal(p, q)


def _raise(outcome: tuple[str, str]) -> None:
    """Raises the exception a rank recorded as ``(type name, message)``, for pytest.raises."""
    name, message = outcome
    raise (PeerFailure if name == "PeerFailure" else getattr(builtins, name))(message)


def test_a_step_of_only_nonfinite_gradients_counts_and_warns_as_in_one_process(two_ranks,
                                                                                single):
    """DDP spreads rank 1's NaN loss to every gradient: every rank skips every parameter,
    counts and warns as one process does, and counts the step as one process does."""
    alone = single["nonfinite"]
    params = len(list(workers.make_model(torch.float32).parameters()))
    assert alone["metrics"] == [{"step": 3, "nonfinite_grad_skips": params},
                                {"step": 4, "nonfinite_grad_skips": params}]
    assert alone["untouched"]
    (category, message), = alone["warnings"]
    assert category == "RuntimeWarning"
    assert f"skipped {params} parameter(s) with NaN/Inf gradients at step 3" in message
    for result in (r["nonfinite"] for r in two_ranks[1]):
        assert result["metrics"] == alone["metrics"]
        assert result["untouched"]
        assert result["warnings"] == alone["warnings"]


@pytest.mark.parametrize("case,message", [
    ("lr", "param group 0: lr must be the same on every rank, got lr = 0.01 on rank(s) [0], "
           "0.02 on rank(s) [1]"),
    ("block_size", "param group 0: block_size must be the same on every rank, got block_size "
                   "= 8 on rank(s) [0], 4 on rank(s) [1]"),
    # The root_dtype and precondition_1d defaults follow the preconditioner.
    ("preconditioner", "param group 0: root_dtype, preconditioner, precondition_1d "
                       "must be the same on every rank, got root_dtype = None on rank(s) [0], "
                       "torch.float64 on rank(s) [1]; preconditioner = 'shampoo' on "
                       "rank(s) [0], 'eigenvalue_corrected' on rank(s) [1]; precondition_1d"),
    ("betas", "param group 0: betas must be the same on every rank, got betas = (0.9, 0.999) "
              "on rank(s) [0], (0.9, 0.98) on rank(s) [1]"),
    ("groups", "the number of param groups must be the same on every rank, got 1 on "
               "rank(s) [0], 2 on rank(s) [1]"),
])
def test_hyperparameters_that_differ_raise_on_every_rank_before_any_state(two_ranks, case,
                                                                          message):
    for result in (r["mismatch"] for r in two_ranks[1]):
        with pytest.raises(ValueError, match=re.escape(message)):
            _raise(result[case])
        assert result.get(case + " untouched", True)


def test_an_invalid_value_on_one_rank_at_the_first_step_raises_on_every_rank(two_ranks):
    """Before the structure check: the invalid rank joins it as failed."""
    zero, one = (r["mismatch"] for r in two_ranks[1])
    with pytest.raises(ValueError, match="lr must be"):
        _raise(one["rank 1 invalid"])
    with pytest.raises(PeerFailure, match=re.escape("failed on rank(s) [1] of 2")):
        _raise(zero["rank 1 invalid"])
    assert zero["rank 1 invalid untouched"] and one["rank 1 invalid untouched"]


def test_an_lr_schedule_that_differs_across_ranks_raises_at_that_step(two_ranks):
    """The per-step check: lr of rank 1 halves from step 3 (index 3) on; both ranks raise
    there with nothing applied, and go on in step once lr agrees again."""
    for result in (r["mismatch"] for r in two_ranks[1]):
        outcomes = result["scheduled"]
        assert [o[0] for o in outcomes] == ["ok", "ok", "ok", "ValueError", "ok"]
        with pytest.raises(ValueError, match=re.escape(
                "param group 0: lr must be the same on every rank, got lr = 0.01 on rank(s) "
                "[0], 0.005 on rank(s) [1]")):
            _raise(outcomes[3])
        assert result["scheduled untouched"] and result["scheduled identical"]
        assert result["scheduled steps"] == 4


def test_a_failure_in_the_apply_on_one_rank_raises_on_every_rank(two_ranks):
    """Rank 1 fails where the update meets its parameters: every rank raises and no rank
    applied anything or counted the step, so the replicas stay identical (and train on
    together)."""
    zero, one = (r["failures"] for r in two_ranks[1])
    with pytest.raises(RuntimeError, match="injected apply failure"):
        _raise(one["apply_error"])
    with pytest.raises(PeerFailure, match=re.escape("failed on rank(s) [1] of 2")):
        _raise(zero["apply_error"])
    for record in (zero, one):
        assert record["apply_error_untouched"] and record["identical_after_apply_error"]
        assert record["apply_error_counted_nowhere"]
        assert record["after_apply_error"] == ("ok", "") and record["identical_at_the_end"]
