"""Rounding-level perturbations give rounding-level differences.

Two runs that differ only in float rounding (the order in which micro-batch gradients
are summed, ``foreach`` batched kernels against the one-block reference kernels, 1 or 2
intra-op threads, one process or 2 and 3 gloo ranks) must stay within
``TOLERANCE`` after 300 steps, measured as ``||theta_a - theta_b|| / ||theta_a -
theta_0||``, for classic Shampoo at its defaults and with frequent roots and for the
README's SOAP settings, on an MLP with merged and rank-deficient factors and on a
small Transformer. AdamW on the same runs differs by ~1e-7; with the former defaults
(absolute epsilon 1e-12, float32 factors, the first eigenbasis rotating the gradient
it came from, the second moment carried by eigenvalue rank) these runs differed by
1e-2 to 5e-1.
"""

from __future__ import annotations

import functools

import pytest
import torch

from tests import distributed_workers
from tests import rounding_workers as runs

TOLERANCE = 1e-4
CASES = [(model, config) for model in runs.MODELS for config in runs.CONFIGS]


def relative_deviation(start: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(a - start))


@functools.lru_cache(maxsize=None)
def reference(model: str, config: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The unperturbed run, one intra-op thread (shared by every perturbation)."""
    with intra_op_threads(1):
        return runs.train(model, config)


class intra_op_threads:
    def __init__(self, threads: int) -> None:
        self.threads = threads

    def __enter__(self) -> None:
        self.saved = torch.get_num_threads()
        torch.set_num_threads(self.threads)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.saved)


PERTURBATIONS = {
    "summation_order": lambda model, config: runs.train(model, config, order="reversed"),
    "foreach_false": lambda model, config: runs.train(model, config, foreach=False),
    "two_threads": lambda model, config: runs.train(model, config),
}


@pytest.mark.parametrize("perturbation", list(PERTURBATIONS))
@pytest.mark.parametrize("model,config", CASES)
def test_rounding_perturbation_stays_at_rounding_level(model, config, perturbation):
    start, expected = reference(model, config)
    with intra_op_threads(2 if perturbation == "two_threads" else 1):
        _, perturbed = PERTURBATIONS[perturbation](model, config)
    deviation = relative_deviation(start, expected, perturbed)
    assert deviation <= TOLERANCE, (
        f"{model}/{config}/{perturbation}: relative deviation {deviation:.2e}")


@pytest.fixture(scope="module")
def data_parallel_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("rounding_ranks")
    for world_size in (2, 3):
        distributed_workers.run_ranks(world_size, runs.train_all_ranks, CASES, out,
                                      timeout_s=600)
    return {world_size: torch.load(out / f"ranks_{world_size}.pt")
            for world_size in (2, 3)}


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("model,config", CASES)
def test_data_parallel_run_stays_at_rounding_level(model, config, world_size,
                                                   data_parallel_results):
    start, expected = reference(model, config)
    deviation = relative_deviation(start, expected,
                                   data_parallel_results[world_size][(model, config)])
    assert deviation <= TOLERANCE, (
        f"{model}/{config} at {world_size} ranks: relative deviation {deviation:.2e}")


def test_perturbations_are_real():
    """The perturbed runs must actually differ in rounding (else the tests above
    prove nothing): one step's gradient summed in two orders differs."""
    model, batch, loss_fn = runs.mlp()
    inputs, targets = batch(0)
    parts = []
    for k in range(runs.MICRO_BATCHES):
        model.zero_grad()
        loss_fn(model(inputs[k::runs.MICRO_BATCHES]), targets[k::runs.MICRO_BATCHES]).backward()
        parts.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    forward = (parts[0] + parts[1]) + parts[2]
    backward = (parts[2] + parts[1]) + parts[0]
    assert not torch.equal(forward, backward)
    assert torch.allclose(forward, backward, rtol=1e-5, atol=1e-7)
