"""Runs, targets, atomic storage, resume, divergence, peak memory, threads."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from scalable_shampoo.bench.optimizers import parse_spec
from scalable_shampoo.bench.runner import (
    CompareError, CompareSettings, PeakMemory, RunKey, load_finished, run_comparison,
    selection_loss, time_to_target, train_run, write_json_atomic)
from tests.bench_helpers import build, one_thread  # noqa: F401  (autouse fixture)

TOY = "tests.bench_helpers:build"


def _settings(out: Path, **overrides) -> CompareSettings:
    fields = dict(workloads=(TOY,), optimizers=(parse_spec("shampoo"), parse_spec("adamw")),
                  out=out, lr_sweep=2, progress=False)
    return CompareSettings(**{**fields, **overrides})


def _run(losses, seconds=None, status="ok"):
    steps = [4 * i for i in range(len(losses))]
    finite = [v for v in losses if math.isfinite(v)]
    return {"status": status, "best_held_out_loss": min(finite) if finite else None,
            "curve": {"step": steps, "seconds": seconds or [0.5 * s for s in steps],
                      "held_out": {"loss": losses}}}


def test_time_to_target_is_the_first_evaluation_at_or_below():
    run = _run([3.0, 2.0, 1.5, 1.0, 1.2])
    assert time_to_target(run, 1.5) == (8, 4.0)
    assert time_to_target(run, 1.0) == (12, 6.0)
    assert time_to_target(run, 0.5) == (None, None)
    assert time_to_target(_run([3.0, math.nan, 1.0]), 2.0) == (8, 4.0)


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
    assert run["best_held_out_loss"] == min(curve["held_out"]["loss"])
    assert 0 < run["optimizer_share"] < 1
    assert run["step_ms_median"] > 0 and run["train_seconds"] >= curve["seconds"][-1]
    assert run["optimizer_metrics"]["step"] == 10
    assert run["state_bytes"] == run["optimizer_metrics"]["state_bytes"]


def test_diverging_run_is_reported_not_raised():
    spec = parse_spec("sgd:momentum=0")
    key = RunKey(TOY, spec.label, tuple(spec.describe().items()), 1e4, 0, 12, 1)
    run = train_run(build(0), spec, key)
    assert run["status"] == "diverged" and run["diverged_at_step"] < 12
    finite = [v for v in run["curve"]["held_out"]["loss"] if math.isfinite(v)]
    assert run["best_held_out_loss"] == min(finite)
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
    write_json_atomic(path, {"x": 2, "y": [math.inf]})
    assert json.loads(path.read_text()) == {"x": 2, "y": [math.inf]}
    with pytest.raises(TypeError):
        write_json_atomic(path, {"x": object()})
    assert json.loads(path.read_text())["x"] == 2
    assert os.listdir(path.parent) == ["run.json"]  # no temporary files left behind


def test_load_finished_needs_the_same_key(tmp_path):
    key = RunKey(TOY, "adamw", (), 1e-3, 0, 10, 1)
    path = tmp_path / "run.json"
    write_json_atomic(path, {"format": "scalable_shampoo.compare.run/1", "key": key.as_dict()})
    assert load_finished(path, key) is not None
    assert load_finished(path, RunKey(TOY, "adamw", (), 1e-3, 0, 11, 1)) is None
    path.write_text('{"format": "scalable_shampoo.comp')  # a torn file is not a finished run
    assert load_finished(path, key) is None


def test_comparison_sweeps_picks_best_and_sets_targets(tmp_path):
    results = run_comparison(_settings(tmp_path, seeds=(0, 3)))
    (workload,) = results["workloads"]
    assert workload["name"] == "toy" and workload["baseline"] == "adamw"
    assert results["runs_total"] == 2 * (2 + 1)
    for entry in workload["optimizers"]:
        sweep = {s["lr"]: s["best_held_out_loss"] for s in entry["sweep"]}
        assert entry["lr_grid"] == [1e-2, 3e-2]
        assert sweep[entry["chosen_lr"]] == min(sweep.values())
        assert [s["seed"] for s in entry["per_seed"]] == [0, 3]
    adamw = workload["optimizers"][1]
    for seed_summary in adamw["per_seed"]:
        assert seed_summary["target"] == seed_summary["best_held_out_loss"]
        assert seed_summary["steps_ratio"] == seed_summary["seconds_ratio"] == 1.0
    assert workload["targets"] == {str(s["seed"]): s["best_held_out_loss"]
                                   for s in adamw["per_seed"]}
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.json"))
    assert len(files) == results["runs_total"] and all(f.startswith("runs/") for f in files)


def test_resume_skips_finished_runs(tmp_path):
    first = run_comparison(_settings(tmp_path))
    files = sorted(tmp_path.rglob("*.json"))
    stamps = {p: p.stat().st_mtime_ns for p in files}
    files[0].unlink()  # as if the comparison had been interrupted before this run
    again = run_comparison(_settings(tmp_path, resume=True))
    assert again["runs_reused"] == again["runs_total"] - 1
    assert all(p.stat().st_mtime_ns == stamps[p] for p in files[1:])
    assert first["workloads"][0]["targets"] == again["workloads"][0]["targets"]
    changed = run_comparison(_settings(tmp_path, resume=True, steps=5))
    assert changed["runs_reused"] == 0
    rerun = run_comparison(_settings(tmp_path, steps=5))
    assert rerun["runs_reused"] == 0  # without --resume everything runs again


def test_same_seed_same_results(tmp_path):
    strip = lambda runs: [(r["key"], r["curve"]["held_out"], r["curve"]["train_loss"])
                          for r in runs]
    one = run_comparison(_settings(tmp_path / "one"))["workloads"][0]["runs"]
    two = run_comparison(_settings(tmp_path / "two"))["workloads"][0]["runs"]
    assert strip(one) == strip(two)


def test_threads_are_set_during_and_restored_after(tmp_path, monkeypatch):
    seen = []
    original = train_run

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr("scalable_shampoo.bench.runner.train_run", spy)
    before = torch.get_num_threads()
    run_comparison(_settings(tmp_path, threads=2, lr=1e-2, steps=2))
    assert seen == [2, 2] and torch.get_num_threads() == before


@pytest.mark.parametrize("overrides, message", [
    ({"workloads": ()}, r"no workloads given"),
    ({"workloads": (TOY, TOY)}, r"a workload is given twice"),
    ({"optimizers": (parse_spec("adamw"), parse_spec("adamw"))}, r"optimizer is given twice"),
    ({"baseline": "sgd"}, r"baseline 'sgd' is not among the optimizers"),
    ({"seeds": ()}, r"seeds must be distinct and at least one"),
    ({"steps": 0}, r"steps must be >= 1"),
    ({"lr_sweep": 0}, r"lr_sweep must be >= 1"),
    ({"lr": -1.0}, r"lr must be a positive number"),
])
def test_settings_errors(tmp_path, overrides, message):
    with pytest.raises(CompareError, match=message):
        _settings(tmp_path, **overrides)
