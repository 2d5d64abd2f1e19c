"""Step-time spikes of synchronous roots, and their removal by background roots (SPEC 4).

Trains an MLP of ``1024 x 1024`` layers (one ``1024 x 1024`` block each, two float64
``eigh`` of size 1024 per layer and root step) on a fixed regression task with
``precondition_frequency=20``, so the root recomputation is a large share of the step
time, three ways in one run:

* ``sync``: the synchronous optimizer (``root_delay=0``), roots computed inside the step;
* ``sync+delay``: synchronous with ``root_delay=10`` (the trajectory async must equal);
* ``async``: ``async_roots=True, root_delay=10, root_workers=1``;
* ``spread``: ``async_roots="spread", root_delay=10``: no worker, the delayed root work
  done a share per step on the training thread (a tenth of it per step here).

The training thread runs one intra-op thread (``torch.set_num_threads(1)``) and the root
worker one, so on a 2-core machine each gets a core. Every training step (forward,
backward and ``optimizer.step()``) is timed with ``time.perf_counter``; the table gives
the median, p99 and max step and the total wall time, and checks that ``async`` ended
with exactly the parameters of ``sync+delay``.

Usage::

    python benchmarks/async_roots.py [--steps 200] [--width 1024] [--layers 3]
        [--batch 256] [--frequency 20] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scalable_shampoo import Shampoo  # noqa: E402


def _model(width: int, layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    modules: list[torch.nn.Module] = []
    for _ in range(layers):
        modules += [torch.nn.Linear(width, width, bias=False), torch.nn.Tanh()]
    return torch.nn.Sequential(*modules, torch.nn.Linear(width, 10, bias=False))


def _run(name: str, args: argparse.Namespace, **options) -> dict:
    model = _model(args.width, args.layers)
    gen = torch.Generator().manual_seed(1)
    inputs = torch.randn(args.batch, args.width, generator=gen)
    targets = torch.randn(args.batch, 10, generator=gen)
    opt = Shampoo(model.parameters(), lr=1e-3, block_size=args.width,
                  precondition_frequency=args.frequency, start_preconditioning_step=1,
                  **options)
    times = []
    start = time.perf_counter()
    with opt:
        for _ in range(args.steps):
            t0 = time.perf_counter()
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(inputs), targets).backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        metrics = opt.metrics()
    total = time.perf_counter() - start
    ordered = sorted(times)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"name": name, "median_ms": 1e3 * statistics.median(times), "p99_ms": 1e3 * p99,
            "max_ms": 1e3 * max(times), "total_s": total,
            "root_seconds": metrics["root_seconds"],
            "root_wait_seconds": metrics["root_wait_seconds"],
            "params": [p.detach().clone() for p in model.parameters()]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--frequency", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="width 384, 60 steps")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.steps = 384, 60
    delay = max(1, args.frequency // 2)
    torch.set_num_threads(1)
    runs = [_run("sync", args),
            _run("sync+delay", args, root_delay=delay),
            _run("async", args, root_delay=delay, async_roots=True, root_workers=1),
            _run("spread", args, root_delay=delay, async_roots="spread")]
    print(f"MLP {args.layers} x Linear {args.width}x{args.width}, batch {args.batch}, "
          f"{args.steps} steps, precondition_frequency {args.frequency}, root_delay {delay}; "
          "1 training thread, 1 root worker")
    print(f"{'run':<11} {'median ms':>10} {'p99 ms':>9} {'max ms':>9} {'p99/median':>10} "
          f"{'total s':>8} {'root s':>7} {'waited s':>8}")
    for r in runs:
        print(f"{r['name']:<11} {r['median_ms']:10.1f} {r['p99_ms']:9.1f} {r['max_ms']:9.1f} "
              f"{r['p99_ms'] / r['median_ms']:10.2f} {r['total_s']:8.1f} "
              f"{r['root_seconds']:7.1f} {r['root_wait_seconds']:8.2f}")
    same = all(torch.equal(a, b) for a, b in zip(runs[1]["params"], runs[2]["params"]))
    spread_same = all(torch.equal(a, b) for a, b in zip(runs[1]["params"], runs[3]["params"]))
    print(f"async total / sync total: {runs[2]['total_s'] / runs[0]['total_s']:.2f}; "
          f"spread total / sync total: {runs[3]['total_s'] / runs[0]['total_s']:.2f}; "
          f"parameters equal sync+delay's bit for bit: async {same}, spread {spread_same}")
    same = same and spread_same
    if args.json:
        args.json.write_text(json.dumps([{k: v for k, v in r.items() if k != "params"}
                                         for r in runs], indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
