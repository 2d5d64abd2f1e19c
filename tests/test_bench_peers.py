"""Peers in the comparison: the real adapters where the peers extra is installed, the
plumbing with fake peer modules, the missing-package path and the command line."""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
import types

import pytest
import torch

from scalable_shampoo.bench import peers
from scalable_shampoo.bench.optimizers import (
    ALL_KINDS, COMPARISON_DEFAULTS, LR_CENTERS, OptimizerSpecError, lr_center, parse_spec,
    split_available, state_bytes, validate)
from scalable_shampoo.bench.peers import PEERS
from scalable_shampoo.cli import build_parser, main
from tests.bench_helpers import one_thread  # noqa: F401  (autouse fixture)

TOY = "tests.bench_helpers:build"


def _installed(kind: str) -> bool:
    return peers.unavailable(kind) is None


def _train(optimizer_for, steps: int = 6):
    """A few steps of a tiny least-squares model on fresh random batches: the model, its
    initial parameters, the losses and the optimizer."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    initial = [p.detach().clone() for p in model.parameters()]
    teacher = torch.randn(6, 2)
    optimizer = optimizer_for(model.parameters())
    losses = []
    for _ in range(steps):
        inputs = torch.randn(32, 6)
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(inputs), inputs @ teacher)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return model, initial, losses, optimizer


def _setting(optimizer, key):
    """A constructor argument as the peer keeps it: in the param group, as an attribute
    (pytorch-optimizer's ScalableShampoo), or for heavyball's SOAP the refresh interval
    as a probability per step."""
    group = optimizer.param_groups[0]
    if key in group:
        return group[key]
    if key == "precondition_frequency" and hasattr(optimizer, "precond_schedule"):
        return 1 / optimizer.precond_schedule
    return getattr(optimizer, key)


# ------------------------------------------------------------ the real peers (extra)
@pytest.mark.parametrize("kind", list(PEERS))
def test_peer_builds_with_the_shared_settings_and_trains(kind):
    if not _installed(kind):
        pytest.skip(f"{PEERS[kind].package} is not installed (the peers extra)")
    spec = parse_spec(kind)
    validate(spec)
    model, before, losses, optimizer = _train(lambda params: spec.build(params, lr=3e-3))
    group = optimizer.param_groups[0]
    assert group["lr"] == 3e-3
    for key, value in PEERS[kind].settings.items():
        assert _setting(optimizer, key) == value, key
    after = list(model.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert all(not torch.equal(a, b) for a, b in zip(before, after))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert state_bytes(optimizer) > sum(p.numel() * 4 for p in after)  # moments at least


@pytest.mark.parametrize("kind", ["heavyball-soap", "heavyball-psgdkron"])
def test_heavyball_peers_run_eagerly_and_restore_its_compile_mode(kind, monkeypatch):
    if not _installed(kind):
        pytest.skip("heavyball is not installed (the peers extra)")
    import heavyball.utils

    def no_compile(*args, **kwargs):
        raise AssertionError("heavyball compiled a function")

    monkeypatch.setattr(heavyball.utils.fusions, "compile", no_compile)
    monkeypatch.setattr(heavyball.utils, "compile_mode", "max-autotune-no-cudagraphs")
    _, _, losses, _ = _train(lambda params: parse_spec(kind).build(params, lr=1e-3), steps=3)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert heavyball.utils.compile_mode == "max-autotune-no-cudagraphs"


def test_importing_the_peers_changes_no_torch_setting():
    if not all(_installed(kind) for kind in PEERS):
        pytest.skip("the peers extra is not installed")
    script = """
import json, torch, torch._dynamo.config as dynamo, torch._inductor.config as inductor
def settings():
    return json.dumps([torch.get_float32_matmul_precision(),
                       torch.are_deterministic_algorithms_enabled(),
                       torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
                       torch.backends.opt_einsum.enabled, torch.backends.opt_einsum.strategy,
                       torch.get_default_dtype().__repr__(), torch.get_num_threads(),
                       repr(sorted(dynamo.get_config_copy().items())),
                       repr(sorted(inductor.get_config_copy().items()))])
before = settings()
import heavyball, pytorch_optimizer
print(json.dumps(before == settings()))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=True, timeout=120)
    assert json.loads(result.stdout.strip().splitlines()[-1]) is True


# ------------------------------------------------- the plumbing, with fake peer modules
class _FakeSOAP(torch.optim.Adam):
    """Stands in for pytorch-optimizer's SOAP: its named arguments, and a ``**kwargs``
    that ignores unknown keywords (as the real one does)."""

    def __init__(self, params, lr=0.5, betas=(0.1, 0.2), precondition_frequency=99,
                 weight_decay=0.7, eps=1e-8, **kwargs):
        super().__init__(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
        self.param_groups[0]["precondition_frequency"] = precondition_frequency


@pytest.fixture
def fake_pto(monkeypatch):
    module = types.ModuleType("pytorch_optimizer")
    module.SOAP = _FakeSOAP
    monkeypatch.setitem(sys.modules, "pytorch_optimizer", module)
    return module


@pytest.fixture
def fake_heavyball(monkeypatch):
    """A heavyball whose step records the compile mode it sees."""
    utils = types.ModuleType("heavyball.utils")
    utils.compile_mode = "max-autotune-no-cudagraphs"
    seen = []

    class PSGDKron(torch.optim.SGD):
        def __init__(self, params, lr=0.5, betas=(0.9, 0.999), weight_decay=0.0, **kwargs):
            seen.append(("init", utils.compile_mode))
            super().__init__(params, lr=lr, weight_decay=weight_decay)

        def step(self, closure=None):
            seen.append(("step", utils.compile_mode))
            return super().step(closure)

    module = types.ModuleType("heavyball")
    module.utils, module.PSGDKron = utils, PSGDKron
    monkeypatch.setitem(sys.modules, "heavyball", module)
    monkeypatch.setitem(sys.modules, "heavyball.utils", utils)
    return utils, seen


def test_a_peer_gets_its_defaults_and_the_shared_settings(fake_pto):
    spec = parse_spec("pto-soap:eps=1e-6")
    assert spec.kwargs == {**PEERS["pto-soap"].settings, "eps": 1e-6}
    assert spec.kwargs == {"betas": (0.95, 0.95), "precondition_frequency": 10,
                           "weight_decay": 0.0, "eps": 1e-6}
    optimizer = spec.build([torch.nn.Parameter(torch.randn(4, 3))], lr=2e-3)
    group = optimizer.param_groups[0]
    assert isinstance(optimizer, _FakeSOAP)
    assert (group["lr"], group["betas"], group["precondition_frequency"],
            group["weight_decay"], group["eps"]) == (2e-3, (0.95, 0.95), 10, 0.0, 1e-6)
    assert spec.describe()["precondition_frequency"] == "10"


def test_validate_rejects_an_argument_that_a_peer_would_ignore(fake_pto):
    with pytest.raises(OptimizerSpecError,
                       match=r"unknown argument\(s\) blocksize; pto-soap accepts betas, eps, "
                             r"precondition_frequency, weight_decay"):
        validate(parse_spec("pto-soap:blocksize=3"))


def test_heavyball_peers_construct_and_step_with_compile_mode_none(fake_heavyball):
    utils, seen = fake_heavyball
    optimizer = parse_spec("heavyball-psgdkron").build(
        [torch.nn.Parameter(torch.randn(3, 2))], lr=0.1)
    optimizer.param_groups[0]["params"][0].grad = torch.randn(3, 2)
    optimizer.step()
    optimizer.step()
    assert seen == [("init", None), ("step", None), ("step", None)]
    assert utils.compile_mode == "max-autotune-no-cudagraphs"  # restored after each call
    assert type(optimizer).__name__ == "PSGDKron"
    assert {"betas", "weight_decay"} <= set(
        inspect.signature(type(optimizer)).parameters)


def test_compile_mode_is_restored_when_a_step_raises(fake_heavyball):
    utils, _ = fake_heavyball
    optimizer = parse_spec("heavyball-psgdkron").build(
        [torch.nn.Parameter(torch.randn(3))], lr=0.1)
    with pytest.raises(RuntimeError, match="closure failed"):
        optimizer.step(lambda: (_ for _ in ()).throw(RuntimeError("closure failed")))
    assert utils.compile_mode == "max-autotune-no-cudagraphs"


@pytest.mark.parametrize("kind, centers, expected", [
    ("pto-scalable-shampoo", {"sgd": 0.1, "adamw": 3e-3}, 0.1),
    ("pto-scalable-shampoo", {}, LR_CENTERS["sgd"]),
    ("heavyball-psgdkron", {"adamw": 3e-3}, 3e-3),
    ("heavyball-soap", {"adamw": 3e-3}, LR_CENTERS["rotated_adam"]),
    ("pto-soap", {"rotated_adam": 1e-2, "soap": 1e-4}, 1e-2),
    ("shampoo", {"shampoo": 1e-2}, 1e-2),
])
def test_lr_center_of_a_peer_is_that_of_its_counterpart(kind, centers, expected):
    assert lr_center(kind, centers) == expected


def test_every_peer_has_comparison_defaults_and_a_known_lr_center():
    for kind, peer in PEERS.items():
        assert kind in ALL_KINDS and COMPARISON_DEFAULTS[kind] == peer.settings
        assert peer.lr_center in LR_CENTERS and peer.summary


# ---------------------------------------------------------------- missing packages
def test_a_missing_package_is_named_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "heavyball", None)  # import raises ModuleNotFoundError
    torch_version = torch.__version__.split("+")[0]
    message = peers.unavailable("heavyball-soap")
    assert message == (f"optimizer 'heavyball-soap' needs heavyball, which is not installed; "
                       f"it is part of the peers extra: pip install 'scalable-shampoo[peers]' "
                       f"torch=={torch_version} (in a checkout: pip install -e \".[peers]\" "
                       f"torch=={torch_version})")
    with pytest.raises(peers.PeerUnavailable, match="not installed"):
        parse_spec("heavyball-soap").build([torch.nn.Parameter(torch.randn(2))], lr=1e-3)


def test_a_broken_package_is_reported_with_its_error(monkeypatch):
    def broken(name, *args):
        raise ImportError("needs a newer torch")

    monkeypatch.setattr(peers.importlib, "import_module", broken)
    assert "pytorch-optimizer, which failed to import (ImportError: needs a newer torch)" \
        in peers.unavailable("pto-soap")


def test_split_available_keeps_the_rest_in_order(monkeypatch, fake_pto):
    monkeypatch.setitem(sys.modules, "heavyball", None)
    specs = [parse_spec(t) for t in ("heavyball-soap:lr=1e-3", "adamw", "pto-soap", "sgd")]
    kept, skipped = split_available(specs)
    assert [s.label for s in kept] == ["adamw", "pto-soap", "sgd"]
    assert len(skipped) == 1 and skipped[0].startswith(
        "skipping 'heavyball-soap:lr=1e-3': optimizer 'heavyball-soap' needs heavyball")


def test_compare_skips_a_missing_peer_and_runs_the_rest(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "heavyball", None)
    assert main(["compare", "--workload", TOY, "--optimizers", "adamw", "heavyball-psgdkron",
                 "sgd", "--lr", "0.01", "--steps", "2", "--no-progress",
                 "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if "heavyball" in line]
    assert len(warnings) == 1 and "skipping 'heavyball-psgdkron'" in warnings[0]
    assert 'pip install -e ".[peers]" torch==' in warnings[0]
    results = json.loads((tmp_path / "results.json").read_text())
    assert [o["label"] for o in results["workloads"][0]["optimizers"]] == ["adamw", "sgd"]


@pytest.mark.parametrize("extra, message", [
    ([], r"no optimizer left to compare: skipping 'heavyball-soap'"),
    (["adamw", "--baseline", "heavyball-soap"],
     r"the baseline 'heavyball-soap' is skipped: its package is missing"),
])
def test_compare_exits_2_when_nothing_or_the_baseline_is_skipped(extra, message, tmp_path,
                                                                  capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "heavyball", None)
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--workload", TOY, "--optimizers", "heavyball-soap", *extra,
              "--steps", "2", "--no-progress", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "results.json").exists()


# ----------------------------------------------------------------- the command line
def test_peer_names_parse_on_the_command_line_and_are_listed_in_help():
    parser = build_parser()
    args = parser.parse_args(["compare", "--optimizers", *PEERS, "heavyball-soap:lr=1e-3"])
    specs = [parse_spec(text) for text in args.optimizers]
    assert [s.kind for s in specs] == [*PEERS, "heavyball-soap"]
    assert specs[-1].fixed_lr == 1e-3
    assert re.fullmatch(r"heavyball-soap_lr=1e-3-[0-9a-f]{8}", specs[-1].slug)
    help_text = " ".join(args.subparser.format_help().split())
    for kind in PEERS:
        assert kind in help_text
    assert 'pip install -e ".[peers]" torch==' in help_text.replace("- e", "-e")


def test_an_unknown_name_lists_the_peers():
    with pytest.raises(OptimizerSpecError, match=r"known: shampoo, soap, adamw, adagrad, sgd, "
                                                 r"pto-soap, pto-scalable-shampoo, "
                                                 r"heavyball-soap, heavyball-psgdkron"):
        parse_spec("heavyball-adamw")
