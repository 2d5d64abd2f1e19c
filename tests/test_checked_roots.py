"""Tests of the float32 roots checked in float64 (matrix_functions.inverse_root_mixed,
root_residual) and of roots formed in a narrower output dtype.

Reference: matrices ``A = Q diag(ev) Q^T`` with a known spectrum (tests.test_matrix_functions'
builders), reference root ``Q diag((ev + r)^(-e)) Q^T`` in float64.
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from scalable_shampoo import Shampoo
from scalable_shampoo.matrix_functions import (inverse_root_eigh, inverse_root_mixed,
                                               root_residual)
from tests.test_matrix_functions import make_psd, reference_root, rel_err, seed_of

F64 = torch.float64
TOLERANCE = 1e-4


def batch(n: int, conds: list[float], seed: int):
    """``(A (k, n, n), references (k, n, n))`` for relative epsilon 1e-6 and e = 1/4."""
    mats, refs = [], []
    for i, cond in enumerate(conds):
        a, q, ev = make_psd(n, cond, seed_of(seed, n, i))
        mats.append(a)
        refs.append(reference_root(q, ev, Fraction(1, 4), float(ev.max()) * 1e-6))
    return torch.stack(mats), torch.stack(refs)


@pytest.mark.parametrize("n", [16, 96])
def test_well_conditioned_roots_stay_float32_within_the_tolerance(n):
    a, ref = batch(n, [1.0, 10.0, 100.0], seed=1)
    result = inverse_root_mixed(a, 0.25, 1e-6, relative=True, tolerance=TOLERANCE)
    float32 = inverse_root_eigh(a.float(), 0.25, 1e-6, relative=True).root
    for i in range(a.shape[0]):
        error = rel_err(result.root[i], ref[i])
        # kept in float32 (equal to the plain float32 root), and accurate: the check
        # bounds the error (it is ~4x the relative error along the probes)
        assert torch.equal(result.root[i], float32[i])
        assert error <= float(result.residual[i]) <= TOLERANCE
        assert error > 1e-9  # really float32, not a float64 root


@pytest.mark.parametrize("cond", [1e5, 1e8])
def test_ill_conditioned_roots_are_recomputed_in_float64(cond):
    a, ref = batch(64, [1.0, cond, 3.0], seed=2)
    plain = inverse_root_eigh(a.float(), 0.25, 1e-6, relative=True).root
    result = inverse_root_mixed(a, 0.25, 1e-6, relative=True, tolerance=TOLERANCE)
    # float32 alone is off by far more than the tolerance on the ill-conditioned one ...
    assert rel_err(plain[1], ref[1]) > 10 * TOLERANCE
    # ... which is recomputed (float64 accuracy, rounded to the float32 output), while the
    # others keep their float32 roots
    assert rel_err(result.root[1], ref[1]) < 1e-6
    assert float(result.residual[1]) < 1e-12
    assert torch.equal(result.root[0], plain[0]) and torch.equal(result.root[2], plain[2])


def test_a_loose_tolerance_keeps_the_inaccurate_float32_root():
    """Negative control: the tolerance is what decides."""
    a, ref = batch(64, [1e8], seed=3)
    result = inverse_root_mixed(a, 0.25, 1e-6, relative=True, tolerance=1.0)
    assert rel_err(result.root[0], ref[0]) > 10 * TOLERANCE


@pytest.mark.parametrize("exponent", [Fraction(1, 2), Fraction(1, 4), Fraction(1, 6),
                                      Fraction(3, 8)], ids=str)
def test_root_residual_is_zero_at_the_root_and_sees_a_wrong_one(exponent):
    a, q, ev = make_psd(48, 1e3, seed_of("residual", str(exponent)))
    ridge = 1e-3
    ref = reference_root(q, ev, exponent, ridge)
    # rounding only (the powers of A + r I amplify it by up to cond^a, here 1e3^3 eps)
    assert float(root_residual(a, ref, float(exponent), ridge)) < 1e-7
    wrong = reference_root(q, ev, exponent * 1.001, ridge)
    assert float(root_residual(a, wrong, float(exponent), ridge)) > 1e-4


def test_exponent_the_check_cannot_apply_goes_to_float64():
    a, ref = batch(32, [1.0, 10.0], seed=4)
    exponent = 0.123456789
    result = inverse_root_mixed(a, exponent, 1e-6, relative=True, tolerance=TOLERANCE)
    wide = inverse_root_eigh(a, exponent, 1e-6, relative=True)
    torch.testing.assert_close(result.root.double(), wide.root, rtol=0, atol=1e-6)
    torch.testing.assert_close(result.residual, wide.residual, rtol=0, atol=0)


def test_root_formed_in_a_narrower_dtype_matches_the_float64_root():
    a, ref = batch(64, [1.0, 1e6], seed=5)
    narrow = inverse_root_eigh(a, 0.25, 1e-6, relative=True, out_dtype=torch.float32)
    wide = inverse_root_eigh(a, 0.25, 1e-6, relative=True)
    assert narrow.root.dtype == torch.float32
    torch.testing.assert_close(narrow.residual, wide.residual, rtol=0, atol=0)
    for i in range(a.shape[0]):
        assert rel_err(narrow.root[i], ref[i]) < 1e-6


def test_optimizer_with_checked_float32_roots_tracks_float64_roots():
    """On a run whose factors are well conditioned (full-rank, long batches) the checked
    float32 roots are kept and the run stays within the check's accuracy of float64's."""
    gen = torch.Generator().manual_seed(7)
    start = torch.randn(24, 16, generator=gen)
    grads = [torch.randn(24, 16, generator=gen) for _ in range(8)]
    params, residuals = {}, {}
    for dtype in (torch.float64, torch.float32):
        p = start.clone().requires_grad_()
        opt = Shampoo([p], lr=1e-2, block_size=24, precondition_frequency=5,
                      start_preconditioning_step=5,
                      root_dtype=dtype)
        for step in range(40):
            p.grad = grads[step % len(grads)].clone()
            opt.step()
        params[dtype] = p.detach()
        assert opt.metrics()["root_failures"] == 0
        residuals[dtype] = opt.metrics()["root_residual_max"]
    moved = torch.linalg.vector_norm(params[torch.float64] - start)
    gap = torch.linalg.vector_norm(params[torch.float64] - params[torch.float32])
    assert 0 < gap / moved < 1e-4
    # the float32 roots were kept (their check is the residual), float64's are exact
    assert 1e-9 < residuals[torch.float32] <= TOLERANCE and residuals[torch.float64] < 1e-12


def test_symmetric_input_skips_only_the_symmetrization():
    """With ``symmetric_input`` (unpacked factors: exactly symmetric) the roots, float32
    and float64 ones alike, equal those computed from the symmetric part."""
    a, _ = batch(48, [1.0, 1e8, 30.0], seed=9)
    a = a.triu() + a.triu(1).mT  # exactly symmetric
    plain = inverse_root_mixed(a, 0.25, 1e-6, relative=True, tolerance=TOLERANCE)
    trusted = inverse_root_mixed(a, 0.25, 1e-6, relative=True, tolerance=TOLERANCE,
                                 symmetric_input=True)
    assert torch.equal(plain.root, trusted.root)
    assert torch.equal(plain.residual, trusted.residual)


@pytest.fixture
def eigh_calls(monkeypatch) -> list[tuple[torch.dtype, int]]:
    """``(dtype, batch size)`` of each eigendecomposition the root functions run."""
    import scalable_shampoo.matrix_functions as mf
    calls: list[tuple[torch.dtype, int]] = []
    original = mf._eigh
    monkeypatch.setattr(mf, "_eigh",
                        lambda m: calls.append((m.dtype, m.shape[0])) or original(m))
    return calls


def test_surely_ill_conditioned_factors_skip_the_float32_eigh(eigh_calls):
    import scalable_shampoo.matrix_functions as mf
    gen = torch.Generator().manual_seed(8)
    thin = torch.randn(2, 48, 3, dtype=F64, generator=gen)  # rank 3 of 48
    a, ref = batch(48, [1.0, 1e10], seed=6)
    rank_deficient = thin @ thin.mT
    mats = torch.cat([a, rank_deficient])
    assert mf.surely_ill_conditioned(mats, 1e-6, True, TOLERANCE).tolist() == [
        False, True, True, True]
    result = inverse_root_mixed(mats, 0.25, 1e-6, relative=True, tolerance=TOLERANCE)
    # float32 eigh for the well-conditioned one only, float64 for the other three
    assert eigh_calls == [(torch.float32, 1), (F64, 3)]
    for i in range(2):
        assert rel_err(result.root[i], ref[i]) < TOLERANCE
    wide = inverse_root_eigh(mats[1:], 0.25, 1e-6, relative=True, out_dtype=torch.float32)
    assert torch.equal(result.root[1:], wide.root)


def test_root_dtype_default_follows_the_stored_roots_and_the_method():
    from scalable_shampoo.config import ShampooConfig
    from scalable_shampoo.preconditioner import checked_roots, root_dtype_of
    default = ShampooConfig()
    assert default.root_dtype is None
    assert root_dtype_of(default, torch.float32) == torch.float32
    assert checked_roots(default, torch.float32) and checked_roots(default, torch.bfloat16)
    assert root_dtype_of(default, torch.float64) == F64  # float64 parameters
    assert not checked_roots(default, torch.float64)
    newton = ShampooConfig(root_method="newton")
    assert root_dtype_of(newton, torch.float32) == F64 and not checked_roots(newton, torch.float32)
    plain = ShampooConfig(root_dtype=torch.float32, root_check_tolerance=float("inf"))
    assert root_dtype_of(plain, torch.float64) == torch.float32
    assert not checked_roots(plain, torch.float32)
    assert ShampooConfig(preconditioner="eigenvalue_corrected").root_dtype == F64


@pytest.mark.parametrize("cond", [10.0, 1e8], ids=["float32_kept", "float64_redone"])
@pytest.mark.parametrize("method", ["mixed", "eigh"])
def test_upper_only_roots_pack_to_the_symmetric_roots(method, cond):
    """``upper_only`` skips the symmetrization: the upper triangle (what packing keeps)
    is the symmetric root's to rounding and matches the float64 reference, the lower one
    is left as the product made it."""
    from scalable_shampoo.symmetric_packing import pack_symmetric
    a, ref = batch(80, [cond, 3.0], seed=11)

    def root(upper_only):
        if method == "mixed":
            return inverse_root_mixed(a, 0.25, 1e-6, relative=True, tolerance=TOLERANCE,
                                      symmetric_input=True, upper_only=upper_only)
        return inverse_root_eigh(a, 0.25, 1e-6, relative=True, upper_only=upper_only)

    full, upper = root(False), root(True)
    ulp = torch.finfo(full.root.dtype).eps
    scale = full.root.abs().amax()
    assert (pack_symmetric(upper.root) - pack_symmetric(full.root)).abs().amax() <= 4 * ulp * scale
    assert torch.equal(full.root, full.root.mT)
    assert not torch.equal(upper.root, upper.root.mT)  # the pass was really skipped

    def error(result, i):
        packed, expected = pack_symmetric(result.root[i]).to(F64), pack_symmetric(ref[i])
        return float((packed - expected).norm() / expected.norm())

    for i in range(2):  # as accurate as the symmetric root (float32 or float64 accuracy)
        assert error(upper, i) <= 1.5 * error(full, i) + 1e-13
        assert error(upper, i) <= (1e-5 if full.root.dtype == torch.float32 else 1e-9)


def cholesky_bound(a: torch.Tensor) -> torch.Tensor:
    """``(max L_ii / min L_ii)^2`` of the float64 Cholesky factor of ``A + 1e-6 ||A||_F I``."""
    ridge = 1e-6 * torch.linalg.matrix_norm(a)
    shifted = a + ridge[..., None, None] * torch.eye(a.shape[-1], dtype=a.dtype)
    diagonal = torch.diagonal(torch.linalg.cholesky(shifted), dim1=-2, dim2=-1)
    return (diagonal.amax(-1) / diagonal.amin(-1)).square()


def test_the_pre_check_sends_factors_above_the_measured_bound_to_float64(eigh_calls):
    """A factor whose Cholesky bound is above ``ILL_CONDITIONED_BOUND`` (here cond 2e3,
    bound ~63) gets no float32 eigh at the default tolerance, and the limit scales with
    the tolerance. This factor's float32 root would pass the check (residual ~4e-5): the
    limit gives up such cases for the many training factors with bounds like it whose
    float32 roots fail (see ``surely_ill_conditioned``)."""
    import scalable_shampoo.matrix_functions as mf
    a, ref = batch(64, [2e3, 3.0], seed=12)
    bound = cholesky_bound(a)
    assert mf.ILL_CONDITIONED_BOUND < float(bound[0]) < 20 * mf.ILL_CONDITIONED_BOUND
    assert float(bound[1]) < mf.ILL_CONDITIONED_BOUND
    assert mf.surely_ill_conditioned(a, 1e-6, True, TOLERANCE).tolist() == [True, False]
    assert mf.surely_ill_conditioned(a, 1e-6, True, 20 * TOLERANCE).tolist() == [False, False]
    result = inverse_root_mixed(a, 0.25, 1e-6, relative=True, tolerance=TOLERANCE)
    assert eigh_calls == [(torch.float32, 1), (F64, 1)]
    assert rel_err(result.root[0], ref[0]) < 1e-6 and rel_err(result.root[1], ref[1]) < TOLERANCE


def test_the_diagonal_settles_factors_before_any_cholesky(monkeypatch):
    """A factor whose diagonal alone bounds its condition number above the limit (the
    diagonal's spread is a lower bound) is flagged without a Cholesky factorization; the
    others, a well-conditioned and a rank-deficient one with even diagonals, are
    factorized, and only they."""
    import scalable_shampoo.matrix_functions as mf
    gen = torch.Generator().manual_seed(13)
    n = 40
    well, _ = batch(n, [3.0], seed=14)
    scales = torch.logspace(0, 2, n, dtype=F64)  # diagonal spread 1e4 > 50
    spread = (well[0] * scales[:, None] * scales[None, :]).unsqueeze(0)
    thin = torch.randn(n, 4, dtype=F64, generator=gen)
    even = thin @ thin.mT  # rank 4 of 40
    root_diagonal = torch.diagonal(even).sqrt()
    even = (even / root_diagonal[:, None] / root_diagonal[None, :]).unsqueeze(0)
    mats = torch.cat([well, spread, even])
    diagonal = torch.diagonal(mats, dim1=-2, dim2=-1)
    assert (diagonal.amax(-1) / diagonal.amin(-1)).tolist()[1] > 1e3
    factorized = []
    original = torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "cholesky_ex",
                        lambda m: factorized.append(m.shape[0]) or original(m))
    assert mf.surely_ill_conditioned(mats, 1e-6, True, TOLERANCE).tolist() == [False, True, True]
    assert factorized == [2]
