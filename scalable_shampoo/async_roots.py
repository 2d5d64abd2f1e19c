"""Root computations scheduled with a delay, optionally on background workers.

The paper's heterogeneous design: the accelerator keeps training while the host CPU
computes inverse roots, and training uses the previous roots until the new ones arrive.
Here the delay is part of the algorithm: roots computed from the statistics of step ``t``
are put in use at step ``t + root_delay``, whether they were computed at once on the
training thread (:class:`RootScheduler` with ``asynchronous=False``) or on a worker
thread. The trajectory therefore does not depend on how fast the workers are; the
training thread waits only when a result is not ready at its activation step.

A block stack's root work goes through its three-step seam (``root_inputs`` snapshots
on the training thread, ``compute_roots`` is pure and runs anywhere, ``install_roots``
accepts or rejects on the training thread), so every preconditioner that implements the
seam is served without a special case.
"""

from __future__ import annotations

import dataclasses
import io
import os
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch

from .config import ShampooConfig


class RootWork(Protocol):
    """What the scheduler needs of a block stack: the root seam and a device."""

    device: torch.device
    pending: "PendingRoots | None"

    def root_inputs(self, config: ShampooConfig, step: int) -> Any: ...
    def compute_roots(self, inputs: Any, config: ShampooConfig) -> Any: ...
    def install_roots(self, results: Any, config: ShampooConfig, computed_at: int) -> int: ...
    def root_count(self) -> int: ...


@dataclass
class PendingRoots:
    """Roots computed from the statistics of step ``computed_at`` that go into use at
    step ``activates_at``: either ``results`` (ready), a ``future`` (in flight) whose
    value is ``(results, worker seconds)``, or ``work`` still to be done a share per step
    on the training thread (``async_roots="spread"``).
    """

    computed_at: int
    activates_at: int
    results: Any = None
    future: Future | None = None
    seconds: float = 0.0
    work: "SpreadWork | None" = None


class SpreadWork:
    """One launch's root work cut into units, each one matrix of the stack's inputs (a
    row of a ``(N, d, d)`` input; an input of another kind, such as the
    eigenvalue-corrected ``(factor, basis, flags)``, is one unit), computed a share per
    step of ``steps`` (those after the launch step and before the activation), by cost
    (``d^3`` a matrix), consecutive rows of one input in one batched call. Every matrix's
    root is computed on its own in any case (batched ``eigh`` and ``bmm`` treat each
    matrix apart), so the results equal the all-at-once computation's.
    """

    def __init__(self, stack: "RootWork", inputs: Any, config: ShampooConfig,
                 steps: int) -> None:
        self.stack, self.inputs, self.config = stack, inputs, config
        self.units: list[tuple[int, int | None, float]] = []
        for index, value in enumerate(inputs):
            if isinstance(value, torch.Tensor) and value.dim() == 3:
                cost = float(value.shape[-1]) ** 3
                self.units += [(index, row, cost) for row in range(value.shape[0])]
            else:
                first = value[0] if isinstance(value, (list, tuple)) else value
                size = first.shape[-1] if isinstance(first, torch.Tensor) else 1
                self.units.append((index, None, float(size) ** 3 * max(1, len(first))))
        self.parts: dict[int, list[Any]] = {index: [] for index in range(len(inputs))}
        self.next, self.spent, self.steps = 0, 0.0, max(1, steps)
        self.total = sum(cost for *_, cost in self.units)

    @property
    def done(self) -> bool:
        return self.next >= len(self.units)

    def advance(self, steps_left: int) -> None:
        """Computes this step's share, ``steps_left`` steps (this one included) before
        the activation: the units until the work done is nearest to the even share of
        the steps so far (so a stack of one unit does it midway); all that is left when
        ``steps_left <= 1``."""
        if self.done:
            return
        elapsed = max(1, self.steps - steps_left + 1)
        target = self.total * elapsed / self.steps
        end = self.next
        while end < len(self.units) and (
                steps_left <= 1 or self.spent + self.units[end][2] / 2 <= target):
            self.spent += self.units[end][2]
            end += 1
        while self.next < end:
            index, row, _ = self.units[self.next]
            stop = self.next + 1
            while (row is not None and stop < end and self.units[stop][0] == index):
                stop += 1
            value = self.inputs[index]
            if row is not None:
                value = value[row:row + stop - self.next]
            self.parts[index].append(self.stack.compute_roots([value], self.config)[0])
            self.next = stop

    def results(self) -> list[Any]:
        return [_concatenated(self.parts[index]) for index in range(len(self.inputs))]


def _concatenated(parts: list[Any]) -> Any:
    """Row slices' results joined: every tensor field concatenated along the rows, other
    fields (a Newton iteration count) their largest value."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    fields = {}
    for f in dataclasses.fields(first):
        values = [getattr(part, f.name) for part in parts]
        fields[f.name] = (torch.cat(values) if isinstance(values[0], torch.Tensor)
                          else max(values))
    return type(first)(**fields)


@dataclass
class RootEvents:
    """What one scheduler call did, for the optimizer's counters."""

    computed: int = 0
    rejected: int = 0
    seconds: float = 0.0
    wait_seconds: float = 0.0

    def __iadd__(self, other: "RootEvents") -> "RootEvents":
        self.computed += other.computed
        self.rejected += other.rejected
        self.seconds += other.seconds
        self.wait_seconds += other.wait_seconds
        return self


def default_root_workers() -> int:
    """A share of the cores that leaves most of them to training: half, at most 4."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def resolve_root_delay(config: ShampooConfig, asynchronous: bool) -> int:
    """``config.root_delay``, or its default: 0 when synchronous (1 for the
    eigenvalue-corrected variant, whose basis must not rotate the gradient it was computed
    from), else ``max(1, precondition_frequency // 2)``. Raises ``ValueError`` for a
    delay of 0 with background workers (the result could never be waited for without
    blocking)."""
    if config.root_delay is None:
        if asynchronous:
            return max(1, config.precondition_frequency // 2)
        return 1 if config.preconditioner == "eigenvalue_corrected" else 0
    if asynchronous and config.root_delay < 1:
        raise ValueError(f"root_delay must be in [1, precondition_frequency="
                         f"{config.precondition_frequency}] with async_roots=True, "
                         f"got {config.root_delay}")
    return config.root_delay


def _init_worker() -> None:
    # One intra-op thread per worker, so workers do not starve the training thread;
    # parallelism comes from several workers serving different block stacks. (This sets
    # the worker thread's own OpenMP/MKL thread count; the training thread keeps its own.)
    torch.set_num_threads(1)


def _host_snapshot(inputs: Any, stream: torch.cuda.Stream) -> tuple[Any, torch.cuda.Event]:
    """Copies device tensors in ``inputs`` to pinned host memory on ``stream`` without
    blocking the host; the returned event marks the copies done."""
    stream.wait_stream(torch.cuda.current_stream())

    def copy(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.is_cuda:
            host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            host.copy_(value, non_blocking=True)
            value.record_stream(stream)  # keep the device snapshot alive until copied
            return host
        if isinstance(value, (list, tuple)):
            return type(value)(copy(v) for v in value)
        return value

    with torch.cuda.stream(stream):
        host_inputs = copy(inputs)
        event = torch.cuda.Event()
        event.record(stream)
    return host_inputs, event


def _pinned(value: Any) -> Any:
    """Host results made ready for a non-blocking copy to the device: every tensor in
    them (through dataclasses, lists and tuples) pinned."""
    if isinstance(value, torch.Tensor):
        return value.pin_memory()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _pinned(getattr(value, f.name))
                                             for f in dataclasses.fields(value) if f.init})
    if isinstance(value, (list, tuple)):
        return type(value)(_pinned(v) for v in value)
    return value


def _run(stack: RootWork, inputs: Any, config: ShampooConfig,
         ready: torch.cuda.Event | None) -> tuple[Any, float]:
    """A worker's task: wait for the host snapshot, compute, time it."""
    start = time.perf_counter()
    if ready is not None:
        ready.synchronize()
    results = stack.compute_roots(inputs, config)
    if ready is not None:
        results = _pinned(results)
    return results, time.perf_counter() - start


class RootScheduler:
    """Launches the root work of block stacks and installs it at its activation step.

    Args:
        asynchronous: compute on background worker threads (True) or at once on the
            calling thread (False). The trajectory is the same either way, given the same
            ``root_delay`` and the same number of intra-op threads for the root
            linear algebra (MKL's ``eigh`` is not bitwise reproducible across thread
            counts; workers use one thread each).
        workers: number of worker threads (default :func:`default_root_workers`).
    """

    def __init__(self, asynchronous: bool | str, workers: int | None = None) -> None:
        if not (isinstance(asynchronous, bool) or asynchronous == "spread"):
            raise ValueError(f"async_roots must be True, False or 'spread', got "
                             f"{asynchronous!r}")
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)
                                    or workers < 1):
            raise ValueError(f"root_workers must be an integer >= 1 or None, got {workers!r}")
        # "spread": no workers; the delayed work is done a share per step on the
        # training thread (the same delay defaults and trajectory as background roots).
        self.spread = asynchronous == "spread"
        self.mode = asynchronous
        self.asynchronous = asynchronous is True or self.spread
        self.workers = default_root_workers() if workers is None else workers
        self._executor: ThreadPoolExecutor | None = None
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- lifecycle
    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.workers, "shampoo-roots",
                                                    initializer=_init_worker)
                # Shut the threads down when the scheduler is collected, without a
                # reference to it (which would keep it alive).
                weakref.finalize(self, self._executor.shutdown, wait=False,
                                 cancel_futures=True)
            return self._executor

    def close(self) -> None:
        """Stops the workers, waiting for the computation running now (if any)."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    def __getstate__(self) -> dict[str, Any]:
        # Threads, streams and locks are not state: a copy starts its own workers.
        return {"asynchronous": self.mode, "workers": self.workers}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["asynchronous"], state["workers"])

    # ---------------------------------------------------------------------- work
    def launch(self, stack: RootWork, config: ShampooConfig, step: int,
               delay: int) -> RootEvents:
        """Starts the root work on the statistics of ``step``, to be put in use at
        ``step + delay`` (at once when ``delay == 0``). Work still pending on the stack
        is put in use first: at most one computation per stack is in flight."""
        events = self.activate(stack, config, step, force=True)
        inputs = stack.root_inputs(config, step)
        pending = PendingRoots(computed_at=step, activates_at=step + delay)
        if self.spread and delay > 0:
            # The launch step already snapshots and installs: the work starts at the next
            # step when there is one before the activation.
            pending.work = SpreadWork(stack, inputs, config, max(1, delay - 1))
            stack.pending = pending
            if delay == 1:
                self._advance(pending, step)
            return events
        if self.asynchronous and not self.spread:
            ready = None
            if stack.device.type == "cuda":
                stream = self._streams.setdefault(stack.device,
                                                  torch.cuda.Stream(device=stack.device))
                inputs, ready = _host_snapshot(inputs, stream)
            pending.future = self._pool().submit(_run, stack, inputs, config, ready)
        else:
            pending.results, pending.seconds = _run(stack, inputs, config, None)
        stack.pending = pending
        events += self.activate(stack, config, step)
        return events

    def activate(self, stack: RootWork, config: ShampooConfig, step: int,
                 force: bool = False) -> RootEvents:
        """Installs the stack's pending roots if they are due at ``step`` (or whenever
        pending, with ``force``), waiting for them if they are still in flight."""
        pending = stack.pending
        if pending is None:
            return RootEvents()
        if pending.activates_at > step and not force:
            if pending.work is not None:
                self._advance(pending, step)
            return RootEvents()
        wait = self.wait(stack)
        stack.pending = None
        rejected = stack.install_roots(pending.results, config, pending.computed_at)
        return RootEvents(stack.root_count(), rejected, pending.seconds, wait)

    def wait(self, stack: RootWork) -> float:
        """Waits until the stack's pending roots (if any) are computed; returns the
        seconds waited. A worker's exception is re-raised here, the pending work dropped."""
        pending = stack.pending
        if pending is not None and pending.work is not None:
            start = time.perf_counter()
            self._advance(pending, pending.activates_at)  # all that is left
            return time.perf_counter() - start
        if pending is None or pending.future is None:
            return 0.0
        start = time.perf_counter()
        try:
            pending.results, pending.seconds = pending.future.result()
        except BaseException as error:
            stack.pending = None
            error.add_note(f"Shampoo: raised by the background root computation on the "
                           f"statistics of step {pending.computed_at}; the roots in use "
                           "were kept.")
            raise
        finally:
            pending.future = None
        return time.perf_counter() - start

    @staticmethod
    def _advance(pending: PendingRoots, step: int) -> None:
        """Spread work: the share of ``step``, or the rest once the activation is due."""
        work = pending.work
        start = time.perf_counter()
        work.advance(pending.activates_at - step)
        pending.seconds += time.perf_counter() - start
        if work.done:
            pending.results, pending.work = work.results(), None

    def raise_failures(self, stacks: Sequence[RootWork]) -> None:
        """Re-raises a finished worker task's exception (at the next step, so an error
        surfaces promptly rather than at the activation step). After a failure the
        other tasks in flight are waited for and every failed one dropped, so one
        failing launch raises once."""
        def failed(stack: RootWork) -> bool:
            future = stack.pending.future if stack.pending is not None else None
            return future is not None and future.done() and future.exception() is not None

        if any(failed(stack) for stack in stacks):
            self.wait_all(stacks)

    def wait_all(self, stacks: Sequence[RootWork]) -> float:
        """Waits for the pending work of every stack; returns the seconds waited. If some
        failed (each failed task is dropped), raises the first failure once, with a note
        counting the others."""
        errors, seconds = [], 0.0
        for stack in stacks:
            try:
                seconds += self.wait(stack)
            except Exception as error:  # noqa: PERF203 - the error path only
                errors.append(error)
        if len(errors) > 1:
            errors[0].add_note(f"Shampoo: {len(errors) - 1} more block stack(s) failed the "
                               "same way; their roots in use were kept too.")
        if errors:
            raise errors[0]
        return seconds


# ------------------------------------------------------------------- checkpoints
def pending_row(pending: PendingRoots | None, row: int) -> dict[str, Any] | None:
    """One block's share of computed-but-not-yet-used roots, for a checkpoint: the
    activation bookkeeping and, per result, every tensor field's row (``pending`` must
    not be in flight: see :meth:`RootScheduler.wait`)."""
    if pending is None:
        return None
    if pending.future is not None or pending.work is not None:
        raise RuntimeError("pending roots are still being computed; wait for them first")

    def take(value: Any) -> Any:
        return value[row].clone() if isinstance(value, torch.Tensor) else value

    return {"computed_at": pending.computed_at, "activates_at": pending.activates_at,
            "results": [{f.name: take(getattr(result, f.name))
                         for f in dataclasses.fields(result)} for result in pending.results]}


def pending_from_rows(entries: Sequence[dict[str, Any] | None], result_type: type,
                      device: torch.device, where: str) -> PendingRoots | None:
    """Inverse of :func:`pending_row` for the rows of one block stack: every row must
    hold pending roots from the same step, or none does."""
    present = [entry for entry in entries if entry is not None]
    if not present:
        return None
    timing = {(entry["computed_at"], entry["activates_at"]) for entry in present}
    if len(present) != len(entries) or len(timing) != 1:
        raise ValueError(f"{where}: blocks stacked together must all have pending roots "
                         "from the same step or none (a checkpoint of another optimizer?)")
    (computed_at, activates_at), = timing
    expected = {f.name for f in dataclasses.fields(result_type) if f.init}
    results = []
    for i, first in enumerate(present[0]["results"]):
        if set(first) != expected:
            raise ValueError(f"{where}: pending roots with fields {sorted(first)}, expected "
                             f"{sorted(expected)} (a checkpoint of another version?)")
        fields = {}
        for name, value in first.items():
            if isinstance(value, torch.Tensor):
                fields[name] = torch.stack([e["results"][i][name] for e in present]).to(device)
            else:
                fields[name] = value
        results.append(result_type(**fields))
    return PendingRoots(computed_at=int(computed_at), activates_at=int(activates_at),
                        results=results)


def encode_pending(entry: dict[str, Any] | None) -> bytes:
    """:func:`pending_row`'s entry as one opaque leaf, for ``torch.distributed.checkpoint``,
    whose load template must have the same keys as the checkpoint whether or not roots
    were pending when it was written."""
    buffer = io.BytesIO()
    torch.save(entry, buffer)
    return buffer.getvalue()


def decode_pending(value: Any) -> dict[str, Any] | None:
    """Inverse of :func:`encode_pending`; other values (a plain state dict's entry or
    None) are returned as they are."""
    if isinstance(value, (bytes, bytearray)):
        return torch.load(io.BytesIO(value), map_location="cpu", weights_only=True)
    return value
