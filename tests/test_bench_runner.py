"""One run: curves, timings, divergence, peak memory, targets, atomic storage."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
import torch

from scalable_shampoo.bench.optimizers import parse_spec
from scalable_shampoo.bench.runner import (
    RUN_FORMAT, PeakMemory, RunKey, check_evaluation, load_finished, selection_loss, smoothed,
    time_to_target, train_run, write_json_atomic)
from scalable_shampoo.bench.workloads import WorkloadError
from tests.bench_helpers import build, one_thread  # noqa: F401  (autouse fixture)

TOY = "tests.bench_helpers:build"


def _run(losses, seconds=None, status="ok"):
    steps = [4 * i for i in range(len(losses))]
    finite = [v for v in losses if math.isfinite(v)]
    return {"status": status, "best_held_out_loss": min(finite) if finite else None,
            "curve": {"step": steps, "seconds": seconds or [0.5 * s for s in steps],
                      "held_out": {"loss": losses}}}


def test_smoothed_averages_the_last_three_evaluations_after_the_first():
    assert smoothed([9.0, 4.0, 2.0, 3.0, 1.0, 5.0]) == pytest.approx(
        [9.0, 4.0, 3.0, 3.0, 2.0, 3.0])
    assert smoothed([9.0, 4.0, None, 2.0, 2.0, 2.0, 2.0]) == pytest.approx(
        [9.0, 4.0, math.inf, math.inf, math.inf, 2.0, 2.0])
    assert smoothed([]) == [] and smoothed([5.0]) == [5.0]


def test_time_to_target_is_the_first_evaluation_at_or_below():
    run = _run([3.0, 2.0, 1.0, 1.5, 0.5])  # smoothed: 3, 2, 1.5, 1.5, 1.0
    assert time_to_target(run, 1.5) == (8, 4.0)
    assert time_to_target(run, 1.0) == (16, 8.0)
    assert time_to_target(run, 0.5) == (None, None)
    assert time_to_target(_run([3.0, math.nan, 1.0, 1.0, 1.0, 1.0]), 1.0) == (16, 8.0)


def test_selection_ranks_diverged_runs_last():
    assert selection_loss(_run([3.0, 1.0])) == 1.0
    assert selection_loss(_run([3.0, 0.5, math.nan], status="diverged")) == math.inf


def test_train_run_records_curves_and_timings():
    spec = parse_spec("shampoo")
    key = RunKey(TOY, spec.label, tuple(spec.describe().items()), 1e-2, 0, 10, 1)
    run = train_run(build(0), spec, key)
    curve = run["curve"]
    assert curve["step"] == [0, 4, 8, 10]
    assert curve["train_loss"][0] is None and all(v > 0 for v in curve["train_loss"][1:])
    assert curve["seconds"] == sorted(curve["seconds"]) and curve["seconds"][0] == 0.0
    assert run["final"]["loss"] == curve["held_out"]["loss"][-1]
    assert run["final"]["rmse"] == pytest.approx(run["final"]["loss"] ** 0.5)
    assert run["best_held_out_loss"] == min(smoothed(curve["held_out"]["loss"]))
    assert run["best_held_out_loss"] >= min(curve["held_out"]["loss"])
    assert 0 < run["optimizer_share"] < 1
    assert run["step_ms_median"] > 0 and run["train_seconds"] >= curve["seconds"][-1]
    assert run["optimizer_metrics"]["step"] == 10
    assert run["state_bytes"] == run["optimizer_metrics"]["state_bytes"]


def test_diverging_run_is_reported_not_raised():
    spec = parse_spec("sgd:momentum=0")
    key = RunKey(TOY, spec.label, tuple(spec.describe().items()), 1e4, 0, 12, 1)
    run = train_run(build(0), spec, key)
    assert run["status"] == "diverged" and run["diverged_at_step"] < 12
    assert run["best_held_out_loss"] == min(smoothed(run["curve"]["held_out"]["loss"]))
    assert selection_loss(run) == math.inf


def test_peak_memory_sees_a_large_temporary():
    memory = PeakMemory()
    if memory.bytes is None:
        pytest.skip("no /proc/self/clear_refs or glibc here")
    memory.open_interval()
    block = torch.ones(48 * 2**20 // 4)  # 48 MiB, written so that it is resident
    del block
    memory.close_interval()
    assert memory.bytes >= 40 * 2**20


def test_write_json_atomic_replaces_whole_files_only(tmp_path):
    path = tmp_path / "a" / "run.json"
    write_json_atomic(path, {"x": 1})
    write_json_atomic(path, {"x": 2, "y": [math.inf, math.nan, 1.5]})
    assert json.loads(path.read_text()) == {"x": 2, "y": [None, None, 1.5]}
    with pytest.raises(TypeError):
        write_json_atomic(path, {"x": object()})
    assert json.loads(path.read_text())["x"] == 2
    assert os.listdir(path.parent) == ["run.json"]  # no temporary files left behind


def test_load_finished_needs_the_same_key(tmp_path):
    key = RunKey(TOY, "adamw", (), 1e-3, 0, 10, 1)
    path = tmp_path / "run.json"
    write_json_atomic(path, {"format": RUN_FORMAT, "key": key.as_dict()})
    assert load_finished(path, key) is not None
    assert load_finished(path, RunKey(TOY, "adamw", (), 1e-3, 0, 11, 1)) is None
    path.write_text('{"format": "scalable_shampoo.comp')  # a torn file is not a finished run
    assert load_finished(path, key) is None


@pytest.mark.parametrize("result, message", [
    ({"rmse": 1.0}, r"must return a dict with a 'loss' key"),
    ([1.0], r"must return a dict with a 'loss' key"),
    ({"loss": "low"}, r"returned loss='low'; metrics must be numbers"),
    ({"loss": 1.0, "ok": True}, r"returned ok=True"),
])
def test_check_evaluation_rejects_malformed_metrics(result, message):
    workload = dataclasses.replace(build(0), evaluate=lambda model: result)
    with pytest.raises(WorkloadError, match=message):
        check_evaluation(workload)
    check_evaluation(build(0))
