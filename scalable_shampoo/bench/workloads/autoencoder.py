"""``autoencoder``: a deep tanh MLP autoencoder on rendered curves.

The classic second-order testbed: Hinton and Salakhutdinov's (2006) CURVES autoencoder,
on which Hessian-free, K-FAC and Shampoo were all shown to beat first-order methods. Its
narrow 6-unit code and long chain of saturating layers make the problem badly
conditioned. Here at CPU scale: ``SIDE x SIDE`` grey images of random cubic Bezier curves
(rendered with a Gaussian pen), encoder widths as the original (400-200-100-50-25-6),
mirrored decoder, logistic output. Loss: per-pixel binary cross-entropy (as the original);
the mean squared error per pixel is reported too. The images are fixed by ``DATA_SEED``.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from . import Workload, seeded_generator

SIDE = 16
TRAIN_IMAGES = 20000
HELD_OUT_IMAGES = 2000
CURVE_POINTS = 48
PEN_WIDTH = 0.7  # Gaussian pen, standard deviation in pixels
ENCODER = (400, 200, 100, 50, 25, 6)
DATA_SEED = 0
BATCH = 1024


def render_curves(count: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` images ``(count, SIDE * SIDE)`` in [0, 1] of random cubic Bezier curves.

    The pen is a Gaussian integrated along the curve (a sum over short segments weighted
    by their length), so a stroke's cross-section is ``exp(-r^2 / (2 PEN_WIDTH^2))``
    wherever the curve runs; crossings saturate at 1. The sum is separable in x and y,
    so each image is one small matrix product.
    """
    control = torch.rand(count, 4, 2, generator=gen) * (SIDE - 3) + 1
    t = torch.linspace(0, 1, CURVE_POINTS).view(1, -1, 1)
    basis = [(1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t**2, t**3]
    points = sum(b * control[:, i : i + 1] for i, b in enumerate(basis))  # (count, P, 2)
    middles = (points[:, 1:] + points[:, :-1]) / 2
    lengths = (points[:, 1:] - points[:, :-1]).norm(dim=-1)
    pixels = torch.arange(SIDE, dtype=torch.float32).view(1, 1, -1)
    along_y = torch.exp(-(pixels - middles[..., :1]) ** 2 / (2 * PEN_WIDTH**2))
    along_x = torch.exp(-(pixels - middles[..., 1:]) ** 2 / (2 * PEN_WIDTH**2))
    ink = (along_y * lengths.unsqueeze(-1)).transpose(1, 2) @ along_x
    return (ink / (2 * math.pi) ** 0.5 / PEN_WIDTH).clamp(max=1.0).reshape(count, -1)


@lru_cache(maxsize=1)
def curves() -> tuple[torch.Tensor, torch.Tensor]:
    """``(train images, held-out images)``."""
    images = render_curves(TRAIN_IMAGES + HELD_OUT_IMAGES, seeded_generator(DATA_SEED))
    return images[:TRAIN_IMAGES], images[TRAIN_IMAGES:]


def deep_autoencoder(inputs: int, encoder: tuple[int, ...]) -> torch.nn.Sequential:
    """tanh layers ``inputs -> encoder -> reversed(encoder) -> inputs`` with a linear
    code layer and logits at the output."""
    widths = (inputs, *encoder, *reversed(encoder[:-1]), inputs)
    layers: list[torch.nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(torch.nn.Linear(fan_in, fan_out))
        if index != len(encoder) - 1 and index != len(widths) - 2:
            layers.append(torch.nn.Tanh())
    return torch.nn.Sequential(*layers)


def reconstruction_loss(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(model(images), images)


def build(seed: int) -> Workload:
    """The ``autoencoder`` workload; the seed sets the initialisation and batch order."""
    train, held_out = curves()
    torch.manual_seed(seed)
    model = deep_autoencoder(SIDE * SIDE, ENCODER)

    def train_batch(step: int) -> torch.Tensor:
        return train[torch.randint(len(train), (BATCH,), generator=seeded_generator(seed, step))]

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        logits = model(held_out)
        return {"loss": F.binary_cross_entropy_with_logits(logits, held_out).item(),
                "mse": F.mse_loss(torch.sigmoid(logits), held_out).item()}

    return Workload(
        name="autoencoder",
        description=f"deep tanh autoencoder {SIDE * SIDE}-{'-'.join(map(str, ENCODER))}-"
                    f"(mirrored) on {SIDE}x{SIDE} rendered curves, batch {BATCH}",
        model=model, train_batch=train_batch, loss=reconstruction_loss, evaluate=evaluate,
        steps=500, quick_steps=300, eval_every=25,
        lr_centers={"shampoo": 3e-3, "adamw": 3e-3, "adagrad": 1e-2, "sgd": 1e-1},
        info={"train_images": TRAIN_IMAGES, "held_out_images": HELD_OUT_IMAGES,
              "side": SIDE, "encoder": list(ENCODER), "batch": BATCH,
              "data_seed": DATA_SEED,
              "parameters": sum(p.numel() for p in model.parameters())})
