"""Shampoo against the independent float64 reference (tests/reference.py), the
batched path against the for-loop path, checkpoints, NaN handling, dtypes, schedulers."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch

from scalable_shampoo import Shampoo
from scalable_shampoo.symmetric_packing import unpack_symmetric, unpacked_size
from tests.reference import ReferenceShampoo

# (parameter shape, merged shape, overrides that make the blocking interesting)
SHAPES = {
    "matrix": ([(6, 5)], [(6, 5)], {"block_size": 6}),
    "matrix_merged_to_vector": ([(6, 5)], [(30,)], {}),
    "blocked_matrix": ([(6, 5)], [(6, 5)], {"block_size": 4}),
    "merged_to_vector": ([(4, 2)], [(8,)], {"block_size": 8}),
    "vector_blocked": ([(7,)], [(7,)], {"block_size": 4}),
    "three_d_blocked": ([(3, 4, 5)], [(3, 4, 5)], {"block_size": 4}),
    "squeezed": ([(2, 1, 3)], [(2, 3)], {"block_size": 4}),
    "one_sided": ([(20, 3)], [(20, 3)], {"block_size": 8, "max_preconditioned_dim": 10}),
    "scalar_and_matrix": ([(), (5, 4)], [(), (5, 4)], {"block_size": 5}),
}

CONFIGS = {
    "default_like": dict(lr=0.05, precondition_frequency=1),
    "adagrad_style_beta2_1": dict(lr=0.05, betas=(0.0, 1.0), grafting="adagrad",
                                  precondition_frequency=3),
    "momentum_nesterov": dict(lr=0.05, betas=(0.9, 0.99), nesterov=True,
                              precondition_frequency=2),
    "no_bias_correction": dict(lr=0.05, betas=(0.8, 0.95), bias_correction=False,
                               precondition_frequency=2),
    "sgd_graft_late_start": dict(lr=0.05, grafting="sgd", precondition_frequency=4,
                                 start_preconditioning_step=6),
    "rmsprop_graft_stat_freq": dict(lr=0.05, grafting="rmsprop", statistics_frequency=3,
                                    precondition_frequency=5, start_preconditioning_step=2),
    "no_graft": dict(lr=0.01, grafting="none", betas=(0.5, 0.9), epsilon=1e-3,
                     precondition_frequency=2),
    "decoupled_wd": dict(lr=0.05, weight_decay=0.1, precondition_frequency=2),
    "vectors_not_preconditioned": dict(lr=0.05, precondition_1d=False, precondition_frequency=2),
    "coupled_wd": dict(lr=0.05, weight_decay=0.1, decoupled_weight_decay=False,
                       grafting="adagrad", precondition_frequency=2),
    "exponent_multiplier": dict(lr=0.05, exponent_multiplier=1.5, precondition_frequency=2),
    "root_delay": dict(lr=0.05, precondition_frequency=4, start_preconditioning_step=2,
                       root_delay=3),
    "root_delay_full_period": dict(lr=0.05, betas=(0.9, 1.0), precondition_frequency=3,
                                   root_delay=3),
    "direction_moment": dict(lr=0.05, first_moment="direction", precondition_frequency=2,
                             start_preconditioning_step=3),
    "direction_moment_nesterov": dict(lr=0.05, first_moment="direction", nesterov=True,
                                      betas=(0.9, 0.99), precondition_frequency=2),
    "gradient_moment_nesterov_sgd_graft": dict(lr=0.05, first_moment="gradient",
                                               nesterov=True, grafting="sgd",
                                               betas=(0.8, 0.99), precondition_frequency=3),
    "gradient_moment_no_graft_no_bias_correction": dict(
        lr=0.01, first_moment="gradient", grafting="none", bias_correction=False,
        betas=(0.5, 0.9), epsilon=1e-3, precondition_frequency=2, root_delay=1),
}

STEPS = 22


def _float64_options(**overrides):
    # epsilon well above rounding noise: with rank-deficient early factors, a smaller one
    # amplifies last-bit differences of equally correct implementations.
    return {"factor_dtype": torch.float64, "root_dtype": torch.float64, "epsilon": 1e-6,
            **overrides}


def _random_grads(params, generator):
    return [torch.randn(p.shape, dtype=p.dtype, generator=generator) for p in params]


def _run_against_reference(shapes, merged, options, steps=STEPS, foreach=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, dtype=torch.float64, generator=gen) for s in shapes]
    ref_params = [p.clone() for p in params]
    opt = Shampoo(params, foreach=foreach, **options)
    ref = ReferenceShampoo(ref_params, merged, **options)
    for _ in range(steps):
        grads = _random_grads(params, gen)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        ref.step(grads)
    return params, ref_params, opt


@pytest.mark.parametrize("shape_name", sorted(SHAPES))
@pytest.mark.parametrize("config_name", sorted(CONFIGS))
def test_matches_explicit_kronecker_reference(shape_name, config_name):
    shapes, merged, shape_options = SHAPES[shape_name]
    options = _float64_options(**CONFIGS[config_name], **shape_options)
    params, ref_params, opt = _run_against_reference(shapes, merged, options)
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p, r, rtol=1e-8, atol=1e-10)
    assert opt.metrics()["root_failures"] == 0


def test_reference_comparison_detects_a_wrong_exponent():
    """Negative control: the tolerance above is tight enough to see a 5% wrong exponent."""
    shapes, merged, shape_options = SHAPES["matrix"]
    options = _float64_options(**CONFIGS["default_like"], **shape_options)
    params, _, _ = _run_against_reference(shapes, merged, options)
    _, ref_wrong, _ = _run_against_reference(
        shapes, merged, {**options, "exponent_multiplier": 1.05})
    assert not torch.allclose(params[0], ref_wrong[0], rtol=1e-7, atol=1e-9)


def test_several_param_groups_match_reference():
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(6, 4, dtype=torch.float64, generator=gen)
    b = torch.randn(9, dtype=torch.float64, generator=gen)
    group_a = _float64_options(lr=0.05, precondition_frequency=2, block_size=6)
    group_b = _float64_options(lr=0.02, grafting="sgd", betas=(0.5, 1.0), block_size=4,
                               precondition_frequency=3)
    opt = Shampoo([{"params": [a], **group_a}, {"params": [b], **group_b}])
    ref_a = ReferenceShampoo([a.clone()], [(6, 4)], **group_a)
    ref_b = ReferenceShampoo([b.clone()], [(9,)], **group_b)
    for _ in range(STEPS):
        ga, gb = _random_grads([a, b], gen)
        a.grad, b.grad = ga.clone(), gb.clone()
        opt.step()
        ref_a.step([ga])
        ref_b.step([gb])
    torch.testing.assert_close(a, ref_a.params[0], rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(b, ref_b.params[0], rtol=1e-7, atol=1e-9)


# ---------------------------------------------------------------- batched vs for-loop
def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
        torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(dtype)


def _train(model, opt, steps, seed=1, start=0, nan_at=None):
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    losses = []
    for step in range(steps):
        x = torch.randn(32, 12, generator=gen).to(dtype)
        y = torch.randn(32, 3, generator=gen).to(dtype)
        if step < start:
            continue
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        losses.append(loss.item())
        opt.step()
    return losses


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
@pytest.mark.parametrize("options", [
    dict(block_size=8, precondition_frequency=3),
    dict(block_size=16, precondition_frequency=2, grafting="none", betas=(0.9, 1.0),
         nesterov=True),
    dict(block_size=5, root_method="newton", precondition_frequency=4, weight_decay=0.01),
])
def test_batched_path_equals_for_loop_path(dtype, tol, options):
    # Factors in the parameters' precision and epsilon above rounding noise, so that the
    # two formulations' last-bit differences are not amplified by near-null directions.
    options = {"factor_dtype": dtype, "epsilon": 1e-4, **options}
    batched, looped = _model(dtype=dtype), _model(dtype=dtype)
    opt_b = Shampoo(batched.parameters(), lr=0.01, foreach=True, **options)
    opt_l = Shampoo(looped.parameters(), lr=0.01, foreach=False, **options)
    _train(batched, opt_b, 20)
    _train(looped, opt_l, 20)
    assert opt_b.metrics()["num_block_stacks"] < opt_l.metrics()["num_block_stacks"]
    for pb, pl in zip(batched.parameters(), looped.parameters()):
        torch.testing.assert_close(pb, pl, rtol=tol, atol=tol)


# ---------------------------------------------------------------------- checkpoints
CHECKPOINT_OPTIONS = [
    dict(precondition_frequency=4, block_size=8),
    dict(precondition_frequency=5, statistics_frequency=2, grafting="rmsprop",
         nesterov=True, root_method="newton"),
    dict(precondition_frequency=3, betas=(0.0, 1.0), grafting="adagrad", foreach=False),
]


@pytest.mark.parametrize("options", CHECKPOINT_OPTIONS)
def test_resume_from_checkpoint_is_bitwise_identical(options):
    straight = _model()
    opt = Shampoo(straight.parameters(), lr=0.01, weight_decay=0.01, **options)
    _train(straight, opt, 30)

    first = _model()
    opt1 = Shampoo(first.parameters(), lr=0.01, weight_decay=0.01, **options)
    _train(first, opt1, 15)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": opt1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed = _model(seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(saved["model"])
    opt2 = Shampoo(resumed.parameters(), lr=0.5, weight_decay=0.0, **options)
    opt2.load_state_dict(saved["optim"])
    assert opt2.param_groups[0]["lr"] == 0.01  # hyperparameters restored as torch.optim does
    _train(resumed, opt2, 30, start=15)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert opt2.metrics()["root_computations"] == opt.metrics()["root_computations"]


def test_state_dict_is_a_snapshot_and_deepcopy_works():
    model = _model()
    opt = Shampoo(model.parameters(), lr=0.01, precondition_frequency=2)
    _train(model, opt, 4)
    snapshot = opt.state_dict()
    factor = snapshot["state"][0]["blocks"][0]["factors"][0].clone()
    _train(model, opt, 3)
    assert torch.equal(snapshot["state"][0]["blocks"][0]["factors"][0], factor)
    clone = copy.deepcopy(opt)
    assert clone.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"] == 7


def test_load_rejects_foreign_and_mismatched_state():
    model = _model()
    opt = Shampoo(model.parameters(), block_size=8, precondition_frequency=2)
    _train(model, opt, 3)
    state = opt.state_dict()
    with pytest.raises(ValueError, match="not a Shampoo state dict"):
        Shampoo(_model().parameters()).load_state_dict(torch.optim.Adam(
            _model().parameters()).state_dict())
    with pytest.raises(ValueError, match="not a Shampoo state dict"):
        Shampoo(_model().parameters()).load_state_dict({**state, "format": "old/0"})
    with pytest.raises(ValueError, match="parameters"):
        Shampoo(list(_model().parameters())[:-1]).load_state_dict(state)
    other = _model()
    other[0] = torch.nn.Linear(12, 17)  # a different shape, same parameter count
    bad = copy.deepcopy(state)
    bad["state"][0]["blocks"][0]["factors"][0] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="factor 0 has shape"):
        Shampoo(_model().parameters()).load_state_dict(bad)
    with pytest.raises(ValueError, match="blocks"):
        changed = copy.deepcopy(state)
        changed["param_groups"][0]["block_size"] = 4
        Shampoo(_model().parameters()).load_state_dict(changed)


# --------------------------------------------------------------- numerical trouble
def _three_same_shape(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 4, generator=gen) for _ in range(3)]


def _feed(params, opt, steps, gen, poison=None, drop=None):
    for t in range(1, steps + 1):
        grads = _random_grads(params, gen)
        for i, (p, g) in enumerate(zip(params, grads)):
            p.grad = g
            if poison and (t, i) in poison:
                kind = poison[(t, i)]
                p.grad = (g.clone().fill_(float("nan")) if kind == "nan" else
                          g * 1e30 if kind == "huge" else None)
        opt.step()


def test_nonfinite_gradient_skips_the_parameter_and_keeps_its_state():
    options = dict(lr=0.02, precondition_frequency=2, betas=(0.9, 0.99))
    nan_params, none_params = _three_same_shape(), _three_same_shape()
    opt_nan, opt_none = Shampoo(nan_params, **options), Shampoo(none_params, **options)
    with pytest.warns(RuntimeWarning, match="NaN/Inf"):
        _feed(nan_params, opt_nan, 6, torch.Generator().manual_seed(1),
              poison={(4, 1): "nan"})
    _feed(none_params, opt_none, 6, torch.Generator().manual_seed(1), poison={(4, 1): None})
    # A NaN gradient is treated exactly as a missing gradient: nothing is touched.
    for a, b in zip(nan_params, none_params):
        assert torch.equal(a, b)
        assert torch.isfinite(a).all()
    assert opt_nan.metrics()["nonfinite_grad_skips"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        nan_params[0].grad = torch.full((5, 4), float("inf"))
        opt_nan.step()
    assert opt_nan.metrics()["nonfinite_grad_skips"] == 2


def test_skipped_parameter_does_not_disturb_its_stack_mates():
    params = _three_same_shape()
    alone = [params[0].clone(), params[2].clone()]
    opt = Shampoo(params, lr=0.02, precondition_frequency=2, factor_dtype=torch.float64)
    opt_alone = Shampoo(alone, lr=0.02, precondition_frequency=2, factor_dtype=torch.float64)
    before = params[1].clone()
    gen = torch.Generator().manual_seed(5)
    for t in range(6):
        grads = _random_grads(params, gen)
        params[0].grad, params[2].grad = grads[0], grads[2]
        params[1].grad = None if t % 2 else torch.full((5, 4), float("nan"))
        alone[0].grad, alone[1].grad = grads[0].clone(), grads[2].clone()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            opt.step()
        opt_alone.step()
    assert torch.equal(params[1], before)
    torch.testing.assert_close(params[0], alone[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(params[2], alone[1], rtol=1e-6, atol=1e-7)


def test_rejected_root_keeps_previous_root_and_is_counted(monkeypatch):
    import scalable_shampoo.preconditioner as preconditioner
    params = _three_same_shape()
    # float64 roots: the path through preconditioner.inverse_root, poisoned below
    opt = Shampoo(params, lr=0.02, precondition_frequency=2, block_size=5,
                  root_dtype=torch.float64)
    gen = torch.Generator().manual_seed(2)
    _feed(params, opt, 2, gen)
    good_root = opt.state_dict()["state"][0]["blocks"][0]["roots"][0]
    assert not torch.equal(good_root, torch.eye(5))

    real = preconditioner.inverse_root

    def poisoned(matrix, *args, **kwargs):
        result = real(matrix, *args, **kwargs)
        return type(result)(torch.full_like(result.root, float("nan")), result.residual,
                            result.iterations)

    monkeypatch.setattr(preconditioner, "inverse_root", poisoned)
    _feed(params, opt, 2, gen)
    assert torch.equal(opt.state_dict()["state"][0]["blocks"][0]["roots"][0], good_root)
    metrics = opt.metrics()
    assert metrics["root_failures"] == 6  # 3 blocks x 2 factors at step 4
    assert metrics["root_age_max"] == 2
    assert all(torch.isfinite(p).all() for p in params)


def test_newton_that_does_not_converge_is_rejected():
    params = _three_same_shape()
    opt = Shampoo(params, lr=0.02, precondition_frequency=2, block_size=5, root_method="newton",
                  newton_max_iterations=1, root_failure_threshold=1e-8)
    _feed(params, opt, 4, torch.Generator().manual_seed(2))
    assert opt.metrics()["root_failures"] == opt.metrics()["root_computations"] == 12
    for root in opt.state_dict()["state"][0]["blocks"][0]["roots"]:
        assert torch.equal(unpack_symmetric(root), torch.eye(unpacked_size(root.shape[0])))


# ------------------------------------------------------------ dtypes and schedulers
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_track_float32(dtype):
    low, high = _model(dtype=dtype), _model(dtype=torch.float32)
    opt_low = Shampoo(low.parameters(), lr=0.01, precondition_frequency=3)
    opt_high = Shampoo(high.parameters(), lr=0.01, precondition_frequency=3)
    losses_low = _train(low, opt_low, 12)
    losses_high = _train(high, opt_high, 12)
    state = opt_low.state_dict()["state"][0]["blocks"][0]
    assert state["factors"][0].dtype == torch.float64  # factor_dtype's default
    assert state["momentum"].dtype == torch.float32
    assert all(math.isfinite(x) for x in losses_low)
    assert abs(losses_low[-1] - losses_high[-1]) < 0.05 * losses_high[-1]
    assert losses_low[-1] < losses_low[0]


def test_lr_scheduler_drives_the_step_size():
    params = _three_same_shape()
    twin = [p.clone() for p in params]
    opt = Shampoo(params, lr=0.1, precondition_frequency=2)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    manual = Shampoo(twin, lr=0.1, precondition_frequency=2)
    gen_a, gen_b = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    for t in range(6):
        _feed(params, opt, 1, gen_a)
        scheduler.step()
        _feed(twin, manual, 1, gen_b)
        manual.param_groups[0]["lr"] = 0.1 * 0.5 ** ((t + 1) // 2)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    for a, b in zip(params, twin):
        assert torch.equal(a, b)


def test_metrics_report_state_bytes_and_roots():
    model = _model()
    opt = Shampoo(model.parameters(), lr=0.01, precondition_frequency=2, block_size=8)
    assert opt.metrics()["step"] == 0
    _train(model, opt, 5)
    m = opt.metrics()
    expected_bytes = sum(
        t.numel() * t.element_size()
        for entry in opt.state_dict()["state"].values() for block in entry["blocks"]
        for t in [*block["factors"], *block["roots"], block["graft"], block["momentum"]]
        if t is not None)
    assert m["state_bytes"] == expected_bytes
    assert m["step"] == 5 and m["root_age_max"] == 1 and m["root_seconds"] > 0
    # float32 roots checked in float64: the residual is the check, below its tolerance
    assert m["root_computations"] > 0 and m["root_residual_max"] <= 1e-4


def test_closure_and_parameters_without_grad():
    model = _model()
    frozen = torch.nn.Parameter(torch.randn(3, 3))
    opt = Shampoo([*model.parameters(), frozen], lr=0.01)
    x, y = torch.randn(8, 12), torch.randn(8, 3)

    def closure():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    before = frozen.clone()
    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor)
    assert torch.equal(frozen, before)


def test_the_largest_gradient_the_state_can_square_is_used():
    """The screen's limit is the block norm whose square float32 holds (1.8e19): a
    gradient just below it is used, and the state stays finite."""
    param = torch.nn.Parameter(torch.zeros(4, 3))
    opt = Shampoo([param], lr=1e-3, betas=(0.0, 0.999), grafting="sgd",
                  start_preconditioning_step=100)
    param.grad = torch.full((4, 3), 5e18)  # norm 1.7e19
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    metrics = opt.metrics()
    assert metrics["nonfinite_grad_skips"] == metrics["overflow_grad_skips"] == 0
    assert torch.equal(param, torch.full((4, 3), 5e18) * -1e-3)
    factors = opt.state_dict()["state"][0]["blocks"][0]["factors"]
    assert all(torch.isfinite(f).all() for f in factors)


@pytest.mark.parametrize("preconditioner", ["shampoo", "eigenvalue_corrected"])
def test_a_gradient_too_large_to_square_skips_the_parameter_and_keeps_its_state(
        preconditioner):
    """A gradient of 1e30 (squared: Inf in float32) would make the factors and second
    moments Inf for good; it is skipped like a missing gradient, warned and counted."""
    options = dict(lr=0.02, precondition_frequency=2, preconditioner=preconditioner)
    huge_params, none_params = _three_same_shape(), _three_same_shape()
    opt_huge, opt_none = Shampoo(huge_params, **options), Shampoo(none_params, **options)
    with pytest.warns(RuntimeWarning, match="squares overflow the optimizer state's dtype"):
        _feed(huge_params, opt_huge, 6, torch.Generator().manual_seed(1),
              poison={(3, 1): "huge"})
    _feed(none_params, opt_none, 6, torch.Generator().manual_seed(1), poison={(3, 1): None})
    for a, b in zip(huge_params, none_params):
        assert torch.equal(a, b)
    metrics = opt_huge.metrics()
    assert metrics["overflow_grad_skips"] == 1 and metrics["nonfinite_grad_skips"] == 0
    assert metrics["root_failures"] == 0


def test_newton_exponent_it_cannot_serve_fails_before_the_first_step():
    param = torch.nn.Parameter(torch.randn(6, 5))
    param.grad = torch.randn(6, 5)
    opt = Shampoo([param], block_size=6, root_method="newton", exponent_multiplier=0.7)
    before = param.clone()
    with pytest.raises(ValueError, match="root_method='newton' cannot serve blocks with 2"):
        opt.step()  # 0.7 / 4 = 7/40: denominator above 32
    assert torch.equal(param, before)
    opt.param_groups[0]["root_method"] = "eigh"
    opt.step()
    assert not torch.equal(param, before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    cpu, gpu = _model(dtype=torch.float64), _model(dtype=torch.float64).cuda()
    options = dict(lr=0.01, precondition_frequency=3, block_size=8, epsilon=1e-4,
                   factor_dtype=torch.float64)
    opt_cpu, opt_gpu = Shampoo(cpu.parameters(), **options), Shampoo(gpu.parameters(), **options)
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        x, y = torch.randn(32, 12, generator=gen).double(), torch.randn(32, 3, generator=gen).double()
        for model, opt, device in ((cpu, opt_cpu, "cpu"), (gpu, opt_gpu, "cuda")):
            opt.zero_grad()
            ((model(x.to(device)) - y.to(device)) ** 2).mean().backward()
            opt.step()
    for a, b in zip(cpu.parameters(), gpu.parameters()):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-8, atol=1e-10)


def test_channels_last_parameters_match_contiguous_ones():
    """Non-contiguous parameters (channels_last conv kernels) take the assemble-then-add
    path; with the same gradients the trajectory equals that of contiguous ones."""
    gen = torch.Generator().manual_seed(0)
    plain = torch.nn.Parameter(torch.randn(8, 3, 3, 3, generator=gen))
    channels_last = torch.nn.Parameter(plain.detach().clone().to(
        memory_format=torch.channels_last))
    assert not channels_last.is_contiguous()
    options = dict(lr=0.01, precondition_frequency=2, block_size=9)
    opt_plain, opt_last = Shampoo([plain], **options), Shampoo([channels_last], **options)
    for _ in range(5):
        grad = torch.randn(8, 3, 3, 3, generator=gen)
        plain.grad = grad
        channels_last.grad = grad.contiguous(memory_format=torch.channels_last)
        opt_plain.step()
        opt_last.step()
    assert not channels_last.is_contiguous()
    assert torch.equal(channels_last, plain)
    assert opt_plain.metrics()["root_computations"] > 0


def test_repr_shows_the_values_in_effect():
    param = torch.nn.Parameter(torch.randn(3, 2))
    other = torch.nn.Parameter(torch.randn(4))
    opt = Shampoo([{"params": [param]},
                   {"params": [other], "preconditioner": "eigenvalue_corrected"}],
                  precondition_frequency=10)
    groups = repr(opt).split("Parameter Group ")[1:]
    assert len(groups) == 2
    for text, grafting, one_d, start, delay in [(groups[0], "'adam'", "True", "10", "0"),
                                                (groups[1], "'adam'", "False", "1", "1")]:
        assert f"    grafting: {grafting}\n" in text
        assert "    first_moment: 'gradient'\n" in text
        assert f"    precondition_1d: {one_d}\n" in text
        assert f"    start_preconditioning_step: {start}\n" in text
        assert f"    root_delay: {delay}\n" in text and "    factor_beta: 0.999\n" in text
        assert "None" not in text
    opt.param_groups[0]["grafting"] = "bogus"  # invalid: shown as it is, step names it
    assert "grafting: 'bogus'" in repr(opt)


COMMON_ARGUMENTS = ["lr", "betas", "epsilon", "weight_decay", "block_size",
                    "max_preconditioned_dim", "precondition_frequency",
                    "start_preconditioning_step", "grafting", "grafting_epsilon",
                    "preconditioner", "adam_epsilon", "root_delay"]


def test_help_documents_the_common_arguments_and_names_the_rest():
    import inspect
    import re

    doc = inspect.getdoc(Shampoo)
    documented = set(re.findall(r"^    (\w+): ", doc, flags=re.M))
    assert set(COMMON_ARGUMENTS) <= documented
    for name in set(COMMON_ARGUMENTS) - {"epsilon"}:  # epsilon defers to ShampooConfig
        entry = re.search(rf"^    {name}: (.*?)(?=^    \w+: |\Z)", doc, flags=re.M | re.S)
        assert "Default" in entry.group(1) or "default" in entry.group(1), name
    assert "ShampooConfig" in doc
    for name in inspect.signature(Shampoo).parameters:  # the rest at least by name
        assert f"``{name}``" in doc or name in documented, name


def test_a_pickle_of_the_previous_version_unpickles_with_the_new_counter():
    import pickle

    param = torch.nn.Parameter(torch.randn(4, 3))
    opt = Shampoo([param], lr=0.01)
    param.grad = torch.randn(4, 3)
    opt.step()
    old = opt.__getstate__()  # as the previous version pickled it
    old.pop("_warned")
    old["_warned_nonfinite"] = True
    old["_counters"] = {k: v for k, v in old["_counters"].items() if k != "overflow_grad_skips"}
    copy_ = Shampoo.__new__(Shampoo)
    copy_.__setstate__(pickle.loads(pickle.dumps(old)))
    param_copy = copy_.param_groups[0]["params"][0]
    param_copy.grad = torch.randn(4, 3) * 1e30
    with pytest.warns(RuntimeWarning, match="squares overflow"):
        copy_.step()
    assert copy_.metrics()["overflow_grad_skips"] == 1
