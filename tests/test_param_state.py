"""torch.optim's per-parameter state (``optimizer.state[p]``, scalable_shampoo.param_state),
the state-dict hooks, state created at a parameter's first gradient with its own step
count, and the checks load_state_dict makes before it changes anything."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch

from scalable_shampoo import Shampoo

OPTIONS = dict(lr=0.02, block_size=6, precondition_frequency=3, start_preconditioning_step=2,
               epsilon=1e-6, weight_decay=0.01)


def _model(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _train(model: torch.nn.Module, opt: Shampoo, steps: int, start: int = 0) -> None:
    for step in range(start, start + steps):
        gen = torch.Generator().manual_seed(100 + step)
        x, y = torch.randn(16, 5, generator=gen), torch.randn(16, 3, generator=gen)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# ------------------------------------------------------------ optimizer.state[p]
def test_state_of_each_parameter_is_its_step_and_views_of_its_blocks():
    model = _model()
    opt = Shampoo(model.parameters(), **OPTIONS)
    assert not opt.state  # nothing before the first gradient
    _train(model, opt, 5)
    saved = opt.state_dict()
    params = list(model.parameters())
    assert set(opt.state) == set(params)
    for index, param in enumerate(params):
        entry = opt.state[param]
        assert isinstance(entry["step"], torch.Tensor) and entry["step"].item() == 5
        blocks = saved["state"][index]["blocks"]
        assert sorted(entry["blocks"]) == list(range(len(blocks)))
        for b, block in enumerate(blocks):
            view = entry["blocks"][b]
            for name in ("factors", "roots"):
                assert len(view[name]) == len(block[name])
                assert all(torch.equal(v, s) for v, s in zip(view[name], block[name]))
            for name in ("graft", "momentum"):
                assert torch.equal(view[name], block[name])
    # Views, not copies: they follow later steps and writing into them writes the state.
    weight = params[0]
    _train(model, opt, 2, start=5)
    later = opt.state_dict()["state"][0]["blocks"][0]
    assert torch.equal(opt.state[weight]["blocks"][0]["momentum"], later["momentum"])
    assert torch.equal(opt.state[weight]["blocks"][0]["factors"][0], later["factors"][0])
    opt.state[weight]["blocks"][0]["momentum"].mul_(0.5)
    assert torch.equal(opt.state_dict()["state"][0]["blocks"][0]["momentum"],
                       later["momentum"] * 0.5)
    assert opt.state[weight]["step"].item() == 7


def test_views_of_a_copy_point_at_the_copy():
    model = _model()
    opt = Shampoo(model.parameters(), **OPTIONS)
    _train(model, opt, 3)
    clone = copy.deepcopy(opt)
    original = next(iter(opt.state.values()))["blocks"][0]["momentum"]
    copied_param = clone.param_groups[0]["params"][0]
    copied = clone.state[copied_param]["blocks"][0]["momentum"]
    assert torch.equal(original, copied)
    copied.zero_()
    assert not torch.equal(original, copied)
    assert torch.equal(clone.state_dict()["state"][0]["blocks"][0]["momentum"], copied)


def test_the_four_state_dict_hooks_run_with_torch_optim_semantics():
    model = _model()
    opt = Shampoo(model.parameters(), **OPTIONS)
    _train(model, opt, 3)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append(("pre", o is opt)))

    def post(o, state_dict):
        calls.append(("post", o is opt))
        return {**state_dict, "note": "added by a hook"}

    opt.register_state_dict_post_hook(post)
    saved = opt.state_dict()
    assert calls == [("pre", True), ("post", True)] and saved["note"] == "added by a hook"

    fresh = Shampoo(_model().parameters(), **OPTIONS)

    def load_pre(o, state_dict):
        calls.append(("load_pre", state_dict.get("note")))
        edited = copy.deepcopy(state_dict)
        edited["param_groups"][0]["lr"] = 0.125
        return edited

    fresh.register_load_state_dict_pre_hook(load_pre)
    fresh.register_load_state_dict_post_hook(
        lambda o: calls.append(("load_post", o.param_groups[0]["lr"])))
    fresh.load_state_dict(saved)
    assert calls[2:] == [("load_pre", "added by a hook"), ("load_post", 0.125)]
    assert saved["param_groups"][0]["lr"] == OPTIONS["lr"]  # the caller's dict is untouched


# -------------------------------------------------------------- frozen parameters
def test_frozen_and_unused_parameters_get_no_state_until_their_first_gradient():
    torch.manual_seed(0)
    backbone = torch.nn.Linear(32, 32)
    head = torch.nn.Linear(32, 2)
    unused = torch.nn.Parameter(torch.randn(16, 16))
    backbone.requires_grad_(False)
    params = [*backbone.parameters(), *head.parameters(), unused]
    opt = Shampoo(params, lr=0.01, block_size=32)
    head_only = Shampoo(copy.deepcopy(head).parameters(), lr=0.01, block_size=32)
    for step in range(3):
        gen = torch.Generator().manual_seed(step)
        opt.zero_grad()
        head(backbone(torch.randn(8, 32, generator=gen))).square().mean().backward()
        for p, q in zip(head.parameters(), head_only.param_groups[0]["params"]):
            q.grad = p.grad.clone()
        opt.step()
        head_only.step()
    assert set(opt.state) == set(head.parameters())
    saved = opt.state_dict()
    assert sorted(saved["state"]) == [2, 3]
    assert opt.metrics()["state_bytes"] == head_only.metrics()["state_bytes"] > 0
    assert opt.metrics()["num_blocks"] == 2
    # Unfrozen: state is created at the first gradient, with its own step count.
    backbone.requires_grad_(True)
    opt.zero_grad()
    head(backbone(torch.randn(8, 32))).square().mean().backward()
    opt.step()
    assert opt.state[backbone.weight]["step"].item() == 1
    assert opt.state[head.weight]["step"].item() == 4
    assert unused not in opt.state
    assert torch.equal(opt.state[head.weight]["blocks"][0]["factors"][0],
                       opt.state_dict()["state"][2]["blocks"][0]["factors"][0])


def _adam_graft_momentum_reference(grads: list[torch.Tensor], lr: float, betas, eps: float,
                                   weight_decay: float, param: torch.Tensor) -> torch.Tensor:
    """SPEC 2.4-2.5 before preconditioning, in float64, written out: Adam grafting
    (beta1 = 0, its own bias correction), momentum of that direction, bias-corrected,
    decoupled weight decay, all with the parameter's own step count t = 1, 2, ..."""
    beta1, beta2 = betas
    p = param.double().clone()
    v = torch.zeros_like(p)
    m = torch.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        v = beta2 * v + (1 - beta2) * g * g
        direction = g / ((v / (1 - beta2**t)).sqrt() + eps)
        m = beta1 * m + (1 - beta1) * direction
        p = p * (1 - lr * weight_decay) - lr * m / (1 - beta1**t)
    return p


def test_a_layer_unfrozen_late_gets_first_updates_of_its_own_step_count():
    """A layer unfrozen after 30 steps of its group: its first update is AdamW's first
    update (torch.optim.AdamW), and its next ones follow the float64 formula with its
    own step count, not the group's (which gave 0.71x then 1.35x AdamW's steps)."""
    torch.manual_seed(1)
    late = torch.nn.Parameter(torch.randn(6, 4))
    early = torch.nn.Parameter(torch.randn(6, 4))  # same shape: the two share a stack
    options = dict(lr=0.01, betas=(0.9, 0.999), weight_decay=0.1, block_size=8,
                   precondition_frequency=5, start_preconditioning_step=5, epsilon=1e-6,
                   first_moment="direction")  # its first steps: Adam's without momentum, then m
    opt = Shampoo([early, late], **options)
    late.requires_grad_(False)
    gen = torch.Generator().manual_seed(2)
    for _ in range(30):
        early.grad = torch.randn(6, 4, generator=gen)
        opt.step()
    late.requires_grad_(True)
    start = late.detach().clone()
    grads = []
    for k in range(3):
        grads.append(torch.randn(6, 4, generator=gen))
        early.grad, late.grad = torch.randn(6, 4, generator=gen), grads[-1].clone()
        opt.step()
        if k == 0:
            adamw_param = torch.nn.Parameter(start.clone())
            adamw = torch.optim.AdamW([adamw_param], lr=0.01, betas=(0.9, 0.999), eps=1e-8,
                                      weight_decay=0.1)
            adamw_param.grad = grads[0].clone()
            adamw.step()
            torch.testing.assert_close(late.detach(), adamw_param.detach(), rtol=1e-6,
                                       atol=1e-7)
        expected = _adam_graft_momentum_reference(grads, 0.01, (0.9, 0.999), 1e-8, 0.1, start)
        torch.testing.assert_close(late.detach().double(), expected, rtol=1e-5, atol=1e-7)
    assert opt.state[late]["step"].item() == 3 and opt.state[early]["step"].item() == 33


def test_an_unfrozen_layer_resumes_bitwise():
    """State created mid-run (with its own step count) is in the checkpoint, and a
    resumed run follows the uninterrupted one bit for bit."""
    def run(model, opt, start, stop):
        for step in range(start, stop):
            model[2].requires_grad_(step >= 4)  # the last layer unfrozen at step 4
            _train(model, opt, 1, start=step)

    model = _model()
    opt = Shampoo(model.parameters(), **OPTIONS)
    run(model, opt, 0, 12)
    halfway_model = _model()
    halfway = Shampoo(halfway_model.parameters(), **OPTIONS)
    run(halfway_model, halfway, 0, 7)
    buffer = io.BytesIO()
    torch.save({"model": halfway_model.state_dict(), "opt": halfway.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model = _model(seed=5)
    resumed_model.load_state_dict(saved["model"])
    resumed = Shampoo(resumed_model.parameters(), **OPTIONS)
    resumed.load_state_dict(saved["opt"])
    assert resumed.state[resumed_model[2].weight]["step"].item() == 3
    run(resumed_model, resumed, 7, 12)
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


# ----------------------------------------------------------- load_state_dict checks
@pytest.fixture
def trained():
    model = _model()
    opt = Shampoo(model.parameters(), **OPTIONS)
    _train(model, opt, 4)
    return model, opt


def _unchanged_after(opt: Shampoo, model: torch.nn.Module, bad_load) -> None:
    """``bad_load(opt)`` raises; the optimizer then continues exactly as a copy that
    never saw it."""
    twin_model = copy.deepcopy(model)
    twin = Shampoo(twin_model.parameters(), **OPTIONS)
    twin.load_state_dict(opt.state_dict())
    before = opt.state_dict()
    groups = copy.deepcopy(opt.param_groups)
    with pytest.raises(ValueError) as error:
        bad_load(opt)
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == [
        {k: v for k, v in g.items() if k != "params"} for g in groups]
    after = opt.state_dict()
    assert sorted(after["state"]) == sorted(before["state"])
    _train(model, opt, 3, start=4)
    _train(twin_model, twin, 3, start=4)
    for a, b in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(a, b)
    return str(error.value)


@pytest.mark.parametrize("field,value", [("factors", math.nan), ("momentum", math.inf),
                                         ("graft", -math.inf), ("roots", math.nan)])
def test_non_finite_values_are_rejected_naming_the_parameter(trained, field, value):
    model, opt = trained
    bad = opt.state_dict()
    target = bad["state"][2]["blocks"][0][field]
    (target[0] if isinstance(target, list) else target).view(-1)[3] = value
    message = _unchanged_after(opt, model, lambda o: o.load_state_dict(bad))
    assert "parameter 2 block 0" in message and "NaN/Inf" in message


def test_a_bad_step_is_rejected(trained):
    model, opt = trained
    bad = opt.state_dict()
    bad["state"][1]["step"] = torch.tensor(math.nan)
    message = _unchanged_after(opt, model, lambda o: o.load_state_dict(bad))
    assert "parameter 1: step must be a whole number" in message


def test_a_reordered_model_is_reported_with_both_shapes(trained):
    model, opt = trained
    saved = opt.state_dict()
    swapped = {**saved, "state": {**saved["state"], 0: saved["state"][2],
                                  2: saved["state"][0]}}
    message = _unchanged_after(opt, model, lambda o: o.load_state_dict(swapped))
    assert "parameter 0 block 0" in message
    assert "the saved block has shape (3, 6)" in message and "this one (6, 5)" in message


def test_missing_entries_and_structural_changes_are_warned(trained):
    model, opt = trained
    saved = opt.state_dict()
    del saved["state"][3]
    fresh = Shampoo(_model().parameters(), **{**OPTIONS, "block_size": 4, "grafting": "sgd"})
    with pytest.warns(UserWarning) as records:
        fresh.load_state_dict(saved)
    messages = [str(r.message) for r in records]
    assert any("no state for parameter(s) [3]" in m for m in messages)
    assert any("block_size 4 -> 6" in m and "grafting 'sgd' -> None" in m for m in messages)
    assert fresh.param_groups[0]["block_size"] == 6  # torch.optim: the saved values win
    assert set(fresh.state) == set(list(fresh.param_groups[0]["params"])[:3])


def test_a_matching_state_loads_without_warnings(trained):
    _, opt = trained
    fresh = Shampoo(_model().parameters(), **OPTIONS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh.load_state_dict(opt.state_dict())


def test_an_eigenvalue_corrected_layer_unfrozen_late_takes_adams_first_step():
    """SOAP blocks: until a row has a basis its update is Adam's; a layer unfrozen after
    the group's first bases takes AdamW's first step (its own step count), while its
    stack-mate keeps its bases: those of an optimizer without the late layer (the bases
    of step 9 go into use at step 10, root_delay 1, whether or not a layer joins)."""
    torch.manual_seed(3)
    late = torch.nn.Parameter(torch.randn(5, 4))
    early = torch.nn.Parameter(torch.randn(5, 4))
    alone = torch.nn.Parameter(early.detach().clone())
    options = dict(lr=0.01, betas=(0.9, 0.99), weight_decay=0.1, block_size=8,
                   preconditioner="eigenvalue_corrected", precondition_frequency=4)
    opt = Shampoo([early, late], **options)
    twin = Shampoo([alone], **options)
    late.requires_grad_(False)
    gen = torch.Generator().manual_seed(4)
    for step in range(1, 11):  # the optimizer with both layers steps at 10 below
        early.grad = torch.randn(5, 4, generator=gen)
        alone.grad = early.grad.clone()
        twin.step()
        if step < 10:
            opt.step()
    bases = twin.state[alone]["blocks"][0]["roots"]
    late.requires_grad_(True)
    start = late.detach().clone()
    late.grad = torch.randn(5, 4, generator=gen)
    adamw_param = torch.nn.Parameter(start.clone())
    adamw = torch.optim.AdamW([adamw_param], lr=0.01, betas=(0.9, 0.99), weight_decay=0.1)
    adamw_param.grad = late.grad.clone()
    opt.step()
    adamw.step()
    torch.testing.assert_close(late.detach(), adamw_param.detach(), rtol=1e-6, atol=1e-7)
    assert all(torch.equal(a, b) for a, b in zip(opt.state[early]["blocks"][0]["roots"], bases))
    assert opt.state[late]["step"].item() == 1 and opt.state[early]["step"].item() == 10


def test_a_state_dict_of_format_1_still_loads_and_resumes_bitwise():
    """Format 1 (before per-parameter steps): one int step per entry, no group step
    counter, pending roots as tensors. Built here from a current state dict."""
    from scalable_shampoo.async_roots import decode_pending

    options = {**OPTIONS, "root_delay": 2}
    model = _model()
    opt = Shampoo(model.parameters(), **options)
    _train(model, opt, 8)  # step 8 launched roots that go into use at 10
    saved = opt.state_dict()
    old = {"format": "scalable_shampoo.shampoo/1", "counters": saved["counters"],
           "param_groups": [{k: v for k, v in g.items() if k != "shampoo_step"}
                            for g in saved["param_groups"]],
           "state": {key: {"step": int(entry["step"]),
                           "blocks": [{**b, "pending_roots": decode_pending(b["pending_roots"])}
                                      for b in entry["blocks"]]}
                     for key, entry in saved["state"].items()}}
    assert any(b["pending_roots"] is not None for e in old["state"].values() for b in e["blocks"])
    resumed_model = copy.deepcopy(model)
    resumed = Shampoo(resumed_model.parameters(), **options)
    resumed.load_state_dict(old)
    _train(model, opt, 4, start=8)
    _train(resumed_model, resumed, 4, start=8)
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("preconditioner", ["shampoo", "eigenvalue_corrected"])
def test_a_state_dict_of_format_2_with_full_factors_loads_and_resumes_bitwise(preconditioner):
    """Format 2 saved each factor as its full ``(d, d)`` matrix; format 3 keeps the
    packed upper triangle. Built here from a current state dict."""
    from scalable_shampoo.symmetric_packing import unpack_symmetric

    options = {**OPTIONS, "preconditioner": preconditioner}
    model = _model()
    opt = Shampoo(model.parameters(), **options)
    _train(model, opt, 7)
    saved = opt.state_dict()
    old = {**saved, "format": "scalable_shampoo.shampoo/2",
           "state": {key: {**entry, "blocks": [
               {**b, "factors": [unpack_symmetric(f) for f in b["factors"]]}
               for b in entry["blocks"]]} for key, entry in saved["state"].items()}}
    assert any(f.dim() == 2 for e in old["state"].values() for b in e["blocks"]
               for f in b["factors"])
    resumed_model = copy.deepcopy(model)
    resumed = Shampoo(resumed_model.parameters(), **options)
    resumed.load_state_dict(old)
    _train(model, opt, 5, start=7)
    _train(resumed_model, resumed, 5, start=7)
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


def test_a_state_dict_of_format_3_with_full_roots_loads_and_resumes_bitwise():
    """Format 3 saved each inverse root, and each pending (computed, not yet in use)
    root, as its full ``(d, d)`` matrix; format 4 keeps the packed upper triangle.
    Built here from a current state dict, with roots pending."""
    from scalable_shampoo.async_roots import decode_pending, encode_pending
    from scalable_shampoo.symmetric_packing import unpack_symmetric

    def full_pending(value):
        entry = decode_pending(value)
        if entry is not None:
            entry["results"] = [{**r, "root": unpack_symmetric(r["root"])}
                                for r in entry["results"]]
        return encode_pending(entry)

    options = {**OPTIONS, "root_delay": 2}
    model = _model()
    opt = Shampoo(model.parameters(), **options)
    _train(model, opt, 8)  # roots in use from step 6, and launched at 8 for step 10
    saved = opt.state_dict()
    old = {**saved, "format": "scalable_shampoo.shampoo/3",
           "state": {key: {**entry, "blocks": [
               {**b, "roots": [unpack_symmetric(r) for r in b["roots"]],
                "pending_roots": full_pending(b["pending_roots"])}
               for b in entry["blocks"]]} for key, entry in saved["state"].items()}}
    blocks = [b for e in old["state"].values() for b in e["blocks"] if b["roots"]]
    assert blocks and all(r.dim() == 2 for b in blocks for r in b["roots"])
    assert any(decode_pending(b["pending_roots"]) is not None for b in blocks)
    resumed_model = copy.deepcopy(model)
    resumed = Shampoo(resumed_model.parameters(), **options)
    resumed.load_state_dict(old)
    assert resumed.state_dict()["format"] == "scalable_shampoo.shampoo/4"
    _train(model, opt, 5, start=8)
    _train(resumed_model, resumed, 5, start=8)
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


def test_a_saved_factor_of_the_wrong_size_names_both_block_shapes():
    model = _model()
    opt = Shampoo(model.parameters(), **OPTIONS)
    _train(model, opt, 3)
    saved = copy.deepcopy(opt.state_dict())
    saved["state"][0]["blocks"][0]["factors"][0] = torch.ones(3)  # d = 2, not d = 6
    fresh = Shampoo(_model().parameters(), **OPTIONS)
    with pytest.raises(ValueError, match=r"factor 0 has shape \(3,\), expected \(21,\) or "
                                         r"\(6, 6\): the upper triangle of a 6x6 factor"):
        fresh.load_state_dict(saved)


def _packed(d: int) -> int:
    return d * (d + 1) // 2


@pytest.mark.parametrize("preconditioner,expected", [
    # two packed float64 factors, two packed float32 roots, the Adam graft, the momentum
    ("shampoo", 8 * (_packed(6) + _packed(5)) + 4 * (_packed(6) + _packed(5)) + 2 * 4 * 30),
    # the same with full bases for roots, the rotated second moment, float32 eigenvalue
    # estimates
    ("eigenvalue_corrected",
     8 * (_packed(6) + _packed(5)) + 4 * (6 * 6 + 5 * 5) + 3 * 4 * 30 + 4 * (6 + 5)),
])
def test_state_bytes_are_exact_and_factors_are_packed(preconditioner, expected):
    """``metrics()['state_bytes']`` is the bytes of the state tensors, with the symmetric
    factors and roots stored as their ``d (d + 1) / 2`` upper-triangle entries."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(6, 5))
    opt = Shampoo([weight], lr=0.01, preconditioner=preconditioner, block_size=8,
                  start_preconditioning_step=1)
    weight.grad = torch.randn(6, 5)
    opt.step()
    block = opt.state[weight]["blocks"][0]
    assert [tuple(f.shape) for f in block["factors"]] == [(21,), (15,)]
    roots = [(21,), (15,)] if preconditioner == "shampoo" else [(6, 6), (5, 5)]
    assert [tuple(r.shape) for r in block["roots"]] == roots
    assert opt.metrics()["state_bytes"] == expected


@pytest.mark.parametrize("factor_dtype,ratio", [(torch.float32, 4), (torch.float64, 5)])
def test_classic_state_is_four_or_five_times_the_parameters(factor_dtype, ratio):
    """Packed factors (1x in float32, 2x in float64) and packed float32 roots (1x), the
    Adam graft and the momentum (1x each), for a square ``d x d`` block: the packed part
    ``ratio - 2`` grows by its diagonal, ``(1 + 1/d)``."""
    d = 32
    weight = torch.nn.Parameter(torch.randn(d, d))
    opt = Shampoo([weight], lr=0.01, block_size=d, factor_dtype=factor_dtype)
    weight.grad = torch.randn(d, d)
    opt.step()
    assert opt.metrics()["state_bytes"] / (4 * d * d) == pytest.approx(2 + (ratio - 2) * (1 + 1 / d))
