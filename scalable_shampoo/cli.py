"""The ``scalable-shampoo`` command-line program: ``quickstart`` and ``compare``."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from . import __version__

if TYPE_CHECKING:  # the bench extra is imported only by the compare command
    from .bench.compare import CompareSettings

DEFAULT_OPTIMIZERS = ("shampoo", "soap", "adamw", "adagrad", "sgd")
QUICK_WORKLOADS = ("image", "autoencoder")
QUICK_LR_SWEEP = 2
FULL_LR_SWEEP = 3


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be comma-separated integers such as 0,1,2, got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds must be distinct, got {text!r}")
    return seeds


def _add_compare(commands: argparse._SubParsersAction) -> None:
    from .bench.peers import PEERS  # imports no peer library

    compare = commands.add_parser(
        "compare", help="train workloads with several optimizers and compare them",
        description="Train each workload with each optimizer (learning rate swept per "
        "optimizer, best held-out loss wins) and report losses, steps and seconds to "
        "the baseline's best held-out loss, step times and memory.")
    compare.add_argument("--workloads", default=None, metavar="LIST",
                         help="comma-separated built-in workloads (lm, ctr, image, "
                         "autoencoder) or module:function builders (default: all four; "
                         f"with --quick: {','.join(QUICK_WORKLOADS)})")
    compare.add_argument("--workload", action="append", default=[], metavar="MODULE:FUNCTION",
                         help="add a workload of your own: FUNCTION(seed) returns a "
                         "scalable_shampoo.bench.workloads.Workload (repeatable)")
    peers = "; ".join(f"{kind} ({peer.summary})" for kind, peer in PEERS.items())
    compare.add_argument("--optimizers", nargs="+", default=list(DEFAULT_OPTIMIZERS),
                         metavar="OPTIMIZER", help="optimizers as kind[:key=value,...], kinds "
                         "shampoo, soap (Shampoo's eigenvalue-corrected variant with SOAP's "
                         "settings), adamw, adagrad, sgd; e.g. "
                         "shampoo:grafting=sgd,block_size=256; "
                         "lr=X fixes that optimizer's learning rate (default: "
                         f"{' '.join(DEFAULT_OPTIMIZERS)}). Peers from other libraries, "
                         "at their defaults with the comparison's learning-rate sweep, "
                         f"betas, weight decay and refresh interval: {peers}. They need "
                         "the peers extra (pip install -e \".[peers]\" "
                         f"torch=={torch.__version__.split('+')[0]}); a peer that is not "
                         "installed is skipped with a message")
    compare.add_argument("--baseline", default=None, metavar="OPTIMIZER",
                         help="optimizer whose best held-out loss is the target "
                         "(default: adamw if given, else the first)")
    compare.add_argument("--steps", type=_positive_int, default=None,
                         help="training steps of every run (default: per workload)")
    rates = compare.add_mutually_exclusive_group()
    rates.add_argument("--lr", type=_positive_float, default=None,
                       help="one learning rate for every optimizer, no sweep")
    rates.add_argument("--lr-sweep", type=_positive_int, default=None, metavar="N",
                       help="learning rates per optimizer, log grid of half-decade steps "
                       f"around a per-optimizer centre (default {FULL_LR_SWEEP}; "
                       f"with --quick {QUICK_LR_SWEEP})")
    compare.add_argument("--seeds", type=_seeds, default=(0,),
                         help="comma-separated seeds; the sweep uses the first (default 0)")
    compare.add_argument("--threads", type=_positive_int, default=None,
                         help="torch intra-op threads (default: torch's choice)")
    compare.add_argument("--out", type=Path, default=Path("compare-results"), metavar="DIR",
                         help="output directory (default ./compare-results)")
    compare.add_argument("--quick", action="store_true",
                         help="fewer steps (each workload's quick_steps), by default on "
                         f"{' and '.join(QUICK_WORKLOADS)} with {QUICK_LR_SWEEP} learning "
                         "rates: about two minutes on 2 cores")
    compare.add_argument("--resume", action="store_true",
                         help="reuse the finished runs stored in --out")
    compare.add_argument("--tensorboard", type=Path, default=None, metavar="DIR",
                         help="also write losses and optimizer metrics for TensorBoard "
                         "(needs the tensorboard extra)")
    compare.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    compare.set_defaults(subparser=compare)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scalable-shampoo",
                                     description="Shampoo second-order optimizer for PyTorch")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    # Not required=True: argparse checks required arguments before unknown ones, so
    # "--bogus" alone would be reported as a missing command (main checks it after).
    commands = parser.add_subparsers(dest="command")
    quick = commands.add_parser("quickstart", help="train a small model with Shampoo and "
                                "AdamW and print both losses")
    quick.add_argument("--steps", type=_positive_int, default=300,
                       help="full-batch training steps per run (default 300)")
    quick.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    quick.add_argument("--threads", type=_positive_int, default=None,
                       help="torch intra-op threads (default: torch's choice)")
    quick.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_compare(commands)
    return parser


def _compare_settings(args: argparse.Namespace,
                      warn: Callable[[str], None]) -> "CompareSettings":
    """The settings from the arguments; ``warn`` gets one line per skipped optimizer."""
    from .bench.optimizers import parse_spec, split_available, validate
    from .bench.compare import CompareSettings

    workloads = (args.workloads.split(",") if args.workloads is not None
                 else [] if args.workload else list(QUICK_WORKLOADS if args.quick else
                                                     ("lm", "ctr", "image", "autoencoder")))
    workloads = [w.strip() for w in workloads if w.strip()] + args.workload
    requested = [parse_spec(text) for text in args.optimizers]
    optimizers, skipped = split_available(requested)
    for message in skipped:
        warn(message)
    if not optimizers:
        raise ValueError("no optimizer left to compare: " + "; ".join(skipped))
    for spec in optimizers:
        validate(spec)
    baseline = None
    if args.baseline is not None:
        baseline = parse_spec(args.baseline).label
        if baseline in {s.label for s in requested} - {s.label for s in optimizers}:
            raise ValueError(f"the baseline {baseline!r} is skipped: its package is missing")
    if args.tensorboard is not None:
        try:
            import torch.utils.tensorboard  # noqa: F401  (needs the tensorboard package)
        except ImportError:
            raise ValueError("--tensorboard needs the tensorboard package: "
                             "pip install 'scalable-shampoo[tensorboard]'") from None
    return CompareSettings(
        workloads=tuple(workloads), optimizers=tuple(optimizers), out=args.out,
        steps=args.steps, quick=args.quick, lr=args.lr,
        lr_sweep=args.lr_sweep or (QUICK_LR_SWEEP if args.quick else FULL_LR_SWEEP),
        seeds=args.seeds, threads=args.threads, resume=args.resume,
        tensorboard=args.tensorboard, baseline=baseline, progress=not args.no_progress)


def _warn(parser: argparse.ArgumentParser, message: str) -> None:
    print(f"{parser.prog}: warning: {message}", file=sys.stderr)


def _installed(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _compare(parser: argparse.ArgumentParser, args: argparse.Namespace,
             argv: list[str] | None) -> int:
    from .bench import BENCH_EXTRA_HINT, report
    from .bench.compare import prepare, run_comparison

    if not args.no_progress and not _installed("tqdm"):
        _warn(parser, f"tqdm is not installed: no progress bars ({BENCH_EXTRA_HINT})")
        args.no_progress = True
    try:
        settings = _compare_settings(args, lambda message: _warn(parser, message))
        prepared = prepare(settings)
    except ValueError as error:  # bad input: argparse's message and exit status 2
        parser.error(str(error))
    results = run_comparison(settings, prepared)
    results = {"header": report.header(settings.as_dict(), argv), **results}
    # Results first, plots last: without matplotlib only the plots are lost.
    paths = report.write_results(results, settings.out)
    print(report.format_text(results))
    try:
        paths += report.write_plots(results, settings.out)
    except ImportError as error:
        missing = (error.name or "matplotlib").split(".")[0]
        _warn(parser, f"plots skipped: {missing} is not installed "
              f"({BENCH_EXTRA_HINT})")
    print(f"\nwrote {', '.join(str(p) for p in paths)}"
          + (f" ({results['runs_reused']} of {results['runs_total']} runs reused)"
             if settings.resume else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error("a command is required: quickstart or compare")
    if args.command == "compare":
        return _compare(args.subparser, args, argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from .quickstart import format_table, run
    results = run(steps=args.steps, seed=args.seed, progress=not args.no_progress)
    print(format_table(results, args.steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
