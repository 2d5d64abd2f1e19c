"""Built-in and user workloads: they build, train with every optimizer, are deterministic."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from scalable_shampoo.bench.optimizers import KINDS, parse_spec
from scalable_shampoo.bench.runner import RunKey, train_run
from scalable_shampoo.bench.workloads import (
    BUILTIN, Workload, WorkloadError, build_workload, resolve_builder, seeded_generator)
from scalable_shampoo.bench.workloads import ctr, lm

from tests.bench_helpers import one_thread  # noqa: F401  (autouse fixture)

METRICS = {"lm": {"loss", "perplexity"}, "ctr": {"loss", "auc"},
           "image": {"loss", "accuracy"}, "autoencoder": {"loss", "mse"}}


def _train(name: str, optimizer: str, steps: int, seed: int = 0) -> dict:
    workload = resolve_builder(name)(seed)
    spec = parse_spec(optimizer)
    key = RunKey(name, spec.label, tuple(spec.describe().items()), 1e-3, seed, steps, 1)
    return train_run(workload, spec, key)


@pytest.mark.parametrize("name", BUILTIN)
def test_workload_trains_five_steps_with_every_optimizer(name):
    for kind in KINDS:
        run = _train(name, kind, steps=5)
        assert run["status"] == "ok", (name, kind)
        assert set(run["curve"]["held_out"]) == METRICS[name]
        assert run["curve"]["step"] == [0, 5]
        losses = run["curve"]["held_out"]["loss"]
        assert all(math.isfinite(v) for v in losses) and losses[1] != losses[0]
        assert math.isfinite(run["final"]["train_loss"])
        assert run["state_bytes"] > 0 and run["step_ms_mean"] > 0


@pytest.mark.parametrize("name", BUILTIN)
def test_same_seed_same_numbers(name):
    first, again = _train(name, "shampoo", 3), _train(name, "shampoo", 3)
    assert first["curve"]["held_out"] == again["curve"]["held_out"]
    assert first["curve"]["train_loss"] == again["curve"]["train_loss"]


@pytest.mark.parametrize("name", BUILTIN)
def test_batches_follow_seed_and_step(name):
    build = resolve_builder(name)
    flatten = lambda batch: torch.cat([t.double().flatten() for t in
                                       (batch if isinstance(batch, tuple) else (batch,))])
    a, b, c = build(0), build(0), build(1)
    assert torch.equal(flatten(a.train_batch(7)), flatten(b.train_batch(7)))
    assert not torch.equal(flatten(a.train_batch(7)), flatten(a.train_batch(8)))
    assert not torch.equal(flatten(a.train_batch(7)), flatten(c.train_batch(7)))
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))


def test_lm_corpus_is_fixed_and_split():
    train, held_out, info = lm.corpus()
    assert info["corpus_bytes"] == len(train) + len(held_out)
    assert 0.08 < len(held_out) / info["corpus_bytes"] < 0.12
    assert int(train.max()) < lm.VOCAB and int(train.min()) >= 0
    if torch.__version__.split("+")[0] in lm.REFERENCE_SHA256:
        assert info["corpus_matches_reference"], "torch's sources differ from the pinned ones"


def test_ctr_has_a_vocabulary_above_max_preconditioned_dim_and_skewed_ids():
    from scalable_shampoo import Shampoo

    assert max(ctr.VOCABULARIES) > 8192
    teacher, (dense, ids, clicks) = ctr.teacher_and_held_out()
    counts = torch.bincount(ids[:, 0], minlength=ctr.VOCABULARIES[0]).sort(descending=True).values
    assert counts[:100].sum() > 0.3 * len(ids)  # Zipf: the top 1% of ids carry a third
    assert 0.1 < float(clicks.mean()) < 0.5
    workload = resolve_builder("ctr")(0)
    optimizer = Shampoo(workload.model.parameters(), block_size=128)
    workload.loss(workload.model, workload.train_batch(0)).backward()
    optimizer.step()
    # The big table's vocabulary dimension gets no factor: its blocks keep the embedding
    # dimension only, so the factor bytes stay small.
    assert optimizer.metrics()["state_bytes"] < 20 * sum(
        p.numel() * 4 for p in workload.model.parameters())


def test_auc_matches_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score

    gen = seeded_generator(5)
    scores = torch.randint(0, 20, (500,), generator=gen).float()  # many ties
    labels = (torch.rand(500, generator=gen) < torch.sigmoid(scores / 5 - 2)).float()
    assert ctr.auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert math.isnan(ctr.auc(scores, torch.zeros(500)))


def _workload(**overrides) -> Workload:
    fields = dict(name="w", description="d", model=torch.nn.Linear(2, 1),
                  train_batch=lambda step: None, loss=lambda m, b: None,
                  evaluate=lambda m: {"loss": 0.0})
    return Workload(**{**fields, **overrides})


@pytest.mark.parametrize("overrides, error, message", [
    ({"name": ""}, ValueError, r"Workload.name must be a non-empty string"),
    ({"name": "a/b"}, ValueError, r"Workload.name"),
    ({"model": "net"}, TypeError, r"Workload.model must be a torch.nn.Module, got str"),
    ({"loss": 3}, TypeError, r"Workload.loss must be callable"),
    ({"steps": 0}, ValueError, r"Workload.steps must be an integer >= 1, got 0"),
    ({"eval_every": 2.5}, ValueError, r"Workload.eval_every must be an integer"),
    ({"lr_centers": {"adamw": -1.0}}, ValueError, r"lr_centers\['adamw'\] must be a positive"),
])
def test_workload_validation(overrides, error, message):
    with pytest.raises(error, match=message):
        _workload(**overrides)


@pytest.mark.parametrize("spec, message", [
    ("mnist", r"unknown workload 'mnist'; built-in workloads are lm, ctr, image, autoencoder"),
    ("no_such_module_xyz:build", r"cannot import module 'no_such_module_xyz'"),
    ("tests.bench_helpers:missing", r"has no callable 'missing'"),
    ("tests.bench_helpers:", r"expected module:function"),
    (":build", r"expected module:function"),
])
def test_resolve_builder_errors(spec, message):
    with pytest.raises(WorkloadError, match=message):
        resolve_builder(spec)


def test_user_workload_must_return_a_workload():
    builder = resolve_builder("tests.bench_helpers:build_wrong_type")
    with pytest.raises(WorkloadError, match=r"returned dict, expected .*Workload"):
        build_workload(builder, 0, "tests.bench_helpers:build_wrong_type")
    assert build_workload(resolve_builder("tests.bench_helpers:build"), 0, "toy").name == "toy"


def test_user_module_is_found_in_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "my_workload_module.py").write_text(
        "from tests.bench_helpers import build as build_mine\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in sys.path
                                     if p not in ("", str(tmp_path))])
    before = list(sys.path)
    builder = resolve_builder("my_workload_module:build_mine")
    assert builder(0).name == "toy"
    assert sys.path == before
