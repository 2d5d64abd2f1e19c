"""Tests of scalable_shampoo.matrix_functions (SPEC 2.3: inverse p-th roots).

Reference: every test matrix is built as ``A = Q diag(ev) Q^T`` from a random orthogonal
``Q`` (QR of a Gaussian) and a known spectrum ``ev``, in float64, and the reference root
is ``Q diag((max(ev, 0) + epsilon)^(-exponent)) Q^T``. No numerical eigendecomposition
is used to build a reference (the explicit 2x2 examples use the closed form).
"""

from __future__ import annotations

import math
import zlib
from fractions import Fraction

import pytest
import torch

from scalable_shampoo.matrix_functions import (MAX_NEWTON_DENOMINATOR, RootResult, inverse_root,
                                               inverse_root_eigh, inverse_root_newton,
                                               largest_eigenvalue, ridge_of)

F64 = torch.float64
EPS64 = torch.finfo(torch.float64).eps  # 2.2e-16
EPS32 = torch.finfo(torch.float32).eps  # 1.2e-7

# ---------------------------------------------------------------------------------------
# Error bounds (relative Frobenius error of the root against the reference)
# ---------------------------------------------------------------------------------------
# eigh: a backward-stable eigendecomposition perturbs every eigenvalue by about
# eps * ||A||, so the smallest one moves by a relative eps * cond, and its inverse root
# (which dominates the Frobenius norm of the root) by about exponent * eps * cond;
# at cond ~ 1 a sqrt(n)-size rounding term of the products remains.
# Bound: error <= EIGH_ERROR_FACTOR * cond * eps, cond that of A + epsilon I.
# Measured worst: 9 * cond * eps at cond 1 (n = 128; 12 at n = 512), below
# 0.2 * cond * eps for cond >= 1e2 (4e-7 at cond 1e10); float32: 6 * cond * eps32.
# 64 leaves >= 5x margin at cond 1, while a wrong exponent or a dropped epsilon gives
# errors of order 1e-3..1 (see the negative controls).
EIGH_ERROR_FACTOR = 64

# newton stops at max|M - I| < tolerance. Each eigenvalue of M is then 1 + d with |d|
# at most about n * tolerance, and the root's eigenvalues are off by (1 + d)^(a/p), so
# the error is a small multiple of the tolerance, plus eigh's rounding term.
# Bound: error <= NEWTON_ERROR_PER_TOLERANCE * tolerance + EIGH_ERROR_FACTOR * cond * eps,
# for cond <= 1e10 and denominators p <= 16 (p = 64 breaks it: see the end of the file).
# Measured worst (float64, tolerance 1e-6): 2.3 * tolerance over 3600 random converged
# cases with n <= 128, 3.3 * tolerance at n = 512 (cond 1e4, exponent 1/2).
NEWTON_ERROR_PER_TOLERANCE = 10
NEWTON_TOLERANCE = 1e-6
NEWTON_MAX_ITERATIONS = 200
# float32 Newton: rounding floors max|M - I| near n * eps32, so use a looser tolerance
# (same bound formula with eps32; measured worst 7e-4 against a bound of 1.8e-2 at cond 1e3).
NEWTON_TOLERANCE_FLOAT32 = 1e-3

# eigh residual (relative reconstruction error) of a backward-stable eigh: O(n eps);
# measured <= 3e-15 (n = 512) whatever the condition number.
EIGH_RESIDUAL_MAX = 1e-10

SIZES = [1, 2, 7, 32, 128]
CONDS = [1.0, 1e2, 1e4, 1e7, 1e10]
EXPONENTS = [Fraction(1, 2), Fraction(1, 3), Fraction(1, 4), Fraction(1, 6), Fraction(1, 8),
             Fraction(3, 8)]
METHODS = ["eigh", "newton"]


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def single_intra_op_thread():
    """The matrices here are small (<= 512): a second intra-op thread only adds
    synchronization, which on a busy 2-core machine turns milliseconds into seconds
    per test. Restored afterwards so that other modules are unaffected."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def seed_of(*parts) -> int:
    """A deterministic seed per test case (Python's hash() of str is salted per run)."""
    return zlib.crc32(repr(parts).encode())


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    return q * torch.sign(torch.diagonal(r))  # Haar-distributed


def spectrum(n: int, cond: float, gen: torch.Generator) -> torch.Tensor:
    """n eigenvalues log-spaced over [scale / cond, scale], shuffled; scale random in
    [0.5, 4] so that even cond = 1 (a multiple of I) distinguishes exponents."""
    scale = 0.5 + 3.5 * torch.rand((), generator=gen, dtype=F64)
    if n == 1:
        return scale.reshape(1)
    values = scale * torch.logspace(0.0, -math.log10(cond), n, dtype=F64)
    return values[torch.randperm(n, generator=gen)]


def psd_from(q: torch.Tensor, ev: torch.Tensor) -> torch.Tensor:
    a = (q * ev) @ q.mT
    return (a + a.mT) / 2


def make_psd(n: int, cond: float, seed: int):
    """(A, Q, ev), float64, with A = Q diag(ev) Q^T."""
    gen = generator(seed)
    q = random_orthogonal(n, gen)
    ev = spectrum(n, cond, gen)
    return psd_from(q, ev), q, ev


def reference_root(q: torch.Tensor, ev: torch.Tensor, exponent,
                   epsilon: float = 0.0) -> torch.Tensor:
    return (q * (ev.clamp_min(0.0) + epsilon).pow(-float(exponent))) @ q.mT


def effective_cond(ev: torch.Tensor, epsilon: float = 0.0) -> float:
    shifted = ev.clamp_min(0.0) + epsilon
    return float(shifted.max() / shifted.min())


def rel_err(root: torch.Tensor, reference: torch.Tensor) -> float:
    root, reference = root.to(F64), reference.to(F64)
    return float(torch.linalg.norm(root - reference) / torch.linalg.norm(reference))


def eigh_bound(cond: float, eps: float = EPS64) -> float:
    return EIGH_ERROR_FACTOR * cond * eps


def newton_bound(cond: float, tolerance: float = NEWTON_TOLERANCE, eps: float = EPS64) -> float:
    return NEWTON_ERROR_PER_TOLERANCE * tolerance + eigh_bound(cond, eps)


# The Newton residual is recomputed as max|X^p A - I| in float64, so besides the
# iteration's tolerance it carries the rounding of that product, ~cond * eps (measured
# up to ~4 cond * eps at cond 1e10).
NEWTON_RESIDUAL_ROUNDING = 64


def newton_residual_bound(cond: float, tolerance: float = NEWTON_TOLERANCE) -> float:
    return tolerance + NEWTON_RESIDUAL_ROUNDING * cond * EPS64


def bound_for(method: str, cond: float) -> float:
    return eigh_bound(cond) if method == "eigh" else newton_bound(cond)


def root_of(matrix, exponent, epsilon=0.0, method="eigh", tolerance=NEWTON_TOLERANCE,
            max_iterations=NEWTON_MAX_ITERATIONS) -> RootResult:
    return inverse_root(matrix, float(exponent), epsilon, method=method,
                        max_iterations=max_iterations, tolerance=tolerance)


def run_newton(matrix, exponent, epsilon=0.0, tolerance=NEWTON_TOLERANCE,
               max_iterations=NEWTON_MAX_ITERATIONS) -> RootResult:
    return inverse_root_newton(matrix, float(exponent), epsilon,
                               max_iterations=max_iterations, tolerance=tolerance)


def assert_symmetric(root: torch.Tensor) -> None:
    assert torch.equal(root, root.mT)


def frac_id(value) -> str:
    return str(Fraction(value).limit_denominator(1000))


def cond_id(cond: float) -> str:
    return f"cond{cond:.0e}"


# ---------------------------------------------------------------------------------------
# Accuracy against the float64 reference
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("exponent", EXPONENTS, ids=frac_id)
@pytest.mark.parametrize("cond", CONDS, ids=cond_id)
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"n{n}")
def test_eigh_matches_reference(n, cond, exponent):
    a, q, ev = make_psd(n, cond, seed_of("eigh", n, cond, exponent))
    result = inverse_root_eigh(a, float(exponent))

    assert result.root.shape == (n, n) and result.root.dtype == F64
    assert result.residual.shape == () and result.iterations == 0
    assert_symmetric(result.root)
    error = rel_err(result.root, reference_root(q, ev, exponent))
    assert error <= eigh_bound(effective_cond(ev)), error
    assert float(result.residual) < EIGH_RESIDUAL_MAX


@pytest.mark.parametrize("exponent", EXPONENTS, ids=frac_id)
@pytest.mark.parametrize("cond", CONDS, ids=cond_id)
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"n{n}")
def test_newton_matches_reference(n, cond, exponent):
    a, q, ev = make_psd(n, cond, seed_of("newton", n, cond, exponent))
    result = run_newton(a, exponent)

    assert result.root.shape == (n, n) and result.root.dtype == F64
    assert result.residual.shape == ()
    assert_symmetric(result.root)
    # 0 iterations only when the scaled start is already the root (n = 1, A = cI).
    assert 0 <= result.iterations <= NEWTON_MAX_ITERATIONS
    assert result.iterations > 0 or float(result.residual) < 1e-12
    assert float(result.residual) < newton_residual_bound(effective_cond(ev))
    error = rel_err(result.root, reference_root(q, ev, exponent))
    assert error <= newton_bound(effective_cond(ev)), error


LARGE_CASES = [
    ("eigh", 1e4, Fraction(1, 4)),
    ("eigh", 1e10, Fraction(1, 2)),
    ("newton", 1e4, Fraction(1, 2)),
    ("newton", 1e10, Fraction(1, 8)),
]


@pytest.mark.parametrize("method, cond, exponent", LARGE_CASES,
                         ids=[f"{m}-{cond_id(c)}-{frac_id(e)}" for m, c, e in LARGE_CASES])
def test_512_matches_reference(method, cond, exponent):
    a, q, ev = make_psd(512, cond, seed_of("large", method, cond, exponent))
    result = root_of(a, exponent, method=method)
    error = rel_err(result.root, reference_root(q, ev, exponent))
    assert error <= bound_for(method, effective_cond(ev)), error
    assert_symmetric(result.root)
    limit = (newton_residual_bound(effective_cond(ev)) if method == "newton"
             else EIGH_RESIDUAL_MAX)
    assert float(result.residual) < limit


@pytest.mark.parametrize("exponent", [Fraction(2, 3), Fraction(1), Fraction(3, 2),
                                      Fraction(1, 16), Fraction(3, 16), Fraction(1, 10)],
                         ids=frac_id)
@pytest.mark.parametrize("method", METHODS)
def test_other_exponents(method, exponent):
    """Numerators > 1 and other denominators (p = 1 is the Newton-Schulz inverse)."""
    a, q, ev = make_psd(16, 1e4, seed_of("other", method, exponent))
    result = root_of(a, exponent, method=method)
    error = rel_err(result.root, reference_root(q, ev, exponent))
    assert error <= bound_for(method, effective_cond(ev)), error


@pytest.mark.parametrize("exponent", [1 / math.pi, math.sqrt(2) / 4, 0.123456789])
def test_eigh_accepts_any_positive_exponent(exponent):
    a, q, ev = make_psd(9, 1e3, seed_of("irrational", exponent))
    result = inverse_root_eigh(a, exponent)
    error = rel_err(result.root, reference_root(q, ev, exponent))
    assert error <= eigh_bound(effective_cond(ev)), error


# ---------------------------------------------------------------------------------------
# Epsilon
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("epsilon", [1e-5, 1e-3, 1e-1])
@pytest.mark.parametrize("method", METHODS)
def test_epsilon_is_added_to_the_spectrum(method, epsilon):
    """(A + epsilon I)^(-e), with epsilon between A's smallest and largest eigenvalues."""
    exponent = Fraction(1, 4)
    a, q, ev = make_psd(24, 1e6, seed_of("epsilon", method, epsilon))
    result = root_of(a, exponent, epsilon, method=method)
    bound = bound_for(method, effective_cond(ev, epsilon))
    expected = reference_root(q, ev, exponent, epsilon)
    assert rel_err(result.root, expected) <= bound
    # negative control: a root that dropped epsilon would be far outside the bound
    assert rel_err(reference_root(q, ev, exponent, 0.0), expected) > 100 * bound


# ---------------------------------------------------------------------------------------
# Negative control: the bounds are tight enough to catch a wrong exponent
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("right, wrong", [
    (Fraction(1, 4), Fraction(1, 2)),
    (Fraction(1, 4), Fraction(1, 8)),
    (Fraction(1, 4), Fraction(1, 3)),
    (Fraction(3, 8), Fraction(1, 2)),
], ids=lambda f: frac_id(f))
@pytest.mark.parametrize("cond", [1.0, 1e4, 1e10], ids=cond_id)
@pytest.mark.parametrize("method", METHODS)
def test_bound_rejects_wrong_exponent(method, cond, right, wrong):
    a, q, ev = make_psd(32, cond, seed_of("negative", method, cond, right, wrong))
    result = root_of(a, right, method=method)
    bound = bound_for(method, effective_cond(ev))
    assert rel_err(result.root, reference_root(q, ev, right)) <= bound
    assert rel_err(result.root, reference_root(q, ev, wrong)) > 100 * bound


# ---------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [(3,), (2, 2)], ids=str)
@pytest.mark.parametrize("method", METHODS)
def test_batched_matches_per_matrix_reference(method, batch):
    n, exponent = 16, Fraction(1, 4)
    count = math.prod(batch)
    conds = [CONDS[i % len(CONDS)] for i in range(1, count + 1)]  # mixed conditioning
    cases = [make_psd(n, cond, seed_of("batch", method, batch, i))
             for i, cond in enumerate(conds)]
    stacked = torch.stack([a for a, _, _ in cases]).reshape(*batch, n, n)

    result = root_of(stacked, exponent, method=method)
    assert result.root.shape == (*batch, n, n)
    assert result.residual.shape == batch
    assert_symmetric(result.root)
    roots = result.root.reshape(count, n, n)
    residuals = result.residual.reshape(count)
    for i, (_, q, ev) in enumerate(cases):
        error = rel_err(roots[i], reference_root(q, ev, exponent))
        assert error <= bound_for(method, effective_cond(ev)), (i, error)
        limit = (EIGH_RESIDUAL_MAX if method == "eigh"
                 else newton_residual_bound(effective_cond(ev)))
        assert float(residuals[i]) < limit


# ---------------------------------------------------------------------------------------
# Rank-deficient and zero matrices
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [1, 5, 11])
@pytest.mark.parametrize("exponent", [Fraction(1, 2), Fraction(1, 4), Fraction(3, 8)],
                         ids=frac_id)
@pytest.mark.parametrize("method", METHODS)
def test_rank_deficient_with_epsilon(method, exponent, rank):
    n, epsilon = 12, 1e-3
    gen = generator(seed_of("rank", method, exponent, rank))
    q = random_orthogonal(n, gen)
    ev = torch.zeros(n, dtype=F64)
    ev[:rank] = (0.5 + 3.5 * torch.rand((), generator=gen, dtype=F64)) \
        * torch.logspace(0, -2, rank, dtype=F64)
    ev = ev[torch.randperm(n, generator=gen)]

    result = root_of(psd_from(q, ev), exponent, epsilon, method=method)
    assert torch.isfinite(result.root).all()
    error = rel_err(result.root, reference_root(q, ev, exponent, epsilon))
    assert error <= bound_for(method, effective_cond(ev, epsilon)), error


def test_eigh_clamps_negative_eigenvalues_before_epsilon():
    """A slightly negative eigenvalue (rounding) counts as 0: the root is
    (0 + eps)^(-e) in that direction, not (eps - 1e-6)^(-e)."""
    n, epsilon, exponent = 10, 1e-3, 0.5
    q = random_orthogonal(n, generator(7))
    ev = torch.linspace(1.0, 0.1, n, dtype=F64)
    ev[3] = -1e-6
    result = inverse_root_eigh(psd_from(q, ev), exponent, epsilon)
    bound = eigh_bound(effective_cond(ev, epsilon))
    assert rel_err(result.root, reference_root(q, ev, exponent, epsilon)) <= bound
    # without the clamp the result would differ by far more than the bound
    unclamped = (q * (ev + epsilon).pow(-exponent)) @ q.mT
    assert rel_err(result.root, unclamped) > 100 * bound


@pytest.mark.parametrize("n", [1, 6])
@pytest.mark.parametrize("exponent", [Fraction(1, 2), Fraction(1, 4), Fraction(3, 8)],
                         ids=frac_id)
@pytest.mark.parametrize("method", METHODS)
def test_zero_matrix_with_epsilon(method, exponent, n):
    """Zero matrix, epsilon 1e-3: exactly epsilon^(-exponent) * I, finite."""
    epsilon = 1e-3
    result = root_of(torch.zeros(n, n, dtype=F64), exponent, epsilon, method=method)
    expected = epsilon ** (-float(exponent)) * torch.eye(n, dtype=F64)
    assert torch.isfinite(result.root).all()
    assert rel_err(result.root, expected) <= bound_for(method, 1.0)
    if method == "newton":
        assert float(result.residual) < NEWTON_TOLERANCE
    else:
        assert float(result.residual) == 0.0


def test_zero_matrix_without_epsilon_is_detectable():
    """epsilon = 0 on the zero matrix has no finite root; each method must say so."""
    zero = torch.zeros(4, 4, dtype=F64)
    eigh = inverse_root_eigh(zero, 0.25, 0.0)
    assert not torch.isfinite(eigh.root).all()  # observed: NaN (inf * 0)
    newton = run_newton(zero, Fraction(1, 4), 0.0, max_iterations=20)
    assert float(newton.residual) >= 0.5  # observed: 1.0, M never leaves 0


# ---------------------------------------------------------------------------------------
# Relative epsilon: (A + epsilon * lambda_max(A) I)^(-e)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [3, 12])
@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e6])
@pytest.mark.parametrize("epsilon", [1e-6, 1e-3])
@pytest.mark.parametrize("method", METHODS)
def test_relative_epsilon_is_scaled_by_the_largest_eigenvalue(method, epsilon, scale, rank):
    """Full-rank and rank-deficient spectra at three scales: the ridge is epsilon times
    the largest eigenvalue, so the root of ``c A`` is ``c^(-e)`` times the root of A."""
    n, exponent = 12, Fraction(1, 4)
    gen = generator(seed_of("relative", method, epsilon, scale, rank))
    q = random_orthogonal(n, gen)
    ev = torch.zeros(n, dtype=F64)
    ev[:rank] = scale * torch.logspace(0, -4, rank, dtype=F64)
    ev = ev[torch.randperm(n, generator=gen)]
    ridge = epsilon * float(ev.max())
    result = inverse_root(psd_from(q, ev), float(exponent), epsilon, method=method,
                          relative=True)
    expected = reference_root(q, ev, exponent, ridge)
    error = rel_err(result.root, expected)
    assert error <= bound_for(method, effective_cond(ev, ridge)), error
    if scale != 1.0:  # negative control: at other scales the absolute epsilon is far off
        assert rel_err(reference_root(q, ev, exponent, epsilon), expected) > 1e-3


@pytest.mark.parametrize("method", METHODS)
def test_relative_epsilon_of_a_zero_matrix_is_the_identity(method):
    result = inverse_root(torch.zeros(2, 5, 5, dtype=F64), 0.25, 1e-6, method=method,
                          relative=True)
    torch.testing.assert_close(result.root, torch.eye(5, dtype=F64).expand(2, 5, 5),
                               rtol=0, atol=1e-12)
    assert torch.equal(ridge_of(torch.tensor([0.0, 2.0], dtype=F64), 1e-3),
                       torch.tensor([1.0, 2e-3], dtype=F64))


@pytest.mark.parametrize("n", [2, 24, 128])
def test_largest_eigenvalue_estimate_matches_the_spectrum(n):
    """Power iteration on spectra with a top gap of at least 1.5x; a lower bound."""
    gen = generator(seed_of("largest", n))
    q = random_orthogonal(n, gen)
    ev = 3.0 * torch.logspace(0, -3, n, dtype=F64)
    ev[1:] = ev[1:].clamp_max(ev[0] / 1.5)
    batch = torch.stack([psd_from(q, ev), psd_from(q, 7.0 * ev)])
    estimate = largest_eigenvalue(batch)
    torch.testing.assert_close(estimate, torch.tensor([3.0, 21.0], dtype=F64),
                               rtol=1e-9, atol=0)
    assert bool((estimate <= torch.tensor([3.0, 21.0], dtype=F64) * (1 + 1e-12)).all())


# ---------------------------------------------------------------------------------------
# Residual semantics
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1e-8, 1.0, 1e8])
@pytest.mark.parametrize("n", [7, 32, 128])
def test_eigh_residual_small_on_well_conditioned(n, scale):
    a, _, _ = make_psd(n, 1e2, seed_of("eigh residual", n, scale))
    result = inverse_root_eigh(a * scale, 0.25)
    assert 0.0 <= float(result.residual) < EIGH_RESIDUAL_MAX  # relative: scale-free


@pytest.mark.parametrize("exponent", [Fraction(1, 2), Fraction(1, 4), Fraction(1, 8)],
                         ids=frac_id)
@pytest.mark.parametrize("n", [7, 32])
def test_newton_residual_is_max_abs_of_m_minus_identity(n, exponent):
    """Converged: residual < tolerance, and the returned root X really makes
    max|X^p (A + eps I) - I| small (checked independently of the iteration's M)."""
    epsilon = 1e-4
    a, _, _ = make_psd(n, 1e2, seed_of("newton residual", n, exponent))
    result = run_newton(a, exponent, epsilon)
    assert result.iterations > 0
    assert 0.0 <= float(result.residual) < NEWTON_TOLERANCE
    m = torch.linalg.matrix_power(result.root, exponent.denominator) \
        @ (a + epsilon * torch.eye(n, dtype=F64))
    assert (m - torch.eye(n, dtype=F64)).abs().max() < \
        NEWTON_ERROR_PER_TOLERANCE * NEWTON_TOLERANCE


@pytest.mark.parametrize("case", ["2x2-first-step-rises", "n16-cond1e7", "n7-cond1e10"])
def test_newton_residual_describes_the_returned_root(case):
    """For every iteration budget, the residual equals max|X^p A - I| of the returned
    root X (computed independently), and never grows with the budget: the best
    iterate is kept. The 2x2 matrix's first step raises max|M - I| (0.71 -> 0.87)."""
    if case.startswith("2x2"):
        a, p = torch.tensor([[0.855, 0.35], [0.35, 0.155]], dtype=F64), 3
    else:
        n, cond = (16, 1e7) if case == "n16-cond1e7" else (7, 1e10)
        a, p = make_psd(n, cond, seed_of("best iterate", case))[0], 4
    identity = torch.eye(a.shape[-1], dtype=F64)
    previous = math.inf
    for budget in range(12):
        result = inverse_root_newton(a, 1 / p, 0.0, max_iterations=budget)
        residual = float(result.residual)
        assert result.iterations <= budget
        assert residual <= previous
        direct = float((torch.linalg.matrix_power(result.root, p) @ a - identity).abs().max())
        assert direct == pytest.approx(residual, rel=1e-4, abs=1e-9)
        previous = residual


@pytest.mark.parametrize("n", [7, 32])
@pytest.mark.parametrize("exponent", [Fraction(1, 2), Fraction(1, 4)], ids=frac_id)
def test_newton_residual_flags_unconverged_root(n, exponent):
    """With max_iterations = 2 on a cond-1e10 matrix the root is far off, and the
    residual says so (large), so a caller can reject it."""
    a, q, ev = make_psd(n, 1e10, seed_of("tight", n, exponent))
    result = run_newton(a, exponent, max_iterations=2)
    assert result.iterations == 2
    assert float(result.residual) > 0.1  # observed 0.6..0.97
    error = rel_err(result.root, reference_root(q, ev, exponent))
    assert error > newton_bound(effective_cond(ev))
    # with enough iterations the same matrix converges
    converged = run_newton(a, exponent)
    assert float(converged.residual) < newton_residual_bound(effective_cond(ev))
    assert converged.iterations > 2


# ---------------------------------------------------------------------------------------
# Symmetrization
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("noise", [1e-12, 1e-6, 1.0])
@pytest.mark.parametrize("method", METHODS)
def test_antisymmetric_part_is_ignored(method, noise):
    """The root of A + S, S antisymmetric, is the root of A (the symmetric part)."""
    n, exponent = 16, Fraction(1, 4)
    a, q, ev = make_psd(n, 1e2, seed_of("antisym", method, noise))
    b = torch.randn(n, n, generator=generator(seed_of("antisym noise", method, noise)),
                    dtype=F64)
    result = root_of(a + noise * (b - b.mT), exponent, method=method)
    assert_symmetric(result.root)
    error = rel_err(result.root, reference_root(q, ev, exponent))
    assert error <= bound_for(method, effective_cond(ev)), error


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("method", METHODS)
def test_asymmetric_noise_gives_symmetric_output(method, dtype):
    n = 20
    a, q, ev = make_psd(n, 1e3, seed_of("asym", method, str(dtype)))
    noise = torch.randn(n, n, generator=generator(seed_of("asym noise", method, str(dtype))),
                        dtype=F64)
    noisy = (a + 1e-9 * noise).to(dtype)
    batch = torch.stack([noisy, noisy.mT.contiguous()])
    result = root_of(batch, Fraction(1, 4), 1e-6, method=method, tolerance=1e-3)
    assert_symmetric(result.root)
    assert torch.isfinite(result.root).all()
    # both orientations have the same symmetric part, hence give the root of A; loosely
    # (tolerance 1e-3 and float32 here; accuracy is tested above)
    expected = reference_root(q, ev, Fraction(1, 4), 1e-6)
    for root in result.root:
        assert rel_err(root, expected) <= 1e-2


# ---------------------------------------------------------------------------------------
# float32
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("exponent", [Fraction(1, 2), Fraction(1, 4), Fraction(3, 8)],
                         ids=frac_id)
@pytest.mark.parametrize("cond", [1.0, 1e2, 1e3], ids=cond_id)
@pytest.mark.parametrize("n", [7, 32], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("method", METHODS)
def test_float32(method, n, cond, exponent):
    a, q, ev = make_psd(n, cond, seed_of("float32", method, n, cond, exponent))
    result = root_of(a.to(torch.float32), exponent, method=method,
                     tolerance=NEWTON_TOLERANCE_FLOAT32)
    assert result.root.dtype == torch.float32
    assert result.residual.dtype == torch.float32
    assert torch.isfinite(result.root).all()
    cond_eff = effective_cond(ev)
    if method == "eigh":
        bound = eigh_bound(cond_eff, EPS32)
    else:
        assert float(result.residual) < NEWTON_TOLERANCE_FLOAT32
        bound = newton_bound(cond_eff, NEWTON_TOLERANCE_FLOAT32, EPS32)
    error = rel_err(result.root, reference_root(q, ev, exponent))
    assert error <= bound, error


# ---------------------------------------------------------------------------------------
# Dispatcher
# ---------------------------------------------------------------------------------------


def test_dispatcher_defaults_to_eigh():
    a, _, _ = make_psd(8, 1e3, 1)
    direct = inverse_root_eigh(a, 0.25, 1e-6)
    dispatched = inverse_root(a, 0.25, 1e-6)
    assert torch.equal(direct.root, dispatched.root)
    assert torch.equal(direct.residual, dispatched.residual)
    assert dispatched.iterations == 0


@pytest.mark.parametrize("max_iterations, tolerance", [(3, 1e-6), (100, 1e-2), (200, 1e-9)])
def test_dispatcher_forwards_newton_options(max_iterations, tolerance):
    a, _, _ = make_psd(8, 1e6, 2)
    direct = inverse_root_newton(a, 0.25, 1e-8, max_iterations, tolerance)
    dispatched = inverse_root(a, 0.25, 1e-8, method="newton",
                              max_iterations=max_iterations, tolerance=tolerance)
    assert torch.equal(direct.root, dispatched.root)
    assert torch.equal(direct.residual, dispatched.residual)
    assert direct.iterations == dispatched.iterations
    assert 0 < dispatched.iterations <= max_iterations


# ---------------------------------------------------------------------------------------
# Argument errors
# ---------------------------------------------------------------------------------------

FUNCTIONS = {
    "eigh": inverse_root_eigh,
    "newton": inverse_root_newton,
    "dispatch-eigh": lambda *args: inverse_root(*args, method="eigh"),
    "dispatch-newton": lambda *args: inverse_root(*args, method="newton"),
}


def _good_matrix(n=3, dtype=F64):
    return 2.0 * torch.eye(n, dtype=dtype)


ERROR_CASES = [
    # (id, matrix, exponent, epsilon, exception, match)
    ("non-square", torch.ones(3, 4, dtype=F64), 0.25, 0.0, ValueError, "shape"),
    ("batched-non-square", torch.ones(2, 3, 4, dtype=F64), 0.25, 0.0, ValueError, "shape"),
    ("1-d", torch.ones(4, dtype=F64), 0.25, 0.0, ValueError, "shape"),
    ("0-d", torch.tensor(1.0, dtype=F64), 0.25, 0.0, ValueError, "shape"),
    ("int64", torch.eye(3, dtype=torch.int64), 0.25, 0.0, TypeError, "floating"),
    ("bool", torch.eye(3, dtype=torch.bool), 0.25, 0.0, TypeError, "floating"),
    ("exponent-0", _good_matrix(), 0.0, 0.0, ValueError, "exponent"),
    ("exponent-negative", _good_matrix(), -0.5, 0.0, ValueError, "exponent"),
    ("exponent-nan", _good_matrix(), float("nan"), 0.0, ValueError, "exponent"),
    ("epsilon-negative", _good_matrix(), 0.25, -1e-6, ValueError, "epsilon"),
    ("epsilon-nan", _good_matrix(), 0.25, float("nan"), ValueError, "epsilon"),
]


@pytest.mark.parametrize("function", FUNCTIONS.values(), ids=FUNCTIONS.keys())
@pytest.mark.parametrize("matrix, exponent, epsilon, error, match",
                         [case[1:] for case in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_invalid_arguments_raise(function, matrix, exponent, epsilon, error, match):
    with pytest.raises(error, match=match):
        function(matrix, exponent, epsilon)


@pytest.mark.parametrize("exponent", [1 / math.pi, 1 / (MAX_NEWTON_DENOMINATOR + 1),
                                      math.sqrt(2) / 4])
def test_newton_rejects_exponent_without_small_denominator(exponent):
    with pytest.raises(ValueError, match="eigh"):
        inverse_root_newton(_good_matrix(), exponent)
    with pytest.raises(ValueError, match="eigh"):
        inverse_root(_good_matrix(), exponent, method="newton")


@pytest.mark.parametrize("exponent", [1 / MAX_NEWTON_DENOMINATOR, 5 / MAX_NEWTON_DENOMINATOR,
                                      2.0])
def test_newton_accepts_small_denominators(exponent):
    result = inverse_root_newton(_good_matrix(), exponent)  # 2 I: exact root 2^(-e) I
    expected = 2.0 ** -exponent * torch.eye(3, dtype=F64)
    assert rel_err(result.root, expected) <= newton_bound(1.0)


@pytest.mark.parametrize("method", ["cholesky", "EIGH", "", None])
def test_unknown_method_raises(method):
    with pytest.raises(ValueError, match="method"):
        inverse_root(_good_matrix(), 0.25, method=method)


# ---------------------------------------------------------------------------------------
# NaN / Inf input: reported, not raised
# ---------------------------------------------------------------------------------------


def _poisoned(value):
    a, q, ev = make_psd(6, 1e2, 99)
    bad = a.clone()
    bad[1, 4] = value
    return a, q, ev, bad


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("method", METHODS)
def test_non_finite_input_is_reported_not_raised(method, value):
    """Observed: eigh gives a NaN residual and a NaN root; newton gives a NaN residual
    but a *finite* root (its initial guess, a multiple of I). A caller must therefore
    reject on `not residual <= threshold` (a `residual > threshold` test lets NaN
    through) or on a non-finite root; either way the failure is detectable."""
    _, _, _, bad = _poisoned(value)
    result = inverse_root(bad, 0.25, 1e-6, method=method)
    assert torch.isnan(result.residual)
    assert not bool(result.residual <= 0.1)
    if method == "eigh":
        assert not torch.isfinite(result.root).all()


@pytest.mark.parametrize("method", METHODS)
def test_non_finite_matrix_does_not_spoil_the_batch(method):
    a, q, ev, bad = _poisoned(float("nan"))
    result = root_of(torch.stack([a, bad, a]), Fraction(1, 4), method=method)
    assert result.residual.shape == (3,)
    assert torch.isnan(result.residual[1])
    for i in (0, 2):
        assert torch.isfinite(result.residual[i])
        error = rel_err(result.root[i], reference_root(q, ev, Fraction(1, 4)))
        assert error <= bound_for(method, effective_cond(ev)), error


# ---------------------------------------------------------------------------------------
# Regression tests for two former defects of the Newton iteration.
# ---------------------------------------------------------------------------------------


def _explicit(matrix):
    """A, Q, ev for an explicit symmetric 2x2 matrix [[a, b], [b, c]], b != 0, by the
    closed form: ev = (a + c)/2 -+ sqrt(((a - c)/2)^2 + b^2), eigenvector (b, ev - a)."""
    (a, b), (_, c) = matrix
    mid, radius = (a + c) / 2, math.hypot((a - c) / 2, b)
    ev = torch.tensor([mid - radius, mid + radius], dtype=F64)
    q = torch.stack([torch.stack([torch.tensor(b, dtype=F64), lam - a]) for lam in ev], dim=1)
    return torch.tensor(matrix, dtype=F64), q / torch.linalg.norm(q, dim=0), ev


# Well-conditioned 2x2 matrices (eigenvalues about 1 and 0.01) on which, with the
# spectrum scaled into (0, (p+1)/2], the first Newton step raised max|M - I| by more
# than 1.2x (0.71 -> 0.87) and the iteration stopped at its initial guess.
EARLY_STOP_EXAMPLES = [
    ([[0.855, 0.35], [0.35, 0.155]], Fraction(1, 3)),
    ([[0.76, 0.424], [0.424, 0.25]], Fraction(1, 2)),
]


@pytest.mark.parametrize("matrix, exponent", EARLY_STOP_EXAMPLES, ids=["1/3", "1/2"])
def test_newton_does_not_stop_after_a_transient_error_rise(matrix, exponent):
    a, q, ev = _explicit(matrix)
    result = run_newton(a, exponent)
    assert float(result.residual) < newton_residual_bound(effective_cond(ev))
    error = rel_err(result.root, reference_root(q, ev, exponent))
    assert error <= newton_bound(effective_cond(ev)), error


@pytest.mark.parametrize("denominator", [16, 32])
def test_newton_residual_is_honest_for_large_denominators(denominator):
    """With p = 64 the coupled pair used to drift (residual < tolerance, root 5% off);
    the residual is now recomputed as max|X^p A - I| and p is capped at 32."""
    a, q, ev = _explicit([[0.855, 0.35], [0.35, 0.155]])
    exponent = Fraction(1, denominator)
    result = run_newton(a, exponent)
    assert float(result.residual) < newton_residual_bound(effective_cond(ev))
    error = rel_err(result.root, reference_root(q, ev, exponent))
    assert error <= newton_bound(effective_cond(ev)), error


def test_newton_rejects_denominator_64():
    a, _, _ = _explicit([[0.855, 0.35], [0.35, 0.155]])
    with pytest.raises(ValueError, match="eigh"):
        run_newton(a, Fraction(1, 64))
