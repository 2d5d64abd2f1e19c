"""Training runs of the comparison: one run, the learning-rate sweep, targets, resume.

A *run* trains one workload with one optimizer at one learning rate and seed, and
records its curves (held-out metrics every ``eval_every`` steps against steps and
training seconds), the step timings, the optimizer-state bytes and the peak memory.
Every finished run is written atomically to ``<out>/runs/`` so that ``resume`` can skip it.

Definitions used in the reports:

- *train loss*: the mean of the training-batch losses over the last ``eval_every`` steps.
- *held-out loss*: the workload's ``evaluate`` on its held-out data.
- *training seconds*: wall-clock time of the training steps (batch, forward, backward,
  optimizer step); held-out evaluations are not counted.
- *target*: the best held-out loss the baseline (by default AdamW at its chosen learning
  rate, same seed) reached; *steps / seconds to target*: at the first evaluation whose
  held-out loss is at or below it (so steps have a resolution of ``eval_every``).
- *optimizer share*: time in ``optimizer.step()`` over the training seconds.
- *peak memory*: the largest increase of the process's resident memory during the
  training steps over its resident memory when training started. Before training and
  after every evaluation, free heap memory is returned to the system (glibc
  ``malloc_trim``) and the kernel's high-water mark is reset (``/proc/self/clear_refs``);
  the mark (``VmHWM``) is read before every evaluation. So it counts what the training
  steps keep resident at once: gradients, activations, temporaries and optimizer state.
  ``None`` where Linux's interface or glibc is missing.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .optimizers import OptimizerSpec, state_bytes
from .workloads import Workload

RUN_FORMAT = "scalable_shampoo.compare.run/1"


@dataclass(frozen=True)
class RunKey:
    """Everything that determines a run's numbers; a stored run is reused by ``resume``
    only when its key is equal."""

    workload: str
    optimizer: str
    hyperparameters: tuple[tuple[str, str], ...]
    lr: float
    seed: int
    steps: int
    threads: int

    def as_dict(self) -> dict[str, Any]:
        return {"workload": self.workload, "optimizer": self.optimizer,
                "hyperparameters": dict(self.hyperparameters), "lr": self.lr,
                "seed": self.seed, "steps": self.steps, "threads": self.threads}

    def path(self, out: Path, optimizer_slug: str) -> Path:
        return out / "runs" / self.workload.replace(":", "_") / optimizer_slug / \
            f"lr{self.lr:.3g}-seed{self.seed}.json"


# ----------------------------------------------------------------------- peak memory
def _read_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _release_free_heap() -> bool:
    """glibc's ``malloc_trim(0)``: freed memory that the allocator kept goes back to the
    system, so that the resident size measures memory in use."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak resident-memory increase over a baseline, across intervals (see module doc)."""

    def __init__(self) -> None:
        self.available = _release_free_heap() and _reset_peak_rss()
        self.baseline = _read_status_kib("VmRSS") if self.available else None
        self.peak_kib = 0

    def close_interval(self) -> None:
        """Folds the peak since the last reset in; call before untracked work."""
        high = _read_status_kib("VmHWM") if self.available else None
        if high is not None and self.baseline is not None:
            self.peak_kib = max(self.peak_kib, high - self.baseline)

    def open_interval(self) -> None:
        if self.available:
            _release_free_heap()
            _reset_peak_rss()

    @property
    def bytes(self) -> int | None:
        return self.peak_kib * 1024 if self.available and self.baseline is not None else None


# -------------------------------------------------------------------------- one run
@contextmanager
def evaluation_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def train_run(workload: Workload, spec: OptimizerSpec, key: RunKey,
              progress: Callable[[int, float], None] | None = None,
              logger: Any = None) -> dict[str, Any]:
    """Trains ``workload.model`` for ``key.steps`` steps and returns the run record.

    A non-finite training or held-out loss stops the run with status ``"diverged"``.

    Args:
        progress: called as ``progress(steps_done, last_train_loss)`` after every step.
        logger: a TensorBoard ``SummaryWriter`` (or None) for losses and Shampoo metrics.
    """
    model = workload.model
    model.train()
    optimizer = spec.build(model.parameters(), key.lr)
    curve: dict[str, list] = {"step": [], "seconds": [], "train_loss": []}
    held_out_curve: dict[str, list] = {}
    step_ms: list[float] = []
    window: list[float] = []
    train_seconds, eval_seconds, status, diverged_at = 0.0, 0.0, "ok", None

    def record(step: int) -> bool:
        nonlocal eval_seconds
        start = time.perf_counter()
        with evaluation_mode(model):
            metrics = {name: float(value) for name, value in workload.evaluate(model).items()}
        eval_seconds += time.perf_counter() - start
        curve["step"].append(step)
        curve["seconds"].append(train_seconds)
        curve["train_loss"].append(sum(window) / len(window) if window else None)
        window.clear()
        for name, value in metrics.items():
            held_out_curve.setdefault(name, []).append(value)
        if logger is not None:
            for name, value in metrics.items():
                logger.add_scalar(f"held_out/{name}", value, step)
            if hasattr(optimizer, "metrics"):
                for name, value in optimizer.metrics().items():
                    logger.add_scalar(f"optimizer/{name}", value, step)
        return _finite(metrics["loss"])

    memory = PeakMemory()
    record(0)
    memory.open_interval()
    for step in range(key.steps):
        start = time.perf_counter()
        batch = workload.train_batch(step)
        optimizer.zero_grad(set_to_none=True)
        loss = workload.loss(model, batch)
        loss.backward()
        loss_value = loss.item()
        before_step = time.perf_counter()
        optimizer.step()
        end = time.perf_counter()
        step_ms.append((end - before_step) * 1e3)
        train_seconds += end - start
        window.append(loss_value)
        if logger is not None:
            logger.add_scalar("train/loss", loss_value, step + 1)
        if progress is not None:
            progress(step + 1, loss_value)
        if not _finite(loss_value):
            status, diverged_at = "diverged", step + 1
            break
        if (step + 1) % workload.eval_every == 0 or step + 1 == key.steps:
            memory.close_interval()
            if not record(step + 1):
                status, diverged_at = "diverged", step + 1
                break
            memory.open_interval()
    memory.close_interval()

    losses = [v if _finite(v) else math.inf for v in held_out_curve["loss"]]
    best = min(range(len(losses)), key=losses.__getitem__)
    optimizer_seconds = sum(step_ms) / 1e3
    return {
        "format": RUN_FORMAT, "key": key.as_dict(), "status": status,
        "diverged_at_step": diverged_at,
        "final": {"train_loss": curve["train_loss"][-1],
                  **{name: values[-1] for name, values in held_out_curve.items()}},
        "best_held_out_loss": losses[best] if status == "ok" or math.isfinite(losses[best])
        else None,
        "best_step": curve["step"][best],
        "train_seconds": train_seconds, "eval_seconds": eval_seconds,
        "step_ms_median": statistics.median(step_ms) if step_ms else None,
        "step_ms_mean": statistics.fmean(step_ms) if step_ms else None,
        "optimizer_share": optimizer_seconds / train_seconds if train_seconds > 0 else None,
        "state_bytes": state_bytes(optimizer),
        "peak_memory_bytes": memory.bytes,
        "optimizer_metrics": optimizer.metrics() if hasattr(optimizer, "metrics") else None,
        "curve": {**curve, "held_out": held_out_curve},
    }


# ------------------------------------------------------------------- storage, resume
def write_json_atomic(path: Path, payload: Any) -> None:
    """Writes JSON to ``path`` via a temporary file in the same directory and
    ``os.replace``, so a reader sees the old file or the new one, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.",
                                         suffix=".tmp", delete=False)
    try:
        with handle:
            json.dump(payload, handle, indent=1, allow_nan=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def load_finished(path: Path, key: RunKey) -> dict[str, Any] | None:
    """The stored run at ``path`` if it is complete and was made with ``key``."""
    try:
        with open(path) as handle:
            stored = json.load(handle)
    except (OSError, ValueError):
        return None
    if stored.get("format") != RUN_FORMAT or stored.get("key") != key.as_dict():
        return None
    return stored


# --------------------------------------------------------------- selection, targets
def selection_loss(run: dict[str, Any]) -> float:
    """What the sweep minimises: the best held-out loss; diverged runs rank last."""
    value = run["best_held_out_loss"]
    return value if run["status"] == "ok" and _finite(value) else math.inf


def time_to_target(run: dict[str, Any], target: float) -> tuple[int | None, float | None]:
    """``(steps, training seconds)`` at the first evaluation with held-out loss
    <= ``target``, or ``(None, None)`` if the run never got there."""
    curve = run["curve"]
    for step, seconds, loss in zip(curve["step"], curve["seconds"], curve["held_out"]["loss"]):
        if _finite(loss) and loss <= target:
            return step, seconds
    return None, None


# ------------------------------------------------------------------------ comparison
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
    present = [v for v in values if _finite(v)]
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


def _plan(settings: CompareSettings, workloads: list[tuple[str, Workload]]) -> int:
    """Number of runs the comparison will make."""
    count = 0
    for _ in workloads:
        for spec in settings.optimizers:
            sweep = 1 if spec.fixed_lr is not None or settings.lr is not None else settings.lr_sweep
            count += sweep + len(settings.seeds) - 1
    return count


def _lr_candidates(settings: CompareSettings, spec: OptimizerSpec, workload: Workload) -> list[float]:
    from .optimizers import LR_CENTERS, lr_grid

    if spec.fixed_lr is not None:
        return [spec.fixed_lr]
    if settings.lr is not None:
        return [settings.lr]
    return lr_grid(workload.lr_centers.get(spec.kind, LR_CENTERS[spec.kind]), settings.lr_sweep)


def resolve_workloads(settings: CompareSettings) -> list[tuple[str, Callable[[int], Workload], Workload]]:
    """Every workload's builder and its build for the first seed; fails before training
    on an unknown or broken workload."""
    from .workloads import WorkloadError, build_workload, resolve_builder

    resolved, names = [], set()
    for spec in settings.workloads:
        builder = resolve_builder(spec)
        bound = lambda seed, builder=builder, spec=spec: build_workload(builder, seed, spec)
        try:
            first = bound(settings.seeds[0])
        except WorkloadError:
            raise
        except Exception as error:  # user code: report it as bad input
            raise WorkloadError(f"workload {spec!r}: building it failed: "
                                f"{type(error).__name__}: {error}") from None
        if first.name in names:
            raise WorkloadError(f"two workloads are named {first.name!r}")
        names.add(first.name)
        resolved.append((spec, bound, first))
    return resolved


def run_comparison(settings: CompareSettings) -> dict[str, Any]:
    """Runs the comparison and returns its results (the content of ``results.json``
    except the header that :mod:`.report` adds). Restores torch's thread count."""
    check_writable(settings.out)
    if settings.tensorboard is not None:
        check_writable(settings.tensorboard)
    previous_threads = torch.get_num_threads()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    try:
        resolved = resolve_workloads(settings)
        session = _Session(settings, _plan(settings, [(s, w) for s, _, w in resolved]))
        results = [_compare_workload(settings, session, spec, builder, first)
                   for spec, builder, first in resolved]
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

    baseline_runs = chosen[settings.baseline_label][2]
    targets = {run["key"]["seed"]: (selection_loss(run) if math.isfinite(selection_loss(run))
                                    else None) for run in baseline_runs}
    baseline_times = {run["key"]["seed"]: time_to_target(run, targets[run["key"]["seed"]])
                      if targets[run["key"]["seed"]] is not None else (None, None)
                      for run in baseline_runs}
    optimizers = []
    for spec in settings.optimizers:
        lr, sweep, runs = chosen[spec.label]
        grid = [run["key"]["lr"] for run in sweep]
        per_seed = [_seed_summary(run, targets[run["key"]["seed"]],
                                  baseline_times[run["key"]["seed"]]) for run in runs]
        optimizers.append({
            "label": spec.label, "kind": spec.kind, "hyperparameters": spec.describe(),
            "lr_grid": grid, "chosen_lr": lr,
            "lr_at_grid_edge": len(grid) > 1 and lr in (grid[0], grid[-1]),
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
