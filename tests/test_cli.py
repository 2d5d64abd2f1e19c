"""The ``scalable-shampoo`` program: ``compare`` end to end, its bad-input exits, ``quickstart``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from scalable_shampoo.cli import main
from tests.bench_helpers import one_thread  # noqa: F401  (autouse fixture)

TOY = "tests.bench_helpers:build"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_compare_end_to_end_on_a_tiny_budget(tmp_path, capsys):
    out = tmp_path / "results"
    code = main(["compare", "--workloads", f"autoencoder,{TOY}", "--steps", "3",
                 "--lr-sweep", "1", "--optimizers", "shampoo:block_size=64", "adamw",
                 "--out", str(out), "--no-progress", "--threads", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "autoencoder: deep tanh autoencoder" in printed and "toy: least squares" in printed
    assert "shampoo:block_size=64" in printed and f"wrote {out / 'results.json'}" in printed
    results = json.loads((out / "results.json").read_text())
    assert [w["name"] for w in results["workloads"]] == ["autoencoder", "toy"]
    assert results["header"]["settings"]["optimizers"] == ["shampoo:block_size=64", "adamw"]
    assert results["header"]["machine"]["torch_threads"] >= 1
    assert results["runs_total"] == 2 * 2
    shampoo = results["workloads"][0]["optimizers"][0]
    assert shampoo["hyperparameters"]["block_size"] == "64"
    assert shampoo["per_seed"][0]["final"]["mse"] > 0
    markdown = (out / "results.md").read_text()
    assert markdown.count("| shampoo:block_size=64 |") == 2
    for name in ("loss_vs_step.png", "loss_vs_seconds.png"):
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE


def test_compare_resume_reuses_runs(tmp_path, capsys):
    arguments = ["compare", "--workload", TOY, "--optimizers", "adamw", "sgd", "--lr", "0.01",
                 "--out", str(tmp_path), "--no-progress"]
    assert main(arguments) == 0
    assert main(arguments + ["--resume"]) == 0
    assert "(2 of 2 runs reused)" in capsys.readouterr().out


def test_compare_writes_tensorboard_logs(tmp_path):
    pytest.importorskip("tensorboard")
    logs = tmp_path / "tb"
    assert main(["compare", "--workload", TOY, "--optimizers", "shampoo", "--lr", "0.01",
                 "--out", str(tmp_path / "out"), "--no-progress",
                 "--tensorboard", str(logs)]) == 0
    events = [p for p in logs.rglob("*") if p.name.startswith("events.out.tfevents")]
    assert len(events) == 1 and events[0].stat().st_size > 0


def _bad_input(argv, capsys, pattern):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert pattern in error, error
    assert "Traceback" not in error


@pytest.mark.parametrize("arguments, message", [
    (["--workloads", "mnist"], "unknown workload 'mnist'"),
    (["--workload", "no_such_module_xyz:build"], "cannot import module 'no_such_module_xyz'"),
    (["--workload", "tests.bench_helpers:nothing"], "has no callable 'nothing'"),
    (["--workload", "tests.bench_helpers:build_failing"],
     "building it failed: RuntimeError: no data here"),
    (["--workload", "tests.bench_helpers:build_wrong_type"], "returned dict"),
    (["--workload", "tests.bench_helpers:build_without_loss"],
     "evaluate() must return a dict with a 'loss' key"),
    (["--optimizers", "lion"], "unknown optimizer 'lion'"),
    (["--optimizers", "shampoo:blocksize=4"], "unknown argument(s) blocksize"),
    (["--optimizers", "shampoo:block_size"], "malformed override 'block_size'"),
    (["--optimizers", "shampoo:block_size=0"], "block_size must be an integer >= 1"),
    (["--optimizers", "adamw", "adamw"], "an optimizer is given twice"),
    (["--baseline", "sgd", "--optimizers", "adamw"], "baseline 'sgd' is not among"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--steps", "0"], "--steps: must be a positive integer"),
    (["--seeds", "a,b"], "must be comma-separated integers"),
    (["--lr", "1e-3", "--lr-sweep", "3"], "not allowed with argument"),
    (["--lr", "-1"], "--lr: must be a positive number"),
])
def test_compare_bad_input_exits_2_with_a_message(arguments, message, capsys, tmp_path):
    names_workload = "--workloads" in arguments or "--workload" in arguments
    workload = [] if names_workload else ["--workload", TOY]
    _bad_input(["compare", *workload, "--out", str(tmp_path), "--no-progress", *arguments],
               capsys, message)


def test_errors_while_training_are_not_reported_as_bad_input(tmp_path):
    with pytest.raises(ValueError, match="broken batch"):
        main(["compare", "--workload", "tests.bench_helpers:build_failing_in_training",
              "--optimizers", "adamw", "--lr", "0.01", "--out", str(tmp_path),
              "--no-progress"])


def test_compare_rejects_an_unwritable_output_directory(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    _bad_input(["compare", "--workload", TOY, "--out", str(blocker / "out")], capsys,
               "is not writable")
    if hasattr(os, "geteuid") and os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        _bad_input(["compare", "--workload", TOY, "--out", str(locked)], capsys,
                   "is not writable")


def test_compare_without_tensorboard_installed(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    _bad_input(["compare", "--workload", TOY, "--out", str(tmp_path), "--tensorboard",
                str(tmp_path / "tb")], capsys, "--tensorboard needs the tensorboard package")


def test_python_dash_m_exits_2_without_traceback(tmp_path):
    process = subprocess.run(
        [sys.executable, "-m", "scalable_shampoo", "compare", "--workloads", "mnist",
         "--out", str(tmp_path)], capture_output=True, text=True)
    assert process.returncode == 2
    assert "scalable-shampoo compare: error: unknown workload 'mnist'" in process.stderr
    assert "Traceback" not in process.stderr


def test_quickstart_still_runs(capsys):
    assert main(["quickstart", "--steps", "5", "--no-progress"]) == 0
    assert "AdamW's final loss / Shampoo's" in capsys.readouterr().out


# --------------------------------------------------------------- the program itself
def test_version_prints_the_version(capsys):
    from scalable_shampoo import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"scalable-shampoo {__version__}"


@pytest.mark.parametrize("argv, message", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    ([], "a command is required: quickstart or compare"),
])
def test_program_bad_input_exits_2_with_a_message(argv, message, capsys):
    _bad_input(argv, capsys, message)
    assert "the following arguments are required" not in capsys.readouterr().err


# ------------------------------------------------------ compare without the bench extra
def _hide_modules(monkeypatch, *names):
    """Makes ``import name`` (and of its loaded submodules) fail, as if not installed."""
    for name in names:
        for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            monkeypatch.setitem(sys.modules, loaded, None)
        monkeypatch.setitem(sys.modules, name, None)


def test_compare_without_sklearn_names_the_bench_extra(tmp_path, capsys, monkeypatch):
    from scalable_shampoo.bench.workloads import image

    image.digits.cache_clear()  # the digits may be cached by an earlier test
    _hide_modules(monkeypatch, "sklearn")
    _bad_input(["compare", "--workloads", "image", "--out", str(tmp_path), "--no-progress"],
               capsys, "needs sklearn, which is not installed; it is part of the bench extra: "
               "pip install "
               "'scalable-shampoo[bench]' (in a checkout: pip install -e \".[bench]\")")
    image.digits.cache_clear()


def test_compare_without_matplotlib_writes_results_and_skips_plots(tmp_path, capsys,
                                                                   monkeypatch):
    _hide_modules(monkeypatch, "matplotlib")
    assert main(["compare", "--workload", TOY, "--optimizers", "adamw", "sgd", "--lr", "0.01",
                 "--out", str(tmp_path), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "toy: least squares" in captured.out  # the table
    assert ("warning: plots skipped: matplotlib is not installed "
            "(pip install 'scalable-shampoo[bench]'") in captured.err
    assert json.loads((tmp_path / "results.json").read_text())["runs_total"] == 2
    assert (tmp_path / "results.md").exists() and not (tmp_path / "loss_vs_step.png").exists()


def test_compare_without_tqdm_runs_without_progress_bars(tmp_path, capsys, monkeypatch):
    _hide_modules(monkeypatch, "tqdm")
    assert main(["compare", "--workload", TOY, "--optimizers", "adamw", "--lr", "0.01",
                 "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "warning: tqdm is not installed: no progress bars" in captured.err
    assert "toy: least squares" in captured.out
