"""Support for tests of failed steps: a snapshot of everything an optimizer step may
change (parameters, the full state, the counters), and its comparison."""

from __future__ import annotations

import copy
from typing import Any

import torch


def optimizer_snapshot(opt: Any) -> dict[str, Any]:
    return {"params": [p.detach().clone() for g in opt.param_groups for p in g["params"]],
            "state": copy.deepcopy(opt.state_dict()), "metrics": opt.metrics()}


def _assert_equal(a: Any, b: Any, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape, where
        same = torch.equal(a, b) or (a.is_floating_point() and a.dtype == b.dtype
                                     and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True))
        assert same, f"{where} changed"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys changed"
        for key in a:
            _assert_equal(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: length changed"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} became {b!r}"


def assert_same_state(opt: Any, before: dict[str, Any]) -> None:
    """Parameters, state dict and metrics (timings aside) are as in ``before``."""
    after = optimizer_snapshot(opt)
    for snapshot in (before, after):
        snapshot["metrics"] = {k: v for k, v in snapshot["metrics"].items()
                               if not k.endswith("seconds")}
    _assert_equal(before, after, "optimizer")
