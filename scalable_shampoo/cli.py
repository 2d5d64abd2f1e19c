"""The ``scalable-shampoo`` command-line program."""

from __future__ import annotations

import argparse
import sys

import torch


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scalable-shampoo",
                                     description="Shampoo second-order optimizer for PyTorch")
    commands = parser.add_subparsers(dest="command", required=True)
    quick = commands.add_parser("quickstart", help="train a small model with Shampoo and "
                                "AdamW and print both losses")
    quick.add_argument("--steps", type=_positive_int, default=300,
                       help="full-batch training steps per run (default 300)")
    quick.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    quick.add_argument("--threads", type=_positive_int, default=None,
                       help="torch intra-op threads (default: torch's choice)")
    quick.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.command == "quickstart":
        from .quickstart import format_table, run
        results = run(steps=args.steps, seed=args.seed, progress=not args.no_progress)
        print(format_table(results, args.steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
