"""Step time and state size of Shampoo against AdamW and, where installed, pytorch-optimizer's
``ScalableShampoo`` and heavyball's ``SOAP``, on four workloads, in one run.

Every optimizer steps the same parameters on the same fixed random gradients (a pool of
four sets drawn up front, set as ``p.grad``; forward/backward is not timed), the
optimizers in turn, step by step, so that a busy machine slows them alike. Each
``optimizer.step()`` is timed as CPU time of the stepping thread (``time.thread_time``,
with one intra-op thread: other processes on the cores do not count), and the table
gives per optimizer and workload:

* ``median``: the median step without a root (basis) computation, after the first;
* ``root``: the median step that recomputes roots (Shampoo: the steps ``metrics()
  ['root_computations']`` rises at, and with ``async_roots="spread"`` the steps its
  schedule launches them at, ``--frequency`` and its multiples; peers: the steps their
  schedule recomputes at, multiples of ``--frequency``);
* ``mean``: the mean over all ``--steps`` steps;
* ``state``: optimizer-state bytes over parameter bytes (Shampoo: ``metrics()
  ['state_bytes']``; others: the distinct tensors in ``optimizer.state``).

Settings matched where the optimizers allow it: Adam grafting (ours, heavyball's SOAP is
Adam in the eigenbases; pytorch-optimizer's ScalableShampoo grafts SGD, its default),
``block_size`` as listed, roots/bases every ``--frequency`` steps from step
``--frequency`` on (SOAP: its own first basis at step 1, then every ``--frequency``
steps, its schedule off; eager: its own torch.compile of its kernels is turned off, its
max-autotune warm-up took ~10 minutes here). Peers missing or failing to import are
skipped with a line saying why.

Usage::

    python benchmarks/peer_speed.py [--steps 120] [--frequency 50]
        [--workloads mlp512,linear128_bias,tiny_gpt,linear2048_b256] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scalable_shampoo import Shampoo  # noqa: E402

LR = 1e-4
GRAD_SCALE = 1e-2
POOL = 4


# ------------------------------------------------------------------------ workloads
class TinyGPT(nn.Module):
    """The parameters of a GPT with ``d``-wide residual stream, ``layers`` blocks
    (attention ``qkv`` and output projections, a 4x MLP, two LayerNorms each) and a
    byte vocabulary (token and position embeddings, an untied head)."""

    def __init__(self, d: int = 128, layers: int = 4, vocab: int = 256, context: int = 128):
        super().__init__()
        self.tokens = nn.Embedding(vocab, d)
        self.positions = nn.Embedding(context, d)
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(nn.ModuleDict({
                "ln1": nn.LayerNorm(d), "qkv": nn.Linear(d, 3 * d), "proj": nn.Linear(d, d),
                "ln2": nn.LayerNorm(d), "up": nn.Linear(d, 4 * d), "down": nn.Linear(4 * d, d)}))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    build: Callable[[], nn.Module]
    block_size: int


def _linears(count: int, size: int, bias: bool) -> Callable[[], nn.Module]:
    return lambda: nn.Sequential(*[nn.Linear(size, size, bias=bias) for _ in range(count)])


WORKLOADS = {w.name: w for w in (
    Workload("mlp512", "4 x Linear 512x512, block 512", _linears(4, 512, False), 512),
    Workload("linear128_bias", "24 x Linear 128x128 + bias, block 128",
             _linears(24, 128, True), 128),
    Workload("tiny_gpt", "tiny GPT (d=128, 4 layers, 256-byte vocab), block 256",
             TinyGPT, 256),
    Workload("linear2048_b256", "Linear 2048x2048, block 256", _linears(1, 2048, False), 256),
)}


# ----------------------------------------------------------------------- optimizers
def _ours(params: list[torch.Tensor], workload: Workload, frequency: int) -> Any:
    return Shampoo(params, lr=LR, block_size=workload.block_size,
                   precondition_frequency=frequency)


def _ours_spread(params: list[torch.Tensor], workload: Workload, frequency: int) -> Any:
    return Shampoo(params, lr=LR, block_size=workload.block_size,
                   precondition_frequency=frequency, async_roots="spread")


def _adamw(params: list[torch.Tensor], workload: Workload, frequency: int) -> Any:
    return torch.optim.AdamW(params, lr=LR)


def _scalable_shampoo(params: list[torch.Tensor], workload: Workload, frequency: int) -> Any:
    from pytorch_optimizer import ScalableShampoo
    return ScalableShampoo(params, lr=LR, block_size=workload.block_size,
                           start_preconditioning_step=frequency,
                           preconditioning_compute_steps=frequency)


def _soap(params: list[torch.Tensor], workload: Workload, frequency: int) -> Any:
    import heavyball
    import heavyball.utils
    # Eager, as the others: its default torch.compile (max-autotune) of its kernels takes
    # minutes of warm-up on a CPU.
    heavyball.utils.compile_mode = None
    return heavyball.SOAP(params, lr=LR, precondition_frequency=frequency,
                          max_precond_dim=max(workload.block_size, 2048),
                          use_precond_schedule=False, compile_step=False)


OPTIMIZERS: dict[str, Callable[..., Any]] = {
    "ours (Shampoo)": _ours, "ours (spread roots)": _ours_spread, "AdamW": _adamw,
    "pytorch-optimizer ScalableShampoo": _scalable_shampoo, "heavyball SOAP": _soap}


def available(names: list[str]) -> tuple[list[str], list[str]]:
    """The optimizers that can be built, and a line per skipped one."""
    probe = [nn.Parameter(torch.randn(4, 4))]
    ok, skipped = [], []
    for name in names:
        try:
            OPTIMIZERS[name](probe, WORKLOADS["mlp512"], 10)
            ok.append(name)
        except Exception as error:  # noqa: BLE001 - an optional peer, reported
            skipped.append(f"skipped {name}: {type(error).__name__}: {error}")
    return ok, skipped


# ------------------------------------------------------------------------ measuring
def state_bytes(optimizer: Any) -> int:
    if isinstance(optimizer, Shampoo):
        return int(optimizer.metrics()["state_bytes"])
    seen, total = set(), 0

    def visit(value: Any) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor):
            key = (value.untyped_storage().data_ptr(), value.dtype)
            if key not in seen and value.numel() > 1:
                seen.add(key)
                total += value.untyped_storage().nbytes()
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)
        elif hasattr(value, "__dict__") and not isinstance(value, type):
            for v in vars(value).values():
                visit(v)

    for entry in optimizer.state.values():
        visit(entry)
    return total


@dataclass
class Timing:
    times_ms: list[float] = field(default_factory=list)
    root_steps: set[int] = field(default_factory=set)
    state_bytes: int = 0


def measure(workload: Workload, names: list[str], steps: int, frequency: int
            ) -> dict[str, Timing]:
    """The optimizers stepped in turn, each on its own copy of the model."""
    torch.manual_seed(0)
    base = workload.build()
    runs = {}
    for name in names:
        model = workload.build()
        model.load_state_dict(base.state_dict())
        params = [p for p in model.parameters()]
        runs[name] = (params, OPTIMIZERS[name](params, workload, frequency), Timing())
    gen = torch.Generator().manual_seed(1)
    shapes = [p.shape for p in base.parameters()]
    pool = [[torch.randn(s, generator=gen) * GRAD_SCALE for s in shapes] for _ in range(POOL)]
    for step in range(1, steps + 1):
        for name, (params, optimizer, timing) in runs.items():
            for p, g in zip(params, pool[step % POOL]):
                p.grad = g.clone()
            spread = isinstance(optimizer, Shampoo) and optimizer._roots.spread
            before = (optimizer.metrics()["root_computations"]
                      if isinstance(optimizer, Shampoo) and not spread else None)
            start = time.thread_time()
            optimizer.step()
            timing.times_ms.append((time.thread_time() - start) * 1e3)
            if before is not None:
                if optimizer.metrics()["root_computations"] > before:
                    timing.root_steps.add(step)
            elif name != "AdamW" and step % frequency == 0:
                timing.root_steps.add(step)
    for params, optimizer, timing in runs.values():
        timing.state_bytes = state_bytes(optimizer)
    return {name: timing for name, (_, _, timing) in runs.items()}


def summarize(timing: Timing, param_bytes: int) -> dict[str, float]:
    plain = [t for step, t in enumerate(timing.times_ms, 1)
             if step > 1 and step not in timing.root_steps]
    roots = [timing.times_ms[step - 1] for step in sorted(timing.root_steps)]
    return {"median_ms": statistics.median(plain),
            "root_ms": statistics.median(roots) if roots else float("nan"),
            "mean_ms": statistics.fmean(timing.times_ms),
            "state_ratio": timing.state_bytes / param_bytes,
            "state_bytes": timing.state_bytes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--frequency", type=int, default=50)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    names, skipped = available([n.strip() for n in args.optimizers.split(",") if n.strip()])
    print(f"# Step time (CPU time of the stepping thread, 1 intra-op thread) and state size; "
          f"torch {torch.__version__}, {args.steps} steps, frequency {args.frequency}")
    for line in skipped:
        print(line)
    rows, results = [], {}
    for key in [k.strip() for k in args.workloads.split(",") if k.strip()]:
        workload = WORKLOADS[key]
        param_bytes = sum(p.numel() * p.element_size() for p in workload.build().parameters())
        timings = measure(workload, names, args.steps, args.frequency)
        results[key] = {name: summarize(t, param_bytes) for name, t in timings.items()}
        for name, r in results[key].items():
            rows.append([workload.description, name, f"{r['median_ms']:.1f}",
                         f"{r['root_ms']:.0f}", f"{r['mean_ms']:.1f}",
                         f"{r['state_ratio']:.2f}"])
        print(f"done {key}", flush=True)
    header = ["workload", "optimizer", "median ms", "root step ms", "mean ms",
              "state / params"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) if i < 2 else "-" * (w + 1) + ":"
                         for i, w in enumerate(widths)) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) if i < 2 else c.rjust(w)
                                for i, (c, w) in enumerate(zip(r, widths))) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
