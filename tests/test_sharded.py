"""Shampoo on FSDP2 parameters (scalable_shampoo.sharded, scalable_shampoo.routing): the
row split, box overlap and routing cuts as pure functions, and gloo runs at 2 and 3 ranks
(tests/fsdp2_workers.py) against the one-process optimizer: bitwise on the same gradients
(classic and eigenvalue-corrected; merged, split and unpreconditioned dimensions; coupled
weight decay; ranks without rows or blocks; unsharded parameters beside sharded ones),
with background roots and a NaN gradient; FSDP2's own backward to rounding; checkpoints
saved at 2 ranks resumed at 2, 3 and 1; refusals of other placements; a failing rank's
peers raise, before and between the all-to-alls; no collective moves a full param group;
overflow decided on the whole gradient; parameters swapped after the plan was built."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from scalable_shampoo.blocking import block_layout, block_regions, region_view
from scalable_shampoo.distributed import Exchange, load_checkpoint
from scalable_shampoo.routing import build_routing, flat_rows, rows_view
from scalable_shampoo.sharded import Shard0, rows_of
from tests import distributed_workers as workers
from tests import fsdp2_workers as fsdp2


@pytest.mark.parametrize("rows,world", [(7, 2), (3, 2), (3, 4), (12, 3), (5, 4), (1, 3)])
def test_rows_follow_torch_chunk(rows, world):
    chunks = torch.arange(rows).chunk(world)
    for rank in range(world):
        start, stop = rows_of(rows, world, rank)
        expected = chunks[rank].tolist() if rank < len(chunks) else []
        assert list(range(start, stop)) == expected


@pytest.mark.parametrize("shape,block_size", [((12, 6), 4), ((2, 2, 3, 12), 4), ((9,), 2),
                                              ((5, 7), 3)])
def test_box_overlap_keeps_every_box_with_local_elements(shape, block_size):
    """The apply skips the boxes :meth:`Shard0.overlaps` rules out: none of them may
    have an element in the rank's rows (and some are ruled out)."""
    layout = block_layout(shape, block_size, 12)
    index = torch.arange(torch.Size(shape).numel()).reshape(layout.merged_shape)
    skipped = 0
    for world in (2, 3, 4):
        for rank in range(world):
            start, stop = rows_of(shape[0], world, rank)
            shard = Shard0(torch.empty(0), start, stop)
            lo, hi = shard.flat_range(shape)
            for region in block_regions(layout) + block_regions(layout, one_block_each=True):
                inside = ((region_view(index, region) >= lo) &
                          (region_view(index, region) < hi)).any()
                assert shard.overlaps(region, shape) or not inside
                skipped += not shard.overlaps(region, shape)
    assert skipped > 0


ROUTING_CASES = [((12, 6), 4, 12), ((2, 2, 3, 12), 4, 12), ((9,), 2, 12), ((5, 7), 3, 12),
                 ((3, 24), 4, 12), ((1, 5), 2, 12), ((7, 1, 3), 2, 100), ((1,), 4, 8),
                 ((10, 9), 4, 6), ((20, 3), 2, 100)]


@pytest.mark.parametrize("shape,block_size,max_dim", ROUTING_CASES)
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_routing_sends_each_element_of_a_ranks_rows_once_to_its_blocks_owner(
        shape, block_size, max_dim, world_size):
    """build_routing against the elements' flat indices: a rank's cuts, as views of its
    rows (a copy, as a local shard is), hold exactly the elements of the owner's box they
    name; every element of the rank's rows is sent once; the owner expects the same cuts
    in the same order; and each owner receives every element of its boxes once."""
    layout = block_layout(shape, block_size, max_dim)
    param = torch.empty(shape)
    index = torch.arange(param.numel()).reshape(layout.merged_shape)
    exchanges = [Exchange.plan([param], [layout], SimpleNamespace(world_size=world_size,
                                                                  rank=rank), None)
                 for rank in range(world_size)]
    for exchange in exchanges:
        exchange.add_param(0, block_regions(layout), torch.float32, param.device,
                           gathered=False)
    routings = [build_routing([param], [layout], e.boxes, [0], world_size, e.rank)
                for e in exchanges]
    boxes = {box.block_indices[0]: box for _, box in exchanges[0].boxes[0]}
    received: list[list[int]] = [[] for _ in range(world_size)]
    for rank, routing in enumerate(routings):
        lo, hi = flat_rows(shape, world_size, rank)
        rows = index.reshape(-1)[lo:hi].clone()
        sent = []
        for owner, cuts in enumerate(routing.sends[0]):
            assert cuts == routings[owner].receives[0][rank]
            for cut in cuts:
                values = rows_view(rows, cut, lo)
                assert torch.equal(values, region_view(index, boxes[cut.key])[cut.index])
                assert exchanges[0].owners[0][cut.key] == owner
                sent += values.flatten().tolist()
                received[owner] += values.flatten().tolist()
        assert sorted(sent) == list(range(lo, hi))
    for owner, exchange in enumerate(exchanges):
        owned = [region_view(index, box).flatten().tolist()
                 for o, box in exchange.boxes[0] if o == owner]
        assert sorted(received[owner]) == sorted(v for box in owned for v in box)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: the thread count changes the rounding
    try:
        workers.run_ranks(2, fsdp2.two_ranks, out)
        workers.run_ranks(3, fsdp2.three_ranks, out)
        single = {
            "bitwise": {v: fsdp2.train(v, False) for v in workers.BITWISE_VARIANTS},
            "async": fsdp2.train("eigenvalue_corrected", False, **fsdp2.DELAYED),
            "poisoned": fsdp2.train("shampoo", False, poison_at=fsdp2.POISON_AT),
            "delayed": fsdp2.train("shampoo", False, **fsdp2.DELAYED),
            "model": workers.train_single(torch.float32, False, stop=fsdp2.MODEL_STEPS),
            "small": fsdp2.small(False),
        }
    finally:
        torch.set_num_threads(threads)
    two = [torch.load(out / f"two_{r}.pt", weights_only=True) for r in range(2)]
    three = [torch.load(out / f"three_{r}.pt", weights_only=True) for r in range(3)]
    return out, single, two, three


def _equal(params, reference):
    return len(params) == len(reference) and all(
        p.dtype == q.dtype and torch.equal(p, q) for p, q in zip(params, reference))


@pytest.mark.parametrize("variant", list(workers.BITWISE_VARIANTS))
def test_sharded_ranks_equal_one_process_bitwise(runs, variant):
    """The same gradients: every rank's full parameters equal one process's bit for bit
    at 2 and 3 ranks, the blocks' state split over the ranks (each block on one)."""
    _, single, two, three = runs
    alone = single["bitwise"][variant]
    start = workers.bitwise_params().values()
    assert all(torch.linalg.vector_norm(p - q) > 0.01 * torch.linalg.vector_norm(q)
               for p, q in zip(alone["params"], start))  # every parameter moved
    for ranks in (two, three):
        results = [r["bitwise"][variant] for r in ranks]
        assert all(_equal(r["params"], alone["params"]) for r in results)
        metrics = [r["metrics"] for r in results]
        assert all(m["owned_blocks"] > 0 for m in metrics)
        assert sum(m["owned_blocks"] for m in metrics) == alone["metrics"]["num_blocks"]
        assert sum(m["state_bytes"] for m in metrics) == alone["metrics"]["state_bytes"]
        assert max(m["state_bytes"] for m in metrics) < alone["metrics"]["state_bytes"]


def test_replicated_async_and_nan_guard_equal_one_process(runs):
    _, single, two, _ = runs
    for record in two:
        # distributed=False: every block on every rank, the same numbers
        assert _equal(record["replicated"]["params"], single["bitwise"]["shampoo"]["params"])
        assert (record["replicated"]["metrics"]["owned_blocks"]
                == single["bitwise"]["shampoo"]["metrics"]["num_blocks"])
        # background roots: the trajectory of synchronous roots with the same delay
        assert _equal(record["async"]["params"], single["async"]["params"])
        # a NaN in one rank's rows skips the parameter on every rank, as in one process
        poisoned = record["poisoned"]
        assert poisoned["metrics"]["nonfinite_grad_skips"] == 1
        assert _equal(poisoned["params"], single["poisoned"]["params"])
        assert not _equal(poisoned["params"], single["bitwise"]["shampoo"]["params"])


def test_fsdp2_backward_follows_one_process_to_rounding(runs):
    """FSDP2's own forward and backward on each rank's share of the batch (its
    reduce-scatter rounds differently): float32, after 50 steps within 1e-5 relative
    (measured: 2e-7)."""
    _, single, two, three = runs
    model, opt = single["model"]
    reference = [p.detach() for p in model.parameters()]
    for ranks in (two, three):
        for record in ranks:
            for p, q in zip(record["model"]["params"], reference):
                assert torch.linalg.vector_norm(p - q) <= 1e-5 * torch.linalg.vector_norm(q)
        assert (sum(r["model"]["metrics"]["state_bytes"] for r in ranks)
                == opt.metrics()["state_bytes"])


def test_checkpoints_resume_bitwise_at_two_and_three_ranks(runs):
    _, single, two, three = runs
    uninterrupted = two[0]["uninterrupted"]
    assert _equal(uninterrupted, single["delayed"]["params"])
    assert all(r["in_flight"] > 0 for r in two)  # saved with roots not yet in use
    for record in two + three:
        assert _equal(record["ours_resumed"], uninterrupted)
        assert _equal(record["dcp_resumed"], uninterrupted)


def test_checkpoint_of_two_ranks_resumes_unsharded_in_one_process(runs):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    out, _, two, _ = runs
    uninterrupted = two[0]["uninterrupted"]
    module, params = fsdp2.bag(False)
    opt = fsdp2.Shampoo(fsdp2.groups(params, "shampoo", **fsdp2.DELAYED))
    load_checkpoint(out / "ours", opt, model=module)
    assert _equal(fsdp2._resume(params, opt), uninterrupted)
    module, params = fsdp2.bag(False)
    opt = fsdp2.Shampoo(fsdp2.groups(params, "shampoo", **fsdp2.DELAYED))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        state = {"model": module.state_dict(), "optimizer": get_optimizer_state_dict(module, opt)}
        dcp.load(state, checkpoint_id=out / "dcp", no_dist=True)
    module.load_state_dict(state["model"])
    set_optimizer_state_dict(module, opt, state["optimizer"])
    assert _equal(fsdp2._resume(params, opt), uninterrupted)


def test_other_placements_are_refused_naming_the_parameter(runs):
    _, _, two, _ = runs
    messages = two[0]["refusals"]
    assert "'layer.shard1'" in messages["shard1"] and "Shard(dim=1)" in messages["shard1"]
    assert "'layer.replicate'" in messages["replicate"] and "Replicate()" in messages["replicate"]
    assert "'layer.mesh2d'" in messages["mesh2d"] and "2-D device mesh" in messages["mesh2d"]
    assert "'layer.strided'" in messages["strided"] and "not contiguous" in messages["strided"]
    assert all("Shard(0) over a 1-D mesh" in m for m in messages.values())


def test_a_failing_rank_makes_every_rank_raise(runs):
    _, _, two, _ = runs
    failure = {rank: record["failures"]["prepare"][0] for rank, record in enumerate(two)}
    assert failure[0] == "RuntimeError: injected"
    assert failure[1].startswith("PeerFailure") and "rank(s) [0]" in failure[1]


@pytest.mark.parametrize("where", ["route", "gather"])
def test_a_rank_failing_between_the_routes_makes_every_rank_raise_untouched(runs, where):
    """Rank 0 fails after the agreement, before the gradient rows travel to the blocks'
    owners ("route") or after, before the updates travel back ("gather"): every rank
    raises, and no rank changed a parameter."""
    _, _, two, _ = runs
    (first, untouched_first), (second, untouched_second) = (
        record["failures"][where] for record in two)
    assert first == "RuntimeError: injected" and untouched_first
    assert second.startswith("PeerFailure") and "rank(s) [0]" in second and untouched_second


def test_no_collective_moves_a_full_parameter_group(runs):
    """The gradient rows travel to the blocks' owners, the updates back to the rows'
    ranks: no collective of a step moves as many elements as the larger param group
    (the whole gradients' all-gather did, and the directions' all-gather buffer)."""
    _, _, two, three = runs
    params = workers.bitwise_params()
    group = max(sum(params[name].numel() for name in names)
                for names in (("w1", "w2", "mix"), ("w3", "b1", "b2", "b3")))
    assert all(record["largest_collective"] < group for record in two + three)


def test_overflow_is_decided_on_the_whole_gradient_from_the_ranks_rows(runs):
    _, _, two, _ = runs
    assert all(record["overflow"] == {"over": 1, "under": 0} for record in two)


def test_ranks_without_rows_or_blocks_of_a_group_and_unsharded_parameters_take_part(runs):
    _, single, two, three = runs
    assert all(_equal(record["small"], single["small"]) for record in two + three)


def test_parameters_swapped_after_the_plan_was_built_are_routed(runs):
    _, single, two, _ = runs
    assert all(_equal(record["swapped"], single["bitwise"]["shampoo"]["params"])
               for record in two)


@pytest.mark.parametrize("swap_at", [0, 3])
def test_swapped_parameters_keep_their_state(swap_at):
    """accelerate's FSDP2 prepare replaces the optimizer's parameters in ``param_groups``
    (by their sharded DTensors) after it was built, here after ``sharded_state_dict()``
    made its template state or after 3 steps: the state follows the new tensors and the
    run is the unswapped one, bit for bit."""
    _, params = fsdp2.bag(False)
    opt = fsdp2.Shampoo(fsdp2.groups(params, "shampoo"))
    opt.sharded_state_dict()
    for step in range(swap_at):
        fsdp2.manual_step(opt, params, step)
    clones = {k: torch.nn.Parameter(v.detach().clone()) for k, v in params.items()}
    mapping = {id(params[k]): clones[k] for k in params}
    for group in opt.param_groups:
        group["params"] = [mapping[id(p)] for p in group["params"]]
    for step in range(swap_at, fsdp2.STEPS):
        fsdp2.manual_step(opt, clones, step)
    assert all(p in opt.state and "blocks" in opt.state[p] for p in clones.values())
    assert _equal(fsdp2.full_params(clones), fsdp2.train("shampoo", False)["params"])
