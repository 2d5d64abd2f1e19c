"""Packed symmetric storage against explicit float64 matrices."""

from __future__ import annotations

import pytest
import torch

from scalable_shampoo import symmetric_packing
from scalable_shampoo.symmetric_packing import (pack_outer_products, pack_symmetric,
                                                packed_size, unpack_symmetric, unpacked_size)


def _symmetric(lead, d, dtype, gen):
    a = torch.randn(*lead, d, d, dtype=torch.float64, generator=gen)
    return (a + a.mT).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lead", [(), (3,), (2, 3)])
@pytest.mark.parametrize("d", [1, 2, 5, 17])
def test_round_trip_is_exact(d, lead, dtype):
    gen = torch.Generator().manual_seed(d)
    full = _symmetric(lead, d, dtype, gen)
    packed = pack_symmetric(full)
    assert packed.shape == (*lead, packed_size(d)) and packed.dtype == dtype
    assert torch.equal(unpack_symmetric(packed), full)
    assert unpacked_size(packed.shape[-1]) == d


def _documented_layout(s: torch.Tensor) -> list[float]:
    """The packed entries of one matrix, entry by entry from the module's description."""
    d = s.shape[0]
    a, b = d // 2, d - d // 2
    s11, s12, s22 = s[:a, :a], s[:a, a:], s[a:, a:]
    out = [s12[r, j].item() for r in range(a) for j in range(b)]
    if a == b:
        out += [(s11[r, j] if r <= j else s22[j, r - 1]).item()
                for r in range(a + 1) for j in range(a)]
    else:
        out += [(s22[j, r] if r >= j else s11[r, j - 1]).item()
                for r in range(b) for j in range(b)]
    return out


@pytest.mark.parametrize("d", [1, 2, 3, 4, 5, 8])
def test_layout_is_the_documented_one_and_reads_only_the_upper_triangle(d):
    gen = torch.Generator().manual_seed(10 + d)
    upper = torch.randn(d, d, dtype=torch.float64, generator=gen).triu()
    symmetric = upper + upper.triu(1).T
    lower_noise = upper + torch.randn(d, d, dtype=torch.float64, generator=gen).tril(-1)
    assert pack_symmetric(lower_noise).tolist() == _documented_layout(symmetric)
    assert torch.equal(unpack_symmetric(pack_symmetric(lower_noise)), symmetric)
    # each entry of the upper triangle exactly once (randn draws no exact zeros)
    assert sorted(_documented_layout(symmetric)) == sorted(upper[upper != 0].tolist())


def test_unpack_casts_to_the_requested_dtype():
    gen = torch.Generator().manual_seed(0)
    full = _symmetric((2,), 4, torch.float64, gen)
    out = unpack_symmetric(pack_symmetric(full), torch.float32)
    assert out.dtype == torch.float32 and torch.equal(out, full.float())


@pytest.mark.parametrize("entries", [2, 4, 7, -1])
def test_unpacked_size_rejects_non_triangular_counts(entries):
    with pytest.raises(ValueError, match="not a packed symmetric matrix"):
        unpacked_size(entries)


def test_pack_rejects_non_square():
    with pytest.raises(ValueError, match="square"):
        pack_symmetric(torch.ones(3, 4))


@pytest.mark.parametrize("chunk_bytes", [1, 10**9])  # a row at a time, all at once
@pytest.mark.parametrize("beta", [1.0, 0.9])
def test_pack_outer_products_matches_float64_ema(beta, chunk_bytes, monkeypatch):
    monkeypatch.setattr(symmetric_packing, "_CHUNK_BYTES", chunk_bytes)
    gen = torch.Generator().manual_seed(5)
    n, d, m = 5, 6, 4
    expected = _symmetric((n,), d, torch.float64, gen)
    packed = pack_symmetric(expected)
    for _ in range(3):
        u = torch.randn(n, d, m, dtype=torch.float64, generator=gen)
        pack_outer_products(u, packed, beta)
        outer = u @ u.mT
        expected = expected + outer if beta == 1.0 else beta * expected + (1 - beta) * outer
    torch.testing.assert_close(unpack_symmetric(packed), expected, rtol=1e-13, atol=1e-13)
