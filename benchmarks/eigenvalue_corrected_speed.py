"""``optimizer.step()`` time of the eigenvalue-corrected preconditioner (SPEC 2.6), its
eigenbasis refreshed by ``eigh`` or by one power step and QR, beside classic Shampoo and
AdamW, on the CPU.

The workloads are ``benchmarks/step_speed.py``'s (``nn.Linear(bias=False)`` layers,
fixed random gradients set as ``p.grad``, forward/backward not timed). Each variant runs
``--steps`` steps with ``precondition_frequency = start_preconditioning_step = F``, so
the first basis (always ``eigh``; classic Shampoo: the first roots) comes at step F and
later refreshes (``eigh`` or ``qr``) at 2F, 3F, ... Every ``optimizer.step()`` is timed
with ``time.perf_counter`` and the table gives:

* ``before ms``: median step before step F (Adam in the identity basis; classic
  Shampoo: statistics and Adam grafting);
* ``step ms``: median preconditioned step without a refresh;
* ``first ms``: the step that computes the first bases or roots;
* ``refresh ms``: median of the later refresh steps (what ``eigenbasis_method`` decides);
* ``amortized @N``: ``(refresh + (N - 1) * step) / N``, the mean step cost at
  ``precondition_frequency = N`` for each N of ``--amortize``;
* ``AdamW ms``: median ``torch.optim.AdamW`` step on the same parameters and gradients.

All Shampoo variants use ``lr=1e-4``, ``block_size`` of the workload and otherwise their
defaults (float64 ``eigh``/QR, float32 factors). ``--quick`` (about a minute on a quiet
2-core machine) runs two small workloads with F = 10 for 30 steps.

Usage::

    python benchmarks/eigenvalue_corrected_speed.py [--quick] [--threads 1]
        [--steps 200] [--frequency 50] [--workloads mlp512,small128,...] [--amortize 10,100]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.step_speed import (LR, WORKLOADS, Workload, build_model,  # noqa: E402
                                   gradient_pool, machine_info, set_grads, time_adamw)
from scalable_shampoo import Shampoo  # noqa: E402

VARIANTS = {  # name: Shampoo keyword arguments beyond lr, block size and schedule
    "shampoo (roots, eigh)": {},
    "eigenvalue_corrected, eigh": {"preconditioner": "eigenvalue_corrected"},
    "eigenvalue_corrected, qr": {"preconditioner": "eigenvalue_corrected",
                                 "eigenbasis_method": "qr"},
}
QUICK_WORKLOADS = "small128,mlp512"


@dataclass
class Row:
    """One table row: median times (ms) of the phases of one run."""

    workload: str
    variant: str
    before_ms: float
    step_ms: float
    first_ms: float
    refresh_ms: float
    adamw_ms: float

    def amortized(self, frequency: int) -> float:
        return (self.refresh_ms + (frequency - 1) * self.step_ms) / frequency


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def time_variant(workload: Workload, options: dict, steps: int, frequency: int
                 ) -> tuple[list[float], dict[str, float]]:
    """Per-step times (ms) of ``steps`` steps of one variant, and its final metrics."""
    params = list(build_model(workload).parameters())
    pool = gradient_pool(params)
    optimizer = Shampoo(params, lr=LR, block_size=workload.block_size,
                        precondition_frequency=frequency, start_preconditioning_step=frequency,
                        foreach=workload.foreach, **options)
    times = []
    for step in range(1, steps + 1):
        set_grads(params, pool[step % len(pool)])
        start = time.perf_counter()
        optimizer.step()
        times.append((time.perf_counter() - start) * 1e3)
    return times, optimizer.metrics()


def summarize(workload: Workload, variant: str, times: list[float], frequency: int,
              adamw_ms: float) -> Row:
    """Splits a run's step times (1-based steps; step 1 allocates state and is left
    out) into the phases of the table."""
    refresh = [t for step, t in enumerate(times, 1) if step > frequency and step % frequency == 0]
    plain = [t for step, t in enumerate(times, 1) if step > frequency and step % frequency]
    before = [t for step, t in enumerate(times, 1) if 1 < step < frequency]
    return Row(workload.name, variant, _median(before), _median(plain), times[frequency - 1],
               _median(refresh), adamw_ms)


def format_table(rows: Sequence[Row], amortize: Sequence[int]) -> str:
    header = ["workload", "variant", "before ms", "step ms", "first ms", "refresh ms",
              *(f"amortized @{n}" for n in amortize), "AdamW ms"]
    cells = [[r.workload, r.variant, *(f"{v:.1f}" for v in (
        r.before_ms, r.step_ms, r.first_ms, r.refresh_ms, *(r.amortized(n) for n in amortize),
        r.adamw_ms))] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]

    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.ljust(w) if i < 2 else v.rjust(w)
                                 for i, (v, w) in enumerate(zip(values, widths))) + " |"
    rule = "|" + "|".join("-" * (w + 2) if i < 2 else "-" * (w + 1) + ":"
                          for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule, *(line(c) for c in cells)])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    parser.add_argument("--steps", type=int, default=None, help="steps (default 200, --quick 30)")
    parser.add_argument("--frequency", type=int, default=None,
                        help="precondition_frequency and start (default 50, --quick 10)")
    parser.add_argument("--workloads", default=None,
                        help=f"comma-separated, from {','.join(WORKLOADS)} (default: all but "
                             f"the 2048 ones; --quick: {QUICK_WORKLOADS})")
    parser.add_argument("--amortize", default="10,100",
                        help="precondition_frequency values for the amortized columns")
    parser.add_argument("--quick", action="store_true", help="small workloads, few steps")
    args = parser.parse_args(argv)
    args.steps = args.steps or (30 if args.quick else 200)
    args.frequency = args.frequency or (10 if args.quick else 50)
    if args.steps < 2 * args.frequency:
        parser.error("--steps must be at least twice --frequency (one refresh after the first)")
    default = QUICK_WORKLOADS if args.quick else ",".join(
        name for name, w in WORKLOADS.items() if not w.short)
    names = [n.strip() for n in (args.workloads or default).split(",") if n.strip()]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {unknown}; choose from {','.join(WORKLOADS)}")
    args.workloads = [WORKLOADS[n] for n in names]
    args.amortize = [int(n) for n in args.amortize.split(",")]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    info = machine_info(torch.get_num_threads())
    print("# Eigenvalue-corrected Shampoo: optimizer.step() time (CPU)\n")
    print("  ".join(f"{k}: {v}" for k, v in info.items()))
    print(f"steps {args.steps}, precondition_frequency = start_preconditioning_step = "
          f"{args.frequency}, lr {LR}\n", flush=True)
    rows = []
    for workload in args.workloads:
        adamw_ms = time_adamw(workload, 20)
        for variant, options in VARIANTS.items():
            times, metrics = time_variant(workload, options, args.steps, args.frequency)
            rows.append(summarize(workload, variant, times, args.frequency, adamw_ms))
            print(f"done {workload.name}, {variant}: root_computations "
                  f"{metrics['root_computations']}, failures {metrics['root_failures']} "
                  f"({time.perf_counter() - began:.0f}s elapsed)", flush=True)
    print()
    print(format_table(rows, args.amortize))
    print(f"\nfirst: the step computing the first bases (always eigh) or roots; refresh: "
          f"median later refresh step. Total {time.perf_counter() - began:.0f}s; load "
          f"average (1 min) at start {info['load average (1 min)']}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
