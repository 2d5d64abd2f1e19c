"""``image``: a small CNN on scikit-learn's bundled 8x8 handwritten digits.

Mirrors the paper's ResNet-50 on ImageNet at CPU scale: convolutions, image
classification, random-translation augmentation. The 1797 images ship inside
scikit-learn (``sklearn.datasets.load_digits``, no download); a fixed split holds out
20% of them. Metrics: cross-entropy (the loss) and accuracy.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from . import Workload, seeded_generator

DATA_SEED = 0
HELD_OUT_FRACTION = 0.2
BATCH = 128
SHIFT = 1  # pixels of random translation


@lru_cache(maxsize=1)
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(train images, train labels, held-out images, held-out labels)``, images
    ``(n, 1, 8, 8)`` scaled to [0, 1]."""
    from sklearn.datasets import load_digits  # the bench extra; imported only when used

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=seeded_generator(DATA_SEED))
    cut = int(len(labels) * (1 - HELD_OUT_FRACTION))
    train, held_out = order[:cut], order[cut:]
    return images[train], labels[train], images[held_out], labels[held_out]


def translate(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Every image shifted by its own random offset of at most ``SHIFT`` pixels per axis
    (zero padding)."""
    count, _, height, width = images.shape
    padded = F.pad(images, (SHIFT,) * 4)
    dy, dx = torch.randint(0, 2 * SHIFT + 1, (2, count, 1), generator=gen)
    rows = (dy + torch.arange(height)).unsqueeze(2)
    cols = (dx + torch.arange(width)).unsqueeze(1)
    return padded[torch.arange(count).view(-1, 1, 1), 0, rows, cols].unsqueeze(1)


def cnn() -> torch.nn.Sequential:
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(64 * 2 * 2, 128), torch.nn.ReLU(),
        torch.nn.Linear(128, 10))


def cross_entropy(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    images, labels = batch
    return F.cross_entropy(model(images), labels)


def build(seed: int) -> Workload:
    """The ``image`` workload; the seed sets the initialisation, batches and augmentation."""
    train_images, train_labels, held_images, held_labels = digits()
    torch.manual_seed(seed)
    model = cnn()

    def train_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = seeded_generator(seed, step)
        index = torch.randint(len(train_labels), (BATCH,), generator=gen)
        return translate(train_images[index], gen), train_labels[index]

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        logits = model(held_images)
        return {"loss": F.cross_entropy(logits, held_labels).item(),
                "accuracy": (logits.argmax(1) == held_labels).double().mean().item()}

    return Workload(
        name="image",
        description=f"CNN (3 conv, 2 dense) on sklearn's 8x8 digits, batch {BATCH}, "
                    f"+-{SHIFT} px translations",
        model=model, train_batch=train_batch, loss=cross_entropy, evaluate=evaluate,
        steps=500, quick_steps=200, eval_every=25,
        lr_centers={"shampoo": 3e-3, "adamw": 3e-3, "adagrad": 1e-2, "sgd": 1e-1},
        info={"train_images": len(train_labels), "held_out_images": len(held_labels),
              "batch": BATCH, "data_seed": DATA_SEED,
              "parameters": sum(p.numel() for p in model.parameters())})
