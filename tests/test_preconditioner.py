"""Stacked kernels against the one-block reference kernels and explicit float64 math."""

from __future__ import annotations

import pytest
import torch

from scalable_shampoo import preconditioner
from scalable_shampoo.config import ShampooConfig
from scalable_shampoo.matrix_functions import RootResult
from scalable_shampoo.preconditioner import (BlockStack, matricize, precondition,
                                             precondition_reference, update_factors_,
                                             update_factors_reference_)
from scalable_shampoo.symmetric_packing import pack_symmetric, unpack_symmetric
from tests.reference import kron_all, outer_along, reference_root

CASES = [  # (block shape, preconditioned dims)
    ((5, 4), (0, 1)),
    ((6,), (0,)),
    ((3, 4, 2), (0, 1, 2)),
    ((3, 4, 2), (1,)),
    ((7, 3), (1,)),       # one-sided: dim 0 above max_preconditioned_dim
    ((2, 3, 2, 2), (0, 2, 3)),
    ((), ()),
]


def _spd_roots(shape, dims, n, gen):
    roots = {}
    for d in dims:
        a = torch.randn(n, shape[d], shape[d], dtype=torch.float64, generator=gen)
        roots[d] = a @ a.mT + torch.eye(shape[d], dtype=torch.float64)
    return roots


@pytest.mark.parametrize("shape,dims", CASES)
def test_precondition_matches_kronecker_product(shape, dims):
    gen = torch.Generator().manual_seed(0)
    n = 3
    blocks = torch.randn(n, *shape, dtype=torch.float64, generator=gen)
    roots = _spd_roots(shape, dims, n, gen)
    batched = precondition(blocks, roots)
    for i in range(n):
        mats = [roots[d][i] if d in roots else torch.eye(shape[d], dtype=torch.float64)
                for d in range(len(shape))]
        expected = (kron_all(mats) @ blocks[i].reshape(-1)).reshape(shape)
        torch.testing.assert_close(batched[i], expected, rtol=1e-12, atol=1e-12)
        one = precondition_reference(blocks[i], {d: r[i] for d, r in roots.items()})
        torch.testing.assert_close(one, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk_bytes", [1, 64 << 20])  # a row at a time, all at once
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("shape,dims", [c for c in CASES if c[1]])
def test_stack_precondition_uses_the_packed_roots(shape, dims, batched, chunk_bytes,
                                                  monkeypatch):
    """The stack stores its roots packed and unpacks them for the product, in bounded
    chunks of rows: the result is the explicit Kronecker product of the full roots."""
    monkeypatch.setattr(preconditioner, "UNPACKED_ROOT_BYTES", chunk_bytes)
    gen = torch.Generator().manual_seed(6)
    n = 3 if batched else 1
    stack = BlockStack(shape, dims, [(0, i) for i in range(n)], torch.float64,
                       torch.device("cpu"), batched)
    stack.allocate(ShampooConfig())
    roots = _spd_roots(shape, dims, n, gen)
    for j, d in enumerate(dims):
        assert stack.state.roots[j].shape == (n, shape[d] * (shape[d] + 1) // 2)
        stack.state.roots[j].copy_(pack_symmetric(roots[d]))
    blocks = torch.randn(n, *shape, dtype=torch.float64, generator=gen)
    out = stack.precondition(stack.state, blocks)
    for i in range(n):
        mats = [roots[d][i] if d in roots else torch.eye(shape[d], dtype=torch.float64)
                for d in range(len(shape))]
        expected = (kron_all(mats) @ blocks[i].reshape(-1)).reshape(shape)
        torch.testing.assert_close(out[i], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("beta2", [1.0, 0.9])
@pytest.mark.parametrize("shape,dims", [c for c in CASES if c[1]])
def test_factor_updates_match_einsum(shape, dims, beta2):
    gen = torch.Generator().manual_seed(1)
    n = 4
    start = [torch.rand(n, shape[d], shape[d], dtype=torch.float64, generator=gen) for d in dims]
    start = [f + f.mT for f in start]  # factors are symmetric: stored packed
    batched = [pack_symmetric(f) for f in start]
    looped = [pack_symmetric(f) for f in start]
    for _ in range(3):
        blocks = torch.randn(n, *shape, dtype=torch.float64, generator=gen)
        update_factors_(batched, blocks, dims, beta2)
        for i in range(n):
            update_factors_reference_([f[i] for f in looped], blocks[i], dims, beta2)
        for j, d in enumerate(dims):
            for i in range(n):
                outer = outer_along(blocks[i], d)
                start[j][i] = (start[j][i] + outer if beta2 == 1.0
                               else beta2 * start[j][i] + (1 - beta2) * outer)
    for b, l, e in zip(batched, looped, start):
        torch.testing.assert_close(unpack_symmetric(b), e, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(unpack_symmetric(l), e, rtol=1e-12, atol=1e-12)


def test_matricize_rows_are_the_dimension():
    x = torch.arange(2 * 3 * 4 * 5.0).reshape(2, 3, 4, 5)
    m = matricize(x, 1)
    assert m.shape == (2, 4, 15)
    assert torch.equal(m[1, 2], x[1, :, 2, :].reshape(-1))


def _stack(shape=(4, 3), n=3, **options):
    config = ShampooConfig(**options)
    stack = BlockStack(shape, (0, 1), [(i, 0) for i in range(n)], torch.float32,
                       torch.device("cpu"), batched=True)
    stack.allocate(config)
    stack.ensure_buffers(config)
    return stack, config


def test_select_and_assign_round_trip_only_touch_selected_rows():
    stack, _ = _stack(n=4)
    gen = torch.Generator().manual_seed(2)
    for t in stack.state.tensors():
        t.copy_(torch.randn(t.shape, generator=gen))
    before = [t.clone() for t in stack.state.tensors()]
    rows = torch.tensor([1, 3])
    part = stack.state.select(rows)
    for t in part.tensors():
        t.add_(1.0)
    stack.state.assign(rows, part)
    for old, new in zip(before, stack.state.tensors()):
        torch.testing.assert_close(new[[1, 3]], old[[1, 3]] + 1)
        assert torch.equal(new[[0, 2]], old[[0, 2]])


def test_roots_are_bias_corrected_inverse_roots():
    stack, config = _stack(betas=(0.9, 0.95), epsilon=1e-6)
    gen = torch.Generator().manual_seed(3)
    blocks = torch.randn(3, 4, 3, generator=gen)
    for _ in range(5):
        update_factors_(stack.state.factors, blocks, stack.dims, 0.95)
    results = stack.compute_roots(stack.root_inputs(config, step=5), config)
    assert stack.install_roots(results, config, computed_at=5) == 0
    assert stack.root_count() == 6
    for j, d in enumerate(stack.dims):
        for i in range(3):
            factor = unpack_symmetric(stack.state.factors[j][i].double())
            expected = reference_root(factor / (1 - 0.95**5),
                                      0.25, 1e-6, relative=True)
            torch.testing.assert_close(unpack_symmetric(stack.state.roots[j][i]).double(),
                                       expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(stack.record.computed_at, torch.full((3, 2), 5))


@pytest.mark.parametrize("packed", [True, False])  # False: pending roots of format <= 3
def test_install_rejects_nan_and_high_residual_per_block(packed):
    stack, config = _stack(root_failure_threshold=0.1)
    old = [r.clone() for r in stack.state.roots]
    new = [torch.rand(3, 4, 4, dtype=torch.float64) + 1, torch.rand(3, 3, 3, dtype=torch.float64)]
    new = [(r + r.mT) / 2 for r in new]
    new[0][1, 0, 0] = float("nan")
    residuals = [torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64),
                 torch.tensor([0.0, 0.5, float("nan")], dtype=torch.float64)]
    results = [RootResult(pack_symmetric(r) if packed else r, res, 0)
               for r, res in zip(new, residuals)]
    assert stack.install_roots(results, config, computed_at=7) == 3
    new = [pack_symmetric(r) for r in new]
    torch.testing.assert_close(stack.state.roots[0][[0, 2]], new[0][[0, 2]].float())
    assert torch.equal(stack.state.roots[0][1], old[0][1])
    torch.testing.assert_close(stack.state.roots[1][0], new[1][0].float())
    assert torch.equal(stack.state.roots[1][1:], old[1][1:])
    assert stack.record.failures.tolist() == [[0, 0], [1, 1], [0, 1]]
    assert stack.record.computed_at.tolist() == [[7, 7], [0, 0], [7, 0]]
