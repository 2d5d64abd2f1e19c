"""One training run of the comparison, its measurements and its storage.

A *run* trains one workload with one optimizer at one learning rate and seed, and
records its curves (held-out metrics every ``eval_every`` steps against steps and
training seconds), the step timings, the optimizer-state bytes and the peak memory.
Every finished run is written atomically to ``<out>/runs/`` so that ``resume`` can skip it.

Definitions used in the reports:

- *train loss*: the mean of the training-batch losses over the last ``eval_every`` steps.
- *held-out loss*: the workload's ``evaluate`` on its held-out data.
- *training seconds*: wall-clock time of the training steps (batch, forward, backward,
  optimizer step); held-out evaluations are not counted.
- *best held-out loss*: the minimum over the run of the held-out loss averaged over the
  last three evaluations (:func:`smoothed`); it picks learning rates.
- *target*: the best held-out loss of the baseline (by default AdamW at its chosen
  learning rate, same seed); *steps / seconds to target*: at the first evaluation where
  the averaged held-out loss is at or below it (a resolution of ``eval_every`` steps).
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
from .workloads import Workload, WorkloadError

RUN_FORMAT = "scalable_shampoo.compare.run/2"
SMOOTHING = 3  # evaluations averaged when reading the held-out curve (see smoothed)


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


def optimizer_metrics(optimizer: torch.optim.Optimizer) -> dict[str, float] | None:
    """The numeric entries of ``optimizer.metrics()`` (Shampoo's diagnostics), or None
    for an optimizer without it."""
    if not hasattr(optimizer, "metrics"):
        return None
    return {name: value for name, value in optimizer.metrics().items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def check_evaluation(workload: Workload) -> None:
    """Evaluates the workload once and checks the result's form.

    Raises:
        WorkloadError: ``evaluate`` returned no ``"loss"`` or a non-number.
    """
    with evaluation_mode(workload.model):
        metrics = workload.evaluate(workload.model)
    if not isinstance(metrics, dict) or "loss" not in metrics:
        raise WorkloadError(f"workload {workload.name!r}: evaluate() must return a dict with "
                            f"a 'loss' key, got {metrics!r}")
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise WorkloadError(f"workload {workload.name!r}: evaluate() returned "
                                f"{name}={value!r}; metrics must be numbers")


def finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def train_run(workload: Workload, spec: OptimizerSpec, key: RunKey,
              progress: Callable[[int, float], None] | None = None,
              logger: Any = None) -> dict[str, Any]:
    """Trains ``workload.model`` for ``key.steps`` steps and returns the run record.

    A non-finite training or held-out loss stops the run with status ``"diverged"``. The
    record is JSON-ready: non-finite numbers in it are None.

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
            for name, value in (optimizer_metrics(optimizer) or {}).items():
                logger.add_scalar(f"optimizer/{name}", value, step)
        return finite(metrics["loss"])

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
        if not finite(loss_value):
            status, diverged_at = "diverged", step + 1
            break
        if (step + 1) % workload.eval_every == 0 or step + 1 == key.steps:
            memory.close_interval()
            if not record(step + 1):
                status, diverged_at = "diverged", step + 1
                break
            memory.open_interval()
    memory.close_interval()

    losses = smoothed(held_out_curve["loss"])
    best = min(range(len(losses)), key=losses.__getitem__)  # the first best
    optimizer_seconds = sum(step_ms) / 1e3
    return json_safe({
        "format": RUN_FORMAT, "key": key.as_dict(), "status": status,
        "diverged_at_step": diverged_at,
        "final": {"train_loss": curve["train_loss"][-1],
                  **{name: values[-1] for name, values in held_out_curve.items()}},
        "best_held_out_loss": losses[best] if math.isfinite(losses[best]) else None,
        "best_step": curve["step"][best],
        "train_seconds": train_seconds, "eval_seconds": eval_seconds,
        "step_ms_median": statistics.median(step_ms) if step_ms else None,
        "step_ms_mean": statistics.fmean(step_ms) if step_ms else None,
        "optimizer_share": optimizer_seconds / train_seconds if train_seconds > 0 else None,
        "state_bytes": state_bytes(optimizer),
        "peak_memory_bytes": memory.bytes,
        "optimizer_metrics": optimizer_metrics(optimizer),
        "curve": {**curve, "held_out": held_out_curve},
    })


# ------------------------------------------------------------------- storage, resume
def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def write_json_atomic(path: Path, payload: Any) -> None:
    """Writes strict JSON (non-finite numbers as null) to ``path`` via a temporary file
    in the same directory and ``os.replace``, so that a reader sees the old file or the
    new one, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.",
                                         suffix=".tmp", delete=False)
    try:
        with handle:
            json.dump(json_safe(payload), handle, indent=1, allow_nan=False)
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
def smoothed(losses: list[float | None]) -> list[float]:
    """Held-out losses as the comparison reads them: entry ``i >= 1`` is the mean of the
    last ``SMOOTHING`` evaluations after the initial one (fewer at the start), entry 0
    the initial loss; +inf where a loss in the window is missing or non-finite. One
    evaluation can be low by chance (a few hundred held-out examples, a noisy
    iterate); a mean over three is much less so, for the baseline's best as for
    the others' crossing of it."""
    values = [v if finite(v) else math.inf for v in losses]
    return values[:1] + [sum(values[max(1, i - SMOOTHING + 1): i + 1]) / min(i, SMOOTHING)
                         for i in range(1, len(values))]


def selection_loss(run: dict[str, Any]) -> float:
    """What the sweep minimises: the best (smoothed) held-out loss; diverged runs rank
    last."""
    value = run["best_held_out_loss"]
    return value if run["status"] == "ok" and finite(value) else math.inf


def time_to_target(run: dict[str, Any], target: float) -> tuple[int | None, float | None]:
    """``(steps, training seconds)`` at the first evaluation whose smoothed held-out loss
    is <= ``target``, or ``(None, None)`` if the run never got there."""
    curve = run["curve"]
    for step, seconds, loss in zip(curve["step"], curve["seconds"],
                                   smoothed(curve["held_out"]["loss"])):
        if loss <= target:
            return step, seconds
    return None, None
