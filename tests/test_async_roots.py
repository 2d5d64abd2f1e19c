"""Background root computation (SPEC 4): the asynchronous optimizer follows the
synchronous one with the same ``root_delay`` bit for bit, whatever the workers' speed;
errors surface in the training thread; workers stop; checkpoints keep work in flight."""

from __future__ import annotations

import copy
import gc
import io
import pickle
import threading
import time
import traceback

import pytest
import torch

from scalable_shampoo import Shampoo
from scalable_shampoo.async_roots import (PendingRoots, RootScheduler, default_root_workers,
                                          pending_from_rows, pending_row, resolve_root_delay)
from scalable_shampoo.config import ShampooConfig
from scalable_shampoo.eigenvalue_corrected import EigenvalueCorrectedStack
from scalable_shampoo.matrix_functions import RootResult
from scalable_shampoo.preconditioner import BlockStack

STEPS = 64


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    # Workers run their linear algebra on one thread; MKL's eigh is not bitwise
    # reproducible across thread counts, so the synchronous reference uses one too.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    # Several stack shapes: blocked matrices, a conv kernel, vectors, a one-sided matrix.
    return torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.Tanh(),
                               torch.nn.Linear(10, 10), torch.nn.Tanh(),
                               torch.nn.Linear(10, 3))


def _options(**overrides):
    return dict(lr=0.02, betas=(0.9, 0.99), block_size=8, precondition_frequency=6,
                start_preconditioning_step=3, epsilon=1e-6, **overrides)


def _train(model, opt, steps, seed=1, start=0):
    """``steps`` steps of a fixed regression task; the batch of step ``i`` depends only on
    ``seed`` and ``i`` so interrupted runs see the same data."""
    losses = []
    for i in range(start, start + steps):
        gen = torch.Generator().manual_seed(seed * 10_000 + i)
        x = torch.randn(32, 12, generator=gen)
        y = torch.sin(x[:, :3] * 2) + 0.1 * torch.randn(32, 3, generator=gen)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def _slow_roots(monkeypatch, seconds, stack_type=BlockStack):
    original = stack_type.compute_roots

    def slow(self, inputs, config):
        time.sleep(seconds)
        return original(self, inputs, config)

    monkeypatch.setattr(stack_type, "compute_roots", slow)


def _sync_run(delay, steps=STEPS):
    model = _model()
    opt = Shampoo(model.parameters(), **_options(root_delay=delay))
    _train(model, opt, steps)
    return _params(model), opt


def _shampoo_threads():
    return [t for t in threading.enumerate() if t.name.startswith("shampoo-roots")]


# ------------------------------------------------------------------ equivalence
@pytest.mark.parametrize("delay, workers, sleep", [
    (1, 1, 0.0), (3, 1, 0.0), (6, 2, 0.0),  # fast workers
    (1, 1, 0.02), (3, 2, 0.02),             # slow workers: the training thread waits
])
def test_async_equals_sync_with_the_same_delay(monkeypatch, delay, workers, sleep):
    expected, sync_opt = _sync_run(delay)
    if sleep:
        _slow_roots(monkeypatch, sleep)
    model = _model()
    with Shampoo(model.parameters(), **_options(root_delay=delay), async_roots=True,
                 root_workers=workers) as opt:
        _train(model, opt, STEPS)
        metrics = opt.metrics()
    _assert_same(_params(model), expected)
    sync_metrics = sync_opt.metrics()
    for key in ("root_computations", "root_failures", "root_age_max", "root_residual_max"):
        assert metrics[key] == sync_metrics[key]
    assert metrics["root_computations"] > 0
    if sleep:  # with delay 1 and a slow worker the training thread must have waited
        assert metrics["root_wait_seconds"] > 0
        if delay == 1:
            assert metrics["root_wait_seconds"] >= 0.5 * sleep


def test_delay_changes_the_trajectory():
    # A negative control: the delay is part of the algorithm, not a no-op.
    no_delay, _ = _sync_run(0, steps=20)
    delayed, _ = _sync_run(3, steps=20)
    assert any(not torch.equal(a, b) for a, b in zip(no_delay, delayed))


def test_default_delay_is_half_the_frequency():
    config = ShampooConfig(precondition_frequency=20)
    assert resolve_root_delay(config, asynchronous=True) == 10
    assert resolve_root_delay(config, asynchronous=False) == 0
    assert resolve_root_delay(ShampooConfig(precondition_frequency=1), True) == 1
    assert resolve_root_delay(ShampooConfig(root_delay=4), False) == 4


def test_roots_activate_exactly_at_the_delay(monkeypatch):
    # The roots in use change at step start + delay, computed from step `start`'s statistics.
    model = _model()
    opt = Shampoo(model.parameters(), **_options(root_delay=2), async_roots=True,
                  root_workers=1)
    _slow_roots(monkeypatch, 0.05)
    computed_at = []
    for i in range(8):
        _train(model, opt, 1, start=i)
        stack = opt._plans[0].stacks[0]
        computed_at.append(int(stack.record.computed_at.max()))
    opt.close()
    # start=3: roots of step 3 in use from step 5; frequency 6: next at 9 (+2 = 11).
    assert computed_at == [0, 0, 0, 0, 3, 3, 3, 3]


# ------------------------------------------------------------------- faults
def test_worker_exception_is_raised_at_the_next_step(monkeypatch):
    def broken(self, inputs, config):
        raise ArithmeticError("injected failure in the worker")

    model = _model()
    opt = Shampoo(model.parameters(), **_options(root_delay=3), async_roots=True,
                  root_workers=1)
    _train(model, opt, 2)
    monkeypatch.setattr(BlockStack, "compute_roots", broken)
    _train(model, opt, 1, start=2)  # step 3 launches the (failing) work
    with pytest.raises(ArithmeticError, match="injected failure") as info:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # raised at the first step after it failed
            _train(model, opt, 1, start=3)
    frames = [frame.name for frame in traceback.extract_tb(info.value.__traceback__)]
    assert "broken" in frames  # the worker's own frame: the original traceback
    assert any("background root computation" in note for note in info.value.__notes__)
    monkeypatch.undo()
    _train(model, opt, 10, start=4)  # the optimizer stays usable afterwards
    assert all(torch.isfinite(p).all() for p in model.parameters())
    opt.close()


def test_close_stops_every_worker():
    model = _model()
    opt = Shampoo(model.parameters(), **_options(), async_roots=True, root_workers=2)
    _train(model, opt, 10)
    assert _shampoo_threads()
    opt.close()
    assert not _shampoo_threads()
    _train(model, opt, 10, start=10)  # usable after close: workers start again
    opt.close()
    assert not _shampoo_threads()


def test_context_manager_and_garbage_collection_stop_workers():
    model = _model()
    with Shampoo(model.parameters(), **_options(), async_roots=True) as opt:
        _train(model, opt, 10)
        assert _shampoo_threads()
    assert not _shampoo_threads()

    opt = Shampoo(model.parameters(), **_options(), async_roots=True)
    _train(model, opt, 10)
    assert _shampoo_threads()
    del opt
    gc.collect()
    deadline = time.monotonic() + 10
    while _shampoo_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _shampoo_threads()


# -------------------------------------------------------------- checkpoints
def _checkpoint_in_flight(monkeypatch, load_async: bool, save_async: bool = True):
    """Saves right after a root step (work in flight when async), resumes in a fresh
    optimizer, and compares with the uninterrupted run."""
    total = 30
    expected, _ = _sync_run(3, steps=total)
    _slow_roots(monkeypatch, 0.02)
    model = _model()
    opt = Shampoo(model.parameters(), **_options(root_delay=3), async_roots=save_async)
    _train(model, opt, 9)  # step 9 is a root step: its roots activate at 12
    assert opt.metrics()["roots_in_flight"] > 0
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    opt.close()
    buffer.seek(0)
    saved = torch.load(buffer)
    assert any(block["pending_roots"] is not None
               for entry in saved["opt"]["state"].values() for block in entry["blocks"])
    resumed = _model(seed=123)
    resumed.load_state_dict(saved["model"])
    new_opt = Shampoo(resumed.parameters(), **_options(root_delay=3), async_roots=load_async)
    new_opt.load_state_dict(saved["opt"])
    _train(resumed, new_opt, total - 9, start=9)
    new_opt.close()
    _assert_same(_params(resumed), expected)


@pytest.mark.parametrize("save_async, load_async", [(True, True), (True, False), (False, True)])
def test_checkpoint_with_roots_in_flight_resumes_bitwise(monkeypatch, save_async, load_async):
    _checkpoint_in_flight(monkeypatch, load_async=load_async, save_async=save_async)


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))],
                         ids=["deepcopy", "pickle"])
def test_copy_while_in_flight_continues_identically(monkeypatch, clone):
    _slow_roots(monkeypatch, 0.02)
    model = _model()
    opt = Shampoo(model.parameters(), **_options(root_delay=3), async_roots=True)
    _train(model, opt, 9)
    both = clone({"model": model, "opt": opt})
    twin, twin_opt = both["model"], both["opt"]
    assert twin_opt.metrics()["roots_in_flight"] == opt.metrics()["roots_in_flight"] > 0
    _train(model, opt, 12, start=9)
    _train(twin, twin_opt, 12, start=9)
    _assert_same(_params(model), _params(twin))
    opt.close()
    twin_opt.close()


def test_pending_rows_round_trip():
    gen = torch.Generator().manual_seed(0)
    results = [RootResult(torch.randn(3, 4, 4, generator=gen), torch.rand(3, generator=gen), 0),
               RootResult(torch.randn(3, 2, 2, generator=gen), torch.rand(3, generator=gen), 5)]
    pending = PendingRoots(computed_at=7, activates_at=9, results=results)
    rows = [pending_row(pending, row) for row in range(3)]
    rebuilt = pending_from_rows(rows, RootResult, torch.device("cpu"), "here")
    assert (rebuilt.computed_at, rebuilt.activates_at) == (7, 9)
    for a, b in zip(results, rebuilt.results):
        assert torch.equal(a.root, b.root) and torch.equal(a.residual, b.residual)
        assert a.iterations == b.iterations
    assert pending_from_rows([None, None], RootResult, torch.device("cpu"), "here") is None
    with pytest.raises(ValueError, match="here: blocks stacked together"):
        pending_from_rows([rows[0], None, rows[2]], RootResult, torch.device("cpu"), "here")
    # An entry from another version (a field missing) is a clear error, not a TypeError.
    old = [{**row, "results": [{k: v for k, v in r.items() if k != "iterations"}
                               for r in row["results"]]} for row in rows]
    with pytest.raises(ValueError, match=r"here: pending roots with fields .*another version"):
        pending_from_rows(old, RootResult, torch.device("cpu"), "here")


# ------------------------------------------------------------------ arguments
@pytest.mark.parametrize("kwargs, regex", [
    (dict(async_roots=True, root_delay=0),
     r"root_delay must be in \[1, precondition_frequency=6\] with async_roots=True, got 0"),
    (dict(async_roots="yes"), r"async_roots must be True, False or .spread., got .yes."),
    (dict(async_roots=True, root_workers=0), r"root_workers must be an integer >= 1"),
    (dict(async_roots=True, root_workers=1.5), r"root_workers must be an integer >= 1"),
    (dict(root_delay=7), r"root_delay must be in \[0, precondition_frequency=6\], got 7"),
])
def test_bad_arguments(kwargs, regex):
    with pytest.raises(ValueError, match=regex):
        Shampoo(_model().parameters(), **{**_options(), **kwargs})


def test_zero_delay_set_later_on_an_async_optimizer_fails_before_any_change():
    model = _model()
    opt = Shampoo(model.parameters(), **_options(), async_roots=True)
    _train(model, opt, 2)
    opt.param_groups[0]["root_delay"] = 0
    before = _params(model)
    with pytest.raises(ValueError, match="with async_roots=True"):
        _train(model, opt, 1, start=2)
    _assert_same(_params(model), before)
    opt.close()


def test_default_worker_count_is_a_share_of_the_cores():
    assert 1 <= default_root_workers() <= 4
    assert RootScheduler(True).workers == default_root_workers()


# ------------------------------------------------------------------------ cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_async_on_cuda_equals_sync_on_cuda():
    def run(async_roots):
        torch.manual_seed(0)
        model = _model().cuda()
        opt = Shampoo(model.parameters(), **_options(root_delay=3), async_roots=async_roots)
        for i in range(30):
            gen = torch.Generator().manual_seed(i)
            x = torch.randn(32, 12, generator=gen).cuda()
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        opt.close()
        return [p.detach().cpu() for p in model.parameters()]
    # Roots come from the CPU in the async run and from the GPU in the sync one.
    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ------------------------------------------------- eigenvalue-corrected variant
@pytest.mark.parametrize("method", ["eigh", "qr"])
def test_async_eigenbases_equal_sync_with_the_same_delay(monkeypatch, method):
    # The basis refresh is the eigenvalue-corrected variant's root work: delayed and
    # computed in the background the same way, checkpointed while in flight.
    options = _options(root_delay=2, preconditioner="eigenvalue_corrected",
                       eigenbasis_method=method, basis_refresh_tolerance=0.01)
    model = _model()
    sync = Shampoo(model.parameters(), **options)
    _train(model, sync, 30)
    expected = _params(model)
    _slow_roots(monkeypatch, 0.02, EigenvalueCorrectedStack)
    model = _model()
    opt = Shampoo(model.parameters(), **options, async_roots=True, root_workers=2)
    _train(model, opt, 9)  # root step 9: in flight
    saved = opt.state_dict()
    opt.close()
    resumed = copy.deepcopy(model)
    new_opt = Shampoo(resumed.parameters(), **options, async_roots=True)
    new_opt.load_state_dict(saved)
    _train(resumed, new_opt, 21, start=9)
    new_opt.close()
    _assert_same(_params(resumed), expected)
    assert new_opt.metrics()["basis_refreshes"] == sync.metrics()["basis_refreshes"] > 0



def _failing_launch(monkeypatch):
    """An optimizer whose background roots of every stack failed: 3 stacks launched."""
    def broken(self, inputs, config):
        raise ArithmeticError("injected failure in the worker")

    model = _model()
    opt = Shampoo(model.parameters(), **_options(root_delay=3), async_roots=True,
                  root_workers=2)
    _train(model, opt, 2)
    monkeypatch.setattr(BlockStack, "compute_roots", broken)
    _train(model, opt, 1, start=2)  # step 3 launches the failing work of every stack
    stacks = sum(len(plan.stacks) for plan in opt._plans)
    assert stacks > 2 and _shampoo_threads()
    return model, opt, stacks


def test_close_after_failed_roots_raises_once_and_stops_the_workers(monkeypatch):
    _, opt, stacks = _failing_launch(monkeypatch)
    with pytest.raises(ArithmeticError, match="injected failure") as info:
        opt.close()
    assert any(f"{stacks - 1} more block stack(s) failed" in note
               for note in info.value.__notes__)
    assert not _shampoo_threads()
    opt.close()  # the failures were reported: nothing more to raise


def test_leaving_a_with_block_on_the_users_exception_keeps_it(monkeypatch):
    model, opt, _ = _failing_launch(monkeypatch)
    with pytest.raises(KeyError, match="the user's own") as info:
        with opt:
            raise KeyError("the user's own error")
    assert any("Shampoo.close() on leaving the with block also failed: ArithmeticError"
               in note for note in info.value.__notes__)
    assert not _shampoo_threads()
