"""Reports of a comparison: the terminal table, ``results.json``, ``results.md`` and plots.

Plots are drawn with matplotlib's object API on the Agg canvas (no pyplot, so no global
backend or state changes for a program that imports this).
"""

from __future__ import annotations

import math
import os
import platform
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from .runner import write_json_atomic

RESULTS_FORMAT = "scalable_shampoo.compare/1"
PLOTS = ("loss_vs_step.png", "loss_vs_seconds.png")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def header(settings: dict[str, Any], argv: list[str] | None) -> dict[str, Any]:
    """Versions, machine and settings: what a reader needs to reproduce the numbers."""
    return {
        "format": RESULTS_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["scalable-shampoo", *(argv or sys.argv[1:])]),
        "versions": {"scalable_shampoo": __version__, "torch": torch.__version__,
                     "python": platform.python_version(),
                     **{name: _package_version(name) for name in
                        ("numpy", "scikit-learn", "matplotlib", "tqdm")}},
        "machine": {"platform": platform.platform(), "cpu": _cpu_model(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "settings": settings,
    }


# ---------------------------------------------------------------------------- table
def _number(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}g}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _megabytes(value: int | float | None) -> str:
    return "-" if value is None else f"{value / 2**20:.2f}"


def table(workload: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows (strings) of one workload's table: seed means at the chosen lr."""
    metrics = [k for k in workload["optimizers"][0]["summary"]["final"]
               if k not in ("train_loss", "loss")]
    base = f"x {workload['baseline']}"
    headers = ["optimizer", "lr", "train loss", "held-out loss", *metrics,
               "steps to target", base, "s to target", base, "step ms med/mean",
               "opt share", "state MB", "peak MB"]
    rows = []
    for entry in workload["optimizers"]:
        summary, final = entry["summary"], entry["summary"]["final"]
        seeds, reached = summary["seeds"], summary["reached_target"]
        lr = f"{entry['chosen_lr']:.3g}" + ("*" if entry["lr_at_grid_edge"] else "")
        if summary["diverged"] == seeds:
            rows.append([entry["label"], lr, "diverged", *["-"] * (len(headers) - 3)])
            continue
        to_target = [_number(summary["steps_to_target"], 6), _ratio(summary["steps_ratio"]),
                     _number(summary["seconds_to_target"], 3), _ratio(summary["seconds_ratio"])]
        if reached < seeds:
            to_target = [f"{reached}/{seeds} reached", "-", "-", "-"]
        rows.append([
            entry["label"], lr, _number(final["train_loss"]), _number(final["loss"]),
            *[_number(final[m]) for m in metrics], *to_target,
            f"{_number(summary['step_ms_median'], 3)} / {_number(summary['step_ms_mean'], 3)}",
            "-" if summary["optimizer_share"] is None else f"{summary['optimizer_share']:.0%}",
            _megabytes(summary["state_bytes"]), _megabytes(summary["peak_memory_bytes"]),
        ])
        if summary["diverged"]:
            rows[-1][0] += f" ({summary['diverged']}/{seeds} diverged)"
    return headers, rows


def _caption(workload: dict[str, Any]) -> str:
    targets = [t for t in workload["targets"].values() if t is not None]
    target = (f"target = {workload['baseline']}'s best held-out loss "
              f"{_number(sum(targets) / len(targets))} (3-evaluation mean)" if targets
              else f"no target ({workload['baseline']} diverged)")
    return (f"{workload['name']}: {workload['description']}; {workload['steps']} steps, "
            f"held-out eval every {workload['eval_every']}; {target}")


FOOTNOTE = (
    "lr: chosen by the best held-out loss (* = at the edge of a grid of 3 or more). "
    "train loss: mean over the last eval interval; held-out metrics at the last step. "
    "Best losses and targets read the held-out loss as the mean of the last 3 "
    "evaluations. Target columns: first evaluation where that mean is at or below the "
    "target, in steps and in training seconds (evaluations excluded), and the ratio to "
    "the baseline's. step ms: "
    "optimizer.step(). opt share: optimizer.step() / training time. state MB: "
    "optimizer-state tensors. peak MB: peak resident-memory increase during training. "
    "Means over seeds.")


def format_text(results: dict[str, Any]) -> str:
    """The terminal report: one aligned table per workload."""
    blocks = []
    for workload in results["workloads"]:
        headers, rows = table(workload)
        widths = [max(len(cell) for cell in column) for column in zip(headers, *rows)]
        line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                       for i, (c, w) in enumerate(zip(cells, widths)))
        blocks.append("\n".join([_caption(workload), line(headers), *map(line, rows)]))
    return "\n\n".join(blocks + [textwrap.fill(FOOTNOTE, width=100)])


def format_markdown(results: dict[str, Any]) -> str:
    """``results.md``: settings, one table per workload, the plots."""
    head = results["header"]
    lines = ["# scalable-shampoo compare", "",
             f"`{head['command']}`", "",
             f"torch {head['versions']['torch']}, scalable-shampoo "
             f"{head['versions']['scalable_shampoo']}, {head['machine']['cpu']} "
             f"({head['machine']['cpu_count']} CPUs, {results['threads']} torch threads), "
             f"{head['created']}.", ""]
    for workload in results["workloads"]:
        headers, rows = table(workload)
        lines += [f"## {workload['name']}", "", _caption(workload), "",
                  "| " + " | ".join(headers) + " |",
                  "|" + "|".join([" --- "] + [" ---: "] * (len(headers) - 1)) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines.append("")
    lines += [FOOTNOTE, ""] + [f"![{name}]({name})" for name in PLOTS]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- plots
def plot(results: dict[str, Any], x: str, path: Path) -> None:
    """Held-out loss against ``x`` (``"step"`` or ``"seconds"``), one panel per workload,
    every optimizer's runs at its chosen lr overlaid (one line per seed), the target dashed;
    a log scale when every loss is positive."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter

    workloads = results["workloads"]
    figure = Figure(figsize=(4.2 * len(workloads), 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(workloads), squeeze=False)[0]
    for ax, workload in zip(axes, workloads):
        runs = {(r["key"]["optimizer"], r["key"]["lr"], r["key"]["seed"]): r
                for r in workload["runs"]}
        lows, starts = [], []
        for index, entry in enumerate(workload["optimizers"]):
            color = f"C{index % 10}"
            for seed_index, seed in enumerate(s["seed"] for s in entry["per_seed"]):
                curve = runs[(entry["label"], entry["chosen_lr"], seed)]["curve"]
                losses = [v if v is not None and math.isfinite(v) else math.nan
                          for v in curve["held_out"]["loss"]]
                ax.plot(curve[x], losses, color=color, linewidth=1.4,
                        label=f"{entry['label']} (lr {entry['chosen_lr']:.3g})"
                        if seed_index == 0 else None)
                finite = [v for v in losses if math.isfinite(v)]
                lows += finite
                starts += finite[:1]
        targets = [t for t in workload["targets"].values() if t is not None]
        if targets:
            ax.axhline(sum(targets) / len(targets), color="grey", linestyle="--", linewidth=0.8,
                       label=f"target ({workload['baseline']}'s best, 3-eval mean)")
        if lows:
            low, high = min(lows), max(starts)
            if low > 0:  # losses span decades near the end: log scale
                ax.set_yscale("log")
                ax.set_ylim(low / 1.15, high * 1.15)
                plain = FuncFormatter(lambda value, _: f"{value:g}")
                ax.yaxis.set_major_formatter(plain)
                # Label the minor ticks only when less than a decade has no major tick.
                ax.yaxis.set_minor_formatter(plain if high / low < 10 else NullFormatter())
            elif high > low:
                ax.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
        ax.set_title(workload["name"])
        ax.set_xlabel("step" if x == "step" else "training seconds")
        ax.set_ylabel("held-out loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    figure.savefig(path, dpi=110)


# --------------------------------------------------------------------------- output
def write_results(results: dict[str, Any], out: Path) -> list[Path]:
    """Writes ``results.json`` (atomically) and ``results.md`` into ``out``: everything
    but the plots, so that a missing matplotlib loses no result."""
    write_json_atomic(out / "results.json", results)
    (out / "results.md").write_text(format_markdown(results))
    return [out / "results.json", out / "results.md"]


def write_plots(results: dict[str, Any], out: Path) -> list[Path]:
    """Draws the plots into ``out``. Raises ``ImportError`` without matplotlib."""
    paths = []
    for name, x in zip(PLOTS, ("step", "seconds")):
        plot(results, x, out / name)
        paths.append(out / name)
    return paths


def write_all(results: dict[str, Any], out: Path) -> list[Path]:
    """Writes ``results.json`` (atomically), ``results.md`` and the plots into ``out``."""
    return write_results(results, out) + write_plots(results, out)
