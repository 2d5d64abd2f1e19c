"""Shampoo beats a tuned AdamW on an ill-conditioned least-squares problem."""

from __future__ import annotations

import math

import torch

from scalable_shampoo import Shampoo

STEPS = 200
CONDITION = 1e4  # of the input covariance


def _problem(seed: int = 0, samples: int = 512, d_in: int = 24, d_out: int = 6):
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=gen, dtype=torch.float64))
    scales = torch.logspace(0, -0.5 * math.log10(CONDITION), d_in, dtype=torch.float64)
    inputs = torch.randn(samples, d_in, generator=gen, dtype=torch.float64) * scales @ basis.T
    teacher = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    return inputs, inputs @ teacher.T


def _final_loss(make_optimizer, lr: float) -> float:
    inputs, targets = _problem()
    weight = torch.zeros(targets.shape[1], inputs.shape[1], dtype=torch.float64,
                         requires_grad=True)
    optimizer = make_optimizer([weight], lr)
    for _ in range(STEPS):
        optimizer.zero_grad()
        ((inputs @ weight.T - targets) ** 2).mean().backward()
        optimizer.step()
    with torch.no_grad():
        loss = ((inputs @ weight.T - targets) ** 2).mean().item()
    return loss if math.isfinite(loss) else math.inf


def test_input_covariance_is_ill_conditioned():
    inputs, _ = _problem()
    eigenvalues = torch.linalg.eigvalsh(inputs.T @ inputs)
    assert eigenvalues.max() / eigenvalues.min() >= CONDITION / 4  # sampling noise


def test_shampoo_reaches_a_loss_tuned_adamw_does_not():
    lrs = [10 ** (k / 2) for k in range(-8, 3)]  # 1e-4 ... 10, half-decade grid
    adamw = min(_final_loss(lambda p, lr: torch.optim.AdamW(p, lr=lr, weight_decay=0.0), lr)
                for lr in lrs)
    shampoo = min(_final_loss(lambda p, lr: Shampoo(p, lr=lr, block_size=24,
                                                    precondition_frequency=10), lr)
                  for lr in (0.3, 1.0))
    # Measured: AdamW's best ~4e-4 (at lr 1); Shampoo 9e-9 at lr 1 (4e-5 at 0.3), and
    # 2e-9 with first_moment="direction" (4e-6 at 0.3).
    assert shampoo < adamw / 100, (shampoo, adamw)
