"""Ranks for tests/test_sharded.py: Shampoo on FSDP2 (``fully_shard``) parameters, gloo on
the CPU, launched by tests/distributed_workers.py's ``run_ranks``.

Two workloads. The *bitwise* one (distributed_workers' bitwise parameters, in a module
sharded by ``fully_shard``): every rank computes the whole batch's gradient from the full
parameters and keeps its rows of it as the DTensor gradient, so the gradients are those
of one process and a comparison tests the optimizer alone, at any world size. The
*model* one: a ``fully_shard`` MLP trained by FSDP2's own forward and backward on each
rank's share of the batch (its reduce-scatter sums in another order than one process).
Besides: injected failures, the collectives' sizes, large gradients, swapped parameters
and small one-block groups.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from scalable_shampoo import Shampoo
from scalable_shampoo.distributed import PeerFailure, load_checkpoint, save_checkpoint
from tests import distributed_workers as workers

STEPS, SAVE_AT, POISON_AT = 12, 8, 4
MODEL_STEPS = 50
# root_delay 2: after step 8 the roots launched at step 8 (group 1) are not yet in use:
# the checkpoint holds them.
DELAYED = {"root_delay": 2}


class Bag(torch.nn.Module):
    """The bitwise workload's parameters as a module (what ``fully_shard`` shards)."""

    def __init__(self) -> None:
        super().__init__()
        self.p = torch.nn.ParameterDict(OrderedDict(workers.bitwise_params()))  # in order


def bag(sharded: bool) -> tuple[Bag, dict[str, torch.Tensor]]:
    module = Bag()
    if sharded:
        fully_shard(module)
    return module, dict(module.p.items())


def groups(params: dict[str, torch.Tensor], variant: str, **extra: Any) -> list[dict[str, Any]]:
    return [{**g, **extra} for g in workers.bitwise_groups(params, variant)]


def give_grads(params: dict[str, torch.Tensor], step: int,
               edit: Callable[[dict[str, torch.Tensor]], None] | None = None) -> None:
    """Step ``step``'s gradient of the whole batch (``edit`` may change it), each DTensor
    given its rows of it."""
    full = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().requires_grad_()
            for k, v in params.items()}
    workers.bitwise_loss(full, step).backward()
    grads = {name: full[name].grad for name in params}
    if edit is not None:
        edit(grads)
    for name, param in params.items():
        param.grad = (distribute_tensor(grads[name], param.device_mesh, param.placements,
                                        src_data_rank=None)
                      if isinstance(param, DTensor) else grads[name])


def _poison(grads: dict[str, torch.Tensor]) -> None:
    grads["w1"][-1, 0] = float("nan")


def manual_step(opt: Shampoo, params: dict[str, torch.Tensor], step: int,
                poison: bool = False) -> None:
    """One step on the whole batch's gradient (each DTensor gets its rows of it); with
    ``poison`` w1's gradient has a NaN (on the last rank's rows when sharded)."""
    opt.zero_grad()
    give_grads(params, step, _poison if poison else None)
    opt.step()


def full_params(params: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [(p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for p in params.values()]


def train(variant: str, sharded: bool, stop: int = STEPS, poison_at: int | None = None,
          **options: Any) -> dict[str, Any]:
    """The bitwise workload, one process (``sharded=False``) or this rank."""
    _, params = bag(sharded)
    extra = {k: v for k, v in options.items() if k in ("root_delay",)}
    constructor = {k: v for k, v in options.items() if k not in extra}
    opt = Shampoo(groups(params, variant, **extra), **constructor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the poisoned step's warning
        for step in range(stop):
            manual_step(opt, params, step, poison=step == poison_at)
    opt.close()
    metrics = opt.metrics()
    return {"params": full_params(params), "metrics": metrics}


# ------------------------------------------------------------------- checkpoints
def _resume(params: dict[str, torch.Tensor], opt: Shampoo) -> list[torch.Tensor]:
    for step in range(SAVE_AT, STEPS):
        manual_step(opt, params, step)
    return full_params(params)


def checkpoint_runs(rank: int, out: Path) -> dict[str, Any]:
    """Saves at SAVE_AT with ``save_checkpoint`` and with DCP's
    ``get_model_state_dict`` / ``get_optimizer_state_dict`` (pending roots in flight),
    trains on; then resumes each in a fresh sharded module and optimizer."""
    module, params = bag(True)
    opt = Shampoo(groups(params, "shampoo", **DELAYED))
    record: dict[str, Any] = {}
    for step in range(STEPS):
        manual_step(opt, params, step)
        if step + 1 == SAVE_AT:
            record["in_flight"] = opt.metrics()["roots_in_flight"]
            save_checkpoint(out / "ours", opt, model=module)
            dcp.save({"model": get_model_state_dict(module),
                      "optimizer": get_optimizer_state_dict(module, opt)},
                     checkpoint_id=out / "dcp")
    record["uninterrupted"] = full_params(params)
    record.update(resume(out))
    return record


def resume(out: Path) -> dict[str, Any]:
    """The checkpoints of :func:`checkpoint_runs` resumed here (any world size)."""
    record = {}
    module, params = bag(True)
    opt = Shampoo(groups(params, "shampoo", **DELAYED))
    load_checkpoint(out / "ours", opt, model=module)
    record["ours_resumed"] = _resume(params, opt)
    module, params = bag(True)
    opt = Shampoo(groups(params, "shampoo", **DELAYED))
    state = {"model": get_model_state_dict(module),
             "optimizer": get_optimizer_state_dict(module, opt)}
    dcp.load(state, checkpoint_id=out / "dcp")
    set_model_state_dict(module, state["model"])
    set_optimizer_state_dict(module, opt, state["optimizer"])
    record["dcp_resumed"] = _resume(params, opt)
    return record


# ------------------------------------------------------------------- FSDP2 model
def train_model(world_size: int, rank: int, steps: int = MODEL_STEPS,
                dtype: torch.dtype = torch.float64) -> dict[str, Any]:
    """The MLP under ``fully_shard`` (each Linear, then the root), FSDP2's own backward
    on this rank's share of each batch."""
    model = workers.make_model(dtype)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = Shampoo(model.parameters(), **workers.DDP_OPTIONS)
    for step in range(steps):
        opt.zero_grad()
        workers.loss_of(model, *workers.batch(step, rank, world_size, dtype)).backward()
        opt.step()
    return {"params": [p.full_tensor().detach().clone() for p in model.parameters()],
            "metrics": opt.metrics()}


# ------------------------------------------------------------------- refusals
def refusals(world_size: int) -> dict[str, str]:
    """The messages of what is refused at construction."""
    mesh = init_device_mesh("cpu", (world_size,))
    flat = torch.randn(6, 4)
    cases = {
        "shard1": distribute_tensor(flat, mesh, [Shard(1)]),
        "replicate": distribute_tensor(flat, mesh, [Replicate()]),
        "mesh2d": distribute_tensor(flat, init_device_mesh("cpu", (world_size, 1)),
                                    [Shard(0), Replicate()]),
        # torch.chunk's rows, transposed in memory
        "strided": DTensor.from_local(torch.randn(4, 6 // world_size).t(), mesh, [Shard(0)],
                                      run_check=False, shape=(6, 4), stride=(4, 1)),
    }
    messages = {}
    for name, tensor in cases.items():
        param = torch.nn.Parameter(tensor)
        try:
            Shampoo([{"params": [torch.nn.Parameter(torch.randn(3)), param],
                      "param_names": ["bias", f"layer.{name}"]}])
            messages[name] = "accepted"
        except ValueError as error:
            messages[name] = str(error)
    return messages


def failure(rank: int, owner: Any, name: str, call: int) -> tuple[str, bool]:
    """Rank 0 fails at the ``call``-th call of ``owner.name`` in the second step: every
    rank raises (the others PeerFailure) instead of waiting. Returns the outcome and
    whether the parameters are those before the step (the failing group's update is
    applied on no rank)."""
    _, params = bag(True)
    opt = Shampoo(groups(params, "shampoo"))
    manual_step(opt, params, 0)
    before = full_params(params)
    original = getattr(owner, name)
    calls = []

    def broken(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if rank == 0 and len(calls) == call:
            raise RuntimeError("injected")
        return original(*args, **kwargs)

    setattr(owner, name, broken)
    try:
        manual_step(opt, params, 1)
        outcome = "ok"
    except PeerFailure as error:
        outcome = f"PeerFailure: {error}"
    except RuntimeError as error:
        outcome = f"RuntimeError: {error}"
    finally:
        setattr(owner, name, original)
    return outcome, all(torch.equal(a, b) for a, b in zip(before, full_params(params)))


def failures(rank: int) -> dict[str, tuple[str, bool]]:
    """Rank 0 fails in the second group before its agreement (preparing the apply), or
    in the first group after it: before the gradient rows travel to the blocks' owners,
    or after, before the updates travel back."""
    from scalable_shampoo import plans
    from scalable_shampoo.distributed import DataParallel

    return {"prepare": failure(rank, plans.ApplyPlan, "prepare", 2),
            "route": failure(rank, DataParallel, "route", 1),
            "gather": failure(rank, DataParallel, "gather", 1)}


# ------------------------------------------------------------------- routing
COLLECTIVES = ("all_gather_into_tensor", "all_gather_single", "all_to_all_single",
               "all_reduce", "all_gather")


def largest_collective(steps: int = 3) -> int:
    """The elements of the largest tensor a collective of ``Shampoo.step`` moved on this
    rank in the bitwise workload's first steps (which check the structure, too)."""
    sizes: list[int] = []
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def recorded(collective: Any) -> Any:
        def run(tensor: Any, *args: Any, **kwargs: Any) -> Any:
            sizes.append(tensor.numel() if isinstance(tensor, torch.Tensor)
                         else sum(t.numel() for t in tensor))
            return collective(tensor, *args, **kwargs)
        return run

    _, params = bag(True)
    opt = Shampoo(groups(params, "shampoo"))
    for step in range(steps):
        opt.zero_grad()
        give_grads(params, step)
        for name, collective in originals.items():
            setattr(dist, name, recorded(collective))
        try:
            opt.step()
        finally:
            for name, collective in originals.items():
                setattr(dist, name, collective)
    return max(sizes)


def overflow() -> dict[str, int]:
    """w1's gradient (float32) with two large entries, in rows 0 and 11 (on different
    ranks at 2 ranks), each rank's rows' norm below the limit (1.8e19) but above it
    over the square root of the world size: skipped on every rank when the whole norm
    is above the limit (1.5e19 twice), as under DDP, not when it is below (1.5e19 and
    0.5e19), decided by the sum of the ranks' squares. Returns the skips counted."""
    skips = {}
    for case, (first, last) in {"over": (1.5e19, 1.5e19), "under": (1.5e19, 0.5e19)}.items():
        def large(grads: dict[str, torch.Tensor]) -> None:
            grads["w1"][0, 0], grads["w1"][-1, 0] = first, last

        _, params = bag(True)
        opt = Shampoo(groups(params, "shampoo"))
        give_grads(params, 0, large)
        opt.step()
        skips[case] = opt.metrics()["overflow_grad_skips"]
    return skips


SMALL_SHAPES = {"a": (5, 3), "b": (2, 4), "c": (4, 4)}


def small(sharded: bool, steps: int = 4) -> list[torch.Tensor]:
    """One-block parameters: ``a`` and ``b`` (``fully_shard``'s) in param groups of their
    own, with ``c`` (not sharded: the same on every rank, as under DDP) in ``a``'s. At 2
    and 3 ranks some rank owns no block of a group, at 3 ranks one holds no row of
    ``b``; they take part in the all-to-alls all the same. One process
    (``sharded=False``) or this rank."""
    gen = torch.Generator().manual_seed(7)
    module = torch.nn.Module()
    module.p = torch.nn.ParameterDict({name: torch.nn.Parameter(torch.randn(shape, generator=gen))
                                       for name, shape in SMALL_SHAPES.items() if name != "c"})
    plain = torch.nn.Parameter(torch.randn(SMALL_SHAPES["c"], generator=gen))
    if sharded:
        fully_shard(module)
    params = {**module.p, "c": plain}
    opt = Shampoo([{"params": [params["a"], params["c"]]}, {"params": [params["b"]]}],
                  lr=0.01, block_size=8, precondition_frequency=2)
    for _ in range(steps):
        for param in params.values():
            grad = torch.randn(param.shape, generator=gen)
            param.grad = (distribute_tensor(grad, param.device_mesh, param.placements,
                                            src_data_rank=None)
                          if isinstance(param, DTensor) else grad)
        opt.step()
    return full_params(params)


def swapped() -> list[torch.Tensor]:
    """The plan built (by ``sharded_state_dict()``) on plain parameters, which are then
    swapped in ``param_groups`` for their ``fully_shard`` DTensors (as accelerate's FSDP2
    prepare does): the run is the unswapped one."""
    _, plain = bag(False)
    opt = Shampoo(groups(plain, "shampoo"))
    opt.sharded_state_dict()
    _, params = bag(True)
    mapping = {id(plain[k]): params[k] for k in plain}
    for group in opt.param_groups:
        group["params"] = [mapping[id(p)] for p in group["params"]]
    for step in range(STEPS):
        manual_step(opt, params, step)
    return full_params(params)


# ------------------------------------------------------------------------ ranks
def two_ranks(rank: int, world_size: int, out: Path) -> None:
    record: dict[str, Any] = {
        "bitwise": {v: train(v, True) for v in workers.BITWISE_VARIANTS},
        "replicated": train("shampoo", True, distributed=False),
        "async": train("eigenvalue_corrected", True, async_roots=True, root_workers=1,
                       **DELAYED),
        "poisoned": train("shampoo", True, poison_at=POISON_AT),
        "model": train_model(world_size, rank, dtype=torch.float32),
        "refusals": refusals(world_size),
        "failures": failures(rank),
        "largest_collective": largest_collective(),
        "overflow": overflow(),
        "swapped": swapped(),
        "small": small(True),
    }
    record.update(checkpoint_runs(rank, out))
    torch.save(record, out / f"two_{rank}.pt")


def three_ranks(rank: int, world_size: int, out: Path) -> None:
    """The bitwise workload and the model at 3 ranks; the 2-rank checkpoints resumed."""
    record = {"bitwise": {v: train(v, True) for v in workers.BITWISE_VARIANTS},
              "model": train_model(world_size, rank, dtype=torch.float32),
              "largest_collective": largest_collective(), "small": small(True),
              **resume(out)}
    dist.barrier()
    torch.save(record, out / f"three_{rank}.pt")
