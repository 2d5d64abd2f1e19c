"""Eigenvalue-corrected Shampoo (SPEC 2.6): the kernels against explicit float64 math,
the optimizer against torch.optim.Adam/AdamW (identity basis) and against the literal
float64 reference (tests/reference.py), the basis refresh (QR convergence, adaptive
skipping, failures) and the root-work seam.

``EC_CONFIGS`` also runs through the contract (tests/test_contract.py). Each starts
preconditioning once the factors of the test shapes have full rank: the eigenvectors of a
zero eigenvalue are arbitrary, so two correct implementations may pick different ones.
"""

from __future__ import annotations

import math

import warnings

import pytest
import torch

import scalable_shampoo.eigenvalue_corrected as ec
from scalable_shampoo import Shampoo, ShampooConfig
from scalable_shampoo.async_roots import RootScheduler
from scalable_shampoo.eigenvalue_corrected import (EigenvalueCorrectedStack, eigenbasis,
                                                   eigenvalue_order, offdiagonal_ratio,
                                                   power_qr_step, refresh_bases)
from scalable_shampoo.symmetric_packing import unpack_symmetric
from tests.reference import ReferenceEigenvalueCorrected, kron_all
from tests.test_optimizer import SHAPES

EC = dict(preconditioner="eigenvalue_corrected")
EC_CONFIGS = {
    "ec_eigh": dict(**EC, lr=0.01, betas=(0.9, 0.95), precondition_frequency=3,
                    start_preconditioning_step=4),
    "ec_qr_adaptive_factor_beta_1d": dict(
        **EC, lr=0.01, betas=(0.9, 0.99), eigenbasis_method="qr", basis_refresh_tolerance=0.2,
        factor_beta=0.8, precondition_1d=True, precondition_frequency=2,
        start_preconditioning_step=4),
    "ec_adam_graft_nesterov_coupled_wd": dict(
        **EC, lr=0.01, betas=(0.8, 1.0), grafting="adam", nesterov=True, weight_decay=0.1,
        decoupled_weight_decay=False, statistics_frequency=2, precondition_frequency=4,
        start_preconditioning_step=7),
    "ec_graft_momentum_nesterov": dict(
        **EC, lr=0.01, betas=(0.9, 0.95), grafting_momentum=True, nesterov=True,
        precondition_frequency=3, start_preconditioning_step=4),
    "ec_graft_momentum_rmsprop": dict(
        **EC, lr=0.01, betas=(0.8, 0.9), grafting="rmsprop", grafting_momentum=True,
        precondition_frequency=2, start_preconditioning_step=4),
    "ec_qr_sgd_graft_no_momentum": dict(
        **EC, lr=0.01, betas=(0.0, 0.9), grafting="sgd", eigenbasis_method="qr",
        bias_correction=False, weight_decay=0.05, adam_epsilon=1e-6, precondition_frequency=3,
        start_preconditioning_step=4),
}
# Vectors of 8 and 30 need that many steps before their factor has full rank.
REFERENCE_SHAPES = sorted(SHAPES)


def _spd(d: int, gen: torch.Generator, decay: float = 0.5) -> torch.Tensor:
    """A float64 SPD matrix with eigenvalues decay^j (well separated) in a random basis."""
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=gen))
    return q @ torch.diag(decay ** torch.arange(d, dtype=torch.float64)) @ q.T


# --------------------------------------------------------------------------- kernels
def test_eigenbasis_diagonalizes_with_decreasing_eigenvalues():
    gen = torch.Generator().manual_seed(0)
    factors = torch.stack([_spd(5, gen), _spd(5, gen, 0.7)])
    bases = eigenbasis(factors)
    for s, u in zip(factors, bases):
        torch.testing.assert_close(u.T @ u, torch.eye(5, dtype=torch.float64), atol=1e-12, rtol=0)
        projected = u.T @ s @ u
        values = torch.diag(projected)
        torch.testing.assert_close(projected, torch.diag(values), atol=1e-12, rtol=0)
        assert torch.all(values[:-1] > values[1:])
        torch.testing.assert_close(values, torch.linalg.eigvalsh(s).flip(0), atol=1e-12, rtol=0)


def test_offdiagonal_ratio_matches_explicit_norms():
    gen = torch.Generator().manual_seed(1)
    s = _spd(4, gen)
    u, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64, generator=gen))
    p = u.T @ s @ u
    expected = torch.sqrt(sum(p[i, j] ** 2 for i in range(4) for j in range(4) if i != j))
    ratio = offdiagonal_ratio(p[None], s[None])
    torch.testing.assert_close(ratio, (expected / torch.linalg.norm(s)).reshape(1))
    assert offdiagonal_ratio(torch.zeros(1, 3, 3), torch.zeros(1, 3, 3)).item() == 0.0


def _largest_principal_angle_sine(basis: torch.Tensor, exact: torch.Tensor) -> float:
    """Over k, the sine of the largest principal angle between the spans of the leading
    k columns of ``basis`` and of ``exact``."""
    d = exact.shape[0]
    sines = []
    for k in range(1, d):
        leading = exact[:, :k]
        residual = basis[:, :k] - leading @ (leading.T @ basis[:, :k])
        sines.append(torch.linalg.matrix_norm(residual, ord=2).item())
    return max(sines)


def test_qr_refresh_converges_to_the_eigh_basis_on_a_fixed_factor():
    gen = torch.Generator().manual_seed(2)
    s = _spd(6, gen)[None]
    exact = eigenbasis(s)[0]
    basis, _ = torch.linalg.qr(torch.randn(1, 6, 6, dtype=torch.float64, generator=gen))
    has_basis = torch.ones(1, dtype=torch.bool)
    angles = [_largest_principal_angle_sine(basis[0], exact)]
    for _ in range(40):
        result = refresh_bases(s, basis, has_basis, "qr", 0.0)
        assert bool(result.refreshed.all())
        basis = result.basis
        angles.append(_largest_principal_angle_sine(basis[0], exact))
    assert angles[0] > 0.5
    assert all(b <= a * 0.9 + 1e-13 for a, b in zip(angles, angles[1:]))  # eigenvalue ratio 0.5
    assert angles[-1] < 1e-9
    # Column by column, up to sign, the QR basis is the eigh basis.
    torch.testing.assert_close(torch.diag(exact.T @ basis[0]).abs(),
                               torch.ones(6, dtype=torch.float64), atol=1e-9, rtol=0)


def test_power_qr_step_orders_columns_by_eigenvalue_order():
    gen = torch.Generator().manual_seed(3)
    s = _spd(5, gen)[None]
    exact = eigenbasis(s)
    shuffled = exact[..., torch.tensor([3, 0, 4, 1, 2])]
    order = eigenvalue_order(shuffled, s @ shuffled)
    assert order.tolist() == [[1, 3, 4, 0, 2]]  # shuffled[:, 1] is the top eigenvector
    new = power_qr_step(s @ shuffled, order)
    torch.testing.assert_close(torch.diag(exact[0].T @ new[0]).abs(),
                               torch.ones(5, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("method", ["eigh", "qr"])
def test_refresh_is_eigh_first_then_skipped_while_the_basis_still_diagonalizes(method):
    gen = torch.Generator().manual_seed(4)
    s = torch.stack([_spd(5, gen), _spd(5, gen)])
    identity = torch.eye(5, dtype=torch.float64).expand(2, 5, 5)
    first = refresh_bases(s, identity, torch.tensor([False, False]), method, 1e-6)
    assert first.refreshed.tolist() == [True, True]  # no basis yet: always eigh
    assert first.drift.isnan().all()  # nothing to measure
    torch.testing.assert_close(first.eigenvalues,  # estimates on the new basis
                               torch.linalg.eigvalsh(s).flip(-1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(first.basis, eigenbasis(s))
    # Row 0's factor is unchanged, row 1's is rotated: only row 1 is refreshed.
    rotation = torch.linalg.matrix_exp(0.3 * (lambda a: a - a.T)(
        torch.randn(5, 5, dtype=torch.float64, generator=gen)))
    moved = torch.stack([s[0], rotation @ s[1] @ rotation.T])
    second = refresh_bases(moved, first.basis, torch.tensor([True, True]), method, 1e-6)
    assert second.refreshed.tolist() == [False, True]
    assert second.drift[0] < 1e-12 < 1e-2 < second.drift[1]
    assert torch.equal(second.basis[0], first.basis[0])
    torch.testing.assert_close(second.eigenvalues[1], torch.diag(
        second.basis[1].T @ moved[1] @ second.basis[1]), rtol=1e-10, atol=1e-12)
    # Without a tolerance every row is refreshed.
    always = refresh_bases(moved, first.basis, torch.tensor([True, True]), method, 0.0)
    assert always.refreshed.tolist() == [True, True] and always.drift.isnan().all()
    with pytest.raises(ValueError, match="method must be"):
        refresh_bases(s, identity, torch.tensor([False, False]), "svd", 0.0)


# ------------------------------------------------------- identity basis: Adam, AdamW
ADAM_SHAPES = [(6, 5), (7,), (3, 4, 5), (), (20, 3)]


def _params(shapes, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, dtype=dtype, generator=gen)) for s in shapes]


def _same_gradients(ours, theirs, steps, seed, copy=torch.Tensor.clone):
    """Yields once per step, after giving each of ``ours`` a fresh random gradient (in its
    dtype) and its partner in ``theirs`` ``copy`` of it."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn(p.shape, dtype=p.dtype, generator=gen)
            q.grad = copy(p.grad)
        yield


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("decoupled", [True, False], ids=["adamw", "adam_l2"])
def test_identity_basis_is_adam_step_for_step(decoupled, dtype, tol, foreach):
    """Without grafting and with no basis ever computed the update is Adam's (AdamW's with
    decoupled weight decay); a block without any factor (``big``: both dimensions above
    max_preconditioned_dim) is Adam even with preconditioning from step 1. (With the
    default Adam grafting the direction is Adam's and its norm that of Adam's step
    without momentum.)"""
    ours, theirs = _params(ADAM_SHAPES, dtype), _params(ADAM_SHAPES, dtype)
    big = torch.nn.Parameter(torch.randn(12, 11, dtype=dtype))
    big_ref = torch.nn.Parameter(big.detach().clone())
    options = dict(lr=0.01, betas=(0.8, 0.95), weight_decay=0.1, adam_epsilon=1e-6,
                   decoupled_weight_decay=decoupled, block_size=4, max_preconditioned_dim=10,
                   grafting="none")
    opt = Shampoo([{"params": ours, "start_preconditioning_step": 10**6},
                   {"params": [big], "start_preconditioning_step": 1,
                    "precondition_frequency": 1}], **EC, **options, foreach=foreach)
    adam = (torch.optim.AdamW if decoupled else torch.optim.Adam)(
        [*theirs, big_ref], lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    for _ in _same_gradients([*ours, big], [*theirs, big_ref], steps=20, seed=1):
        opt.step()
        adam.step()
        for p, q in zip([*ours, big], [*theirs, big_ref]):
            torch.testing.assert_close(p, q, rtol=tol, atol=tol)
    assert opt.metrics()["basis_refreshes"] == 0  # the no-factor blocks have nothing to refresh


@pytest.mark.parametrize("grafting_momentum", [True, False])
def test_grafting_momentum_grafts_to_adams_actual_step(grafting_momentum):
    """With ``grafting_momentum`` the step takes the norm of the grafting method's
    direction of the first moment: with no basis in use and Adam grafting at the rotated
    Adam's own betas and epsilon, that is Adam's step itself, so the update is AdamW's
    step for step. Without it the norm is that of Adam's step without momentum."""
    ours, theirs = _params(ADAM_SHAPES, torch.float64), _params(ADAM_SHAPES, torch.float64)
    opt = Shampoo(ours, **EC, lr=0.01, betas=(0.8, 0.95), weight_decay=0.1,
                  adam_epsilon=1e-6, grafting_beta2=0.95, grafting_epsilon=1e-6,
                  start_preconditioning_step=10**6, grafting_momentum=grafting_momentum)
    adam = torch.optim.AdamW(theirs, lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    for _ in _same_gradients(ours, theirs, steps=10, seed=1):
        opt.step()
        adam.step()
    same = all(torch.allclose(p, q, rtol=1e-12, atol=1e-12) for p, q in zip(ours, theirs))
    assert same == grafting_momentum


# -------------------------------------------------------------- float64 reference
def _run(shapes, merged, options, steps=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, dtype=torch.float64, generator=gen) for s in shapes]
    ref = ReferenceEigenvalueCorrected([p.clone() for p in params], merged, **options)
    opt = Shampoo(params, **options)
    for _ in range(steps):
        grads = [torch.randn(p.shape, dtype=torch.float64, generator=gen) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        ref.step(grads)
    return params, ref, opt


@pytest.mark.parametrize("shape_name", REFERENCE_SHAPES)
@pytest.mark.parametrize("config_name", sorted(EC_CONFIGS))
def test_matches_float64_reference(config_name, shape_name):
    shapes, merged, shape_options = SHAPES[shape_name]
    options = {**EC_CONFIGS[config_name], **shape_options, "factor_dtype": torch.float64}
    params, ref, opt = _run(shapes, merged, options)
    for p, r in zip(params, ref.params):
        torch.testing.assert_close(p, r, rtol=1e-8, atol=1e-10)
    metrics = opt.metrics()
    assert metrics["basis_failures"] == 0
    assert (metrics["basis_refreshes"], metrics["basis_refreshes_skipped"]) == (
        ref.refreshes, ref.skips)


@pytest.mark.parametrize("preconditioner", ["eigenvalue_corrected", "shampoo"])
def test_unmerged_dimensions_match_float64_reference(preconditioner):
    """``merge_dims=False``: a conv-like kernel keeps one factor per dimension (its size-1
    dimension squeezed) and a small matrix stays a matrix, where merging would make them
    ``(12, 2)`` and one 30-long vector."""
    shapes, merged = [(4, 1, 3, 2), (6, 5)], [(4, 3, 2), (6, 5)]
    options = dict(preconditioner=preconditioner, merge_dims=False, block_size=32,
                   lr=0.01, betas=(0.9, 0.95), precondition_frequency=3,
                   start_preconditioning_step=7)
    if preconditioner == "shampoo":
        from tests.reference import ReferenceShampoo
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(s, dtype=torch.float64, generator=gen) for s in shapes]
        ref = ReferenceShampoo([p.clone() for p in params], merged, **options)
        opt = Shampoo(params, **options)
        for _ in range(24):
            grads = [torch.randn(p.shape, dtype=torch.float64, generator=gen) for p in params]
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
            ref.step(grads)
    else:
        params, ref, opt = _run(shapes, merged, dict(options, grafting_momentum=True))
    for p, r in zip(params, ref.params):
        torch.testing.assert_close(p, r, rtol=1e-8, atol=1e-10)
    blocks = opt.state[params[0]]["blocks"][0]["factors"]
    assert [f.numel() for f in blocks] == [10, 6, 3]  # packed 4x4, 3x3, 2x2


@pytest.mark.parametrize("rule", ["keep", "rank", "no_pooling"])
def test_reference_comparison_sees_the_second_moment_rule(rule):
    """Negative controls: keeping ``v`` as it is on every change of basis, carrying it
    by eigenvalue rank (SOAP's rule, this library's before), or not pooling the null
    directions (on a 30-long merged vector, whose factor is rank deficient for 30 steps),
    leaves a difference the comparison above would catch."""
    shapes, merged, shape_options = SHAPES["matrix_merged_to_vector" if rule == "no_pooling"
                                           else "matrix"]
    options = {**EC_CONFIGS["ec_eigh"], **shape_options, "factor_dtype": torch.float64}
    params, _, _ = _run(shapes, merged, options)

    class OtherRule(ReferenceEigenvalueCorrected):
        def _install(self, key, block, vb, new_bases):
            before = vb.clone()
            olds = {d: block.roots[d].clone() for d in block.dims}
            super()._install(key, block, vb, new_bases)
            if rule == "keep":
                vb.copy_(before)
            elif rule == "rank":
                weights = []
                for d, n in enumerate(block.shape):
                    weights.append(torch.eye(n, dtype=torch.float64))
                    if new_bases.get(d) is not None and (*key, d, "old") in self.seen:
                        s = block.factors[d]
                        order = torch.argsort(torch.diag(olds[d].T @ s @ olds[d]),
                                              descending=True)
                        weights[d] = weights[d][order].T.contiguous()
                    self.seen.add((*key, d, "old"))
                if any(not torch.equal(w, torch.eye(w.shape[0], dtype=w.dtype))
                       for w in weights):
                    vb.copy_((kron_all([w.T for w in weights]) @ before.reshape(-1))
                             .reshape(vb.shape))

        def _pooling(self, key, block):
            if rule == "no_pooling":
                return torch.eye(math.prod(block.shape), dtype=torch.float64)
            return super()._pooling(key, block)

    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, dtype=torch.float64, generator=gen) for s in shapes]
    ref = OtherRule([p.clone() for p in start], merged, **options)
    ref.seen = set()
    for _ in range(24):
        ref.step([torch.randn(p.shape, dtype=torch.float64, generator=gen) for p in start])
    assert not torch.allclose(params[0], ref.params[0], rtol=1e-7, atol=1e-9)


def test_default_first_basis_is_computed_from_the_first_gradient_and_used_next():
    """By default the first basis comes from step 1's factors and goes into use at step
    2 (``root_delay=1``): a basis never rotates the gradient it was computed from."""
    param = torch.randn(6, 4)
    opt = Shampoo([param], preconditioner="eigenvalue_corrected", precondition_frequency=10,
                  block_size=8)
    param.grad = torch.randn(6, 4)
    before = param.detach().clone()
    opt.step()
    metrics = opt.metrics()
    assert metrics["basis_refreshes"] == 0 and metrics["roots_in_flight"] == 1
    # Adam's first step (the sign of the gradient times lr): no basis in use yet.
    torch.testing.assert_close(param - before, -1e-3 * param.grad.sign(), rtol=0, atol=1e-6)
    param.grad = torch.randn(6, 4)
    before = param.detach().clone()
    opt.step()
    assert opt.metrics()["basis_refreshes"] == 2  # both factors, from step 1
    assert not torch.allclose(param - before, -1e-3 * param.grad.sign(), rtol=1e-2, atol=0)


def test_several_groups_mix_preconditioners():
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(6, 4, dtype=torch.float64, generator=gen)
    b = torch.randn(6, 4, dtype=torch.float64, generator=gen)
    ec_options = {**EC_CONFIGS["ec_eigh"], "block_size": 6, "factor_dtype": torch.float64}
    opt = Shampoo([{"params": [a], **ec_options},
                   {"params": [b], "lr": 0.01, "precondition_frequency": 2, "block_size": 6}])
    alone = torch.nn.Parameter(a.clone())
    opt_alone = Shampoo([alone], **ec_options)
    for _ in range(8):
        ga, gb = torch.randn(6, 4, dtype=torch.float64, generator=gen), torch.randn(
            6, 4, dtype=torch.float64, generator=gen)
        a.grad, b.grad, alone.grad = ga, gb, ga.clone()
        opt.step()
        opt_alone.step()
    assert torch.equal(a, alone.detach())
    assert opt.metrics()["basis_refreshes"] == opt_alone.metrics()["basis_refreshes"] == 4
    assert opt.param_groups[1]["grafting"] is None  # resolved per group: adam for shampoo
    assert opt.state_dict()["state"][1]["blocks"][0]["graft"] is not None


# ------------------------------------------------------------- refresh in the optimizer
def _one_factor_run(steps, freeze_after, tolerance, method="qr"):
    """A (4, 12) parameter with block_size 4 and max_preconditioned_dim 10: one block
    with one 4x4 factor, its basis refreshed every step from step 2. The gradients have
    well separated scales along a random basis; the factor is updated in the first
    ``freeze_after`` steps only. Returns the optimizer, the basis after every step and
    the final factor."""
    gen = torch.Generator().manual_seed(0)
    param = torch.nn.Parameter(torch.randn(4, 12, generator=gen))
    opt = Shampoo([param], **EC, lr=1e-3, block_size=4, max_preconditioned_dim=10,
                  precondition_frequency=1, start_preconditioning_step=2, root_delay=0,
                  eigenbasis_method=method, basis_refresh_tolerance=tolerance)
    mixing, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen))
    scales = mixing @ torch.diag(torch.tensor([1.0, 0.5, 0.25, 0.125]))
    bases = []
    for step in range(1, steps + 1):
        if step == freeze_after + 1:  # statistics_frequency may change between steps
            opt.param_groups[0]["statistics_frequency"] = 10**6
        param.grad = scales @ torch.randn(4, 12, generator=gen)
        opt.step()
        bases.append(opt.state_dict()["state"][0]["blocks"][0]["roots"][0].double())
    factor = unpack_symmetric(opt.state_dict()["state"][0]["blocks"][0]["factors"][0].double())
    return opt, bases, factor


def test_optimizer_qr_refresh_converges_on_a_frozen_factor():
    # Step 2: eigh of the factor of steps 1-2; step 3 changes the factor, which then stays.
    _, bases, factor = _one_factor_run(24, freeze_after=3, tolerance=0.0)
    exact = eigenbasis(factor[None])[0]
    angles = [_largest_principal_angle_sine(b, exact) for b in bases[1:]]
    assert angles[0] > 1e-2
    # The angle shrinks by the eigenvalue ratios each step, down to the float32 basis's
    # rounding floor.
    assert all(b <= a * 0.5 for a, b in zip(angles, angles[1:]) if a > 1e-6)
    assert max(angles[-8:]) < 1e-6


def test_adaptive_refresh_in_the_optimizer_skips_only_while_the_basis_holds():
    frozen, _, _ = _one_factor_run(12, freeze_after=1, tolerance=1e-5)
    m = frozen.metrics()
    # Step 2: the first eigh; steps 3..12: the float32 basis still diagonalizes the factor.
    assert (m["basis_refreshes"], m["basis_refreshes_skipped"]) == (1, 10)
    assert m["root_computations"] == 11 and m["root_age_max"] == 10
    assert 0 < m["root_residual_max"] < 1e-5
    moving, _, _ = _one_factor_run(12, freeze_after=12, tolerance=1e-5)
    m = moving.metrics()
    assert (m["basis_refreshes"], m["basis_refreshes_skipped"]) == (11, 0)
    assert m["root_residual_max"] > 1e-3


@pytest.mark.parametrize("method, kernel", [("eigh", "eigenbasis"), ("qr", "power_qr_step")])
def test_failed_basis_keeps_the_previous_one_and_is_counted(monkeypatch, method, kernel):
    params = _params([(5, 4)] * 3, torch.float32)
    opt = Shampoo(params, **EC, lr=0.02, precondition_frequency=2,
                  start_preconditioning_step=2, block_size=5, eigenbasis_method=method,
                  root_delay=0)
    gen = torch.Generator().manual_seed(2)

    def feed(steps):
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn(5, 4, generator=gen)
            opt.step()

    feed(3)  # bases from step 2
    state = opt.state_dict()["state"][0]["blocks"][0]
    real = getattr(ec, kernel)
    monkeypatch.setattr(ec, kernel, lambda *a: torch.full_like(real(*a), float("nan")))
    before_moments = {k: state[k] for k in ("momentum", "second_moment")}
    opt.step()  # step 4 refreshes: every basis fails
    after = opt.state_dict()["state"][0]["blocks"][0]
    for old, new in zip(state["roots"], after["roots"]):
        assert torch.equal(old, new)
    # No change of basis, so the rotated moments only took this step's gradient.
    assert not torch.equal(before_moments["second_moment"], after["second_moment"])
    m = opt.metrics()
    assert m["basis_failures"] == m["root_failures"] == 6  # 3 blocks x 2 factors
    assert m["basis_refreshes"] == 12 and m["root_age_max"] == 2
    monkeypatch.undo()
    feed(3)
    assert all(torch.isfinite(p).all() for p in params)
    assert opt.metrics()["basis_failures"] == 6


def test_nan_gradient_is_treated_as_a_missing_one():
    options = dict(**EC_CONFIGS["ec_eigh"], block_size=5)
    runs = []
    for poison in ("nan", None):
        params = _params([(5, 4)] * 3, torch.float32)
        opt = Shampoo(params, **options)
        gen = torch.Generator().manual_seed(3)
        for t in range(1, 9):
            for i, p in enumerate(params):
                p.grad = torch.randn(5, 4, generator=gen)
                if (t, i) in ((4, 1), (7, 2)):  # step 7 refreshes the bases
                    p.grad = p.grad.fill_(float("nan")) if poison else None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                opt.step()
        runs.append((params, opt.state_dict()))
    (nan_params, nan_state), (none_params, none_state) = runs
    for a, b in zip(nan_params, none_params):
        assert torch.equal(a, b) and torch.isfinite(a).all()
    for key in nan_state["state"]:
        for x, y in zip(nan_state["state"][key]["blocks"], none_state["state"][key]["blocks"]):
            for name, value in x.items():
                other = y[name]
                if isinstance(value, list):
                    assert all(torch.equal(u, w) for u, w in zip(value, other)), name
                elif isinstance(value, bytes):  # pending roots, one opaque leaf
                    assert value == other, name
                elif value is not None:
                    assert torch.equal(value, other), name


# ------------------------------------------------------------------ root-work seam
def test_root_work_seam_is_pure_and_equals_the_synchronous_refresh():
    """root_inputs / compute_roots / install_roots, driven by hand as a background
    worker would: compute_roots touches no state, and the result equals the synchronous
    scheduler's."""
    params = _params([(5, 4)] * 2, torch.float32)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    options = dict(**EC, lr=0.01, precondition_frequency=3, block_size=5,
                   eigenbasis_method="qr", start_preconditioning_step=3)
    opt, twin_opt = Shampoo(params, **options), Shampoo(twins, **options)
    for _ in _same_gradients(params, twins, steps=4, seed=4):  # bases from step 3
        opt.step()
        twin_opt.step()
    config = ShampooConfig.from_group(opt.param_groups[0])
    stack, twin_stack = opt._plans[0].stacks[0], twin_opt._plans[0].stacks[0]
    assert isinstance(stack, EigenvalueCorrectedStack)
    before = [t.clone() for t in stack.state.tensors()]
    inputs = stack.root_inputs(config, 5)
    snapshot = [tuple(t.clone() for t in entry) for entry in inputs]
    results = stack.compute_roots(inputs, config)
    assert all(torch.equal(a, b) for a, b in zip(before, stack.state.tensors()))
    assert all(torch.equal(a, b) for entry, saved in zip(inputs, snapshot)
               for a, b in zip(entry, saved))
    assert stack.install_roots(results, config, 5) == 0
    RootScheduler(asynchronous=False).launch(twin_stack, config, 5, delay=0)
    for a, b in zip(stack.state.tensors(), twin_stack.state.tensors()):
        assert torch.equal(a, b)
    assert torch.equal(stack.record.computed_at, twin_stack.record.computed_at)


def test_state_dict_holds_bases_moments_and_counts():
    params = _params([(6, 5)], torch.float32)
    opt = Shampoo(params, **EC_CONFIGS["ec_qr_adaptive_factor_beta_1d"], block_size=6,
                  root_delay=0)
    gen = torch.Generator().manual_seed(6)
    for _ in range(6):
        params[0].grad = torch.randn(6, 5, generator=gen)
        opt.step()
    block = opt.state_dict()["state"][0]["blocks"][0]
    assert block["second_moment"].shape == (6, 5) and bool((block["second_moment"] > 0).all())
    for basis in block["roots"]:
        torch.testing.assert_close(basis.T @ basis, torch.eye(basis.shape[0]), atol=1e-5, rtol=0)
    m = opt.metrics()
    assert int(block["basis_refreshes"].sum()) == m["basis_refreshes"]
    assert int(block["basis_refreshes_skipped"].sum()) == m["basis_refreshes_skipped"]
    # Refresh steps 4 and 6, two factors each.
    assert m["basis_refreshes"] + m["basis_refreshes_skipped"] == m["root_computations"] == 4
    bad = opt.state_dict()
    del bad["state"][0]["blocks"][0]["second_moment"]
    with pytest.raises(ValueError, match="second_moment"):
        Shampoo(_params([(6, 5)], torch.float32), **EC, block_size=6).load_state_dict(bad)


def test_factor_beta_sets_the_factor_ema_of_classic_shampoo():
    """In classic Shampoo beta2 serves only the factors, so factor_beta=x is betas[1]=x."""
    a, b = _params([(6, 5)], torch.float32), _params([(6, 5)], torch.float32)
    opt_a = Shampoo(a, lr=0.01, betas=(0.9, 0.999), factor_beta=0.9, precondition_frequency=2)
    opt_b = Shampoo(b, lr=0.01, betas=(0.9, 0.9), precondition_frequency=2)
    gen = torch.Generator().manual_seed(7)
    for _ in range(6):
        a[0].grad = torch.randn(6, 5, generator=gen)
        b[0].grad = a[0].grad.clone()
        opt_a.step()
        opt_b.step()
    assert torch.equal(a[0], b[0])


def test_bfloat16_parameters_keep_float32_state_and_train():
    gen = torch.Generator().manual_seed(8)
    target = torch.randn(6, 5, generator=gen)
    params = {dtype: torch.nn.Parameter(torch.zeros(6, 5, dtype=dtype))
              for dtype in (torch.bfloat16, torch.float32)}
    losses = {}
    for dtype, param in params.items():
        opt = Shampoo([param], **EC_CONFIGS["ec_eigh"], block_size=6)
        for _ in range(12):
            opt.zero_grad()
            loss = ((param.float() - target) ** 2).sum()
            loss.backward()
            opt.step()
        losses[dtype] = loss.item()
        block = opt.state_dict()["state"][0]["blocks"][0]
        assert block["second_moment"].dtype == block["roots"][0].dtype == torch.float32
    assert losses[torch.bfloat16] < 0.95 * (target ** 2).sum().item()
    assert abs(losses[torch.bfloat16] - losses[torch.float32]) < 0.05 * losses[torch.float32]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("config_name", sorted(EC_CONFIGS))
def test_cuda_matches_cpu(config_name):
    shapes = [(6, 5), (7,), (3, 4, 5), (), (20, 3)]
    cpu = _params(shapes, torch.float64)
    gpu = [torch.nn.Parameter(p.detach().cuda()) for p in cpu]
    options = dict(**EC_CONFIGS[config_name], block_size=4, max_preconditioned_dim=10,
                   factor_dtype=torch.float64)
    opt_cpu, opt_gpu = Shampoo(cpu, **options), Shampoo(gpu, **options)
    for _ in _same_gradients(cpu, gpu, steps=12, seed=9, copy=torch.Tensor.cuda):
        opt_cpu.step()
        opt_gpu.step()
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-8, atol=1e-10)
    assert opt_cpu.metrics()["basis_refreshes"] == opt_gpu.metrics()["basis_refreshes"]


# ------------------------------------------------- refreshes never collapse the step
def _full_batch_regression(make_optimizer, steps: int = 60, seed: int = 0):
    """A full-batch ``Linear(12, 48)-Tanh-Linear(48, 12)`` regression on a random teacher:
    with the default ``block_size`` each 48x12 weight merges into one 576-long vector, whose
    factor has rank <= t (rank deficient for all 60 steps). Returns the final loss and, per
    step, the update norm of each weight."""
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(256, 12, generator=gen)
    teacher = [torch.randn(12, 24, generator=gen) / 3.5, torch.randn(24, 12, generator=gen) / 5]
    targets = torch.tanh(inputs @ teacher[0]) @ teacher[1]
    targets += 0.1 * torch.randn(targets.shape, generator=gen)
    model = torch.nn.Sequential(torch.nn.Linear(12, 48), torch.nn.Tanh(), torch.nn.Linear(48, 12))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
    weights = [model[0].weight, model[2].weight]
    optimizer = make_optimizer(model.parameters())
    norms = []
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(inputs), targets).backward()
        before = [w.detach().clone() for w in weights]
        optimizer.step()
        norms.append([float((w.detach() - b).norm()) for w, b in zip(weights, before)])
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model(inputs), targets)), norms


@pytest.mark.parametrize("overrides", [{}, {"eigenbasis_method": "qr"}, {"betas": (0.0, 0.999)}],
                         ids=["defaults", "qr", "no_momentum"])
def test_a_refresh_never_collapses_the_step(overrides):
    """With the defaults, each weight's update right after a new basis goes into use (steps
    2, 7, 12, ...: bases every 5 steps from step 1, used one step later) keeps >= 0.3x the
    norm of the update before it. Before grafting became the default, the first basis cut
    it ~17x and every refresh ~3x (the rank-deficient factor's basis concentrates the
    whitened step on the few directions the gradients span)."""
    _, norms = _full_batch_regression(lambda params: Shampoo(
        params, lr=3e-3, preconditioner="eigenvalue_corrected", precondition_frequency=5,
        **overrides))
    for step in range(2, 60, 5):  # 1-based step whose basis is new
        for weight in range(2):
            ratio = norms[step - 1][weight] / norms[step - 2][weight]
            assert ratio >= 0.3, (step, weight, ratio)


def test_full_batch_regression_reaches_adamw_loss():
    """Bases refreshed every 5 steps from rank-deficient merged factors reach AdamW's loss
    (or better) in 60 steps at AdamW's learning rate."""
    lr = 3e-3
    adamw, _ = _full_batch_regression(lambda params: torch.optim.AdamW(params, lr=lr,
                                                                       weight_decay=0.0))
    ours, _ = _full_batch_regression(lambda params: Shampoo(
        params, lr=lr, preconditioner="eigenvalue_corrected", precondition_frequency=5))
    assert ours <= adamw, (ours, adamw)
