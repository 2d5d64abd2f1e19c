"""Training runs for tests/test_rounding_stability.py: two small models, the
configurations under test, and one trainer whose only knobs are rounding-level
perturbations (gradient summation order, ``foreach``, intra-op threads, world size).

Importable by spawned gloo ranks (tests/distributed_workers.run_ranks), so everything
here is a plain module-level function.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from scalable_shampoo import Shampoo

STEPS = 300
MICRO_BATCHES = 3  # three: a + b == b + a in floats, (a + b) + c != (c + b) + a
ORDERS = {"forward": (0, 1, 2), "reversed": (2, 1, 0)}

# The documented defaults (roots every 100 steps), roots every 10 steps, the README's
# SOAP settings, and those with grafting_momentum.
CONFIGS: dict[str, dict[str, Any]] = {
    "shampoo": dict(lr=3e-3),
    "shampoo_frequent_roots": dict(lr=3e-3, precondition_frequency=10),
    "soap": dict(lr=1e-3, betas=(0.95, 0.95), weight_decay=0.01,
                 preconditioner="eigenvalue_corrected", precondition_frequency=10),
    # The SOAP settings grafted to Adam's actual step, with Nesterov (compare's fastest
    # SOAP variant on image and autoencoder).
    "soap_grafting_momentum": dict(lr=3e-3, betas=(0.95, 0.95), weight_decay=0.01,
                                   preconditioner="eigenvalue_corrected",
                                   precondition_frequency=10, grafting_momentum=True,
                                   nesterov=True),
}


def mlp() -> tuple[torch.nn.Module, Callable[[int], tuple[torch.Tensor, ...]], Callable]:
    """MLP 24-80-40-6: with the default block_size the 6x40 layer merges into one
    240-long vector and the biases are vectors, so their factors are rank deficient
    for hundreds of steps."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 80), torch.nn.Tanh(),
                                torch.nn.Linear(80, 40), torch.nn.Tanh(), torch.nn.Linear(40, 6))
    gen = torch.Generator().manual_seed(1)
    inputs = torch.randn(256, 24, generator=gen)
    targets = (torch.tanh(inputs @ torch.randn(24, 6, generator=gen))
               + 0.1 * torch.randn(256, 6, generator=gen))

    def batch(step: int) -> tuple[torch.Tensor, ...]:
        rows = torch.arange(step * 48, step * 48 + 48) % inputs.shape[0]
        return inputs[rows], targets[rows]

    return model, batch, torch.nn.functional.mse_loss


def transformer() -> tuple[torch.nn.Module, Callable[[int], tuple[torch.Tensor, ...]], Callable]:
    """A one-layer Transformer (width 32, 2 heads) predicting the next token of
    sequences from a fixed random bigram table."""
    torch.manual_seed(0)
    vocab, width, length = 16, 32, 12

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(vocab, width)
            self.position = torch.nn.Parameter(0.1 * torch.randn(length, width))
            # No biases: the attention's key bias gets a pure rounding-noise gradient
            # (softmax ignores a shift shared by a row's logits), which Adam's
            # normalization turns into full-size steps, so even AdamW's trajectory would
            # be rounding-sensitive (6e-3 after 300 steps). gelu, not relu: a kink can
            # flip on a rounding change of its input.
            self.layer = torch.nn.TransformerEncoderLayer(width, 2, 64, dropout=0.0,
                                                          activation="gelu", batch_first=True,
                                                          bias=False)
            self.head = torch.nn.Linear(width, vocab)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.head(self.layer(self.embed(tokens) + self.position))

    model = Tiny()
    gen = torch.Generator().manual_seed(1)
    table = torch.randint(0, vocab, (vocab,), generator=gen)
    starts = torch.randint(0, vocab, (512,), generator=gen)
    noise = torch.rand(512, length + 1, generator=gen) < 0.2
    sequences = torch.empty(512, length + 1, dtype=torch.long)
    sequences[:, 0] = starts
    for i in range(length):
        sequences[:, i + 1] = torch.where(noise[:, i + 1], (sequences[:, i] + 1) % vocab,
                                          table[sequences[:, i]])

    def batch(step: int) -> tuple[torch.Tensor, ...]:
        rows = torch.arange(step * 24, step * 24 + 24) % sequences.shape[0]
        return sequences[rows, :-1], sequences[rows, 1:]

    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1))

    return model, batch, loss


MODELS = {"mlp": mlp, "transformer": transformer}


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


def train(model_name: str, config_name: str, order: str = "forward", foreach: bool = True,
          steps: int = STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """``(theta_0, theta_steps)`` of one run. Each step's gradient is the sum of
    ``MICRO_BATCHES`` micro-batch gradients in ``order``; under ``torch.distributed``
    every rank computes the same full gradient (so only the optimizer's data-parallel
    arithmetic differs from one process)."""
    model, batch, loss_fn = MODELS[model_name]()
    start = flat(model)
    params = list(model.parameters())
    optimizer = Shampoo(params, foreach=foreach, **CONFIGS[config_name])
    for step in range(steps):
        inputs, targets = batch(step)
        parts = []
        for k in range(MICRO_BATCHES):
            model.zero_grad()
            loss_fn(model(inputs[k::MICRO_BATCHES]), targets[k::MICRO_BATCHES]).backward()
            parts.append([p.grad.clone() for p in params])
        for i, p in enumerate(params):
            total = torch.zeros_like(p)
            for k in ORDERS[order]:
                total += parts[k][i]
            p.grad = total
        optimizer.step()
    return start, flat(model)


def train_all_ranks(rank: int, world_size: int, cases: list[tuple[str, str]], out: Path) -> None:
    """Every ``(model, config)`` case under data parallelism; rank 0 saves the results."""
    results = {case: train(*case)[1] for case in cases}
    if rank == 0:
        torch.save(results, out / f"ranks_{world_size}.pt")
