"""How data-parallel Shampoo's per-rank work falls with the number of ranks (SPEC 5).

What is measured
----------------
For each world size (default 1, 2 and 4) the script spawns that many CPU processes (one
intra-op thread each, gloo, a free local port). Every rank builds the same model of
bias-free linear layers, gets the same fixed random gradients each step (drawn before
timing: forward, backward and DDP's all-reduce are not measured) and runs
``Shampoo.step()``; the optimizer shares its blocks over the ranks (at world size 1 it
is the plain one-process optimizer). Per rank it reports:

* ``blocks``: the blocks it owns; ``state MB``: its optimizer state (``metrics()``);
* ``root CPU s``: CPU time (``time.thread_time`` of the thread that runs them) spent in
  this rank's root computations, per root step. This is the work the assignment
  balances, and the column to compare across world sizes;
* ``root wall s``: wall time spent in them per root step (``metrics()["root_seconds"]``);
* ``step ms``: median wall time of a step without roots, and ``step CPU ms``: its
  process CPU time (``time.process_time``);
* ``root step ms``: median wall time of a step that recomputes roots (it waits for the
  slowest rank's roots before the all-gather).

The summary line gives the largest per-rank root CPU time relative to world size 1
(the issue's targets: <= 0.6 at 2 ranks, <= 0.35 at 4).

With ``--fsdp2`` the parameters are FSDP2's: ``DTensor``s sharded along dimension 0 over
a 1-D mesh of the ranks (as ``fully_shard`` makes them), each rank given its rows of the
same gradients, and the optimizer is the lossless sharded one (:mod:`scalable_shampoo.
sharded`). Extra columns: ``param MB`` (the rank's parameter shard), ``recv MB`` and
``root recv MB``: the bytes this rank receives from the others in the step's collectives
(all-gathers: ``(world - 1) / world`` of the output; all-to-alls: the output less the
rank's own part; all-reduces: the tensor), in a step without and with root computations.

Memory the step needs besides the optimizer state, per rank (both modes):

* ``kept MB``: buffers the optimizer keeps between steps for its exchange (the
  all-gather buffers of the directions);
* ``peak MB``: the transient peak of a step without roots: the largest sum of the
  bytes of the tensors the step allocated and had not yet freed, from the CPU
  allocator's events that ``torch.profiler`` records with ``profile_memory=True``
  (every tensor allocation and free, in time order, on every thread), the largest of
  ``PROFILED`` steps run under the profiler after the timed ones (not timed).

Wall times are honest only while every rank has a core of its own: with more ranks
than cores the processes share cores, and wall times grow although each rank's CPU
time falls. On a 2-core machine the 4-rank wall columns are therefore not scaling
numbers; the CPU columns are.

Usage::

    python benchmarks/distributed_scaling.py [--world-sizes 1,2,4] [--steps 30]
        [--precondition-frequency 10] [--quick] [--fsdp2]

``--quick`` (seconds) runs a small model for 10 steps to check that the script works.
"""

from __future__ import annotations

import argparse
import datetime
import math
import socket
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scalable_shampoo import Shampoo  # noqa: E402
from scalable_shampoo.preconditioner import BlockStack  # noqa: E402

GRAD_POOL = 3
PROFILED = 3  # steps without roots whose transient peak is measured


@dataclass(frozen=True)
class Setup:
    """The model and schedule: per layer ``(out_features, in_features)``; roots every
    ``precondition_frequency`` steps from that step on."""

    layers: tuple[tuple[int, int], ...]
    block_size: int
    steps: int
    precondition_frequency: int


FULL = Setup(((1024, 1024), (1024, 1024), (1024, 768), (1000, 1024)), 256, 30, 10)
QUICK = Setup(((256, 256), (256, 200)), 64, 10, 5)


def _timed_roots(counter: list[float]) -> Any:
    """``BlockStack.compute_roots`` that adds its thread's CPU seconds to ``counter``."""
    compute = BlockStack.compute_roots

    def timed(self: BlockStack, *args: Any, **kwargs: Any) -> Any:
        start = time.thread_time()
        try:
            return compute(self, *args, **kwargs)
        finally:
            counter[0] += time.thread_time() - start

    return timed


def _counted(received: list[int], world_size: int, rank: int) -> None:
    """Wraps this process's all-gathers, all-to-alls and all-reduces to add the bytes
    it receives from the other ranks to ``received[0]``."""
    def wrap(name: str, incoming: Any) -> None:
        collective = getattr(dist, name, None)
        if collective is None:
            return

        def counted(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            received[0] += incoming(tensor)
            return collective(tensor, *args, **kwargs)

        setattr(dist, name, counted)

    def gathered(t: torch.Tensor) -> int:
        return t.numel() * t.element_size() * (world_size - 1) // world_size

    for name in ("all_gather_into_tensor", "all_gather_single"):
        wrap(name, gathered)
    wrap("all_reduce", lambda t: t.numel() * t.element_size())
    exchange = getattr(dist, "all_to_all_single", None)

    def all_to_all(output: torch.Tensor, input: torch.Tensor,
                   output_split_sizes: list[int] | None = None, *args: Any,
                   **kwargs: Any) -> Any:
        own = (output_split_sizes[rank] if output_split_sizes is not None
               else output.numel() // world_size)
        received[0] += (output.numel() - own) * output.element_size()
        return exchange(output, input, output_split_sizes, *args, **kwargs)

    if exchange is not None:
        dist.all_to_all_single = all_to_all


def _peak_bytes(step: Any) -> int:
    """The transient peak of ``step()``: the largest running sum of the bytes of the
    CPU tensors it allocated less those it freed (torch.profiler's memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    peak = held = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak


def _profiled_peak(opt: Shampoo, params: list[torch.Tensor], pool: list[list[torch.Tensor]],
                   setup: Setup) -> int:
    """The largest transient peak (:func:`_peak_bytes`) of ``PROFILED`` steps without
    roots after the timed ones (root steps among them run unmeasured). Equal steps'
    peaks differ at times by a buffer or two: gloo's worker thread may let go of a
    collective's tensors after the step allocated its next ones."""
    peaks, step = [], setup.steps
    while len(peaks) < PROFILED:
        step += 1
        _give(params, pool, step)
        if step % setup.precondition_frequency == 0:
            opt.step()
        else:
            peaks.append(_peak_bytes(opt.step))
    return max(peaks)


def _kept_bytes(opt: Shampoo) -> int:
    """Bytes of the exchange buffers the optimizer keeps between steps."""
    return sum(bucket.buffer.numel() * bucket.buffer.element_size()
               for plan in opt._plans if plan is not None and plan.exchange is not None
               for bucket in plan.exchange.buckets.values() if bucket.buffer is not None)


def _give(params: list[torch.Tensor], pool: list[list[torch.Tensor]], step: int) -> None:
    """Step ``step``'s gradients, from the pool drawn before timing."""
    for p, g in zip(params, pool[step % GRAD_POOL]):
        p.grad = g


def _rank(rank: int, world_size: int, port: int, setup: Setup, fsdp2: bool,
          results: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(minutes=10))
    root_cpu, received = [0.0], [0]
    BlockStack.compute_roots = _timed_roots(root_cpu)  # this process only
    _counted(received, world_size, rank)
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(o, i, generator=gen) / math.sqrt(i))
              for o, i in setup.layers]
    pool = [[torch.randn(p.shape, generator=gen) * 1e-2 for p in params]
            for _ in range(GRAD_POOL)]
    if fsdp2:  # fully_shard's parameters: rows of dimension 0 per rank
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world_size,))

        def shard(t: torch.Tensor) -> torch.Tensor:
            return distribute_tensor(t, mesh, [Shard(0)], src_data_rank=None)

        params = [torch.nn.Parameter(shard(p.detach())) for p in params]
        pool = [[shard(g) for g in grads] for grads in pool]
    opt = Shampoo(params, lr=1e-4, block_size=setup.block_size,
                  precondition_frequency=setup.precondition_frequency)
    plain, plain_cpu, with_roots, plain_recv, root_recv = [], [], [], [], []
    for step in range(1, setup.steps + 1):
        _give(params, pool, step)
        dist.barrier()  # every rank starts the step together
        received[0] = 0
        wall, cpu = time.perf_counter(), time.process_time()
        opt.step()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if step % setup.precondition_frequency == 0:  # the default start: the frequency
            with_roots.append(wall)
            root_recv.append(received[0])
        else:
            plain.append(wall)
            plain_cpu.append(cpu)
            plain_recv.append(received[0])
    peak = _profiled_peak(opt, params, pool, setup)
    metrics = opt.metrics()
    root_steps = max(1, len(with_roots))
    local = [p.to_local() if fsdp2 else p for p in params]
    row = {"rank": rank, "blocks": metrics["owned_blocks"], "num_blocks": metrics["num_blocks"],
           "state_bytes": metrics["state_bytes"], "root_cpu": root_cpu[0] / root_steps,
           "root_wall": metrics["root_seconds"] / root_steps,
           "step": statistics.median(plain), "step_cpu": statistics.median(plain_cpu),
           "root_step": statistics.median(with_roots) if with_roots else float("nan"),
           "param_bytes": sum(t.numel() * t.element_size() for t in local),
           "kept": _kept_bytes(opt), "peak": peak,
           "recv": statistics.median(plain_recv),
           "root_recv": statistics.median(root_recv) if root_recv else float("nan")}
    everyone: list[Any] = [None] * world_size
    dist.all_gather_object(everyone, row)
    if rank == 0:
        results.put(everyone)
    dist.barrier()  # nobody tears the group down while another still uses it
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(world_size: int, setup: Setup, fsdp2: bool = False) -> list[dict[str, Any]]:
    """Per rank, its row of the table (see the module docstring)."""
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.start_processes(_rank, args=(world_size, _free_port(), setup, fsdp2, results),
                       nprocs=world_size, start_method="spawn")
    return results.get()


def format_table(rows_by_world: dict[int, list[dict[str, Any]]], setup: Setup,
                 fsdp2: bool = False) -> str:
    layers = " + ".join(f"Linear {i}->{o}" for o, i in setup.layers)
    kind = "FSDP2 (lossless, sharded parameters)" if fsdp2 else "Data-parallel"
    extra = f" {'param MB':>8} {'recv MB':>8} {'root recv MB':>12}" if fsdp2 else ""
    lines = [f"{kind} Shampoo: {layers}, block_size {setup.block_size}, "
             f"{setup.steps} steps, roots every {setup.precondition_frequency}; "
             "one thread per rank",
             f"{'ranks':>5} {'rank':>4} {'blocks':>6} {'state MB':>9} {'root CPU s':>10} "
             f"{'root wall s':>11} {'step ms':>8} {'step CPU ms':>11} {'root step ms':>12} "
             f"{'kept MB':>8} {'peak MB':>8}" + extra]
    for world_size, rows in rows_by_world.items():
        for r in rows:
            line = (
                f"{world_size:>5} {r['rank']:>4} {r['blocks']:>6} {r['state_bytes'] / 2**20:>9.2f} "
                f"{r['root_cpu']:>10.3f} {r['root_wall']:>11.3f} {r['step'] * 1e3:>8.1f} "
                f"{r['step_cpu'] * 1e3:>11.1f} {r['root_step'] * 1e3:>12.1f} "
                f"{r['kept'] / 2**20:>8.2f} {r['peak'] / 2**20:>8.2f}")
            if fsdp2:
                line += (f" {r['param_bytes'] / 2**20:>8.2f} {r['recv'] / 2**20:>8.2f} "
                         f"{r['root_recv'] / 2**20:>12.2f}")
            lines.append(line)
    if 1 in rows_by_world:
        base = max(r["root_cpu"] for r in rows_by_world[1])
        ratios = [f"{w} ranks {max(r['root_cpu'] for r in rows) / base:.2f}x"
                  for w, rows in rows_by_world.items() if w != 1 and base > 0]
        state = [f"{w} ranks {max(r['state_bytes'] for r in rows) / 2**20:.2f} MB"
                 for w, rows in rows_by_world.items()]
        lines.append("largest per-rank root CPU time vs 1 rank: " + ", ".join(ratios))
        lines.append("largest per-rank optimizer state: " + ", ".join(state))
    lines.append("CPU columns: time.thread_time of the root computations, time.process_time "
                 "of a step; wall columns: time.perf_counter (shared cores inflate them)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Per-rank root and step time of "
                                     "data-parallel Shampoo at several world sizes.")
    parser.add_argument("--world-sizes", default="1,2,4")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--precondition-frequency", type=int)
    parser.add_argument("--quick", action="store_true", help="a small model, 10 steps")
    parser.add_argument("--fsdp2", action="store_true",
                        help="FSDP2 parameters (DTensors sharded along dimension 0)")
    args = parser.parse_args(argv)
    setup = QUICK if args.quick else FULL
    setup = Setup(setup.layers, setup.block_size, args.steps or setup.steps,
                  args.precondition_frequency or setup.precondition_frequency)
    sizes = [int(w) for w in args.world_sizes.split(",")]
    if any(w < 1 for w in sizes) or setup.steps < setup.precondition_frequency:
        parser.error("world sizes must be >= 1 and --steps >= --precondition-frequency")
    print(format_table({w: measure(w, setup, args.fsdp2) for w in sizes}, setup, args.fsdp2))


if __name__ == "__main__":
    main()
