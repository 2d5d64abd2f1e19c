"""Real frameworks' checkpoints of Shampoo under DDP, each launched with torchrun on 2
gloo CPU ranks (tests/frameworks/): HF Trainer (transformers + accelerate) and
Lightning's DDPStrategy, saved at 2 ranks and resumed at 2, continuing bit for bit; HF
Trainer's rank-0-only saving of a sharded Shampoo fails at save time with the fix;
Lightning's ModelParallelStrategy (FSDP2) saves a distributed checkpoint and resumes it.
Skipped where the frameworks are not installed (``pip install -e ".[dev]"`` has them)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from tests.launch import ROOT, torchrun

FRAMEWORKS = ROOT / "tests" / "frameworks"


def _torchrun(script: str, *args: str) -> subprocess.CompletedProcess:
    return torchrun(FRAMEWORKS / script, *args)


def _same(path: Path) -> bool:
    result = torch.load(path, weights_only=True)
    return len(result["straight"]) > 0 and all(
        torch.equal(a, b) for a, b in zip(result["straight"], result["resumed"]))


def test_hf_trainer_replica_resumes_bitwise_and_sharded_fails_at_save(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    run = _torchrun("hf_trainer.py", str(tmp_path), "replica")
    assert run.returncode == 0, run.stderr[-4000:]
    assert _same(tmp_path / "hf_replica.pt")
    _torchrun("hf_trainer.py", str(tmp_path), "sharded")  # ends the job from rank 0
    message = (tmp_path / "sharded_error.txt").read_text()
    assert "every rank must call it, but only 1 did" in message
    assert "Shampoo(..., distributed=False)" in message


def test_lightning_ddp_checkpoint_resumes_bitwise(tmp_path):
    pytest.importorskip("lightning")
    run = _torchrun("lightning_ddp.py", str(tmp_path))
    assert run.returncode == 0, run.stderr[-4000:]
    assert _same(tmp_path / "lightning.pt")


def test_lightning_fsdp2_checkpoint_resumes_bitwise(tmp_path):
    """ModelParallelStrategy with ``fully_shard`` in ``configure_model``: Lightning's
    distributed checkpoint (DCP through ``get_optimizer_state_dict``) resumes exactly."""
    pytest.importorskip("lightning")
    run = _torchrun("lightning_fsdp2.py", str(tmp_path))
    assert run.returncode == 0, run.stderr[-4000:]
    assert _same(tmp_path / "lightning_fsdp2.pt")


def test_hf_trainer_fsdp2_checkpoint_resumes_bitwise(tmp_path):
    """HF Trainer with ``fsdp_version: 2`` (accelerate swaps the optimizer's parameters
    for the sharded ones after building it; FSDP turned on for the CPU in the script):
    the DCP checkpoint resumes exactly."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    run = _torchrun("hf_fsdp2.py", str(tmp_path))
    assert run.returncode == 0, run.stderr[-4000:]
    result = torch.load(tmp_path / "hf_fsdp2.pt", weights_only=True)
    assert result["sharded"] > 0 and _same(tmp_path / "hf_fsdp2.pt")
