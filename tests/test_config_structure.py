"""Structural hyperparameters (what may change after the first step), parameter dtypes,
sparse gradients and defaults that follow each group's preconditioner."""

from __future__ import annotations

import pytest
import torch

from scalable_shampoo import Shampoo, ShampooConfig
from scalable_shampoo.config import STRUCTURAL_FIELDS
from tests.test_config import DEFAULTS, _assert_unchanged, _fill_grads, _params, _snapshot


# -------------------------------------------------------- structure, dtypes, sparsity
STRUCTURAL_CHANGES = [
    ("block_size", 2),
    ("max_preconditioned_dim", 2),
    ("factor_dtype", torch.float32),
    ("grafting", "sgd"),
    ("preconditioner", "eigenvalue_corrected"),
    ("precondition_1d", False),
    ("merge_dims", False),
]


def test_structural_changes_cover_structural_fields():
    assert {name for name, _ in STRUCTURAL_CHANGES} == set(STRUCTURAL_FIELDS)


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("name, value", STRUCTURAL_CHANGES)
def test_structural_change_after_first_step_raises(name, value, foreach):
    params = _params(3)
    opt = Shampoo(params, lr=0.1, foreach=foreach)
    _fill_grads(params)
    opt.step()
    opt.param_groups[0][name] = value
    _fill_grads(params, seed=2)
    before = _snapshot(params)
    with pytest.raises(ValueError, match=rf"{name}\b.*cannot change"):
        opt.step()
    _assert_unchanged(params, before)
    opt.param_groups[0][name] = DEFAULTS[name]
    opt.step()


@pytest.mark.parametrize("name, value", STRUCTURAL_CHANGES)
def test_structural_change_before_first_step_is_allowed(name, value):
    params = _params(3)
    opt = Shampoo(params, lr=0.1)
    opt.param_groups[0][name] = value
    _fill_grads(params)
    opt.step()
    opt.step()


@pytest.mark.parametrize("name, value", [("lr", 0.5), ("betas", (0.5, 0.9)), ("epsilon", 1e-6),
                                         ("weight_decay", 0.1), ("grafting_beta2", 0.9),
                                         ("precondition_frequency", 1),
                                         ("nesterov", True), ("grafting_momentum", True)])
def test_non_structural_change_after_first_step_is_allowed(name, value):
    params = _params(3)
    # Eigenvalue-corrected: the one preconditioner every field here applies to.
    opt = Shampoo(params, lr=0.1, betas=(0.0, 0.999), preconditioner="eigenvalue_corrected")
    _fill_grads(params)
    opt.step()
    opt.param_groups[0][name] = value
    opt.step()
    assert all(torch.isfinite(p).all() for p in params)


NON_FLOAT_DTYPES = [torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool,
                    torch.complex64]


@pytest.mark.parametrize("dtype", NON_FLOAT_DTYPES, ids=str)
def test_non_floating_parameters_raise_type_error(dtype):
    bad = torch.zeros(3, 2, dtype=dtype)
    good = _params(1)
    with pytest.raises(TypeError, match=r"floating"):
        Shampoo([bad])
    with pytest.raises(TypeError, match=r"floating"):
        Shampoo([good[0], bad])
    with pytest.raises(TypeError, match=r"floating"):
        Shampoo([{"params": good}, {"params": [bad]}])
    opt = Shampoo(good)
    with pytest.raises(TypeError, match=r"floating"):
        opt.add_param_group({"params": [bad]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("foreach", [True, False])
def test_sparse_gradient_raises_at_step(foreach):
    params = _params(2)
    opt = Shampoo(params, lr=0.1, foreach=foreach)
    _fill_grads(params)
    params[0].grad = params[0].grad.to_sparse()
    before = _snapshot(params)
    with pytest.raises(RuntimeError, match=r"sparse"):
        opt.step()
    _assert_unchanged(params, before)


def test_sparse_embedding_gradient_raises_at_step():
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    opt = Shampoo(embedding.parameters(), lr=0.1)
    embedding(torch.tensor([1, 2, 2])).sum().backward()
    assert embedding.weight.grad.is_sparse
    before = _snapshot(embedding.parameters())
    with pytest.raises(RuntimeError, match=r"sparse"):
        opt.step()
    _assert_unchanged(embedding.parameters(), before)


@pytest.mark.parametrize("group, expected", [("shampoo", True), ("eigenvalue_corrected", False)])
def test_default_precondition_1d_follows_each_groups_preconditioner(group, expected):
    vector, matrix = torch.randn(6), torch.randn(4, 3)
    opt = Shampoo([{"params": [vector, matrix], "preconditioner": group}], block_size=8)
    assert opt.param_groups[0]["precondition_1d"] is None
    assert ShampooConfig.from_group(opt.param_groups[0]).precondition_1d is expected
    for p in (vector, matrix):
        p.grad = torch.randn_like(p)
    opt.step()
    # The vector's block has a factor only when vectors are preconditioned; the matrix
    # keeps both of its factors either way.
    blocks = {index: state["blocks"] for index, state in opt.state_dict()["state"].items()}
    assert [tuple(f.shape) for f in blocks[0][0]["factors"]] == ([(21,)] if expected else [])
    assert [tuple(f.shape) for f in blocks[1][0]["factors"]] == [(10,), (6,)]  # packed
