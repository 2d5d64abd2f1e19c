"""Reports: tables (text and markdown), results.json, plots."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest

from scalable_shampoo.bench import report
from scalable_shampoo.bench.compare import CompareSettings, run_comparison
from scalable_shampoo.bench.optimizers import parse_spec
from tests.bench_helpers import one_thread  # noqa: F401  (autouse fixture)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    settings = CompareSettings(
        workloads=("tests.bench_helpers:build",), out=out, lr_sweep=2, progress=False,
        optimizers=tuple(parse_spec(s) for s in ("adamw", "shampoo", "sgd:momentum=0,lr=1e4")))
    return {"header": report.header({"quick": False}, ["compare"]), **run_comparison(settings)}


def test_table_has_every_optimizer_and_marks_divergence(results):
    headers, rows = report.table(results["workloads"][0])
    assert headers[:5] == ["optimizer", "lr", "train loss", "held-out loss", "rmse"]
    assert "x adamw" in headers
    by_label = {row[0]: row for row in rows}
    assert by_label["adamw"][headers.index("steps to target") + 1] == "1.00x"
    diverged = by_label["sgd:momentum=0,lr=1e4"]
    assert diverged[1] == "1e+04" and diverged[2] == "diverged"
    assert all(len(row) == len(headers) for row in rows)


def test_table_says_when_a_target_was_not_reached(results):
    workload = copy.deepcopy(results["workloads"][0])
    summary = workload["optimizers"][1]["summary"]
    summary["reached_target"], summary["steps_to_target"] = 0, None
    headers, rows = report.table(workload)
    assert rows[1][headers.index("steps to target")] == "0/1 reached"


def test_text_and_markdown_reports(results):
    text = report.format_text(results)
    assert text.startswith("toy: least squares; 12 steps")
    assert "target = adamw's best held-out loss" in text
    markdown = report.format_markdown(results)
    table_lines = [line for line in markdown.splitlines() if line.startswith("|")]
    assert len(table_lines) == 2 + 3
    assert len({line.count("|") for line in table_lines}) == 1
    assert "![loss_vs_step.png](loss_vs_step.png)" in markdown


def test_write_all_writes_json_markdown_and_png(results, tmp_path):
    from matplotlib.image import imread

    paths = report.write_all(results, tmp_path)
    assert sorted(p.name for p in paths) == sorted(
        ["results.json", "results.md", *report.PLOTS])
    def reject(constant):
        raise AssertionError(f"results.json is not strict JSON: {constant}")

    stored = json.loads((tmp_path / "results.json").read_text(), parse_constant=reject)
    assert stored["header"]["format"] == report.RESULTS_FORMAT
    assert stored["header"]["versions"]["torch"]
    assert stored["workloads"][0]["optimizers"][0]["label"] == "adamw"
    for name in report.PLOTS:
        image = imread(tmp_path / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0


def test_importing_the_package_imports_no_bench_dependency():
    # (tqdm is left out: torch itself imports it when it is installed.)
    code = ("import sys, scalable_shampoo, scalable_shampoo.cli; "
            "print([m for m in ('matplotlib', 'sklearn', 'tensorboard') "
            "if m in sys.modules])")
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout
    assert output.strip() == "[]"
