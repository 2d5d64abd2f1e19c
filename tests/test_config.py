"""Hyperparameter validation, defaults and schedule helpers (SPEC sections 2 and 3).

The error-input table follows ``torch.optim``'s own tests
(``torch/testing/_internal/common_optimizers.py``: ``ErrorOptimizerInput``): each row is
data, ``(kwargs, expected exception type, message regex)``, and is checked through
every door a hyperparameter can come in by: ``ShampooConfig`` directly, the ``Shampoo``
constructor, a param group given at construction, ``add_param_group`` and a
``param_groups`` entry edited after construction (as a buggy scheduler would).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scalable_shampoo import Shampoo, ShampooConfig

NAN, INF = math.nan, math.inf

# Regex pieces for the accepted ranges as the messages print them ("[0.0, inf]",
# "(0.0, 1.0]"): tolerant of "0" vs "0.0", strict about the brackets.
_ZERO, _ONE = r"0(\.0)?", r"1(\.0)?"
NON_NEGATIVE = rf"must be in \[{_ZERO}, inf\]"
POSITIVE = rf"must be in \({_ZERO}, inf\]"
UNIT_CLOSED_OPEN = rf"must be in \[{_ZERO}, {_ONE}\)"  # [0, 1)
UNIT_OPEN_CLOSED = rf"must be in \({_ZERO}, {_ONE}\]"  # (0, 1]
UNIT_OPEN = rf"must be in \({_ZERO}, {_ONE}\)"  # (0, 1)
FINITE = r"must be a finite real number"
INT_GE_1 = r"must be an integer >= 1"
BOOL = r"must be True or False"


def _row(kwargs, exc, regex, id_):
    return pytest.param(kwargs, exc, regex, id=id_)


# (kwargs, expected exception type, message regex). Every field of ShampooConfig has
# several rows; test_error_table_covers_every_hyperparameter keeps it that way.
ERROR_INPUTS = [
    # lr: [0, inf)
    _row(dict(lr=-1e-3), ValueError, r"lr " + NON_NEGATIVE, "lr-negative"),
    _row(dict(lr=-1), ValueError, r"lr " + NON_NEGATIVE, "lr-negative-int"),
    _row(dict(lr=NAN), ValueError, r"lr " + FINITE, "lr-nan"),
    _row(dict(lr=INF), ValueError, r"lr " + FINITE, "lr-inf"),
    _row(dict(lr=-INF), ValueError, r"lr " + FINITE, "lr-neg-inf"),
    _row(dict(lr="0.1"), ValueError, r"lr " + FINITE, "lr-str"),
    _row(dict(lr=True), ValueError, r"lr " + FINITE, "lr-bool"),
    _row(dict(lr=None), ValueError, r"lr " + FINITE, "lr-none"),
    # betas: a pair, beta1 in [0, 1), beta2 in (0, 1]
    _row(dict(betas=(0.9,)), ValueError, r"betas must be a pair", "betas-one"),
    _row(dict(betas=(0.9, 0.99, 0.999)), ValueError, r"betas must be a pair", "betas-three"),
    _row(dict(betas=0.9), ValueError, r"betas must be a pair", "betas-scalar"),
    _row(dict(betas="ab"), ValueError, r"betas must be a pair", "betas-str"),
    _row(dict(betas=None), ValueError, r"betas must be a pair", "betas-none"),
    _row(dict(betas=(1.0, 0.999)), ValueError, r"beta1\)? " + UNIT_CLOSED_OPEN, "beta1-one"),
    _row(dict(betas=(1.5, 0.999)), ValueError, r"beta1\)? " + UNIT_CLOSED_OPEN, "beta1-above"),
    _row(dict(betas=(-0.1, 0.999)), ValueError, r"beta1\)? " + UNIT_CLOSED_OPEN,
         "beta1-negative"),
    _row(dict(betas=(NAN, 0.999)), ValueError, r"beta1\)? " + FINITE, "beta1-nan"),
    _row(dict(betas=(0.9, 0.0)), ValueError, r"beta2\)? " + UNIT_OPEN_CLOSED, "beta2-zero"),
    _row(dict(betas=(0.9, 1.0001)), ValueError, r"beta2\)? " + UNIT_OPEN_CLOSED, "beta2-above"),
    _row(dict(betas=(0.9, -0.5)), ValueError, r"beta2\)? " + UNIT_OPEN_CLOSED,
         "beta2-negative"),
    _row(dict(betas=(0.9, INF)), ValueError, r"beta2\)? " + FINITE, "beta2-inf"),
    # epsilon: (0, inf)
    _row(dict(epsilon=0.0), ValueError, r"epsilon " + POSITIVE, "epsilon-zero"),
    _row(dict(epsilon=-1e-12), ValueError, r"epsilon " + POSITIVE, "epsilon-negative"),
    _row(dict(epsilon=NAN), ValueError, r"epsilon " + FINITE, "epsilon-nan"),
    _row(dict(epsilon=INF), ValueError, r"epsilon " + FINITE, "epsilon-inf"),
    # weight_decay: [0, inf)
    _row(dict(weight_decay=-1e-4), ValueError, r"weight_decay " + NON_NEGATIVE,
         "weight_decay-negative"),
    _row(dict(weight_decay=NAN), ValueError, r"weight_decay " + FINITE, "weight_decay-nan"),
    _row(dict(weight_decay=INF), ValueError, r"weight_decay " + FINITE, "weight_decay-inf"),
    # block_size: integer >= 1
    _row(dict(block_size=0), ValueError, r"block_size " + INT_GE_1, "block_size-zero"),
    _row(dict(block_size=-4), ValueError, r"block_size " + INT_GE_1, "block_size-negative"),
    _row(dict(block_size=1.5), ValueError, r"block_size " + INT_GE_1, "block_size-float"),
    _row(dict(block_size=128.0), ValueError, r"block_size " + INT_GE_1,
         "block_size-integral-float"),
    _row(dict(block_size=True), ValueError, r"block_size " + INT_GE_1, "block_size-bool"),
    _row(dict(block_size="64"), ValueError, r"block_size " + INT_GE_1, "block_size-str"),
    # max_preconditioned_dim: integer >= 1
    _row(dict(max_preconditioned_dim=0), ValueError, r"max_preconditioned_dim " + INT_GE_1,
         "max_preconditioned_dim-zero"),
    _row(dict(max_preconditioned_dim=-1), ValueError, r"max_preconditioned_dim " + INT_GE_1,
         "max_preconditioned_dim-negative"),
    _row(dict(max_preconditioned_dim=2.5), ValueError, r"max_preconditioned_dim " + INT_GE_1,
         "max_preconditioned_dim-float"),
    _row(dict(max_preconditioned_dim=True), ValueError, r"max_preconditioned_dim " + INT_GE_1,
         "max_preconditioned_dim-bool"),
    # precondition_frequency: integer >= 1
    _row(dict(precondition_frequency=0), ValueError, r"precondition_frequency " + INT_GE_1,
         "precondition_frequency-zero"),
    _row(dict(precondition_frequency=-10), ValueError, r"precondition_frequency " + INT_GE_1,
         "precondition_frequency-negative"),
    _row(dict(precondition_frequency=10.0), ValueError, r"precondition_frequency " + INT_GE_1,
         "precondition_frequency-float"),
    _row(dict(precondition_frequency=False), ValueError, r"precondition_frequency " + INT_GE_1,
         "precondition_frequency-bool"),
    # start_preconditioning_step: None or integer >= 1
    _row(dict(start_preconditioning_step=0), ValueError,
         r"start_preconditioning_step " + INT_GE_1, "start_preconditioning_step-zero"),
    _row(dict(start_preconditioning_step=-1), ValueError,
         r"start_preconditioning_step " + INT_GE_1, "start_preconditioning_step-negative"),
    _row(dict(start_preconditioning_step=2.0), ValueError,
         r"start_preconditioning_step " + INT_GE_1, "start_preconditioning_step-float"),
    _row(dict(start_preconditioning_step=True), ValueError,
         r"start_preconditioning_step " + INT_GE_1, "start_preconditioning_step-bool"),
    # statistics_frequency: integer >= 1
    _row(dict(statistics_frequency=0), ValueError, r"statistics_frequency " + INT_GE_1,
         "statistics_frequency-zero"),
    _row(dict(statistics_frequency=-3), ValueError, r"statistics_frequency " + INT_GE_1,
         "statistics_frequency-negative"),
    _row(dict(statistics_frequency=1.5), ValueError, r"statistics_frequency " + INT_GE_1,
         "statistics_frequency-float"),
    _row(dict(statistics_frequency=True), ValueError, r"statistics_frequency " + INT_GE_1,
         "statistics_frequency-bool"),
    # grafting: one of the five names
    _row(dict(grafting="adamw"), ValueError, r"grafting must be one of .*'adam'", "grafting-adamw"),
    _row(dict(grafting="Adam"), ValueError, r"grafting must be one of", "grafting-case"),
    _row(dict(grafting=""), ValueError, r"grafting must be one of", "grafting-empty"),
    _row(dict(grafting=1), ValueError, r"grafting must be one of", "grafting-int"),
    # grafting_beta2: (0, 1); 1 would freeze the rmsprop/adam accumulator at 0
    _row(dict(grafting_beta2=0.0), ValueError, r"grafting_beta2 " + UNIT_OPEN,
         "grafting_beta2-zero"),
    _row(dict(grafting_beta2=1.0), ValueError, r"grafting_beta2 " + UNIT_OPEN,
         "grafting_beta2-one"),
    _row(dict(grafting_beta2=1.5), ValueError, r"grafting_beta2 " + UNIT_OPEN,
         "grafting_beta2-above"),
    _row(dict(grafting_beta2=-0.9), ValueError, r"grafting_beta2 " + UNIT_OPEN,
         "grafting_beta2-negative"),
    _row(dict(grafting_beta2=NAN), ValueError, r"grafting_beta2 " + FINITE,
         "grafting_beta2-nan"),
    # grafting_epsilon: (0, inf)
    _row(dict(grafting_epsilon=0.0), ValueError, r"grafting_epsilon " + POSITIVE,
         "grafting_epsilon-zero"),
    _row(dict(grafting_epsilon=-1e-8), ValueError, r"grafting_epsilon " + POSITIVE,
         "grafting_epsilon-negative"),
    _row(dict(grafting_epsilon=INF), ValueError, r"grafting_epsilon " + FINITE,
         "grafting_epsilon-inf"),
    # root_method: "eigh" or "newton"
    _row(dict(root_method="cholesky"), ValueError, r"root_method must be one of .*'eigh'",
         "root_method-unknown"),
    _row(dict(root_method="EIGH"), ValueError, r"root_method must be one of",
         "root_method-case"),
    _row(dict(root_method=None), ValueError, r"root_method must be one of", "root_method-none"),
    # root_dtype / factor_dtype: torch.float32 or torch.float64
    _row(dict(root_dtype=torch.float16), ValueError, r"root_dtype must be one of .*float64",
         "root_dtype-float16"),
    _row(dict(root_dtype=torch.bfloat16), ValueError, r"root_dtype must be one of",
         "root_dtype-bfloat16"),
    _row(dict(root_dtype=int), ValueError, r"root_dtype must be one of", "root_dtype-int"),
    _row(dict(root_dtype=torch.int64), ValueError, r"root_dtype must be one of",
         "root_dtype-int64"),
    _row(dict(root_dtype="float64"), ValueError, r"root_dtype must be one of",
         "root_dtype-str"),
    _row(dict(root_dtype=torch.float16, preconditioner="eigenvalue_corrected"), ValueError,
         r"root_dtype must be one of", "root_dtype-float16-eigenvalue-corrected"),
    # root_check_tolerance: (0, inf]
    _row(dict(root_check_tolerance=0.0), ValueError, r"root_check_tolerance must be in \(0",
         "root_check_tolerance-zero"),
    _row(dict(root_check_tolerance=-1e-4), ValueError, r"root_check_tolerance must be in",
         "root_check_tolerance-negative"),
    _row(dict(root_check_tolerance=float("nan")), ValueError,
         r"root_check_tolerance must be a finite", "root_check_tolerance-nan"),
    _row(dict(root_check_tolerance="1e-4"), ValueError, r"root_check_tolerance must be a",
         "root_check_tolerance-str"),
    _row(dict(factor_dtype=torch.bfloat16), ValueError, r"factor_dtype must be one of .*float32",
         "factor_dtype-bfloat16"),
    _row(dict(factor_dtype=torch.float16), ValueError, r"factor_dtype must be one of",
         "factor_dtype-float16"),
    _row(dict(factor_dtype=float), ValueError, r"factor_dtype must be one of",
         "factor_dtype-python-float"),
    _row(dict(factor_dtype=torch.complex64), ValueError, r"factor_dtype must be one of",
         "factor_dtype-complex64"),
    # exponent_multiplier: (0, inf)
    _row(dict(exponent_multiplier=0.0), ValueError, r"exponent_multiplier " + POSITIVE,
         "exponent_multiplier-zero"),
    _row(dict(exponent_multiplier=-1.0), ValueError, r"exponent_multiplier " + POSITIVE,
         "exponent_multiplier-negative"),
    _row(dict(exponent_multiplier=NAN), ValueError, r"exponent_multiplier " + FINITE,
         "exponent_multiplier-nan"),
    # booleans: only True/False (1, "yes", None are not bools)
    _row(dict(nesterov=1), ValueError, r"nesterov " + BOOL, "nesterov-int"),
    _row(dict(nesterov="yes"), ValueError, r"nesterov " + BOOL, "nesterov-str"),
    _row(dict(nesterov=None), ValueError, r"nesterov " + BOOL, "nesterov-none"),
    _row(dict(bias_correction=0), ValueError, r"bias_correction " + BOOL,
         "bias_correction-int"),
    _row(dict(bias_correction="yes"), ValueError, r"bias_correction " + BOOL,
         "bias_correction-str"),
    _row(dict(bias_correction=np.bool_(True)), ValueError, r"bias_correction " + BOOL,
         "bias_correction-numpy-bool"),
    _row(dict(decoupled_weight_decay=1), ValueError, r"decoupled_weight_decay " + BOOL,
         "decoupled_weight_decay-int"),
    _row(dict(decoupled_weight_decay="no"), ValueError, r"decoupled_weight_decay " + BOOL,
         "decoupled_weight_decay-str"),
    # newton_max_iterations: integer >= 1
    _row(dict(newton_max_iterations=0), ValueError, r"newton_max_iterations " + INT_GE_1,
         "newton_max_iterations-zero"),
    _row(dict(newton_max_iterations=-5), ValueError, r"newton_max_iterations " + INT_GE_1,
         "newton_max_iterations-negative"),
    _row(dict(newton_max_iterations=10.5), ValueError, r"newton_max_iterations " + INT_GE_1,
         "newton_max_iterations-float"),
    # newton_tolerance: (0, inf)
    _row(dict(newton_tolerance=0.0), ValueError, r"newton_tolerance " + POSITIVE,
         "newton_tolerance-zero"),
    _row(dict(newton_tolerance=-1e-6), ValueError, r"newton_tolerance " + POSITIVE,
         "newton_tolerance-negative"),
    _row(dict(newton_tolerance=NAN), ValueError, r"newton_tolerance " + FINITE,
         "newton_tolerance-nan"),
    # root_failure_threshold: (0, inf)
    _row(dict(root_failure_threshold=0.0), ValueError, r"root_failure_threshold " + POSITIVE,
         "root_failure_threshold-zero"),
    _row(dict(root_failure_threshold=-0.1), ValueError, r"root_failure_threshold " + POSITIVE,
         "root_failure_threshold-negative"),
    _row(dict(root_failure_threshold=INF), ValueError, r"root_failure_threshold " + FINITE,
         "root_failure_threshold-inf"),
    # preconditioner: "shampoo" or "eigenvalue_corrected"
    _row(dict(preconditioner="kfac"), ValueError,
         r"preconditioner must be one of .*'shampoo', 'eigenvalue_corrected'",
         "preconditioner-unknown"),
    _row(dict(preconditioner="Shampoo"), ValueError, r"preconditioner must be one of",
         "preconditioner-case"),
    _row(dict(preconditioner=None), ValueError, r"preconditioner must be one of",
         "preconditioner-none"),
    # root_delay: None or an integer in [0, precondition_frequency]
    _row(dict(root_delay=-1), ValueError, r"root_delay must be an integer >= 0",
         "root_delay-negative"),
    _row(dict(root_delay=2.0), ValueError, r"root_delay must be an integer >= 0",
         "root_delay-float"),
    _row(dict(root_delay=11, precondition_frequency=10), ValueError,
         r"root_delay must be in \[0, precondition_frequency=10\], got 11",
         "root_delay-above-frequency"),
    _row(dict(preconditioner="soap", grafting=None), ValueError,
         r"preconditioner must be one of", "preconditioner-unknown-default-grafting"),
    # precondition_1d: None or a bool
    _row(dict(precondition_1d=1), ValueError, r"precondition_1d " + BOOL, "precondition_1d-int"),
    _row(dict(precondition_1d="no"), ValueError, r"precondition_1d " + BOOL,
         "precondition_1d-str"),
    # first_moment: None, "gradient" or "direction" (eigenvalue_corrected: "gradient")
    _row(dict(first_moment="momentum"), ValueError,
         r"first_moment must be one of \('gradient', 'direction'\), got 'momentum'",
         "first_moment-unknown"),
    _row(dict(first_moment="direction", preconditioner="eigenvalue_corrected"), ValueError,
         r"first_moment must be 'gradient' \(or None\) with "
         r"preconditioner='eigenvalue_corrected'", "first_moment-direction-with-ec"),
    # relative_epsilon: a bool
    _row(dict(relative_epsilon=1), ValueError, r"relative_epsilon " + BOOL,
         "relative_epsilon-int"),
    _row(dict(relative_epsilon=None), ValueError, r"relative_epsilon " + BOOL,
         "relative_epsilon-none"),
    # merge_dims, grafting_momentum: bools
    _row(dict(merge_dims=0), ValueError, r"merge_dims " + BOOL, "merge_dims-int"),
    _row(dict(merge_dims=None), ValueError, r"merge_dims " + BOOL, "merge_dims-none"),
    _row(dict(grafting_momentum="yes"), ValueError, r"grafting_momentum " + BOOL,
         "grafting_momentum-str"),
    _row(dict(grafting_momentum=None), ValueError, r"grafting_momentum " + BOOL,
         "grafting_momentum-none"),
    _row(dict(grafting_momentum=True), ValueError,
         r"grafting_momentum=True needs preconditioner='eigenvalue_corrected'.*"
         r"preconditioner='shampoo'", "grafting_momentum-classic"),
    _row(dict(grafting_momentum=True, preconditioner="eigenvalue_corrected", grafting="none"),
         ValueError, r"grafting_momentum=True needs .*grafting='none'",
         "grafting_momentum-no-grafting"),
    # eigenbasis_method: "eigh" or "qr"
    _row(dict(eigenbasis_method="newton"), ValueError,
         r"eigenbasis_method must be one of .*'eigh', 'qr'", "eigenbasis_method-unknown"),
    _row(dict(eigenbasis_method="QR"), ValueError, r"eigenbasis_method must be one of",
         "eigenbasis_method-case"),
    _row(dict(eigenbasis_method=None), ValueError, r"eigenbasis_method must be one of",
         "eigenbasis_method-none"),
    # basis_refresh_tolerance: [0, inf)
    _row(dict(basis_refresh_tolerance=-1e-3), ValueError,
         r"basis_refresh_tolerance " + NON_NEGATIVE, "basis_refresh_tolerance-negative"),
    _row(dict(basis_refresh_tolerance=NAN), ValueError, r"basis_refresh_tolerance " + FINITE,
         "basis_refresh_tolerance-nan"),
    _row(dict(basis_refresh_tolerance=INF), ValueError, r"basis_refresh_tolerance " + FINITE,
         "basis_refresh_tolerance-inf"),
    _row(dict(basis_refresh_tolerance=None), ValueError, r"basis_refresh_tolerance " + FINITE,
         "basis_refresh_tolerance-none"),
    # factor_beta: None or (0, 1]
    _row(dict(factor_beta=0.0), ValueError, r"factor_beta " + UNIT_OPEN_CLOSED,
         "factor_beta-zero"),
    _row(dict(factor_beta=1.5), ValueError, r"factor_beta " + UNIT_OPEN_CLOSED,
         "factor_beta-above"),
    _row(dict(factor_beta=-0.95), ValueError, r"factor_beta " + UNIT_OPEN_CLOSED,
         "factor_beta-negative"),
    _row(dict(factor_beta=NAN), ValueError, r"factor_beta " + FINITE, "factor_beta-nan"),
    _row(dict(factor_beta="0.95"), ValueError, r"factor_beta " + FINITE, "factor_beta-str"),
    # adam_epsilon: (0, inf)
    _row(dict(adam_epsilon=0.0), ValueError, r"adam_epsilon " + POSITIVE, "adam_epsilon-zero"),
    _row(dict(adam_epsilon=-1e-8), ValueError, r"adam_epsilon " + POSITIVE,
         "adam_epsilon-negative"),
    _row(dict(adam_epsilon=INF), ValueError, r"adam_epsilon " + FINITE, "adam_epsilon-inf"),
]

# A value that passes validation for each field, to restore a group after a failure.
DEFAULTS = ShampooConfig().as_dict()


def _params(n: int = 2) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    shapes = [(4, 3), (5,), (2, 3, 2)]
    return [torch.nn.Parameter(torch.randn(shapes[i % 3], generator=gen)) for i in range(n)]


def _fill_grads(params, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


def _snapshot(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def _assert_unchanged(params, before) -> None:
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)


# ----------------------------------------------------------------------------- table
def test_error_table_covers_every_hyperparameter():
    covered: dict[str, int] = {}
    for row in ERROR_INPUTS:
        for name in row.values[0]:
            covered[name] = covered.get(name, 0) + 1
    fields = set(ShampooConfig.field_names())
    assert set(covered) == fields, f"missing from the table: {sorted(fields - set(covered))}"
    few = {name: n for name, n in covered.items() if n < 2}
    assert not few, f"fewer than two invalid values for {few}"


@pytest.mark.parametrize("kwargs, exc, regex", ERROR_INPUTS)
def test_error_config(kwargs, exc, regex):
    with pytest.raises(exc, match=regex):
        ShampooConfig(**kwargs)


@pytest.mark.parametrize("kwargs, exc, regex", ERROR_INPUTS)
def test_error_constructor(kwargs, exc, regex):
    with pytest.raises(exc, match=regex):
        Shampoo(_params(), **kwargs)


@pytest.mark.parametrize("kwargs, exc, regex", ERROR_INPUTS)
def test_error_param_group_at_construction(kwargs, exc, regex):
    p1, p2 = _params()
    with pytest.raises(exc, match=regex):
        Shampoo([{"params": [p1]}, {"params": [p2], **kwargs}])


@pytest.mark.parametrize("kwargs, exc, regex", ERROR_INPUTS)
def test_error_add_param_group_leaves_groups_unchanged(kwargs, exc, regex):
    p1, p2 = _params()
    opt = Shampoo([p1], lr=0.1)
    _fill_grads([p1])
    opt.step()
    groups_before = copy.copy(opt.param_groups)
    group_before = dict(opt.param_groups[0])
    with pytest.raises(exc, match=regex):
        opt.add_param_group({"params": [p2], **kwargs})
    assert len(opt.param_groups) == 1
    assert opt.param_groups[0] is groups_before[0]
    assert opt.param_groups[0] == group_before
    # The rejected parameter is not half-registered: it can still be added (no "appears
    # in more than one parameter group"), and both groups then step.
    opt.add_param_group({"params": [p2], "lr": 0.1})
    _fill_grads([p1, p2], seed=2)
    before = _snapshot([p1, p2])
    opt.step()
    assert not torch.equal(p1.detach(), before[0])
    assert not torch.equal(p2.detach(), before[1])


@pytest.mark.parametrize("kwargs, exc, regex", ERROR_INPUTS)
def test_error_param_group_edited_after_construction(kwargs, exc, regex):
    """A bad value written into ``param_groups`` (as a buggy scheduler would) is caught
    at the next step, before any parameter moves; restoring it recovers."""
    params = _params()
    opt = Shampoo(params, lr=0.1)
    _fill_grads(params)
    opt.step()
    group = opt.param_groups[0]
    saved = {name: group[name] for name in kwargs}
    group.update(kwargs)
    _fill_grads(params, seed=2)
    before = _snapshot(params)
    with pytest.raises(exc, match=regex):
        opt.step()
    _assert_unchanged(params, before)
    group.update(saved)
    opt.step()
    assert not torch.equal(params[0].detach(), before[0])


def test_negative_lr_from_a_real_scheduler_raises_at_step():
    params = _params()
    opt = Shampoo(params, lr=0.1)
    # lr = 0.1 * (1 - epoch): 0.1, 0, then -0.1.
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 - epoch)
    for _ in range(2):
        _fill_grads(params)
        opt.step()
        scheduler.step()
    assert opt.param_groups[0]["lr"] < 0
    _fill_grads(params)
    with pytest.raises(ValueError, match=r"lr " + NON_NEGATIVE):
        opt.step()


def test_non_bool_foreach_is_rejected():
    with pytest.raises(ValueError, match=r"foreach must be True or False"):
        Shampoo(_params(), foreach=1)


def test_huge_int_real_hyperparameter_raises_value_error():
    with pytest.raises(ValueError, match=r"lr "):
        ShampooConfig(lr=10**400)


# ------------------------------------------------------------------- valid / defaults
VALID_EDGES = [
    dict(lr=0.0),
    dict(lr=0),  # an int is a real number
    dict(lr=np.float32(1e-3)),
    dict(betas=(0.0, 0.999)),  # beta1 = 0: no momentum
    dict(betas=(0.9, 1.0)),  # beta2 = 1: running sum
    dict(betas=(0.0, 1.0)),
    dict(betas=[0.5, 0.5]),  # a list is a pair too
    dict(betas=(0.999999, 1e-300)),
    dict(epsilon=1e-30),
    dict(epsilon=1),
    dict(weight_decay=0.0),
    dict(weight_decay=1e3),
    dict(block_size=1),
    dict(block_size=np.int64(8)),
    dict(max_preconditioned_dim=1),
    dict(precondition_frequency=1),
    dict(start_preconditioning_step=1),
    dict(start_preconditioning_step=None),
    dict(start_preconditioning_step=1, precondition_frequency=1),
    dict(statistics_frequency=1),
    dict(statistics_frequency=7),
    *[dict(grafting=g) for g in ("none", "sgd", "adagrad", "rmsprop", "adam")],
    dict(grafting_beta2=1e-300),
    dict(grafting_epsilon=1e-300),
    dict(root_method="newton"),
    dict(root_dtype=torch.float32),
    dict(factor_dtype=torch.float64),
    dict(exponent_multiplier=1e-6),
    dict(exponent_multiplier=2),
    dict(nesterov=True),
    dict(bias_correction=False),
    dict(decoupled_weight_decay=False, weight_decay=0.1),
    dict(newton_max_iterations=1),
    dict(newton_tolerance=1e-300),
    dict(root_failure_threshold=1e-300),
    dict(root_failure_threshold=1e300),
    dict(preconditioner="shampoo"),
    dict(root_delay=0),
    dict(root_delay=7, precondition_frequency=7),
    dict(preconditioner="eigenvalue_corrected"),
    dict(preconditioner="eigenvalue_corrected", grafting="adam", nesterov=True),
    dict(preconditioner="eigenvalue_corrected", betas=(0.0, 1.0), bias_correction=False),
    dict(preconditioner="eigenvalue_corrected", root_method="newton", exponent_multiplier=0.7),
    dict(preconditioner="eigenvalue_corrected", root_dtype=torch.float32),
    dict(eigenbasis_method="qr", preconditioner="eigenvalue_corrected"),
    dict(eigenbasis_method="qr"),  # accepted, unused by the root preconditioner
    dict(basis_refresh_tolerance=0.0),
    dict(basis_refresh_tolerance=1e3, preconditioner="eigenvalue_corrected"),
    dict(factor_beta=None),
    dict(factor_beta=1.0),
    dict(factor_beta=1e-300, preconditioner="eigenvalue_corrected"),
    dict(adam_epsilon=1e-300, preconditioner="eigenvalue_corrected"),
    dict(adam_epsilon=1),
    dict(precondition_1d=False),
    dict(precondition_1d=True, preconditioner="eigenvalue_corrected"),
    dict(first_moment="gradient"),
    dict(first_moment="direction"),
    dict(first_moment="gradient", preconditioner="eigenvalue_corrected"),
]


@pytest.mark.parametrize("kwargs", VALID_EDGES, ids=lambda kw: ",".join(
    f"{k}={v!r}" for k, v in kw.items()))
def test_valid_edge_values_are_accepted_and_step(kwargs):
    config = ShampooConfig(**kwargs)
    for name, value in kwargs.items():
        expected = tuple(value) if name == "betas" else value
        assert getattr(config, name) == expected
    assert isinstance(config.betas, tuple)
    # The same values as constructor arguments and as a param group; two steps with
    # preconditioning from step 1 exercise every code path the value reaches.
    p1, p2 = _params()
    start = dict(start_preconditioning_step=1) if "start_preconditioning_step" not in kwargs \
        else {}
    opt = Shampoo([p1], **{**kwargs, **start})
    opt.add_param_group({"params": [p2], **kwargs, **start})
    for seed in (1, 2):
        _fill_grads([p1, p2], seed)
        opt.step()
    assert torch.isfinite(p1).all() and torch.isfinite(p2).all()


@pytest.mark.parametrize("kwargs", [dict(epsilon=1e-300),
                                    dict(epsilon=1e-12, exponent_multiplier=8.0)],
                         ids=["epsilon-1e-300", "exponent_multiplier-8"])
def test_root_overflowing_the_float32_work_dtype_is_rejected(kwargs):
    """A root containing NaN/Inf is rejected and the previous one (here the identity)
    stays in use. With a rank-1 factor the clamped eigenvalues are 0, so with an
    absolute epsilon the root's entries are about ``epsilon ** -e``: 1e150 and 1e48
    here, finite in float64 but not in float32."""
    kwargs = {**kwargs, "relative_epsilon": False}
    param = torch.nn.Parameter(torch.randn(6, generator=torch.Generator().manual_seed(0)))
    opt = Shampoo([param], lr=0.1, start_preconditioning_step=1, **kwargs)
    _fill_grads([param])
    opt.step()
    assert torch.isfinite(param).all()
    assert opt.metrics()["root_failures"] == 1


def test_grafting_beta2_one_is_rejected_or_finite():
    params = _params()
    try:
        opt = Shampoo(params, lr=0.1, grafting="adam", grafting_beta2=1.0)
    except ValueError as error:
        assert "grafting_beta2" in str(error)
        return
    for seed in (1, 2, 3):
        _fill_grads(params, seed)
        opt.step()
    assert all(torch.isfinite(p).all() for p in params)


def test_betas_are_normalized_to_a_tuple_of_floats():
    config = ShampooConfig(betas=[0, 1])
    assert config.betas == (0.0, 1.0)
    assert all(type(b) is float for b in config.betas)


SPEC_DEFAULTS = dict(
    lr=1e-3, betas=(0.9, 0.999), epsilon=1e-6, weight_decay=0.0, block_size=1024,
    max_preconditioned_dim=8192, precondition_frequency=100, start_preconditioning_step=None,
    statistics_frequency=1, grafting="adam", grafting_beta2=0.999, grafting_epsilon=1e-8,
    root_method="eigh", root_dtype=None, factor_dtype=torch.float64,
    exponent_multiplier=1.0, nesterov=False, bias_correction=True,
    decoupled_weight_decay=True, preconditioner="shampoo", adam_epsilon=1e-8,
    relative_epsilon=True, merge_dims=True,
)


def test_defaults_match_spec():
    config = ShampooConfig()
    for name, value in SPEC_DEFAULTS.items():
        assert getattr(config, name) == value, name
    # Not in SPEC section 3 but documented on ShampooConfig.
    assert config.newton_max_iterations == 100
    assert config.newton_tolerance == 1e-6
    assert config.root_failure_threshold == 0.1
    assert config.root_check_tolerance == 1e-4  # float32 roots checked in float64
    assert config.preconditioning_start == config.precondition_frequency == 100


def test_defaults_of_the_eigenvalue_corrected_variant():
    config = ShampooConfig(preconditioner="eigenvalue_corrected")
    # Adam grafting keeps the step's size across basis refreshes (test_eigenvalue_corrected).
    assert config.grafting == "adam" and config.first_moment == "gradient"
    assert ShampooConfig().first_moment == "gradient"
    assert (config.eigenbasis_method, config.basis_refresh_tolerance, config.factor_beta,
            config.adam_epsilon) == ("eigh", 0.0, None, 1e-8)
    assert config.factor_ema == config.betas[1] == 0.999
    assert config.root_dtype == torch.float64  # bases in float64 (no check for them)
    assert config.precondition_1d is False and ShampooConfig().precondition_1d is True
    # The first basis at step 1 (SOAP's schedule); classic roots at precondition_frequency.
    assert config.start_preconditioning_step is None and config.preconditioning_start == 1
    assert ShampooConfig(precondition_frequency=7).preconditioning_start == 7
    assert ShampooConfig(preconditioner="eigenvalue_corrected",
                         start_preconditioning_step=5).preconditioning_start == 5
    assert ShampooConfig(betas=(0.9, 0.95), factor_beta=0.5).factor_ema == 0.5


# Field defaults before resolution: ``grafting`` and ``precondition_1d`` are None
# (resolved per preconditioner).
FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ShampooConfig)}


def test_constructor_defaults_equal_config_defaults():
    """The constructor signature and ShampooConfig cannot drift apart."""
    signature = inspect.signature(Shampoo.__init__).parameters
    for name, value in FIELD_DEFAULTS.items():
        assert signature[name].default == value, name
    opt = Shampoo(_params(1))
    assert ShampooConfig.from_group(opt.param_groups[0]) == ShampooConfig()
    assert {k: opt.defaults[k] for k in ShampooConfig.field_names()} == FIELD_DEFAULTS


@pytest.mark.parametrize("default, group, expected", [
    ("shampoo", "shampoo", "adam"), ("shampoo", "eigenvalue_corrected", "adam"),
    ("eigenvalue_corrected", "shampoo", "adam"),
    ("eigenvalue_corrected", "eigenvalue_corrected", "adam")])
def test_default_grafting_follows_each_groups_preconditioner(default, group, expected):
    p1, p2 = _params()
    opt = Shampoo([{"params": [p1]}, {"params": [p2], "preconditioner": group}],
                  preconditioner=default)
    assert opt.param_groups[1]["grafting"] is None
    assert ShampooConfig.from_group(opt.param_groups[1]).grafting == expected
    explicit = Shampoo([{"params": [p2], "preconditioner": group, "grafting": "sgd"}])
    assert ShampooConfig.from_group(explicit.param_groups[0]).grafting == "sgd"


def test_param_group_overrides_and_inherits():
    p1, p2 = _params()
    opt = Shampoo([{"params": [p1]}, {"params": [p2], "lr": 0.5, "grafting": "sgd"}], lr=0.1,
                  block_size=64)
    first, second = (ShampooConfig.from_group(g) for g in opt.param_groups)
    assert (first.lr, first.grafting, first.block_size) == (0.1, "adam", 64)
    assert (second.lr, second.grafting, second.block_size) == (0.5, "sgd", 64)


@pytest.mark.parametrize("start, frequency, expected", [
    (None, 100, 100), (None, 1, 1), (None, 7, 7), (1, 100, 1), (250, 100, 250), (3, 10, 3)])
def test_preconditioning_start(start, frequency, expected):
    config = ShampooConfig(start_preconditioning_step=start, precondition_frequency=frequency)
    assert config.start_preconditioning_step == start
    assert config.preconditioning_start == expected


def test_config_is_frozen():
    config = ShampooConfig()
    for name, value in [("lr", 0.1), ("betas", (0.5, 0.5)), ("block_size", 8),
                        ("grafting", "sgd")]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(config, name, value)
    assert config == ShampooConfig()


def test_as_dict_and_from_group_round_trip():
    config = ShampooConfig(lr=0.25, betas=(0.0, 1.0), block_size=3, grafting="rmsprop",
                           start_preconditioning_step=7, root_dtype=torch.float32)
    assert tuple(config.as_dict()) == ShampooConfig.field_names()
    assert ShampooConfig(**config.as_dict()) == config
    # from_group ignores "params" and keys that are not hyperparameters.
    group = {"params": [torch.zeros(1)], "initial_lr": 1.0, **config.as_dict()}
    assert ShampooConfig.from_group(group) == config
    assert ShampooConfig.from_group({"lr": 0.5}) == ShampooConfig(lr=0.5)


# --------------------------------------------------------------------- schedule helpers
@pytest.mark.parametrize("frequency, expected_steps", [
    (1, list(range(1, 13))),
    (3, [1, 4, 7, 10]),
    (5, [1, 6, 11]),
    (20, [1]),
])
def test_is_statistics_step(frequency, expected_steps):
    config = ShampooConfig(statistics_frequency=frequency)
    assert [t for t in range(1, 13) if config.is_statistics_step(t)] == expected_steps


@pytest.mark.parametrize("frequency, expected", [
    (1, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]),
    (3, [1, 1, 1, 2, 2, 2, 3, 3, 3, 4]),
    (4, [1, 1, 1, 1, 2, 2, 2, 2, 3, 3]),
    (100, [1] * 10),
])
def test_statistics_updates(frequency, expected):
    config = ShampooConfig(statistics_frequency=frequency)
    assert [config.statistics_updates(t) for t in range(1, 11)] == expected


@pytest.mark.parametrize("start, frequency, expected_steps", [
    (5, 3, [5, 8, 11, 14, 17, 20]),
    (None, 3, [3, 6, 9, 12, 15, 18]),  # start defaults to the frequency
    (None, 7, [7, 14]),
    (1, 1, list(range(1, 21))),
    (1, 4, [1, 5, 9, 13, 17]),
    (10, 100, [10]),
    (25, 1, []),
    (None, 100, []),
])
def test_is_root_step(start, frequency, expected_steps):
    config = ShampooConfig(start_preconditioning_step=start, precondition_frequency=frequency)
    assert [t for t in range(1, 21) if config.is_root_step(t)] == expected_steps


@settings(max_examples=150, deadline=None)
@given(start=st.one_of(st.none(), st.integers(1, 40)), root_frequency=st.integers(1, 40),
       stats_frequency=st.integers(1, 40), step=st.integers(1, 400))
def test_schedule_helpers_agree_with_brute_force(start, root_frequency, stats_frequency, step):
    config = ShampooConfig(start_preconditioning_step=start,
                           precondition_frequency=root_frequency,
                           statistics_frequency=stats_frequency)
    stats_steps = set(range(1, step + 1, stats_frequency))
    assert config.is_statistics_step(step) == (step in stats_steps)
    assert config.statistics_updates(step) == len(stats_steps)
    first = root_frequency if start is None else start
    assert config.is_root_step(step) == (step in set(range(first, step + 1, root_frequency)))
