"""The gradient screen: which gradients would poison the state (NaN/Inf, or squares
that overflow it) and are skipped; the whole-gradient form that data parallelism uses,
and its parts (FSDP2 rows) whose norms combine over the ranks."""

from __future__ import annotations

import math

import pytest
import torch

from scalable_shampoo.gradient_screen import (largest_norm, norm_limit, part_verdict,
                                              screen_parts, screen_rows, screen_whole)


def test_the_limit_is_the_norm_whose_square_fits_the_smaller_dtype():
    assert largest_norm(torch.float32, torch.float32) == math.sqrt(torch.finfo(torch.float32).max)
    assert largest_norm(torch.float64, torch.float32) == largest_norm(torch.float32,
                                                                      torch.float32)
    assert norm_limit(torch.float64, torch.float64) == math.sqrt(torch.finfo(torch.float64).max)
    assert norm_limit(torch.bfloat16, torch.float64) == largest_norm(torch.float32,
                                                                     torch.float64)


@pytest.mark.parametrize("scale, dtype, verdict", [
    (1.0, torch.float32, "ok"),
    (1e18, torch.float32, "ok"),
    (1e19, torch.float32, "overflow"),  # 12 entries: norm 3.5e19
    (1e30, torch.float32, "overflow"),
    (1e30, torch.float64, "ok"),
    (1e200, torch.float64, "overflow"),
    (math.inf, torch.float32, "nonfinite"),
    (math.nan, torch.float64, "nonfinite"),
    (1e3, torch.float16, "ok"),
    (3e4, torch.float16, "ok"),  # norm 1e5: above float16's max, squares fit float32
])
def test_whole_gradients_are_judged_by_their_norm(scale, dtype, verdict):
    gen = torch.Generator().manual_seed(3)
    good = torch.randn(4, 3, generator=gen, dtype=dtype)
    probe = (torch.rand(4, 3, generator=gen) + 0.5).to(dtype) * scale
    limits = [norm_limit(dtype, torch.float32)] * 2
    if dtype == torch.float64:
        limits = [norm_limit(dtype, torch.float64)] * 2
    assert screen_whole([good, probe], limits) == ["ok", verdict]


def test_rows_are_judged_per_block():
    gen = torch.Generator().manual_seed(4)
    blocks = torch.randn(3, 4, 3, generator=gen)
    blocks[1] *= 1e30
    blocks[2, 0, 0] = math.nan
    (ok,) = screen_rows([blocks], [largest_norm(torch.float32, torch.float32)])
    assert ok.tolist() == [True, False, False]


def test_parts_give_their_norms_or_none_for_nan_and_inf():
    finite = torch.tensor([[3.0, 4.0]])
    huge = torch.full((2,), 3e38)  # finite entries whose norm overflows float32
    assert screen_parts([finite, huge, torch.tensor([1.0, math.nan]),
                         torch.tensor([math.inf])]) == [5.0, math.inf, None, None]


@pytest.mark.parametrize("largest, parts, verdict", [
    (1.0, 4, "ok"), (5.0, 4, "ok"),  # 4 parts of norm 5 at most: 10, the limit
    (5.1, 4, "unsure"), (10.0, 4, "unsure"), (10.5, 4, "overflow"), (7.0, 2, "ok"), (7.1, 2, "unsure"),
    (10.0, 1, "ok"), (math.inf, 3, "overflow")])
def test_a_largest_part_decides_unless_the_sum_of_squares_must(largest, parts, verdict):
    assert part_verdict(largest, 10.0, parts) == verdict
