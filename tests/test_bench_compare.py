"""A comparison: sweeps, chosen learning rates, targets, resume, determinism, threads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scalable_shampoo.bench.compare import CompareError, CompareSettings, run_comparison
from scalable_shampoo.bench.optimizers import parse_spec
from scalable_shampoo.bench.runner import train_run
from tests.bench_helpers import one_thread  # noqa: F401  (autouse fixture)

TOY = "tests.bench_helpers:build"


def _settings(out: Path, **overrides) -> CompareSettings:
    fields = dict(workloads=(TOY,), optimizers=(parse_spec("shampoo"), parse_spec("adamw")),
                  out=out, lr_sweep=2, progress=False)
    return CompareSettings(**{**fields, **overrides})



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

    monkeypatch.setattr("scalable_shampoo.bench.compare.train_run", spy)
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
