"""The quickstart: Shampoo and AdamW side by side on a small, ill-conditioned problem.

A two-hidden-layer MLP regresses a fixed random teacher network whose inputs have a
covariance with condition number ``condition`` (the regime where preconditioning pays).
Each optimizer gets a small learning-rate sweep and reports its best final loss.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from .optimizer import Shampoo


@dataclass(frozen=True)
class QuickstartResult:
    optimizer: str
    lr: float
    final_loss: float
    seconds: float


def make_problem(seed: int, samples: int = 1024, features: int = 32, outputs: int = 8,
                 condition: float = 1e3) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs with covariance eigenvalues log-spaced over ``condition`` and the targets
    of a random two-layer teacher."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -0.5 * torch.log10(torch.tensor(condition)).item(), features)
    basis, _ = torch.linalg.qr(torch.randn(features, features, generator=gen))
    inputs = torch.randn(samples, features, generator=gen) * scales @ basis.T
    hidden = torch.randn(features, 64, generator=gen) / features**0.5
    readout = torch.randn(64, outputs, generator=gen) / 8
    return inputs, torch.tanh(inputs @ hidden * 4) @ readout


def make_model(seed: int, features: int = 32, outputs: int = 8) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(features, 64), torch.nn.Tanh(),
                               torch.nn.Linear(64, 64), torch.nn.Tanh(),
                               torch.nn.Linear(64, outputs))


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "shampoo": lambda params, lr: Shampoo(params, lr=lr, block_size=128,
                                          precondition_frequency=10),
    "adamw": lambda params, lr: torch.optim.AdamW(params, lr=lr),
}


def train(name: str, lr: float, steps: int, seed: int) -> QuickstartResult:
    inputs, targets = make_problem(seed)
    model = make_model(seed + 1)
    optimizer = OPTIMIZERS[name](model.parameters(), lr)
    start = time.perf_counter()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        final = torch.nn.functional.mse_loss(model(inputs), targets).item()
    return QuickstartResult(name, lr, final, time.perf_counter() - start)


def run(steps: int = 300, seed: int = 0, lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2),
        progress: bool = True) -> list[QuickstartResult]:
    """Best result per optimizer over the ``lrs`` sweep (lowest final loss, NaN last)."""
    jobs = [(name, lr) for name in OPTIMIZERS for lr in lrs]
    try:
        from tqdm import tqdm
        iterator = tqdm(jobs, desc="quickstart", disable=not progress)
    except ImportError:  # tqdm is an optional extra
        iterator = jobs
    results = [train(name, lr, steps, seed) for name, lr in iterator]

    def key(r: QuickstartResult) -> float:
        return r.final_loss if r.final_loss == r.final_loss else float("inf")

    return [min((r for r in results if r.optimizer == name), key=key) for name in OPTIMIZERS]


def format_table(results: list[QuickstartResult], steps: int) -> str:
    lines = [f"Quickstart: MLP on an ill-conditioned regression, {steps} full-batch steps, "
             "best lr of the sweep per optimizer",
             f"{'optimizer':<10} {'best lr':>8} {'final loss':>12} {'seconds':>8}"]
    lines += [f"{r.optimizer:<10} {r.lr:>8.0e} {r.final_loss:>12.4e} {r.seconds:>8.2f}"
              for r in results]
    by_name = {r.optimizer: r for r in results}
    if "shampoo" in by_name and "adamw" in by_name and by_name["shampoo"].final_loss > 0:
        ratio = by_name["adamw"].final_loss / by_name["shampoo"].final_loss
        lines.append(f"AdamW's final loss / Shampoo's: {ratio:.2f}x")
    return "\n".join(lines)
