"""Root-step time of this checkout against another one (a former commit), in one session.

For each workload of ``benchmarks/step_speed.py`` given, each variant runs 80 Shampoo
steps with ``precondition_frequency=20`` from step 20 (roots at 20, 40, 60, 80) on fixed
random gradients and reports the median root step, the largest step after step 20, the
median plain step and the mean of steps 21..80, as CPU time of the stepping thread
(``time.thread_time``, one intra-op thread: other processes on the cores count less than
in wall time). Each variant runs in its own process with its checkout first on the path,
the variants in turn, ``--repeat`` times.

Variants: ``baseline`` (the ``--baseline`` checkout at its defaults, if given), ``now``
(this checkout's defaults), ``now, float64 roots`` (``root_dtype=torch.float64``) and
``now, spread roots`` (``async_roots="spread"``).

With ``--training lm,autoencoder,image`` the variants instead train ``compare``'s
workloads (seed 0, lr 3e-3, the comparison's Shampoo settings: roots every 20 steps from
step 10) for 200 steps and report the total CPU time of the steps that computed roots.
Their factors are those of real training, mostly ill-conditioned, where the fixed random
gradients of ``benchmarks/step_speed.py`` give factors with condition numbers of a few,
on which every float32 root passes its check.

Usage (the former commit checked out outside the repository)::

    git worktree add /tmp/base1a6 1a6c4a1
    python benchmarks/root_step.py --baseline /tmp/base1a6 [--workloads mlp512,small128]
        [--repeat 2]
    python benchmarks/root_step.py --baseline /tmp/base1a6 --training lm,autoencoder,image
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent

# Each child: argv = (checkout, workloads, Shampoo options); prints {workload: numbers}.
PREAMBLE = r"""
import json, statistics, sys, time
import torch
sys.path.insert(0, sys.argv[1])
from scalable_shampoo import Shampoo
torch.set_num_threads(1)
options = eval(sys.argv[3], {"torch": torch})
out = {}
"""

CHILD = PREAMBLE + r"""
from benchmarks.step_speed import WORKLOADS, build_model, gradient_pool, set_grads
for name in sys.argv[2].split(","):
    workload = WORKLOADS[name]
    params = list(build_model(workload).parameters())
    pool = gradient_pool(params)
    opt = Shampoo(params, lr=1e-4, block_size=workload.block_size, precondition_frequency=20,
                  start_preconditioning_step=20, **options)
    times = []
    for step in range(1, 81):
        set_grads(params, pool[step % len(pool)])
        start = time.thread_time()
        opt.step()
        times.append((time.thread_time() - start) * 1e3)
    roots = [times[s - 1] for s in (20, 40, 60, 80)]
    plain = [t for s, t in enumerate(times, 1) if s > 20 and s % 20]
    out[name] = {"root": statistics.median(roots), "max": max(times[20:]),
                 "plain": statistics.median(plain), "mean": statistics.fmean(times[20:])}
print(json.dumps(out))
"""

TRAINING_CHILD = PREAMBLE + r"""
from scalable_shampoo.bench.workloads import build_workload, resolve_builder
for name in sys.argv[2].split(","):
    workload = build_workload(resolve_builder(name), 0, name)
    opt = Shampoo(workload.model.parameters(), lr=3e-3, precondition_frequency=20,
                  start_preconditioning_step=10, **options)
    root, total, roots, last = 0.0, 0.0, 0, 0
    for step in range(200):
        opt.zero_grad()
        workload.loss(workload.model, workload.train_batch(step)).backward()
        start = time.thread_time()
        opt.step()
        elapsed = (time.thread_time() - start) * 1e3
        total += elapsed
        count = opt.metrics()["root_computations"]
        if count > last:
            root, roots = root + elapsed, roots + 1
        last = count
    out[name] = {"root": root, "root_steps": roots, "mean": total / 200}
print(json.dumps(out))
"""


def run(tree: Path, workloads: str, options: str, child: str) -> dict:
    result = subprocess.run([sys.executable, "-c", child, str(tree), workloads, options],
                            capture_output=True, text=True, check=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure(args: argparse.Namespace, workloads: str, child: str, spread: bool
            ) -> list[tuple[str, str, int, dict, str]]:
    """Every variant's numbers per workload and repetition, variants in turn, each with
    its root time over the baseline's of that workload and repetition ("-" without)."""
    variants = ([("baseline", args.baseline, "{}")] if args.baseline else []) + [
        ("now", HERE, "{}"), ("now, float64 roots", HERE, "{'root_dtype': torch.float64}")]
    if spread:
        variants.append(("now, spread roots", HERE, "{'async_roots': 'spread'}"))
    rows = []
    for repeat in range(args.repeat):
        for label, tree, options in variants:
            for name, r in run(tree, workloads, options, child).items():
                rows.append((name, label, repeat, r))
    base = {(n, rep): r["root"] for n, label, rep, r in rows if label == "baseline"}
    return [(name, label, rep, r,
             f"{r['root'] / base[(name, rep)]:.2f}" if (name, rep) in base else "-")
            for name, label, rep, r in sorted(rows, key=lambda row: (row[0], row[2]))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, default=None)
    parser.add_argument("--workloads", default="mlp512,small128,blocked1024_b128")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--training", default=None, metavar="LIST",
                        help="compare's workloads to train instead (e.g. lm,autoencoder,image)")
    args = parser.parse_args(argv)
    if args.training:
        return training(args)
    rows = measure(args, args.workloads, CHILD, spread=True)
    print("| workload | variant | run | root step ms | / baseline | max step ms | plain ms | "
          "mean 21..80 ms |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, label, rep, r, ratio in rows:
        print(f"| {name} | {label} | {rep + 1} | {r['root']:.0f} | {ratio} | {r['max']:.0f} | "
              f"{r['plain']:.1f} | {r['mean']:.1f} |")
    return 0


def training(args: argparse.Namespace) -> int:
    rows = measure(args, args.training, TRAINING_CHILD, spread=False)
    print("| workload | variant | run | root steps | their total CPU ms | / baseline | "
          "mean step ms |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name, label, rep, r, ratio in rows:
        print(f"| {name} | {label} | {rep + 1} | {r['root_steps']} | {r['root']:.0f} | {ratio} | "
              f"{r['mean']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
