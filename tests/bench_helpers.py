"""Support for the ``compare`` tests: tiny user workloads (named as
``tests.bench_helpers:function``) and a fixture that runs a test on one torch thread."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from scalable_shampoo.bench.workloads import Workload, seeded_generator


def build(seed: int) -> Workload:
    """Least squares with a random teacher: 2 layers, fresh batch per step."""
    teacher = torch.randn(6, 3, generator=seeded_generator(99))
    held_out = torch.randn(64, 6, generator=seeded_generator(98))
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))

    def train_batch(step: int) -> torch.Tensor:
        return torch.randn(32, 6, generator=seeded_generator(seed, step))

    def loss(model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.mse_loss(model(inputs), inputs @ teacher)

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        error = loss(model, held_out).item()
        return {"loss": error, "rmse": error**0.5}

    return Workload(name="toy", description="least squares", model=model,
                    train_batch=train_batch, loss=loss, evaluate=evaluate,
                    steps=12, quick_steps=8, eval_every=4,
                    lr_centers={"adamw": 1e-2, "shampoo": 1e-2, "sgd": 1e-2, "adagrad": 1e-2})


def build_failing_in_training(seed: int) -> Workload:
    """Builds, then fails at step 1: a bug in the user's code, not bad input."""
    workload = build(seed)

    def train_batch(step: int) -> torch.Tensor:
        if step == 1:
            raise ValueError("broken batch")
        return workload.train_batch(step)

    return dataclasses.replace(workload, train_batch=train_batch)


def build_without_loss(seed: int) -> Workload:
    return dataclasses.replace(build(seed), evaluate=lambda model: {"rmse": 1.0})


def build_failing(seed: int) -> Workload:
    raise RuntimeError("no data here")


def build_wrong_type(seed: int) -> dict:
    return {"model": None}


@pytest.fixture(autouse=True)
def one_thread():
    """These tests train small models: one intra-op thread is as fast, and it keeps them
    fast on a machine whose cores are busy (spinning worker threads then stall)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
