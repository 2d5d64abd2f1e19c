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


def test_layout_is_the_upper_triangle_row_by_row_and_ignores_the_lower():
    full = torch.tensor([[1.0, 2.0, 3.0], [-9.0, 4.0, 5.0], [-9.0, -9.0, 6.0]])
    assert pack_symmetric(full).tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert torch.equal(unpack_symmetric(pack_symmetric(full)), torch.triu(full) + torch.triu(full, 1).T)


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
