"""The programs in examples/ run as the README shows them: 2 gloo CPU ranks under
torchrun with a checkpoint halfway, then resumed from it at 3 ranks (and, for FSDP2, in
one process without torchrun). Short runs: 40 steps, checkpoint at 20. Each rank must
end its process group's threads before it exits (tests/example_runner.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.launch import ROOT, torchrun

EXAMPLES = ROOT / "examples"
RUNNER = ROOT / "tests" / "example_runner.py"
STEPS = "40"
LINUX = os.path.isdir("/proc/self/task")


def _loss(run: subprocess.CompletedProcess) -> float:
    assert run.returncode == 0, run.stderr[-4000:]
    return float(re.search(r"after step 40: full-data loss (\S+?)[;\s]", run.stdout).group(1))


@pytest.mark.parametrize("script", ["ddp_train.py", "fsdp2_train.py"])
def test_example_checkpoints_at_two_ranks_and_resumes_at_three(tmp_path, script):
    checkpoint = str(tmp_path / "checkpoint")
    example = str(EXAMPLES / script)
    straight = torchrun(RUNNER, example, "--steps", STEPS, "--checkpoint", checkpoint)
    resumed = torchrun(RUNNER, example, "--steps", STEPS, "--resume", checkpoint, nproc=3)
    for run, ranks in ((straight, 2), (resumed, 3)):
        assert run.returncode == 0, run.stderr[-4000:]
        # A group that outlives it can hang a rank or abort it at exit (torch 2.13, gloo).
        if LINUX:  # the runner names threads from /proc
            assert run.stdout.count(
                "gloo threads left after destroy_process_group: 0") == ranks, run.stdout
    assert "saved the state after step 20" in straight.stdout
    assert "after step 20" in resumed.stdout.partition("resumed from")[2]
    # Another world size sums the gradients in another order: the same run to rounding.
    assert _loss(resumed) == pytest.approx(_loss(straight), rel=1e-4)
    if script == "ddp_train.py":
        assert "parameters identical on all 2 ranks: True" in straight.stdout
        assert "parameters identical on all 3 ranks: True" in resumed.stdout
    else:
        alone = subprocess.run([sys.executable, str(EXAMPLES / script), "--steps", STEPS,
                                "--resume", checkpoint], capture_output=True, text=True,
                               timeout=300, cwd=ROOT)
        assert _loss(alone) == pytest.approx(_loss(straight), rel=1e-4)
