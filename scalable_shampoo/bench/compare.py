"""A comparison: the plan of runs, learning-rate sweeps, targets, per-seed summaries.

Per workload and optimizer, the sweep's learning rates run on the first seed and the one
with the best held-out loss (:func:`.runner.selection_loss`) is chosen; the other seeds
rerun it. The baseline's (by default AdamW's) best held-out loss per seed is the target
of that seed's runs; see :mod:`.runner` for how runs are measured.
"""

from __future__ import annotations

import math
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from . import BENCH_EXTRA_HINT, BENCH_MODULES
from .optimizers import OptimizerSpec, lr_grid, spec_lr_center
from .runner import (RunKey, check_evaluation, finite, load_finished, selection_loss,
                     time_to_target, train_run, write_json_atomic)
from .workloads import Workload, WorkloadError, build_workload, resolve_builder


class CompareError(ValueError):
    """Settings of a comparison that cannot run (reported without a traceback)."""


@dataclass(frozen=True)
class CompareSettings:
    """What ``scalable-shampoo compare`` runs.

    Attributes:
        workloads: built-in names or ``module:function`` specifications, in order.
        optimizers: the optimizers, labels unique.
        out: output directory (created; must be writable).
        steps: training steps of every run; None: each workload's own (``steps``, or
            ``quick_steps`` under ``quick``).
        quick: the short version (see ``quick_steps``).
        lr: one learning rate for every optimizer (no sweep), or None.
        lr_sweep: grid points per optimizer when ``lr`` is None, >= 1.
        seeds: seeds; the sweep runs on the first, the others repeat the chosen lr.
        threads: torch intra-op threads during the comparison (restored after), or None.
        resume: reuse finished runs stored in ``out`` with the same settings.
        tensorboard: directory for TensorBoard logs, or None.
        baseline: label of the optimizer that sets the targets; None: ``adamw`` when
            present, else the first optimizer.
        progress: show a progress bar per run.
    """

    workloads: tuple[str, ...]
    optimizers: tuple[OptimizerSpec, ...]
    out: Path
    steps: int | None = None
    quick: bool = False
    lr: float | None = None
    lr_sweep: int = 3
    seeds: tuple[int, ...] = (0,)
    threads: int | None = None
    resume: bool = False
    tensorboard: Path | None = None
    baseline: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.workloads:
            raise CompareError("no workloads given")
        if len(set(self.workloads)) != len(self.workloads):
            raise CompareError(f"a workload is given twice: {', '.join(self.workloads)}")
        if not self.optimizers:
            raise CompareError("no optimizers given")
        labels = [spec.label for spec in self.optimizers]
        if len(set(labels)) != len(labels):
            raise CompareError(f"an optimizer is given twice: {', '.join(labels)}")
        if self.baseline is not None and self.baseline not in labels:
            raise CompareError(f"baseline {self.baseline!r} is not among the optimizers "
                               f"({', '.join(labels)})")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise CompareError(f"seeds must be distinct and at least one, got {self.seeds}")
        for name in ("steps", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise CompareError(f"{name} must be >= 1, got {value}")
        if self.lr_sweep < 1:
            raise CompareError(f"lr_sweep must be >= 1, got {self.lr_sweep}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise CompareError(f"lr must be a positive number, got {self.lr}")

    def as_dict(self) -> dict[str, Any]:
        """The settings as JSON values, for ``results.json``."""
        return {"workloads": list(self.workloads),
                "optimizers": [spec.label for spec in self.optimizers],
                "steps": self.steps, "quick": self.quick, "lr": self.lr,
                "lr_sweep": self.lr_sweep, "seeds": list(self.seeds),
                "threads": self.threads, "out": str(self.out), "resume": self.resume,
                "tensorboard": None if self.tensorboard is None else str(self.tensorboard),
                "baseline": self.baseline_label}

    @property
    def baseline_label(self) -> str:
        labels = [spec.label for spec in self.optimizers]
        if self.baseline is not None:
            return self.baseline
        return "adamw" if "adamw" in labels else labels[0]


def check_writable(directory: Path) -> None:
    """Creates ``directory`` and checks that a file can be written in it."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise CompareError(f"output directory {str(directory)!r} is not writable: "
                           f"{error.strerror or error}") from None


def _progress_bar(enabled: bool, total: int, description: str) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm  # the bench extra

    return tqdm(total=total, desc=description, leave=True, dynamic_ncols=True,
                mininterval=0.5)


def _tensorboard_writer(directory: Path | None, key: RunKey, slug: str) -> Any:
    if directory is None:
        return None
    from torch.utils.tensorboard import SummaryWriter  # the tensorboard extra

    return SummaryWriter(str(key.path(directory, slug).with_suffix("")))


class _Session:
    """Runs (or, with resume, reloads) runs and counts them for the progress bars."""

    def __init__(self, settings: CompareSettings, total: int) -> None:
        self.settings = settings
        self.total = total
        self.done = 0
        self.reused = 0

    def run(self, workload_spec: str, builder: Callable[[int], Workload],
            spec: OptimizerSpec, lr: float, seed: int, steps: int) -> dict[str, Any]:
        self.done += 1
        key = RunKey(workload_spec, spec.label, tuple(spec.describe().items()), lr, seed, steps,
                     torch.get_num_threads())
        path = key.path(self.settings.out, spec.slug)
        if self.settings.resume:
            stored = load_finished(path, key)
            if stored is not None:
                self.reused += 1
                return stored
        workload = builder(seed)
        description = (f"[{self.done}/{self.total}] {workload.name} {spec.label} "
                       f"lr={lr:.3g} seed={seed}")
        bar = _progress_bar(self.settings.progress, steps, description)
        logger = _tensorboard_writer(self.settings.tensorboard, key, spec.slug)

        def progress(done: int, loss: float) -> None:
            bar.update(1)
            if done % 10 == 0 or done == steps:
                bar.set_postfix(loss=f"{loss:.4g}", refresh=False)

        try:
            run = train_run(workload, spec, key, progress if bar is not None else None, logger)
        finally:
            if bar is not None:
                bar.close()
            if logger is not None:
                logger.close()
        write_json_atomic(path, run)
        return run


def _seed_summary(run: dict[str, Any], target: float | None,
                  baseline: tuple[int | None, float | None]) -> dict[str, Any]:
    steps, seconds = time_to_target(run, target) if target is not None else (None, None)
    ratio = lambda mine, theirs: (mine / theirs if mine is not None and theirs else None)
    return {
        "seed": run["key"]["seed"], "status": run["status"],
        "diverged_at_step": run["diverged_at_step"], "final": run["final"],
        "best_held_out_loss": run["best_held_out_loss"], "best_step": run["best_step"],
        "target": target, "steps_to_target": steps, "seconds_to_target": seconds,
        "steps_ratio": ratio(steps, baseline[0]), "seconds_ratio": ratio(seconds, baseline[1]),
        **{name: run[name] for name in ("train_seconds", "step_ms_median", "step_ms_mean",
                                        "optimizer_share", "state_bytes", "peak_memory_bytes")},
    }


def _mean(values: list[Any]) -> float | None:
    present = [v for v in values if finite(v)]
    return statistics.fmean(present) if len(present) == len(values) and present else None


def _aggregate(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over seeds; a target-related mean only when every seed reached the target."""
    keys = ("best_held_out_loss", "steps_to_target", "seconds_to_target", "steps_ratio",
            "seconds_ratio", "train_seconds", "step_ms_median", "step_ms_mean",
            "optimizer_share", "state_bytes", "peak_memory_bytes")
    final_keys = per_seed[0]["final"].keys()
    return {
        "seeds": len(per_seed),
        "diverged": sum(s["status"] == "diverged" for s in per_seed),
        "reached_target": sum(s["steps_to_target"] is not None for s in per_seed),
        "final": {k: _mean([s["final"].get(k) for s in per_seed]) for k in final_keys},
        **{k: _mean([s[k] for s in per_seed]) for k in keys},
    }


def _planned_runs(settings: CompareSettings) -> int:
    """Number of runs the comparison will make."""
    per_workload = sum((1 if spec.fixed_lr is not None or settings.lr is not None
                        else settings.lr_sweep) + len(settings.seeds) - 1
                       for spec in settings.optimizers)
    return len(settings.workloads) * per_workload


def _lr_candidates(settings: CompareSettings, spec: OptimizerSpec,
                   workload: Workload) -> list[float]:
    if spec.fixed_lr is not None:
        return [spec.fixed_lr]
    if settings.lr is not None:
        return [settings.lr]
    return lr_grid(spec_lr_center(spec, workload.lr_centers), settings.lr_sweep)


ResolvedWorkload = tuple[str, Callable[[int], Workload], Workload]


def prepare(settings: CompareSettings) -> list[ResolvedWorkload]:
    """Checks what can be checked before training: the output directories are writable,
    and every workload resolves and builds for the first seed. Returns, per workload, its
    specification, its builder and that first build.

    Raises:
        CompareError, WorkloadError: bad input (both are ``ValueError``).
    """
    check_writable(settings.out)
    if settings.tensorboard is not None:
        check_writable(settings.tensorboard)
    resolved, names = [], set()
    for spec in settings.workloads:
        builder = resolve_builder(spec)
        bound = lambda seed, builder=builder, spec=spec: build_workload(builder, seed, spec)
        try:
            first = bound(settings.seeds[0])
        except WorkloadError:
            raise
        except ImportError as error:
            missing = (error.name or "").split(".")[0]
            if missing not in BENCH_MODULES:
                raise WorkloadError(f"workload {spec!r}: building it failed: "
                                    f"{type(error).__name__}: {error}") from None
            raise WorkloadError(f"workload {spec!r} needs {missing}, which is not installed; "
                                f"it is part of the bench extra: {BENCH_EXTRA_HINT}") from None
        except Exception as error:  # user code: report it as bad input
            raise WorkloadError(f"workload {spec!r}: building it failed: "
                                f"{type(error).__name__}: {error}") from None
        check_evaluation(first)
        if first.name in names:
            raise WorkloadError(f"two workloads are named {first.name!r}")
        names.add(first.name)
        resolved.append((spec, bound, first))
    return resolved


def run_comparison(settings: CompareSettings,
                   prepared: list[ResolvedWorkload] | None = None) -> dict[str, Any]:
    """Runs the comparison and returns its results (the content of ``results.json``
    except the header that :mod:`.report` adds). ``prepared``: the result of
    :func:`prepare`, which is called when it is None. Restores torch's thread count."""
    if prepared is None:
        prepared = prepare(settings)
    previous_threads = torch.get_num_threads()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    try:
        session = _Session(settings, _planned_runs(settings))
        results = [_compare_workload(settings, session, spec, builder, first)
                   for spec, builder, first in prepared]
        return {"workloads": results, "runs_reused": session.reused,
                "runs_total": session.total, "threads": torch.get_num_threads()}
    finally:
        torch.set_num_threads(previous_threads)


def _compare_workload(settings: CompareSettings, session: _Session, workload_spec: str,
                      builder: Callable[[int], Workload], first: Workload) -> dict[str, Any]:
    steps = settings.steps or (first.quick_steps if settings.quick else first.steps)
    first_seed, other_seeds = settings.seeds[0], settings.seeds[1:]
    chosen: dict[str, tuple[float, list[dict[str, Any]], list[dict[str, Any]]]] = {}
    all_runs: list[dict[str, Any]] = []
    for spec in settings.optimizers:
        grid = _lr_candidates(settings, spec, first)
        sweep = [session.run(workload_spec, builder, spec, lr, first_seed, steps) for lr in grid]
        best = min(range(len(sweep)), key=lambda i: (selection_loss(sweep[i]), i))
        lr = grid[best]
        runs = [sweep[best]] + [session.run(workload_spec, builder, spec, lr, seed, steps)
                                for seed in other_seeds]
        chosen[spec.label] = (lr, sweep, runs)
        all_runs += sweep + runs[1:]

    # Per seed: the baseline's best held-out loss, and when the baseline reached it.
    targets: dict[int, float | None] = {}
    baseline_times: dict[int, tuple[int | None, float | None]] = {}
    for run in chosen[settings.baseline_label][2]:
        seed, best = run["key"]["seed"], selection_loss(run)
        targets[seed] = best if math.isfinite(best) else None
        baseline_times[seed] = time_to_target(run, best) if math.isfinite(best) else (None, None)
    optimizers = []
    for spec in settings.optimizers:
        lr, sweep, runs = chosen[spec.label]
        grid = [run["key"]["lr"] for run in sweep]
        per_seed = [_seed_summary(run, targets[run["key"]["seed"]],
                                  baseline_times[run["key"]["seed"]]) for run in runs]
        optimizers.append({
            "label": spec.label, "kind": spec.kind, "hyperparameters": spec.describe(),
            "lr_grid": grid, "chosen_lr": lr,
            # Only a grid of 3 or more says that the best lies inside it.
            "lr_at_grid_edge": len(grid) >= 3 and lr in (grid[0], grid[-1]),
            "sweep": [{"lr": run["key"]["lr"], "status": run["status"],
                       "best_held_out_loss": run["best_held_out_loss"]} for run in sweep],
            "per_seed": per_seed, "summary": _aggregate(per_seed),
        })
    return {
        "name": first.name, "spec": workload_spec, "description": first.description,
        "info": first.info, "steps": steps, "eval_every": first.eval_every,
        "baseline": settings.baseline_label,
        "targets": {str(seed): target for seed, target in targets.items()},
        "optimizers": optimizers, "runs": all_runs,
    }
