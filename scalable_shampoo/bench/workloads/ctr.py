"""``ctr``: a DLRM-style click-through-rate model on synthetic click logs.

Mirrors the paper's Criteo experiment. Each impression has ``DENSE`` standard-normal dense
features and one id per categorical table; ids are Zipf-distributed (a few ids are most of
the traffic, as in real logs). A hidden teacher (per-id biases, low-rank pairwise id
interactions and a linear dense term, fixed by ``DATA_SEED``) gives the click probability,
and the click is drawn from it. Logs are streamed: every step draws a fresh batch, so a run
is a single pass as in the paper, and the held-out logs are a fixed sample.

The student is DLRM (Naumov et al. 2019): a bottom MLP for the dense features, one
embedding table per categorical feature, pairwise dot-product interactions, a top MLP. The
largest table (``VOCABULARIES[0]``) is above Shampoo's default ``max_preconditioned_dim``
(8192), so its vocabulary dimension gets no factor, as for Criteo's tables.
Metrics: log-loss (the loss) and AUC.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from . import Workload, seeded_generator

VOCABULARIES = (12000, 1000, 400, 100, 50, 20, 10, 4)
DENSE = 13
EMBEDDING_DIM = 16
TEACHER_RANK = 4
ZIPF_EXPONENT = 1.1
DATA_SEED = 0
BATCH = 4096
HELD_OUT = 16384


class Teacher:
    """The hidden click model; all tensors drawn from ``DATA_SEED``."""

    def __init__(self) -> None:
        gen = seeded_generator(DATA_SEED, 1)
        # Zipf popularity over a random permutation of the ids of every table.
        self.popularity = []
        for size in VOCABULARIES:
            weights = torch.arange(1, size + 1, dtype=torch.float64) ** -ZIPF_EXPONENT
            self.popularity.append(weights[torch.randperm(size, generator=gen)])
        self.biases = [torch.randn(size, generator=gen) * 0.5 for size in VOCABULARIES]
        self.factors = [torch.randn(size, TEACHER_RANK, generator=gen) / TEACHER_RANK**0.5
                        for size in VOCABULARIES]
        self.dense_weight = torch.randn(DENSE, generator=gen) / DENSE**0.5
        self.offset = -1.2  # base click rate around a quarter

    def sample(self, count: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        """``(dense, ids, clicks)`` of ``count`` impressions."""
        dense = torch.randn(count, DENSE, generator=gen)
        ids = torch.stack([torch.multinomial(p, count, replacement=True, generator=gen)
                           for p in self.popularity], dim=1)
        logit = dense @ self.dense_weight + self.offset
        vectors = torch.stack([f[ids[:, j]] for j, f in enumerate(self.factors)], dim=1)
        for j, bias in enumerate(self.biases):
            logit = logit + bias[ids[:, j]]
        # 2 sum_{j<k} <v_j, v_k> = |sum_j v_j|^2 - sum_j |v_j|^2
        pair_sum = vectors.sum(1).pow(2).sum(1) - vectors.pow(2).sum((1, 2))
        logit = logit + 0.25 * pair_sum
        clicks = torch.bernoulli(torch.sigmoid(logit), generator=gen)
        return dense, ids, clicks


@lru_cache(maxsize=1)
def teacher_and_held_out() -> tuple[Teacher, tuple[torch.Tensor, ...]]:
    teacher = Teacher()
    return teacher, teacher.sample(HELD_OUT, seeded_generator(DATA_SEED, 2))


def mlp(*widths: int) -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        layers += [torch.nn.Linear(fan_in, fan_out), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


class DLRM(torch.nn.Module):
    """Bottom MLP, embedding tables, pairwise dot interactions, top MLP; returns logits."""

    def __init__(self) -> None:
        super().__init__()
        self.bottom = mlp(DENSE, 64, EMBEDDING_DIM)
        self.tables = torch.nn.ModuleList(torch.nn.Embedding(size, EMBEDDING_DIM)
                                          for size in VOCABULARIES)
        for table in self.tables:  # small initial embeddings, as DLRM's uniform(+-1/sqrt(n))
            torch.nn.init.normal_(table.weight, std=0.05)
        features = 1 + len(VOCABULARIES)
        self.pairs = torch.triu_indices(features, features, offset=1)
        self.top = mlp(EMBEDDING_DIM + self.pairs.shape[1], 128, 64, 1)

    def forward(self, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        bottom = self.bottom(dense)
        vectors = torch.stack([bottom] + [table(ids[:, j]) for j, table in
                                          enumerate(self.tables)], dim=1)
        dots = vectors @ vectors.transpose(1, 2)
        interactions = dots[:, self.pairs[0], self.pairs[1]]
        return self.top(torch.cat([bottom, interactions], dim=1)).squeeze(1)


def log_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    dense, ids, clicks = batch
    return F.binary_cross_entropy_with_logits(model(dense, ids), clicks)


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney) formula, ties at their
    average rank; NaN when only one class is present."""
    _, inverse, counts = torch.unique(scores.double(), return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    ranks = (ends - (counts.double() - 1) / 2)[inverse]
    positive = labels.bool()
    n_pos = int(positive.sum())
    n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def build(seed: int) -> Workload:
    """The ``ctr`` workload; the seed sets the initialisation and the logs streamed."""
    teacher, held_out = teacher_and_held_out()
    torch.manual_seed(seed)
    model = DLRM()

    def train_batch(step: int) -> tuple[torch.Tensor, ...]:
        return teacher.sample(BATCH, seeded_generator(seed, step, 3))

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        dense, ids, clicks = held_out
        logits = model(dense, ids)
        return {"loss": F.binary_cross_entropy_with_logits(logits, clicks).item(),
                "auc": auc(logits, clicks)}

    return Workload(
        name="ctr",
        description=f"DLRM ({len(VOCABULARIES)} tables up to {VOCABULARIES[0]} ids) on "
                    f"streamed synthetic Zipf click logs, batch {BATCH}",
        model=model, train_batch=train_batch, loss=log_loss, evaluate=evaluate,
        steps=500, quick_steps=150, eval_every=25,
        lr_centers={"shampoo": 1e-2, "adamw": 1e-2, "adagrad": 3e-2, "sgd": 3e-1},
        info={"vocabularies": list(VOCABULARIES), "embedding_dim": EMBEDDING_DIM,
              "dense_features": DENSE, "zipf_exponent": ZIPF_EXPONENT, "batch": BATCH,
              "held_out_impressions": HELD_OUT, "data_seed": DATA_SEED,
              "held_out_click_rate": float(held_out[2].mean()),
              "parameters": sum(p.numel() for p in model.parameters())})
