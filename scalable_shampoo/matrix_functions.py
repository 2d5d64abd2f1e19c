"""Inverse p-th roots of symmetric positive semi-definite matrices.

All functions take a batch ``(..., n, n)`` and return ``(A + epsilon I)^(-exponent)``
for every matrix of the batch, together with a per-matrix residual that says how far
the computation can be trusted. They compute in the dtype of their input: callers
cast to the root dtype (float64 by default) first.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import torch

# Newton handles exponent a/b by an iteration for the b-th root followed by the a-th
# power; larger denominators converge too slowly to be worth it (use eigh).
MAX_NEWTON_DENOMINATOR = 32
# The float32 roots' check: its default tolerance, and the lower bound on a factor's
# condition number above which a float32 eigh is not tried at that tolerance
# (:func:`surely_ill_conditioned`).
DEFAULT_CHECK_TOLERANCE = 1e-4
ILL_CONDITIONED_BOUND = 50.0


@dataclass(frozen=True)
class RootResult:
    """Result of an inverse root.

    Attributes:
        root: ``(..., n, n)`` the inverse root, symmetric.
        residual: ``(...)`` per-matrix error estimate. eigh: error of the
            eigendecomposition's reconstruction ``V diag(w) V^T`` applied to a fixed unit
            probe vector, relative to ``||A||_F``. newton: ``max|X^p A - I|`` for the
            ``p``-th root ``X`` (0 at the exact root). NaN where the computation failed.
        iterations: Newton iterations run (0 for eigh).
    """

    root: torch.Tensor
    residual: torch.Tensor
    iterations: int


def _symmetric(matrix: torch.Tensor) -> torch.Tensor:
    return (matrix + matrix.mT) / 2


def _eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched eigh that isolates failures: a matrix whose decomposition does not
    converge gets NaN eigenvalues and vectors instead of failing the whole batch."""
    try:
        return torch.linalg.eigh(matrix)
    except torch.linalg.LinAlgError:
        if matrix.dim() == 2:
            n = matrix.shape[-1]
            nan = torch.full((n,), float("nan"), dtype=matrix.dtype, device=matrix.device)
            return nan, torch.full_like(matrix, float("nan"))
        flat = matrix.reshape(-1, *matrix.shape[-2:])
        pairs = [_eigh(m) for m in flat]
        values = torch.stack([p[0] for p in pairs]).reshape(matrix.shape[:-1])
        vectors = torch.stack([p[1] for p in pairs]).reshape(matrix.shape)
        return values, vectors


def symmetric_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of the symmetric part of each matrix of
    the batch; a matrix whose decomposition does not converge gets NaN values and vectors
    instead of failing the batch."""
    return _eigh(_symmetric(matrix))


def inverse_root_eigh(matrix: torch.Tensor, exponent: float, epsilon: float = 0.0,
                      relative: bool = False, out_dtype: torch.dtype | None = None,
                      upper_only: bool = False) -> RootResult:
    """``(A + epsilon I)^(-exponent)`` by symmetric eigendecomposition.

    Eigenvalues are clamped at 0 (rounding can make a PSD matrix's smallest ones
    slightly negative) before ``epsilon`` is added, so epsilon > 0 keeps rank-deficient
    and zero matrices safe. ``exponent`` is any positive real number. With a narrower
    ``out_dtype`` the root ``V diag(s) V^T`` is formed in it from the rounded factors
    (half the cost of a float64 product, an error of a few ulps of ``out_dtype``: the
    root is stored in it anyway). ``upper_only``: only the root's upper triangle is
    exact (the lower one differs by rounding), for callers that pack it: the
    symmetrization, a pass over the root, is skipped.
    """
    _check_root_args(matrix, exponent, epsilon)
    root, residual, _ = _eigh_root(_symmetric(matrix), exponent, epsilon, relative, out_dtype,
                                   upper_only)
    return RootResult(root, residual, 0)


def _eigh_root(sym: torch.Tensor, exponent: float, epsilon: float, relative: bool,
               out_dtype: torch.dtype | None, upper_only: bool = False,
               reconstruction: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | float]:
    """:func:`inverse_root_eigh` of a symmetric batch: ``(root, residual, ridge)``.
    ``upper_only``: only the root's upper triangle is read (the caller packs it), so the
    product is not symmetrized. ``reconstruction=False`` skips the reconstruction
    residual (None), for callers that check the root itself."""
    values, vectors = _eigh(sym)
    values = values.clamp_min(0)
    ridge = ridge_of(values.amax(dim=-1), epsilon) if relative else epsilon
    scaled = (values + (ridge.unsqueeze(-1) if relative else ridge)).pow(-exponent)
    if out_dtype is not None and torch.finfo(out_dtype).eps > torch.finfo(sym.dtype).eps:
        low = vectors.to(out_dtype)
        root = (low * scaled.to(out_dtype).unsqueeze(-2)) @ low.mT
    else:
        root = (vectors * scaled.unsqueeze(-2)) @ vectors.mT
    root = root if upper_only else _symmetric(root)
    if not reconstruction:
        return root, None, ridge
    # Reconstruction error on a fixed probe vector: O(n^2), where the full
    # V diag(values) V^T - A would cost another n^3 product per matrix.
    n = sym.shape[-1]
    probe = torch.cos(torch.arange(n, dtype=sym.dtype, device=sym.device) * 1.2345)
    probe = (probe / torch.linalg.vector_norm(probe)).unsqueeze(-1)
    reconstructed = vectors @ (values.unsqueeze(-1) * (vectors.mT @ probe))
    norm = torch.linalg.matrix_norm(sym).clamp_min(torch.finfo(sym.dtype).tiny)
    residual = torch.linalg.vector_norm((sym @ probe - reconstructed).squeeze(-1), dim=-1) / norm
    return root, residual, ridge


def _probe(n: int, count: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(n, count)`` fixed unit probe vectors (deterministic, so that a check decides the
    same way on every run and rank)."""
    index = torch.arange(n, dtype=dtype, device=device).unsqueeze(-1)
    freq = torch.arange(1, count + 1, dtype=dtype, device=device) * 1.2345
    probe = torch.cos(index * freq + 0.5 * freq)
    return probe / torch.linalg.vector_norm(probe, dim=0, keepdim=True)


def check_fraction(exponent: float) -> Fraction | None:
    """``exponent`` as ``a / b`` with ``a <= 4`` and ``b <= MAX_NEWTON_DENOMINATOR`` (the
    powers :func:`root_residual` applies), or None."""
    fraction = Fraction(exponent).limit_denominator(MAX_NEWTON_DENOMINATOR)
    if abs(float(fraction) - exponent) > 1e-12 * exponent or fraction.numerator > 4:
        return None
    return fraction


def root_residual(matrix: torch.Tensor, root: torch.Tensor, exponent: float,
                  ridge: torch.Tensor | float, probes: int = 2) -> torch.Tensor:
    """``max_z ||X^b (A + r I)^a z - z||`` over fixed unit probes ``z``, per matrix, for
    ``X ~ (A + r I)^(-a/b)`` (``exponent = a / b``, see :func:`check_fraction`), computed
    in ``matrix``'s dtype by matrix-vector products only (``O((a + b) n^2)``). It is 0
    at the exact root and about ``b`` times the root's relative error along ``z``: a
    root that is accurate for the large eigenvalues but not for the small ones (the
    case of float32 roots of ill-conditioned factors) shows here, where the
    reconstruction residual of the eigendecomposition does not."""
    fraction = check_fraction(exponent)
    if fraction is None:
        raise ValueError(f"exponent {exponent!r} is not a/b with a <= 4 and b <= "
                         f"{MAX_NEWTON_DENOMINATOR}")
    dtype = matrix.dtype
    z = _probe(matrix.shape[-1], probes, dtype, matrix.device).expand(*matrix.shape[:-1], probes)
    r = ridge if isinstance(ridge, float) else ridge.to(dtype)[..., None, None]
    x = root.to(dtype)
    y = z
    for _ in range(fraction.numerator):
        y = matrix @ y + r * y
    for _ in range(fraction.denominator):
        y = x @ y
    error = torch.linalg.vector_norm(y - z, dim=-2).amax(dim=-1)
    return torch.where(torch.isfinite(error), error, torch.full_like(error, float("nan")))


def _rows(batch: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``batch[rows]``, without a copy when ``rows`` are all of them (in order, as
    ``nonzero`` gives them)."""
    return batch if rows.numel() == batch.shape[0] else batch.index_select(0, rows)


def inverse_root_mixed(matrix: torch.Tensor, exponent: float, epsilon: float = 0.0,
                       relative: bool = False, tolerance: float = DEFAULT_CHECK_TOLERANCE,
                       out_dtype: torch.dtype | None = None,
                       symmetric_input: bool = False, upper_only: bool = False) -> RootResult:
    """``(A + epsilon I)^(-exponent)`` by a float32 eigendecomposition, checked in
    float64 by :func:`root_residual`; the matrices whose check exceeds ``tolerance`` (or
    fails) are recomputed by a float64 eigendecomposition. float32 ``eigh`` costs about
    half of float64's; its root is accurate to ~1e-6 for a well-conditioned factor but
    off by percents along the small eigenvalues of an ill-conditioned one (an absolute
    eigenvalue error of ~1e-7 ``lambda_max`` against a ridge of ``epsilon lambda_max``),
    which the check catches. ``residual`` is the check for the float32 roots kept and the
    float64 reconstruction residual for the recomputed ones. The root is returned in
    ``out_dtype`` (default float32). ``symmetric_input``: the matrices are exactly
    symmetric (unpacked factors are), so their symmetric part is not formed (a float64
    pass that costs ~15% of a float32 ``eigh`` at n = 512). ``upper_only``: see
    :func:`inverse_root_eigh`."""
    _check_root_args(matrix, exponent, epsilon)
    out_dtype = out_dtype or torch.float32
    n = matrix.shape[-1]
    wide = matrix.to(torch.float64)
    wide = (wide if symmetric_input else _symmetric(wide)).reshape(-1, n, n)
    root = torch.empty(wide.shape, dtype=out_dtype, device=wide.device)
    residual = torch.full(wide.shape[:1], float("nan"), dtype=torch.float64, device=wide.device)
    # Host syncs below are on the root path only (its result is installed), not per step.
    ok = ~surely_ill_conditioned(wide, epsilon, relative, tolerance)
    if check_fraction(exponent) is not None and bool(ok.any()):
        tried = ok.nonzero().squeeze(-1)
        part = _rows(wide, tried)
        # No reconstruction residual: the check tests the root itself, so an
        # eigendecomposition that is off shows there too.
        low, _, ridge = _eigh_root(part.to(torch.float32), exponent, epsilon, relative, None,
                                   upper_only, reconstruction=False)
        check = root_residual(part, low, exponent, ridge if isinstance(ridge, float)
                              else ridge.to(torch.float64))
        root.index_copy_(0, tried, low.to(out_dtype))
        residual.index_copy_(0, tried, check)
        ok = torch.zeros_like(ok).index_copy_(0, tried, check <= tolerance)
    else:
        ok = torch.zeros_like(ok)
    if not bool(ok.all()):
        rows = (~ok).nonzero().squeeze(-1)
        part = _rows(wide, rows)
        again, again_residual, _ = _eigh_root(part, exponent, epsilon, relative, out_dtype,
                                              upper_only)
        root.index_copy_(0, rows, again.to(out_dtype))
        residual.index_copy_(0, rows, again_residual)
    return RootResult(root.reshape(matrix.shape), residual.reshape(matrix.shape[:-2]), 0)


def surely_ill_conditioned(matrix: torch.Tensor, epsilon: float, relative: bool,
                           tolerance: float) -> torch.Tensor:
    """``(N,)`` whether a float32 root of each (float64, symmetric PSD) matrix is
    unlikely to pass the check at ``tolerance``, so that its float32 ``eigh`` is not
    worth trying (it costs half a float64 one, wasted where the check fails). The
    condition number of ``A + r I`` is at least ``(max_i L_ii / min_i L_ii)^2`` for its
    Cholesky factor ``L`` (``r`` from ``||A||_F >= lambda_max``, which only lowers the
    bound), and at least ``max_i A_ii / min_i A_ii`` (plus the ridge), which is free and
    tried first. The limit on the bounds, ``ILL_CONDITIONED_BOUND`` at the default tolerance
    (proportional to it, as the check grows with the condition number), was measured on
    the factors of ``compare``'s lm, autoencoder and image workloads: the bound
    underestimates their condition number by up to ~100x, and float32 roots passed the
    check for 13 of the 24 factors with a bound up to 50, but for only 2 of the 43
    between 50 and 150 and 1 of the 813 above. The Cholesky factorization runs in
    float32 (``n^3 / 3`` flops, an eighth of a float32 ``eigh`` at n = 512); a
    factorization that fails, as float32's does from ``cond`` ~1e7, counts as ill
    conditioned."""
    if relative:
        # ||A||_F >= lambda_max: a larger ridge, a smaller (still valid) bound
        ridge = ridge_of(torch.linalg.matrix_norm(matrix), epsilon)[:, None]
    else:
        ridge = torch.full((matrix.shape[0], 1), epsilon, dtype=matrix.dtype,
                           device=matrix.device)
    limit = ILL_CONDITIONED_BOUND * tolerance / DEFAULT_CHECK_TOLERANCE
    # First the free bound of the diagonal (the Rayleigh quotients of unit vectors lie in
    # [lambda_min, lambda_max]): it settled 46-86% of the training factors measured, so
    # only the others pay for a Cholesky factorization.
    entries = torch.diagonal(matrix, dim1=-2, dim2=-1) + ridge
    ill = ~(entries.amax(dim=-1) / entries.amin(dim=-1).clamp_min(1e-300) <= limit)
    rest = (~ill).nonzero().squeeze(-1)
    if rest.numel() == 0:
        return ill
    shifted = _rows(matrix, rest).to(torch.float32, copy=True)
    shifted.diagonal(dim1=-2, dim2=-1).add_(_rows(ridge, rest).to(torch.float32))
    chol, info = torch.linalg.cholesky_ex(shifted)
    diagonal = torch.diagonal(chol, dim1=-2, dim2=-1).abs().to(torch.float64)
    bound = (diagonal.amax(dim=-1) / diagonal.amin(dim=-1).clamp_min(1e-300)).square()
    return ill.index_copy(0, rest, (info != 0) | ~(bound <= limit))


def ridge_of(largest: torch.Tensor, epsilon: float) -> torch.Tensor:
    """The relative regularization ``epsilon * lambda_max`` per matrix, given each
    matrix's largest eigenvalue (or an estimate); 1 where ``lambda_max`` is 0, so
    that a zero matrix's inverse root is the identity instead of infinite."""
    ridge = largest.clamp_min(0) * epsilon
    return torch.where(ridge > 0, ridge, torch.ones_like(ridge))


def newton_fraction(exponent: float) -> Fraction:
    """``exponent`` as the fraction ``a / p`` the Newton root iterates with; raises
    ``ValueError`` when no fraction with ``p <= MAX_NEWTON_DENOMINATOR`` matches it."""
    fraction = Fraction(exponent).limit_denominator(MAX_NEWTON_DENOMINATOR)
    if abs(float(fraction) - exponent) > 1e-12 * exponent:
        raise ValueError(
            f"exponent {exponent!r} is not a fraction a/b with b <= "
            f"{MAX_NEWTON_DENOMINATOR}; the Newton root needs one (use root_method='eigh')")
    return fraction


def inverse_root_newton(matrix: torch.Tensor, exponent: float, epsilon: float = 0.0,
                        max_iterations: int = 100, tolerance: float = 1e-6,
                        relative: bool = False) -> RootResult:
    """``(A + epsilon I)^(-exponent)`` by the coupled Newton iteration (matmul only).

    With ``exponent = a / p``: scale so that the spectrum of ``M_0 = z A`` lies in
    ``(0, 1]`` (``z`` from an upper bound of the largest eigenvalue, the smaller of the
    Frobenius and infinity norms), ``X_0 = z^(1/p) I``, then iterate
    ``T = ((p + 1) I - M) / p``, ``X <- X T``, ``M <- T^p M``. ``M -> I`` and
    ``X -> A^(-1/p)``; the result is ``X^a``.

    On a spectrum in ``(0, 1]`` every eigenvalue of ``M`` rises monotonically to 1, so
    ``max|M - I|`` (a diagonal entry of the negative semi-definite ``M - I``) decreases
    monotonically in exact arithmetic: each matrix of the batch stops once it is below
    ``tolerance`` or stops decreasing (rounding), keeping its best iterate; all stop
    after ``max_iterations``. (Scaling to ``(p + 1) / 2``, as some implementations do,
    lets the error rise in the first steps, which makes that stopping rule unsafe.)

    The returned residual is recomputed from the result, ``max|X^p A - I|``, so that a
    drift of the coupled pair (rounding in ``T^p`` for large ``p``) cannot hide.
    """
    _check_root_args(matrix, exponent, epsilon)
    fraction = newton_fraction(exponent)
    power, p = fraction.numerator, fraction.denominator
    n = matrix.shape[-1]
    identity = torch.eye(n, dtype=matrix.dtype, device=matrix.device)
    sym = _symmetric(matrix)
    ridge = (ridge_of(largest_eigenvalue(sym), epsilon)[..., None, None] if relative
             else epsilon)
    a = sym + ridge * identity
    bound = torch.minimum(torch.linalg.matrix_norm(a),
                          torch.linalg.matrix_norm(a, ord=float("inf")))
    bound = torch.where(bound > 0, bound, torch.ones_like(bound))
    z = (1 / bound)[..., None, None]
    m = a * z
    x = identity * z.pow(1.0 / p)

    def error_of(mat: torch.Tensor) -> torch.Tensor:
        return (mat - identity).abs().amax(dim=(-2, -1))

    error = error_of(m)
    best_x = x
    running = error > tolerance
    iterations = 0
    while iterations < max_iterations and bool(running.any()):
        t = ((p + 1) * identity - m) / p
        m = torch.linalg.matrix_power(t, p) @ m
        x = x @ t
        iterations += 1
        new_error = error_of(m)
        better = running & (new_error < error)
        best_x = torch.where(better[..., None, None], x, best_x)
        error = torch.where(better, new_error, error)
        running = better & (new_error > tolerance)
    residual = error_of(torch.linalg.matrix_power(best_x, p) @ a)
    residual = torch.where(torch.isfinite(residual), residual,
                           torch.full_like(residual, float("nan")))
    root = best_x if power == 1 else torch.linalg.matrix_power(best_x, power)
    return RootResult(_symmetric(root), residual, iterations)


def inverse_root(matrix: torch.Tensor, exponent: float, epsilon: float = 0.0,
                 method: str = "eigh", max_iterations: int = 100,
                 tolerance: float = 1e-6, relative: bool = False,
                 out_dtype: torch.dtype | None = None, upper_only: bool = False
                 ) -> RootResult:
    """``(A + epsilon I)^(-exponent)`` by ``method`` ("eigh" or "newton"); with
    ``relative``, ``(A + epsilon lambda_max(A) I)^(-exponent)``. ``out_dtype`` and
    ``upper_only``: see :func:`inverse_root_eigh` (Newton returns ``matrix``'s dtype and
    a symmetric root)."""
    if method == "eigh":
        return inverse_root_eigh(matrix, exponent, epsilon, relative, out_dtype, upper_only)
    if method == "newton":
        return inverse_root_newton(matrix, exponent, epsilon, max_iterations, tolerance,
                                   relative)
    raise ValueError(f"method must be 'eigh' or 'newton', got {method!r}")


def largest_eigenvalue(matrix: torch.Tensor, iterations: int = 30) -> torch.Tensor:
    """An estimate of each symmetric PSD matrix's largest eigenvalue by power iteration
    from a fixed start vector (the Rayleigh quotient: a lower bound, within a fraction
    of the gap to the next eigenvalue); matmul only, as the Newton root."""
    n = matrix.shape[-1]
    vector = torch.cos(torch.arange(n, dtype=matrix.dtype, device=matrix.device) * 1.2345) + 1.5
    vector = (vector / torch.linalg.vector_norm(vector)).expand(*matrix.shape[:-1]).unsqueeze(-1)
    tiny = torch.finfo(matrix.dtype).tiny
    for _ in range(iterations):
        vector = matrix @ vector
        vector = vector / torch.linalg.vector_norm(vector, dim=-2, keepdim=True).clamp_min(tiny)
    return (vector.mT @ (matrix @ vector)).squeeze(-1).squeeze(-1)


def _check_root_args(matrix: torch.Tensor, exponent: float, epsilon: float) -> None:
    if matrix.dim() < 2 or matrix.shape[-1] != matrix.shape[-2]:
        raise ValueError(f"matrix must have shape (..., n, n), got {tuple(matrix.shape)}")
    if not matrix.is_floating_point():
        raise TypeError(f"matrix must be a floating-point tensor, got {matrix.dtype}")
    if not exponent > 0:
        raise ValueError(f"exponent must be > 0, got {exponent!r}")
    if not epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon!r}")
