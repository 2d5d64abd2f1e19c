"""Optimizer specifications: parsing, validation, learning-rate grids, state bytes."""

from __future__ import annotations

import math
import re

import pytest
import torch

from scalable_shampoo import Shampoo
from scalable_shampoo.bench.optimizers import (
    COMPARISON_DEFAULTS, LR_CENTERS, OptimizerSpecError, lr_grid, parse_spec, parse_value,
    spec_lr_center, state_bytes, validate)


@pytest.mark.parametrize("text, expected", [
    ("256", 256), ("1e-3", 1e-3), ("-0.5", -0.5), ("true", True), ("False", False),
    ("none", None), ("None", None), ("(0.9,0.95)", (0.9, 0.95)), ("'x,y'", "x,y"),
    ("float64", torch.float64), ("torch.float32", torch.float32),
    ("torch.bfloat16", torch.bfloat16), ("adam", "adam"), ("eigenvalue_corrected",
                                                           "eigenvalue_corrected"),
])
def test_parse_value(text, expected):
    value = parse_value(text)
    assert value == expected and type(value) is type(expected)


def test_parse_spec_reads_kind_overrides_and_fixed_lr():
    spec = parse_spec("shampoo: grafting=sgd, block_size=256,betas=(0.9,0.99),lr=3e-3,"
                      "root_dtype=torch.float32")
    assert spec.label == "shampoo:grafting=sgd,block_size=256,betas=(0.9,0.99),lr=3e-3," \
                         "root_dtype=torch.float32"
    assert spec.kind == "shampoo" and spec.fixed_lr == 3e-3
    assert spec.kwargs == {**COMPARISON_DEFAULTS["shampoo"], "grafting": "sgd",
                           "block_size": 256, "betas": (0.9, 0.99),
                           "root_dtype": torch.float32}
    assert parse_spec("adamw").kwargs == {} and parse_spec("adamw").fixed_lr is None


def test_soap_is_the_eigenvalue_corrected_variant_with_soaps_settings():
    spec = parse_spec("soap:precondition_frequency=5")
    optimizer = spec.build([torch.nn.Parameter(torch.randn(5, 4))], lr=3e-3)
    group = optimizer.param_groups[0]
    assert isinstance(optimizer, Shampoo)
    assert (group["preconditioner"], group["betas"], group["start_preconditioning_step"],
            group["precondition_frequency"]) == ("eigenvalue_corrected", (0.95, 0.95), 1, 5)


def test_overrides_reach_the_constructor():
    spec = parse_spec("shampoo:block_size=64,grafting=sgd,precondition_frequency=7")
    optimizer = spec.build([torch.nn.Parameter(torch.randn(5, 4))], lr=0.25)
    group = optimizer.param_groups[0]
    assert isinstance(optimizer, Shampoo)
    assert (group["lr"], group["block_size"], group["grafting"],
            group["precondition_frequency"]) == (0.25, 64, "sgd", 7)
    sgd = parse_spec("sgd:nesterov=true").build([torch.nn.Parameter(torch.randn(3))], lr=0.1)
    assert sgd.param_groups[0]["nesterov"] and sgd.param_groups[0]["momentum"] == 0.9


@pytest.mark.parametrize("text, message", [
    ("lion", r"unknown optimizer 'lion'.*known: shampoo, soap, adamw, adagrad, sgd"),
    ("shampoo:", r"nothing after ':'"),
    ("shampoo:block_size", r"malformed override 'block_size' \(expected key=value\)"),
    ("shampoo:=3", r"malformed override '=3'"),
    ("shampoo:block_size=", r"malformed override 'block_size='"),
    ("shampoo:block_size=2,block_size=4", r"'block_size' given twice"),
    ("adamw:betas=(0.9,0.99", r"unbalanced"),
    ("adamw:betas=0.9,0.99)", r"unbalanced"),
    ("adamw:lr=-1", r"lr must be a positive number"),
    ("adamw:lr=abc", r"lr must be a positive number"),
    ("shampoo:root_dtype=torch.float128", r"unknown dtype 'torch.float128'"),
])
def test_parse_spec_errors(text, message):
    with pytest.raises(OptimizerSpecError, match=message):
        parse_spec(text)


@pytest.mark.parametrize("text, message", [
    ("shampoo:blocksize=4", r"unknown argument\(s\) blocksize; shampoo accepts .*block_size"),
    ("adamw:momentum=0.9", r"unknown argument\(s\) momentum; adamw accepts .*betas"),
    ("shampoo:block_size=0", r"shampoo:block_size=0.*block_size must be an integer >= 1"),
    ("shampoo:grafting=lamb", r"grafting must be one of"),
    ("sgd:momentum=-1", r"sgd:momentum=-1.*momentum"),
])
def test_validate_reports_constructor_errors(text, message):
    with pytest.raises(OptimizerSpecError, match=message):
        validate(parse_spec(text))


def test_validate_accepts_any_constructor_argument():
    for text in ("shampoo:root_method=newton,epsilon=1e-8", "shampoo:foreach=false",
                 "adagrad:lr_decay=0.01", "adamw:amsgrad=true"):
        validate(parse_spec(text))


def test_slug_is_file_safe_and_distinct():
    plain, fancy = parse_spec("adamw"), parse_spec("adamw:betas=(0.9,0.95)")
    assert plain.slug == "adamw"
    assert re.fullmatch(r"[A-Za-z0-9_.=-]+", fancy.slug)
    assert fancy.slug != parse_spec("adamw:betas=(0.9,0.96)").slug


@pytest.mark.parametrize("center, points, expected", [
    (1e-3, 1, [1e-3]), (1e-3, 3, [3e-4, 1e-3, 3e-3]), (1e-3, 2, [1e-3, 3e-3]),
    (3e-2, 4, [1e-2, 3e-2, 1e-1, 3e-1]), (2e-3, 3, [1e-3, 3e-3, 1e-2]),
    (0.9, 5, [0.1, 0.3, 1.0, 3.0, 10.0]),
])
def test_lr_grid(center, points, expected):
    grid = lr_grid(center, points)
    assert grid == pytest.approx(expected, rel=1e-12)
    ratios = [b / a for a, b in zip(grid, grid[1:])]
    assert all(3.0 - 1e-9 <= r <= 10 / 3 + 1e-9 for r in ratios)


@pytest.mark.parametrize("center, points", [(1e-3, 0), (0.0, 3), (math.nan, 3)])
def test_lr_grid_errors(center, points):
    with pytest.raises(ValueError):
        lr_grid(center, points)


def test_state_bytes_counts_state_tensors():
    params = [torch.nn.Parameter(torch.randn(7, 5)), torch.nn.Parameter(torch.randn(5))]
    adamw = torch.optim.AdamW(params, lr=1e-3)
    assert state_bytes(adamw) == 0
    sum(p.sum() for p in params).backward()
    adamw.step()
    # exp_avg and exp_avg_sq (float32) and the step count (a float32 scalar) per parameter.
    assert state_bytes(adamw) == sum(2 * 4 * p.numel() + 4 for p in params)
    shampoo = Shampoo(params, lr=1e-3)
    shampoo.step()
    assert state_bytes(shampoo) == shampoo.metrics()["state_bytes"] > 0


def test_state_bytes_finds_nested_state_once_and_not_the_parameters():
    """Peers keep state in nested dicts, lists and objects; views share a storage."""
    weight = torch.nn.Parameter(torch.randn(6, 4))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    buffer = torch.randn(5, 3, dtype=torch.float64)
    holder = type("Holder", (), {})()
    holder.factors, holder.param, holder.scale = [torch.randn(4, 4), buffer[1:]], weight, 2.0
    optimizer.state[weight] = {0: {"exp_avg": torch.randn(6, 4), "step": torch.tensor(3.0),
                                   "pair": (buffer, {"empty": torch.empty(0)})},
                               "object": holder, "set": {"tag"}}
    expected = 6 * 4 * 4 + 4 + 5 * 3 * 8 + 4 * 4 * 4  # the view of buffer counts once
    assert state_bytes(optimizer) == expected


@pytest.mark.parametrize("text, centers, expected", [
    ("soap", {"adamw": 3e-3}, LR_CENTERS["soap"]),
    ("soap:grafting_momentum=true", {"adamw": 1e-2}, 1e-2),
    ("soap:grafting_momentum=true,nesterov=true", {}, LR_CENTERS["adamw"]),
    ("soap:grafting='none'", {"adamw": 3e-3}, LR_CENTERS["rotated_adam"]),
    ("soap:grafting='adam',grafting_momentum=false", {"soap": 3e-4}, 3e-4),
    ("shampoo:grafting_momentum=true", {"shampoo": 1e-2}, 1e-2),
    ("pto-soap", {"rotated_adam": 1e-2}, 1e-2),
])
def test_lr_center_follows_the_scale_of_the_step(text, centers, expected):
    """SOAP grafted to Adam's actual step sweeps around AdamW's centre, SOAP without
    grafting around the rotated Adam's, the default around its own."""
    assert spec_lr_center(parse_spec(text), centers) == expected
