"""Workloads of the comparison: each a model, its data and its metrics behind :class:`Workload`.

A workload module exposes ``build(seed: int) -> Workload``. The built-in ones mirror the
paper's experiments at CPU scale:

- ``lm``: a causal Transformer language model on a byte-level text corpus (:mod:`.lm`),
- ``ctr``: a DLRM-style click-through model on synthetic Zipf-distributed logs (:mod:`.ctr`),
- ``image``: a small CNN on scikit-learn's 8x8 digits (:mod:`.image`),
- ``autoencoder``: a deep tanh MLP autoencoder on rendered curves (:mod:`.autoencoder`).

A user's own workload is named ``module:function`` (``--workload my_module:build``);
the function is called with the seed and must return a :class:`Workload`.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

BUILTIN = ("lm", "ctr", "image", "autoencoder")


@dataclass(frozen=True)
class Workload:
    """One training problem, built for one seed.

    Attributes:
        name: short name for tables, plots and file names (letters, digits, ``_-.``).
        description: one line saying what is trained on what.
        model: the freshly initialised model (its initialisation follows the seed).
        train_batch: ``step -> batch``: the training batch of 0-based step ``step``, a
            deterministic function of the seed and the step.
        loss: ``(model, batch) -> scalar tensor``: the mean training loss of a batch.
        evaluate: ``model -> {"loss": float, ...}``: held-out metrics. The runner calls it
            in ``eval()`` mode under ``torch.no_grad()``. ``"loss"`` is required (it picks
            learning rates and defines the targets); other keys (accuracy, AUC, ...) are
            reported as they are.
        steps: training steps of a full comparison, >= 1.
        quick_steps: training steps under ``--quick``, >= 1.
        eval_every: steps between held-out evaluations, >= 1 (the resolution of
            "steps to target").
        lr_centers: optional per optimizer kind (``"adamw"``, ``"shampoo"``, ...) the
            learning rate at the centre of the sweep grid; kinds left out use the
            defaults of :mod:`scalable_shampoo.bench.optimizers`.
        info: JSON-serialisable facts recorded in ``results.json`` (sizes, corpus hash).
    """

    name: str
    description: str
    model: torch.nn.Module
    train_batch: Callable[[int], Any]
    loss: Callable[[torch.nn.Module, Any], torch.Tensor]
    evaluate: Callable[[torch.nn.Module], dict[str, float]]
    steps: int = 500
    quick_steps: int = 100
    eval_every: int = 25
    lr_centers: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or not all(
                c.isalnum() or c in "_-." for c in self.name):
            raise ValueError(f"Workload.name must be a non-empty string of letters, digits "
                             f"and '_-.', got {self.name!r}")
        if not isinstance(self.model, torch.nn.Module):
            raise TypeError(f"Workload.model must be a torch.nn.Module, got "
                            f"{type(self.model).__name__}")
        for name in ("train_batch", "loss", "evaluate"):
            if not callable(getattr(self, name)):
                raise TypeError(f"Workload.{name} must be callable")
        for name in ("steps", "quick_steps", "eval_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Workload.{name} must be an integer >= 1, got {value!r}")
        for kind, lr in self.lr_centers.items():
            if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
                raise ValueError(f"Workload.lr_centers[{kind!r}] must be a positive number, "
                                 f"got {lr!r}")


class WorkloadError(ValueError):
    """A workload name that names nothing buildable."""


def resolve_builder(spec: str) -> Callable[[int], Workload]:
    """The build function of a built-in workload name or of ``module:function``.

    Raises:
        WorkloadError: unknown name, unimportable module, or a missing/non-callable function.
    """
    if ":" not in spec:
        if spec not in BUILTIN:
            raise WorkloadError(f"unknown workload {spec!r}; built-in workloads are "
                                f"{', '.join(BUILTIN)}, or give module:function")
        return importlib.import_module(f"{__name__}.{spec}").build
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise WorkloadError(f"workload {spec!r}: expected module:function")
    # Like ``python -m``, look in the current directory too (the console script does not).
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # any import-time failure of user code is reported, not raised
        raise WorkloadError(f"workload {spec!r}: cannot import module {module_name!r}: "
                            f"{type(error).__name__}: {error}") from None
    finally:
        if added:
            sys.path.remove(os.getcwd())
    builder = getattr(module, function_name, None)
    if not callable(builder):
        raise WorkloadError(f"workload {spec!r}: module {module_name!r} has no callable "
                            f"{function_name!r}")
    return builder


def build_workload(builder: Callable[[int], Workload], seed: int, spec: str) -> Workload:
    """Calls ``builder(seed)`` and checks that it returned a :class:`Workload`."""
    workload = builder(seed)
    if not isinstance(workload, Workload):
        raise WorkloadError(f"workload {spec!r}: the build function returned "
                            f"{type(workload).__name__}, expected "
                            "scalable_shampoo.bench.workloads.Workload")
    return workload


def seeded_generator(*numbers: int) -> torch.Generator:
    """A CPU generator seeded from integers (e.g. a seed and a step), identical everywhere."""
    value = 0
    for number in numbers:
        value = (value * 1_000_003 + int(number)) % (2**63 - 1)
    return torch.Generator().manual_seed(value)
