"""Speed of ``Shampoo.step()`` on the CPU, against a matrix-product floor and AdamW.

What is measured
----------------
On a CPU the Shampoo step is bound by matrix products. Per ``m x n`` block and step
four of them are unavoidable:

* ``G G^T`` and ``G^T G`` (the Kronecker-factor statistics), ``2 m n (m + n)`` flops;
* ``L G`` and ``G R`` (the two-sided preconditioning), ``2 m n (m + n)`` flops;

so the **floor** of a step is ``sum over blocks of 4 m n (m + n)`` flops divided by the
machine's measured ``torch.bmm`` rate for that block shape (float32, the blocks of a
shape stacked as the optimizer stacks them; ``torch.mm`` rates are printed too). The
rate is measured before and after the workloads and the better one is used, so a busy
machine can only make the ratios worse; a drift above 10% is flagged.

For each workload (a model of ``nn.Linear(bias=False)`` layers, so every weight is a
matrix and there are no tiny bias blocks) the script sets ``p.grad`` to fixed random
gradients drawn before timing (forward/backward is not measured), times every
``optimizer.step()`` with ``time.perf_counter`` and reports:

* ``median``: the median step of the preconditioned phase, root recomputations excluded;
* ``mean``: the mean over the whole ``--steps`` window, root steps included (with the
  defaults, 200 steps, ``precondition_frequency=100`` and the default start, roots are
  computed at steps 100 and 200 and preconditioning is active from step 100);
* ``steady``: the mean over one ``precondition_frequency`` window of the preconditioned
  phase (steps start+1 .. start+frequency: one root step and frequency-1 plain ones);
* ``root``: the time of a step that recomputes the roots;
* ``AdamW``: the median ``torch.optim.AdamW`` step (foreach default) on the same
  parameters and gradients, and the ratio of the Shampoo median to it.

Workloads too slow for the full window (the 2048x2048 layers) run a short window with
an early ``start_preconditioning_step`` (one root step, then plain preconditioned
steps); their ``mean`` and ``steady`` are then *projected* from the measured per-phase
step times onto the full window and marked ``*``. The same projection is printed for
the full runs as a check of the model. ``--quick`` (about a minute) runs 40 steps with
``precondition_frequency=20``. Nothing is written unless ``--json PATH`` is given.

Usage::

    python benchmarks/step_speed.py [--threads 1] [--steps 200] [--quick]
        [--workloads mlp512,small128,small128_loop,blocked1024_b128,big2048_b2048,big2048_b1024]
        [--json PATH] [--profile]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scalable_shampoo import Shampoo  # noqa: E402

LR = 1e-4
GRAD_SCALE = 1e-2
GRAD_POOL = 4


# ------------------------------------------------------------------------ workloads
@dataclass(frozen=True)
class Workload:
    """A model of bias-free linear layers and how Shampoo blocks it.

    Attributes:
        name: the workload's key on the command line.
        layers: per layer ``(out_features, in_features)``.
        block_size: Shampoo's ``block_size``.
        foreach: Shampoo's ``foreach`` (False: one block at a time, the reference loop).
        short: run the short window (one early root step) and project the long one.
    """

    name: str
    layers: tuple[tuple[int, int], ...]
    block_size: int
    foreach: bool = True
    short: bool = False

    @property
    def description(self) -> str:
        shapes = Counter(self.layers)
        layers = " + ".join(f"{c}x Linear {i}->{o}" for (o, i), c in shapes.items())
        loop = ", foreach=False" if not self.foreach else ""
        return f"{layers}, block_size {self.block_size}{loop}"


WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    Workload("mlp512", ((512, 512),) * 4, 512),
    Workload("small128", ((128, 128),) * 24, 512),
    Workload("small128_loop", ((128, 128),) * 24, 512, foreach=False),
    # Many blocks per parameter: 2 x 64 blocks of 128x128 gathered per region, not per block.
    Workload("blocked1024_b128", ((1024, 1024),) * 2, 128),
    Workload("big2048_b2048", ((2048, 2048),), 2048, short=True),
    Workload("big2048_b1024", ((2048, 2048),), 1024, short=True),
)}
DEFAULT_WORKLOADS = ",".join(WORKLOADS)


def _chunks(size: int, block_size: int) -> list[int]:
    full, rest = divmod(size, block_size)
    return [block_size] * full + ([rest] if rest else [])


def block_shapes(workload: Workload) -> list[tuple[int, int]]:
    """The ``(m, n)`` blocks of the workload's weights: each dimension above
    ``block_size`` cut into chunks of ``block_size`` (no layer here is small enough
    for Shampoo to merge its two dimensions)."""
    return [(m, n) for out, inp in workload.layers
            for m in _chunks(out, workload.block_size) for n in _chunks(inp, workload.block_size)]


def block_stacks(workload: Workload) -> list[tuple[int, int, int]]:
    """``(k, m, n)`` per stack of ``k`` equal ``m x n`` blocks, as the batched optimizer
    stacks them. The floor is a property of the model, so it is the same for
    ``foreach=False`` (which runs the same products one block at a time)."""
    return [(k, m, n) for (m, n), k in Counter(block_shapes(workload)).items()]


def floor_flops(m: int, n: int) -> int:
    """Flops of ``G G^T``, ``G^T G``, ``L G`` and ``G R`` for one ``m x n`` block."""
    return 4 * m * n * (m + n)


# ------------------------------------------------------------------------- mm rates
def _median_seconds(fn: Callable[[], object], warmup: int = 2, min_reps: int = 7,
                    min_seconds: float = 0.5) -> float:
    for _ in range(warmup):
        fn()
    times: list[float] = []
    total = 0.0
    while len(times) < min_reps or total < min_seconds:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        total += times[-1]
    return statistics.median(times)


def mm_rate(n: int) -> float:
    """GFLOP/s of a float32 ``torch.mm`` of two ``n x n`` matrices."""
    gen = torch.Generator().manual_seed(n)
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    return 2 * n**3 / _median_seconds(lambda: torch.mm(a, b)) / 1e9


def stack_rate(k: int, m: int, n: int) -> float:
    """GFLOP/s of the four floor products on ``k`` stacked ``m x n`` float32 blocks, as
    ``torch.bmm`` calls: ``G G^T``, ``G^T G``, ``L G``, ``G R``."""
    gen = torch.Generator().manual_seed(k * 7919 + m * 31 + n)
    g = torch.randn(k, m, n, generator=gen)
    left = torch.randn(k, m, m, generator=gen)
    right = torch.randn(k, n, n, generator=gen)

    def products() -> None:
        torch.bmm(g, g.mT)
        torch.bmm(g.mT, g)
        torch.bmm(left, g)
        torch.bmm(g, right)

    return k * floor_flops(m, n) / _median_seconds(products) / 1e9


def floor_ms(workload: Workload, rates: dict[tuple[int, int, int], float]) -> float:
    """The workload's floor: every stack's products at that stack's measured rate."""
    return sum(k * floor_flops(m, n) / (rates[(k, m, n)] * 1e9)
               for k, m, n in block_stacks(workload)) * 1e3


# --------------------------------------------------------------------------- models
def build_model(workload: Workload, seed: int = 0) -> nn.Module:
    """``nn.Sequential`` of the workload's ``nn.Linear(bias=False)`` layers, with
    weights drawn from a private generator (the global RNG is left alone)."""
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for out, inp in workload.layers:
        layer = torch.nn.utils.skip_init(nn.Linear, inp, out, bias=False)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(out, inp, generator=gen) / math.sqrt(inp))
        layers.append(layer)
    return nn.Sequential(*layers)


def gradient_pool(params: Sequence[torch.Tensor], size: int = GRAD_POOL,
                  seed: int = 1) -> list[list[torch.Tensor]]:
    """``size`` sets of random gradients, one tensor per parameter, drawn up front."""
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=gen) * GRAD_SCALE for p in params]
            for _ in range(size)]


def set_grads(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
    for p, g in zip(params, grads):
        p.grad = g


# ------------------------------------------------------------------------- schedule
@dataclass(frozen=True)
class Schedule:
    """Which steps are run and which of them compute roots (1-based steps).

    Attributes:
        steps: steps run.
        start: ``start_preconditioning_step``: first preconditioned (and root) step.
        frequency: ``precondition_frequency``.
    """

    steps: int
    start: int
    frequency: int

    def is_root_step(self, step: int) -> bool:
        return step >= self.start and (step - self.start) % self.frequency == 0

    def root_steps(self) -> list[int]:
        return [s for s in range(1, self.steps + 1) if self.is_root_step(s)]


def project_mean(window: Schedule, graft_ms: float, precond_ms: float, root_ms: float,
                 first: int = 1) -> float:
    """Mean step over ``window`` steps ``first..window.steps`` from per-phase step
    times: before ``start`` a grafting-only step, then preconditioned steps, of which
    the root steps cost ``root_ms``."""
    total = 0.0
    for step in range(first, window.steps + 1):
        if step < window.start:
            total += graft_ms
        elif window.is_root_step(step):
            total += root_ms
        else:
            total += precond_ms
    return total / (window.steps - first + 1)


# ------------------------------------------------------------------------ measuring
@dataclass
class ShampooRun:
    """Per-step times (ms) of one Shampoo run and the step numbers that computed roots."""

    schedule: Schedule
    times_ms: list[float]
    root_steps: list[int]
    metrics: dict[str, float]

    def phase(self, preconditioned: bool, roots: bool) -> list[float]:
        """Times of the steps (step 1, which allocates the state, left out) in the
        preconditioned phase or before it, with or without root computation."""
        return [t for step, t in enumerate(self.times_ms, start=1)
                if step > 1 and (step >= self.schedule.start) == preconditioned
                and (step in self.root_steps) == roots]


def time_shampoo(workload: Workload, schedule: Schedule) -> ShampooRun:
    """Runs ``schedule.steps`` Shampoo steps, timing each ``optimizer.step()``; the root
    steps are read off ``metrics()['root_computations']`` (outside the timed region)."""
    params = list(build_model(workload).parameters())
    pool = gradient_pool(params)
    optimizer = Shampoo(params, lr=LR, block_size=workload.block_size,
                        precondition_frequency=schedule.frequency,
                        start_preconditioning_step=schedule.start, foreach=workload.foreach)
    times, roots, computed = [], [], 0
    for step in range(1, schedule.steps + 1):
        set_grads(params, pool[step % len(pool)])
        start = time.perf_counter()
        optimizer.step()
        times.append((time.perf_counter() - start) * 1e3)
        now = optimizer.metrics()["root_computations"]
        if now > computed:
            roots.append(step)
        computed = now
    if roots != schedule.root_steps():
        print(f"warning: {workload.name}: roots computed at steps {roots}, expected "
              f"{schedule.root_steps()}", file=sys.stderr)
    return ShampooRun(schedule, times, roots, optimizer.metrics())


def time_adamw(workload: Workload, steps: int) -> float:
    """Median ``torch.optim.AdamW`` step (ms) on the workload's parameters; the first
    two steps (state allocation) are left out."""
    params = list(build_model(workload).parameters())
    pool = gradient_pool(params)
    optimizer = torch.optim.AdamW(params, lr=LR)
    times = []
    for step in range(1, steps + 3):
        set_grads(params, pool[step % len(pool)])
        start = time.perf_counter()
        optimizer.step()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[2:])


def profile_shampoo(workload: Workload, steps: int = 10, rows: int = 15) -> str:
    """``torch.profiler`` tables (by self CPU time) of one root-recomputing step and of
    ``steps`` preconditioned, root-free Shampoo steps."""
    params = list(build_model(workload).parameters())
    pool = gradient_pool(params)
    optimizer = Shampoo(params, lr=LR, block_size=workload.block_size,
                        precondition_frequency=10**9, start_preconditioning_step=3,
                        foreach=workload.foreach)

    def run(first: int, count: int) -> str:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for step in range(first, first + count):
                set_grads(params, pool[step % len(pool)])
                optimizer.step()
        return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)

    run(1, 2)  # state allocation, grafting-only steps
    root = run(3, 1)
    preconditioned = run(4, steps)
    return (f"{workload.name}: one root step\n{root}\n"
            f"{workload.name}: {steps} preconditioned steps\n{preconditioned}")


# ------------------------------------------------------------------------- results
@dataclass
class Result:
    """One table row (times in ms)."""

    workload: str
    description: str
    blocks: int
    stacks: int
    steps: str
    floor_ms: float
    median_ms: float
    mean_ms: float
    steady_ms: float
    root_ms: float
    adamw_ms: float
    projected: bool
    check_mean_ms: float | None = None

    @property
    def median_ratio(self) -> float:
        return self.median_ms / self.floor_ms

    @property
    def mean_ratio(self) -> float:
        return self.mean_ms / self.floor_ms

    @property
    def steady_ratio(self) -> float:
        return self.steady_ms / self.floor_ms

    @property
    def adamw_ratio(self) -> float:
        return self.median_ms / self.adamw_ms


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(workload: Workload, run: ShampooRun, window: Schedule, floor: float,
              adamw: float) -> Result:
    """Turns a run into a row; a short run's mean/steady are projected onto ``window``."""
    graft = _median(run.phase(preconditioned=False, roots=False))
    precond = _median(run.phase(preconditioned=True, roots=False))
    root = _median(run.phase(preconditioned=True, roots=True))
    steady_window = dataclasses.replace(window, steps=window.start + window.frequency)
    projected_mean = project_mean(window, graft, precond, root)
    projected_steady = project_mean(steady_window, graft, precond, root,
                                    first=window.start + 1)
    times = run.times_ms
    full = run.schedule == window
    if full:
        mean = statistics.fmean(times)
        steady = statistics.fmean(times[window.start:window.start + window.frequency])
    else:
        mean, steady = projected_mean, projected_steady
    s = run.schedule
    steps = (f"{s.steps}" if full else f"{s.steps} (start {s.start})")
    return Result(workload.name, workload.description, int(run.metrics["num_blocks"]),
                  int(run.metrics["num_block_stacks"]), steps, floor, precond, mean, steady,
                  root, adamw, projected=not full,
                  check_mean_ms=projected_mean if full else None)


def _fmt(value: float, digits: int = 1) -> str:
    return f"{value:.{digits}f}"


def format_table(results: Sequence[Result]) -> str:
    """A markdown table, columns padded so it also reads as plain text."""
    header = ["workload", "blocks/stacks", "steps", "floor ms", "median ms", "median/floor",
              "mean ms", "mean/floor", "steady ms", "steady/floor", "root step ms",
              "AdamW ms", "median/AdamW"]
    rows = []
    for r in results:
        star = "*" if r.projected else ""
        rows.append([r.workload, f"{r.blocks}/{r.stacks}", r.steps, _fmt(r.floor_ms),
                     _fmt(r.median_ms), _fmt(r.median_ratio, 2), _fmt(r.mean_ms) + star,
                     _fmt(r.mean_ratio, 2) + star, _fmt(r.steady_ms) + star,
                     _fmt(r.steady_ratio, 2) + star, _fmt(r.root_ms, 0), _fmt(r.adamw_ms, 2),
                     _fmt(r.adamw_ratio, 1)])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if i < 3 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    sep = "|" + "|".join("-" * (w + 1) + ":" if i >= 3 else "-" * (w + 2)
                         for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), sep, *(line(row) for row in rows)])


# --------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        for row in Path("/proc/cpuinfo").read_text().splitlines():
            if row.startswith("model name"):
                return row.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    """The 1-minute load average: other processes on these cores skew every timing."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):
        return "n/a"


def machine_info(threads: int) -> dict[str, str]:
    return {"torch": torch.__version__, "python": platform.python_version(),
            "cpu": cpu_model(), "logical cpus": str(os.cpu_count()),
            "intra-op threads": str(threads), "load average (1 min)": load_average()}


# ------------------------------------------------------------------------------ main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps of the full window (default 200, --quick 40)")
    parser.add_argument("--precondition-frequency", type=int, default=None,
                        help="precondition_frequency; also the start (default 100, --quick 20)")
    parser.add_argument("--short-steps", type=int, default=None,
                        help="steps of a short run (default 16, --quick 6)")
    parser.add_argument("--adamw-steps", type=int, default=None,
                        help="timed AdamW steps (default 50, --quick 10)")
    parser.add_argument("--workloads", default=DEFAULT_WORKLOADS,
                        help=f"comma-separated, from {DEFAULT_WORKLOADS} (default: all)")
    parser.add_argument("--quick", action="store_true", help="fewer steps, about a minute")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    parser.add_argument("--profile", action="store_true",
                        help="print a torch.profiler table of preconditioned steps per workload")
    args = parser.parse_args(argv)
    quick = args.quick
    args.steps = args.steps or (40 if quick else 200)
    args.precondition_frequency = args.precondition_frequency or (20 if quick else 100)
    args.short_steps = args.short_steps or (6 if quick else 16)
    args.adamw_steps = args.adamw_steps or (10 if quick else 50)
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {unknown}; choose from {DEFAULT_WORKLOADS}")
    args.workloads = [WORKLOADS[n] for n in names]
    if args.steps < args.precondition_frequency:
        parser.error("--steps must be at least --precondition-frequency (the first root step)")
    return args


def measure_rates(workloads: Sequence[Workload], mm_sizes: bool = True
                  ) -> tuple[dict[int, float], dict[tuple[int, int, int], float]]:
    """GFLOP/s of ``torch.mm`` per block dimension in play (unless ``mm_sizes`` is False)
    and of the floor products per block stack."""
    sizes = sorted({n for w in workloads for shape in block_shapes(w) for n in shape})
    mm = {n: mm_rate(n) for n in sizes} if mm_sizes else {}
    stacks = sorted({key for w in workloads for key in block_stacks(w)})
    return mm, {key: stack_rate(*key) for key in stacks}


def print_header(info: dict[str, str], window: Schedule) -> None:
    print("# Shampoo step speed (CPU)\n")
    print("  ".join(f"{k}: {v}" for k, v in info.items()))
    if info["load average (1 min)"] != "n/a" and float(info["load average (1 min)"]) >= 0.5:
        print("note: other processes are busy on this machine; the timings will be inflated.")
    print(f"Models: nn.Linear(bias=False) layers (weights are the blocks, no bias blocks); "
          f"random gradients (x{GRAD_SCALE}) set as p.grad, forward/backward not timed.\n"
          f"Shampoo(lr={LR}, block_size=..., precondition_frequency={window.frequency}, "
          f"start_preconditioning_step={window.start}), other arguments default "
          f"(grafting adam, eigh roots in float32 checked in float64); AdamW(lr={LR}), foreach default.\n")


def print_rates(mm: dict[int, float], before: dict[tuple[int, int, int], float],
                after: dict[tuple[int, int, int], float]) -> None:
    print("float32 matrix-product rates, GFLOP/s (median of timed repetitions after "
          "warm-up; bmm measured before and after the workloads):")
    for n, rate in mm.items():
        print(f"  torch.mm {n}x{n} @ {n}x{n}: {rate:6.1f}")
    for (k, m, n), rate in before.items():
        print(f"  torch.bmm floor products (GG^T, G^TG, LG, GR) on {k} stacked {m}x{n} "
              f"blocks: {rate:6.1f} before, {after[(k, m, n)]:6.1f} after")
    if any(abs(after[key] / rate - 1) > 0.1 for key, rate in before.items()):
        print("warning: a matrix-product rate moved by more than 10% during the run; the "
              "machine was not quiet, rerun for trustworthy ratios.")


def print_legend(window: Schedule, short: Schedule, results: Sequence[Result]) -> None:
    print(f"""
floor: sum over blocks of 4*m*n*(m+n) flops at the bmm rate of that block stack (the
  better of the two measurements, so a busy machine makes the ratios worse, not better).
median: median step of the preconditioned phase without root recomputation.
mean: mean over steps 1..{window.steps} (roots at steps {window.root_steps()}).
steady: mean over steps {window.start + 1}..{window.start + window.frequency} \
(one root step per precondition_frequency window).
root step ms: a step that recomputes all roots.  AdamW ms: median AdamW step.
* projected onto the {window.steps}-step window from the short run's per-phase step times
  (short run: {short.steps} steps, start_preconditioning_step {short.start}, one root step).""")
    checks = [f"{r.workload} {r.mean_ms:.1f} vs {r.check_mean_ms:.1f}"
              for r in results if r.check_mean_ms is not None]
    if checks:
        print("Projection check, measured vs projected mean ms: " + "; ".join(checks))


def write_json(path: Path, info: dict[str, str], mm: dict[int, float],
               rates: dict[tuple[int, int, int], float], window: Schedule, short: Schedule,
               results: Sequence[Result]) -> None:
    payload = {"machine": info, "mm_gflops": {str(k): v for k, v in mm.items()},
               "stack_gflops": {"x".join(map(str, k)): v for k, v in rates.items()},
               "window": dataclasses.asdict(window), "short": dataclasses.asdict(short),
               "results": [dataclasses.asdict(r) | {
                   "median_ratio": r.median_ratio, "mean_ratio": r.mean_ratio,
                   "steady_ratio": r.steady_ratio, "adamw_ratio": r.adamw_ratio}
                   for r in results]}
    path.write_text(json.dumps(payload, indent=2))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    info = machine_info(torch.get_num_threads())
    window = Schedule(args.steps, args.precondition_frequency, args.precondition_frequency)
    short = Schedule(args.short_steps, max(3, args.short_steps // 3), args.precondition_frequency)
    print_header(info, window)

    mm, before = measure_rates(args.workloads)
    runs = []
    for workload in args.workloads:
        run = time_shampoo(workload, short if workload.short else window)
        runs.append((workload, run, time_adamw(workload, args.adamw_steps)))
        print(f"done {workload.name}: {workload.description} "
              f"({time.perf_counter() - began:.0f}s elapsed)", flush=True)
        if args.profile:
            print(profile_shampoo(workload), flush=True)
    _, after = measure_rates(args.workloads, mm_sizes=False)
    rates = {key: max(rate, after[key]) for key, rate in before.items()}
    results = [summarize(workload, run, window, floor_ms(workload, rates), adamw)
               for workload, run, adamw in runs]

    print()
    print_rates(mm, before, after)
    print()
    print(format_table(results))
    print_legend(window, short, results)
    print(f"Total time {time.perf_counter() - began:.0f}s; load average (1 min) at start "
          f"{info['load average (1 min)']}, at end {load_average()}.")
    if args.json is not None:
        write_json(args.json, info, mm, rates, window, short, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
