"""Launching scripts on gloo CPU ranks with torchrun, for the tests that run whole
programs (tests/frameworks/, examples/)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def torchrun(script: Path, *args: str, nproc: int = 2,
             timeout_s: float = 300) -> subprocess.CompletedProcess:
    """Runs ``torchrun --nproc_per_node=nproc script *args`` from the repository root on a
    free port, one intra-op thread per rank, offline; returns the finished process with
    its output as text."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]), "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
         f"--master_port={port}", str(script), *args],
        env=env, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
