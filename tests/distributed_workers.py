"""Multi-process runs for tests/test_distributed.py: a launcher (spawned CPU processes,
gloo, a free port, timeouts on every collective and on the whole run), the shared
workload, and the functions the ranks run. Kept apart from the test module so that
the spawned processes import torch and the library only."""

from __future__ import annotations

import datetime
import math
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from scalable_shampoo import Shampoo
from scalable_shampoo.distributed import PeerFailure, load_checkpoint, save_checkpoint

STEPS = 32
SAVE_AT = 16
BATCH = 24  # divisible by 2 and 3: every rank's mean loss weighs equally
COLLECTIVE_TIMEOUT_S = 60

# float32 through DDP: uneven blocks (block_size 8 cuts 24x10, 20x24, 3x20 and the biases
# into blocks of 8x8, 8x2, 4x8, 3x4, ...; dimensions above 20 get no factor).
DDP_OPTIONS = dict(lr=0.01, block_size=8, max_preconditioned_dim=20, precondition_frequency=4,
                   epsilon=1e-4, weight_decay=0.01)
# float64 with manual all-reduce: two groups, so the assignment carries loads over groups.
WEIGHT_OPTIONS = dict(lr=0.02, block_size=8, max_preconditioned_dim=20,
                      precondition_frequency=3, start_preconditioning_step=2, epsilon=1e-6,
                      factor_dtype=torch.float64, betas=(0.9, 0.99), nesterov=True,
                      weight_decay=0.01, decoupled_weight_decay=False)
BIAS_OPTIONS = dict(lr=0.01, grafting="sgd", betas=(0.5, 1.0), block_size=8)
# The "async" variant: roots delayed by 3 steps (so the checkpoint at SAVE_AT holds roots
# computed but not yet in use) and the biases eigenvalue-corrected, whose bases are
# delayed the same way; the ranks compute them on background workers.
ASYNC_WEIGHT_OPTIONS = dict(WEIGHT_OPTIONS, root_delay=3)
ASYNC_BIAS_OPTIONS = dict(lr=0.01, preconditioner="eigenvalue_corrected", betas=(0.9, 0.99),
                          block_size=8, precondition_frequency=3, root_delay=2)


def make_model(dtype: torch.dtype) -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(10, 24), torch.nn.Tanh(), torch.nn.Linear(24, 20),
                                torch.nn.Tanh(), torch.nn.Linear(20, 3)).to(dtype)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) / math.sqrt(p.shape[-1]))
    return model


def param_groups(model: torch.nn.Module, variant: str | None = None) -> list[dict[str, Any]]:
    weights = [p for p in model.parameters() if p.dim() > 1]
    biases = [p for p in model.parameters() if p.dim() == 1]
    if variant == "async":
        return [{"params": weights, **ASYNC_WEIGHT_OPTIONS},
                {"params": biases, **ASYNC_BIAS_OPTIONS}]
    return [{"params": weights, **WEIGHT_OPTIONS}, {"params": biases, **BIAS_OPTIONS}]


def batch(step: int, rank: int = 0, world_size: int = 1,
          dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s global batch (the same on every rank), or rank ``rank``'s share."""
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(BATCH, 10, generator=gen, dtype=dtype)
    y = torch.randn(BATCH, 3, generator=gen, dtype=dtype)
    share = BATCH // world_size
    return x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]


def loss_of(model: Callable, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def params_of(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def train_single(dtype: torch.dtype, grouped: bool, start: int = 0, stop: int = STEPS,
                 model: torch.nn.Module | None = None, opt: Shampoo | None = None,
                 variant: str | None = None) -> tuple[torch.nn.Module, Shampoo]:
    """The one-process run on whole batches, steps ``start`` to ``stop`` (synchronous
    roots, also for the "async" variant: the trajectory is the same)."""
    model = model or make_model(dtype)
    opt = opt or Shampoo(param_groups(model, variant) if grouped else model.parameters(),
                         **({} if grouped else DDP_OPTIONS))
    for step in range(start, stop):
        opt.zero_grad()
        loss_of(model, *batch(step, dtype=dtype)).backward()
        opt.step()
    return model, opt


# ------------------------------------------------------------------ bitwise workload
# Every rank computes the whole batch's gradient on its replica, so that the gradients
# are those of one process and a comparison tests the optimizer alone (DDP's all-reduce
# sums in another order). float32; block_size 4 and max_preconditioned_dim 12 cut every
# weight into blocks the ranks share: w1 (12, 6) into 4x4 and 4x2 blocks, w2 (2, 2, 3, 12)
# merges to (4, 3, 12) with three factors, mix (3, 24) keeps its 24 whole (no factor);
# the biases get factors too in the classic groups. Units 8-11 of the first layer are
# dead: their blocks' gradients, and so their grafted norms, are exactly zero (which once
# sent the norms of the other blocks of their stack, and only of those, another way).
BITWISE_STEPS = 60
BITWISE_BATCH = 16
BITWISE_SHAPES = {"w1": (12, 6), "b1": (12,), "w2": (2, 2, 3, 12), "b2": (12,), "w3": (3, 12),
                  "b3": (3,), "mix": (3, 24)}
_SHARED = dict(block_size=4, max_preconditioned_dim=12, epsilon=1e-6)
BITWISE_VARIANTS = {
    "shampoo": [dict(_SHARED, lr=0.02, betas=(0.9, 0.99), weight_decay=0.01,
                     precondition_frequency=5, start_preconditioning_step=3),
                dict(_SHARED, lr=0.01, betas=(0.5, 0.999), nesterov=True, weight_decay=0.02,
                     decoupled_weight_decay=False, grafting="sgd", precondition_frequency=4,
                     precondition_1d=True)],
    "eigenvalue_corrected": [
        dict(_SHARED, preconditioner="eigenvalue_corrected", lr=3e-3, betas=(0.95, 0.95),
             precondition_frequency=10, weight_decay=0.01),
        dict(_SHARED, preconditioner="eigenvalue_corrected", lr=2e-3, betas=(0.95, 0.95),
             precondition_frequency=10, weight_decay=0.02, decoupled_weight_decay=False,
             grafting="adam")],
}


def bitwise_params() -> dict[str, torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(5)
    return {name: torch.nn.Parameter(torch.randn(shape, generator=gen) / math.sqrt(shape[-1]))
            for name, shape in BITWISE_SHAPES.items()}


def bitwise_groups(params: dict[str, torch.nn.Parameter], variant: str) -> list[dict[str, Any]]:
    first, second = BITWISE_VARIANTS[variant]
    return [{"params": [params["w1"], params["w2"], params["mix"]], **first},
            {"params": [params["w3"], params["b1"], params["b2"], params["b3"]], **second}]


def bitwise_loss(params: dict[str, torch.nn.Parameter], step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(2000 + step)
    x = torch.randn(BITWISE_BATCH, 6, generator=gen)
    y = torch.randn(BITWISE_BATCH, 3, generator=gen)
    alive = (torch.arange(12) < 8).to(x.dtype)
    h = torch.tanh(x @ params["w1"].T + params["b1"]) * alive
    h = torch.tanh(h @ params["w2"].reshape(12, 12).T + params["b2"])
    features = torch.cat([x, x**2, torch.sin(x), torch.cos(x)], dim=1)
    out = h @ params["w3"].T + params["b3"] + torch.tanh(features @ params["mix"].T)
    return ((out - y) ** 2).mean()


def train_bitwise(variant: str, steps: int = BITWISE_STEPS) -> dict[str, Any]:
    """The parameters after ``steps`` and the blocks owned (one process, or this rank of
    a process group)."""
    params = bitwise_params()
    opt = Shampoo(bitwise_groups(params, variant))
    for step in range(steps):
        opt.zero_grad()
        bitwise_loss(params, step).backward()
        opt.step()
    metrics = opt.metrics()
    return {"params": [p.detach().clone() for p in params.values()],
            "owned_blocks": metrics["owned_blocks"], "num_blocks": metrics["num_blocks"]}


# ---------------------------------------------------------------------- launcher
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, target: Callable, args: tuple) -> None:
    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        target(rank, world_size, *args)
        dist.barrier()  # nobody tears the group down while another still uses it
    finally:
        dist.destroy_process_group()
    # Success ends the process here, before interpreter finalization: there gloo's worker
    # thread may still be releasing a collective's tensors, which takes the GIL and, in a
    # finalizing interpreter, aborts the rank (tests/frameworks/rank_exit.py has the
    # core dump's account). A failure above leaves by the exception, as before.
    os._exit(0)


def run_ranks(world_size: int, target: Callable, *args: Any, timeout_s: float = 240) -> None:
    """Runs ``target(rank, world_size, *args)`` in ``world_size`` spawned processes; a
    rank's exception is raised here, a run past ``timeout_s`` fails."""
    context = mp.start_processes(_entry, args=(world_size, _free_port(), target, args),
                                 nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            raise TimeoutError(f"{world_size} ranks of {target.__name__} ran past {timeout_s} s")


# ------------------------------------------------------------------------- ranks
def _same_on_all_ranks(model: torch.nn.Module, group: Any = None) -> bool:
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    everyone = [torch.empty_like(flat) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, flat, group=group)
    return all(torch.equal(flat, other) for other in everyone)


def one_block(group: Any = None) -> tuple[torch.Tensor, Shampoo, bool]:
    """A single parameter of a single block, the same gradients on every rank: over
    several ranks, all but one own nothing (and take part all the same). Returns the
    parameter, the optimizer and whether the ranks agreed bitwise after every step."""
    holder = torch.nn.Linear(4, 5, bias=False)
    with torch.no_grad():
        holder.weight.copy_(torch.randn(5, 4, generator=torch.Generator().manual_seed(0)))
    opt = Shampoo(holder.parameters(), lr=0.05, block_size=8, precondition_frequency=2,
                  process_group=group)
    gen = torch.Generator().manual_seed(1)
    identical = True
    for _ in range(8):
        holder.weight.grad = torch.randn(5, 4, generator=gen)
        opt.step()
        identical = identical and (group is None or _same_on_all_ranks(holder, group))
    return holder.weight.detach().clone(), opt, identical


def _one_block_ranks(group: Any = None) -> dict[str, Any]:
    param, opt, identical = one_block(group)
    return {"param": param, "identical": identical, "owned_blocks": opt.metrics()["owned_blocks"]}


def _train_ranks(rank: int, world_size: int, dtype: torch.dtype, grouped: bool,
                 checkpoint: Path | None = None, resume_from: Path | None = None,
                 variant: str | None = None) -> dict:
    """DDP (float32, one group) or manual all-reduce (float64, two groups) on this
    rank's share of every batch; optionally saves at SAVE_AT or resumes from there.
    The "async" variant computes its roots on background workers."""
    model = make_model(dtype)
    opt = Shampoo(param_groups(model, variant) if grouped else model.parameters(),
                  **({} if grouped else DDP_OPTIONS), async_roots=variant == "async")
    forward = model if grouped else torch.nn.parallel.DistributedDataParallel(model)
    start = 0
    if resume_from is not None:
        load_checkpoint(resume_from, opt, model=model)
        start = SAVE_AT
    identical = []
    for step in range(start, STEPS):
        opt.zero_grad()
        loss_of(forward, *batch(step, rank, world_size, dtype)).backward()
        if grouped:
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad.div_(world_size)
        opt.step()
        identical.append(_same_on_all_ranks(model))
        if checkpoint is not None and step + 1 == SAVE_AT:
            in_flight = opt.metrics()["roots_in_flight"]
            save_checkpoint(checkpoint, opt, model=model)
    opt.close()
    return {"params": params_of(model), "identical": identical, "metrics": opt.metrics(),
            **({"in_flight_at_save": in_flight} if checkpoint is not None else {})}


def train_two_ranks(rank: int, world_size: int, out: Path) -> None:
    """Both runs (the float64 one saves a checkpoint), then the failure scenarios."""
    results = {"ddp": _train_ranks(rank, world_size, torch.float32, grouped=False),
               "manual": _train_ranks(rank, world_size, torch.float64, grouped=True,
                                      checkpoint=out / "checkpoint"),
               "async": _train_ranks(rank, world_size, torch.float64, grouped=True,
                                     checkpoint=out / "async_checkpoint", variant="async"),
               "one_block": _one_block_ranks(dist.group.WORLD),
               "bitwise": {variant: train_bitwise(variant) for variant in BITWISE_VARIANTS},
               "nonfinite": nonfinite_steps(),
               "mismatch": mismatches(rank),
               "failures": failures(rank, world_size)}
    torch.save(results, out / f"two_ranks_{rank}.pt")


def train_three_ranks(rank: int, world_size: int, out: Path, checkpoint: Path) -> None:
    results = {"ddp": _train_ranks(rank, world_size, torch.float32, grouped=False),
               "manual": _train_ranks(rank, world_size, torch.float64, grouped=True),
               "resumed": _train_ranks(rank, world_size, torch.float64, grouped=True,
                                       resume_from=checkpoint),
               "async_resumed": _train_ranks(rank, world_size, torch.float64, grouped=True,
                                             resume_from=checkpoint.parent / "async_checkpoint",
                                             variant="async"),
               "bitwise": {variant: train_bitwise(variant) for variant in BITWISE_VARIANTS}}
    pair = dist.new_group([0, 1])  # an explicit process_group that rank 2 is not in
    if rank < 2:
        results["pair"] = _one_block_ranks(pair)
    else:
        results["pair"] = _outcome(lambda: Shampoo([torch.nn.Parameter(torch.ones(2))],
                                                   process_group=pair))
    torch.save(results, out / f"three_ranks_{rank}.pt")


def _outcome(call: Callable[[], Any]) -> tuple[str, str]:
    try:
        call()
    except Exception as error:  # the test checks which error each rank saw
        return type(error).__name__, str(error)
    return "ok", ""


def nonfinite_steps() -> dict[str, Any]:
    """Two steps, then one whose every gradient is NaN (under DDP: rank 1's loss is, and
    the all-reduce spreads it), then one more; in one process or on this rank. Returns
    what the caller saw: the warnings, the metrics after each of the last two steps and
    whether the NaN step left the parameters as they were."""
    model = make_model(torch.float32)
    opt = Shampoo(model.parameters(), **DDP_OPTIONS)
    distributed = dist.is_available() and dist.is_initialized()
    forward = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    record: dict[str, Any] = {"metrics": []}
    for step in range(4):
        opt.zero_grad()
        loss = loss_of(forward, *batch(step, rank, world_size))
        if step == 2 and rank == world_size - 1:
            loss = loss * float("nan")
        loss.backward()
        before = params_of(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
        if step == 2:
            record["untouched"] = all(torch.equal(a, b) for a, b in zip(before, params_of(model)))
            record["warnings"] = [(w.category.__name__, str(w.message)) for w in caught]
        if step >= 2:
            metrics = opt.metrics()
            record["metrics"].append({k: metrics[k] for k in ("step", "nonfinite_grad_skips")})
    return record


# Per case: the options of rank 0 and rank 1, each on a fresh optimizer's first step.
MISMATCHES = {
    "lr": ({}, {"lr": 0.02}),
    "block_size": ({}, {"block_size": 4}),
    "preconditioner": ({}, {"preconditioner": "eigenvalue_corrected"}),
    "betas": ({}, {"betas": (0.9, 0.98)}),
    "rank 1 invalid": ({}, {"lr": -1.0}),
}


def mismatches(rank: int) -> dict[str, Any]:
    """Hyperparameters that differ across ranks: on a fresh optimizer's first step (the
    structure check), after a scheduler changed lr on rank 1 only at step 3 (the
    per-step check), and param groups that differ in number. What each rank saw, and
    whether the parameters stayed as they were and the same on both ranks."""
    record: dict[str, Any] = {}
    for case, options in MISMATCHES.items():
        model = make_model(torch.float32)
        opt = Shampoo(model.parameters(), **DDP_OPTIONS)
        opt.param_groups[0].update(options[rank])
        loss_of(model, *batch(0)).backward()
        before = params_of(model)
        record[case] = _outcome(opt.step)
        record[case + " untouched"] = all(torch.equal(a, b)
                                          for a, b in zip(before, params_of(model)))
    model = make_model(torch.float32)
    weights = [p for p in model.parameters() if p.dim() > 1]
    biases = [p for p in model.parameters() if p.dim() == 1]
    groups = [{"params": weights}, {"params": biases}] if rank else [{"params": weights + biases}]
    loss_of(model, *batch(0)).backward()
    record["groups"] = _outcome(Shampoo(groups, **DDP_OPTIONS).step)
    # lr from a scheduler that (wrongly) differs on rank 1 from step 3 on.
    model = make_model(torch.float32)
    opt = Shampoo(model.parameters(), **DDP_OPTIONS)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 if rank == 1 and step >= 3 else 1.0)
    outcomes = []
    for step in range(5):
        opt.zero_grad()
        loss_of(model, *batch(step)).backward()
        before = params_of(model)
        outcomes.append(_outcome(opt.step))
        if outcomes[-1][0] != "ok":
            record["scheduled untouched"] = all(torch.equal(a, b)
                                                for a, b in zip(before, params_of(model)))
            opt.param_groups[0]["lr"] = DDP_OPTIONS["lr"]  # repaired: training goes on
        else:
            schedule.step()
    record["scheduled"] = outcomes
    record["scheduled identical"] = _same_on_all_ranks(model)
    record["scheduled steps"] = opt.metrics()["step"]
    return record


def failures(rank: int, world_size: int) -> dict[str, Any]:
    """Errors on one rank, one after the other in one process group: what each rank saw."""
    import scalable_shampoo.preconditioner as preconditioner

    model = make_model(torch.float64)
    opt = Shampoo(param_groups(model))

    def backward(step: int, poison: bool = False) -> None:
        opt.zero_grad()
        loss_of(model, *batch(step, rank, world_size, torch.float64)).backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
        if poison:  # after the all-reduce: this rank's gradient alone has a NaN
            next(model.parameters()).grad[0, 0] = float("nan")

    record: dict[str, Any] = {}
    for step in range(3):
        backward(step)
        opt.step()
    # 1. A bad hyperparameter on rank 1 only: caught at validation, before any state.
    backward(3)
    if rank == 1:
        opt.param_groups[0]["lr"] = -1.0
    before = params_of(model)
    record["bad_config"] = _outcome(opt.step)
    record["bad_config_untouched"] = all(torch.equal(a, b) for a, b in
                                         zip(before, params_of(model)))
    opt.param_groups[0]["lr"] = WEIGHT_OPTIONS["lr"]
    record["after_bad_config"] = _outcome(opt.step)
    record["identical_after_bad_config"] = _same_on_all_ranks(model)
    # 2. A NaN in rank 1's gradient only: every rank skips that parameter.
    first = next(model.parameters()).detach().clone()
    backward(4, poison=rank == 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record["nan"] = _outcome(opt.step)
    record["nan_warned"] = any("NaN/Inf" in str(w.message) for w in caught)
    record["nan_param_untouched"] = torch.equal(first, next(model.parameters()))
    record["nan_skips"] = opt.metrics()["nonfinite_grad_skips"]
    record["identical_after_nan"] = _same_on_all_ranks(model)
    # 3. An error inside rank 0's root computation (after the agreement, before the
    # all-gather), at the next root step (start 2, frequency 3: steps 2, 5, 8, ...).
    for step in (6, 7):
        backward(step)
        opt.step()
    record["root_step"] = opt.metrics()["step"] + 1
    real = preconditioner.inverse_root

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ArithmeticError("injected root failure")

    if rank == 0:
        preconditioner.inverse_root = broken
    backward(8)
    before = params_of(model)
    record["root_error"] = _outcome(opt.step)
    preconditioner.inverse_root = real
    record["root_error_untouched"] = all(torch.equal(a, b) for a, b in
                                         zip(before, params_of(model)))
    record["peer_failure_is_runtime_error"] = issubclass(PeerFailure, RuntimeError)
    # 4. An error on rank 1 where the update meets the parameters (the apply).
    import scalable_shampoo.plans as plans  # where the apply plan takes its views

    real_view = plans.region_view
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def failing_view(source: torch.Tensor, region: Any) -> torch.Tensor:
        if source.untyped_storage().data_ptr() in storages:
            raise RuntimeError("injected apply failure")
        return real_view(source, region)

    if rank == 1:
        plans.region_view = failing_view
    backward(9)
    before = params_of(model)
    steps_before = opt.metrics()["step"]
    record["apply_error"] = _outcome(opt.step)
    plans.region_view = real_view
    record["apply_error_counted_nowhere"] = opt.metrics()["step"] == steps_before
    record["apply_error_untouched"] = all(torch.equal(a, b) for a, b in
                                          zip(before, params_of(model)))
    record["identical_after_apply_error"] = _same_on_all_ranks(model)
    backward(10)
    record["after_apply_error"] = _outcome(opt.step)
    record["identical_at_the_end"] = _same_on_all_ranks(model)
    dist.barrier()  # the group still works
    return record
