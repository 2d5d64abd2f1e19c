"""Ranks for tests/test_sharded.py: Shampoo on FSDP2 (``fully_shard``) parameters, gloo on
the CPU, launched by tests/distributed_workers.py's ``run_ranks``.

Two workloads. The *bitwise* one (distributed_workers' bitwise parameters, in a module
sharded by ``fully_shard``): every rank computes the whole batch's gradient from the full
parameters and keeps its rows of it as the DTensor gradient, so the gradients are those
of one process and a comparison tests the optimizer alone, at any world size. The
*model* one: a ``fully_shard`` MLP trained by FSDP2's own forward and backward on each
rank's share of the batch (its reduce-scatter sums in another order than one process).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

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


def manual_step(opt: Shampoo, params: dict[str, torch.Tensor], step: int,
                poison: bool = False) -> None:
    """One step on the whole batch's gradient (each DTensor gets its rows of it); with
    ``poison`` w1's gradient has a NaN (on the last rank's rows when sharded)."""
    opt.zero_grad()
    full = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().requires_grad_()
            for k, v in params.items()}
    workers.bitwise_loss(full, step).backward()
    for name, param in params.items():
        grad = full[name].grad
        if poison and name == "w1":
            grad[-1, 0] = float("nan")
        param.grad = (distribute_tensor(grad, param.device_mesh, param.placements,
                                        src_data_rank=None)
                      if isinstance(param, DTensor) else grad)
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


def failure(rank: int) -> str:
    """Rank 0 fails in the second group's step, before its gradient gather: every rank
    raises (the others PeerFailure) instead of waiting."""
    from scalable_shampoo import plans

    _, params = bag(True)
    opt = Shampoo(groups(params, "shampoo"))
    manual_step(opt, params, 0)
    original = plans.ApplyPlan.prepare
    calls = []

    def broken(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if rank == 0 and len(calls) == 2:
            raise RuntimeError("injected")
        return original(*args, **kwargs)

    plans.ApplyPlan.prepare = broken
    try:
        manual_step(opt, params, 1)
        outcome = "ok"
    except PeerFailure as error:
        outcome = f"PeerFailure: {error}"
    except RuntimeError as error:
        outcome = f"RuntimeError: {error}"
    finally:
        plans.ApplyPlan.prepare = original
    return outcome


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
        "failure": failure(rank),
    }
    record.update(checkpoint_runs(rank, out))
    torch.save(record, out / f"two_{rank}.pt")


def three_ranks(rank: int, world_size: int, out: Path) -> None:
    """The bitwise workload and the model at 3 ranks; the 2-rank checkpoints resumed."""
    record = {"bitwise": {v: train(v, True) for v in workers.BITWISE_VARIANTS},
              "model": train_model(world_size, rank, dtype=torch.float32), **resume(out)}
    dist.barrier()
    torch.save(record, out / f"three_{rank}.pt")
