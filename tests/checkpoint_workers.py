"""Ranks for tests/test_ddp_checkpoints.py: checkpoints of data-parallel Shampoo made the
ways frameworks make them (every rank calls ``state_dict()`` and rank 0 writes it; DCP's
``get_optimizer_state_dict`` / ``set_optimizer_state_dict``; rank 0 alone calling
``state_dict()``, which must fail at once, at save time). Launched by
tests/distributed_workers.py's ``run_ranks``."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)

from scalable_shampoo import Shampoo, distributed_state
from tests import distributed_workers as workers

STEPS, SAVE_AT = 12, 7
# Roots launched at step 7 go into use at step 9: the checkpoint holds them pending.
OPTIONS = dict(lr=0.01, block_size=8, max_preconditioned_dim=20, precondition_frequency=3,
               start_preconditioning_step=1, root_delay=2, epsilon=1e-6,
               factor_dtype=torch.float64, weight_decay=0.01)


def _setup() -> tuple[torch.nn.Module, torch.nn.Module, Shampoo]:
    model = workers.make_model(torch.float64)
    return model, torch.nn.parallel.DistributedDataParallel(model), Shampoo(model.parameters(),
                                                                            **OPTIONS)


def _train(rank: int, world_size: int, ddp: torch.nn.Module, opt: Shampoo, start: int,
           stop: int, at_save: Callable[[], None] | None = None) -> None:
    for step in range(start, stop):
        opt.zero_grad()
        workers.loss_of(ddp, *workers.batch(step, rank, world_size, torch.float64)).backward()
        opt.step()
        if at_save is not None and step + 1 == SAVE_AT:
            at_save()


def _sharded_equal(a: dict[str, Any], b: dict[str, Any]) -> bool:
    def same(x: Any, y: Any) -> bool:
        if isinstance(x, dict):
            return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        if isinstance(x, (list, tuple)):
            return len(x) == len(y) and all(same(u, v) for u, v in zip(x, y))
        return torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
    return same(a["state"], b["state"])


def checkpoints(rank: int, world_size: int, out: Path) -> None:
    """The uninterrupted run saves, at SAVE_AT, (1) every rank's gathered
    ``state_dict()`` written by rank 0 and (2) DCP checkpoints through
    ``get_optimizer_state_dict`` (default and full options); each is resumed in fresh
    models and optimizers and trained to the end; then rank 0 alone calls
    ``state_dict()``."""
    model, ddp, opt = _setup()
    record: dict[str, Any] = {}

    def save() -> None:
        before = opt.sharded_state_dict()
        full = opt.state_dict()
        record["in_flight"] = opt.metrics()["roots_in_flight"]
        record["owned_blocks"] = opt.metrics()["owned_blocks"]
        record["full_blocks"] = sum(len(e["blocks"]) for e in full["state"].values())
        record["full_bytes"] = sum(t.numel() * t.element_size() for e in full["state"].values()
                                   for b in e["blocks"] for t in _tensors(b))
        record["own_bytes"] = opt.metrics()["state_bytes"]
        if rank == 0:
            torch.save({"model": model.state_dict(), "optimizer": full}, out / "rank0.pt")
        for name, options in (("dcp", None), ("dcp_full", StateDictOptions(full_state_dict=True))):
            dcp.save({"optimizer": get_optimizer_state_dict(model, opt, options=options)},
                     checkpoint_id=out / name)
        record["untouched"] = _sharded_equal(before, opt.sharded_state_dict())
        dist.barrier()

    _train(rank, world_size, ddp, opt, 0, STEPS, at_save=save)
    record["uninterrupted"] = workers.params_of(model)
    saved = torch.load(out / "rank0.pt", weights_only=True)
    model, ddp, opt = _setup()
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    _train(rank, world_size, ddp, opt, SAVE_AT, STEPS)
    record["rank0_resumed"] = workers.params_of(model)
    for name, options in (("dcp", None), ("dcp_full", StateDictOptions(full_state_dict=True))):
        model, ddp, opt = _setup()
        model.load_state_dict(saved["model"])
        template = {"optimizer": get_optimizer_state_dict(model, opt, options=options)}
        dcp.load(template, checkpoint_id=out / name)
        set_optimizer_state_dict(model, opt, template["optimizer"], options=options)
        _train(rank, world_size, ddp, opt, SAVE_AT, STEPS)
        record[f"{name}_resumed"] = workers.params_of(model)
    distributed_state.TIMEOUT_S = 2.0
    if rank == 0:  # the HF Trainer / "if rank == 0: torch.save(opt.state_dict())" recipe
        try:
            opt.state_dict()
            record["rank0_alone"] = ("ok", "")
        except RuntimeError as error:
            record["rank0_alone"] = ("RuntimeError", str(error))
    dist.barrier()
    torch.save(record, out / f"record_{rank}.pt")
    replica(rank, world_size, out)


def _tensors(block: dict[str, Any]) -> list[torch.Tensor]:
    found = []
    for value in block.values():
        values = value if isinstance(value, list) else [value]
        found += [v for v in values if isinstance(v, torch.Tensor)]
    return found


def replica(rank: int, world_size: int, out: Path) -> None:
    """HF Trainer's recipe with the documented fix (distributed=False): rank 0 alone
    saves, every rank resumes, and the run continues exactly."""
    def setup() -> tuple[torch.nn.Module, torch.nn.Module, Shampoo]:
        model = workers.make_model(torch.float64)
        return (model, torch.nn.parallel.DistributedDataParallel(model),
                Shampoo(model.parameters(), **OPTIONS, distributed=False))

    model, ddp, opt = setup()

    def save() -> None:
        if rank == 0:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()},
                       out / "replica.pt")
        dist.barrier()

    _train(rank, world_size, ddp, opt, 0, STEPS, at_save=save)
    uninterrupted = workers.params_of(model)
    model, ddp, opt = setup()
    saved = torch.load(out / "replica.pt", weights_only=True)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(copy.deepcopy(saved["optimizer"]))
    _train(rank, world_size, ddp, opt, SAVE_AT, STEPS)
    torch.save({"uninterrupted": uninterrupted, "resumed": workers.params_of(model)},
               out / f"replica_{rank}.pt")


def resume_at_three(rank: int, world_size: int, out: Path) -> None:
    """The 2-rank checkpoints resumed at 3 ranks: rank 0's gathered ``state_dict()``
    file and the DCP checkpoint through ``set_optimizer_state_dict``."""
    saved = torch.load(out / "rank0.pt", weights_only=True)
    results = {}
    for name in ("rank0", "dcp"):
        model, ddp, opt = _setup()
        model.load_state_dict(saved["model"])
        if name == "rank0":
            opt.load_state_dict(saved["optimizer"])
        else:
            template = {"optimizer": get_optimizer_state_dict(model, opt)}
            dcp.load(template, checkpoint_id=out / "dcp")
            set_optimizer_state_dict(model, opt, template["optimizer"])
        _train(rank, world_size, ddp, opt, SAVE_AT, STEPS)
        results[name] = workers.params_of(model)
    torch.save(results, out / f"three_{rank}.pt")
