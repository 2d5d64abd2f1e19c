"""How the torchrun scripts in this folder end: every rank tears the gloo group down in
order, then leaves without interpreter finalization.

Left to a normal exit, rank 1 of hf_fsdp2.py aborted in 3 runs of 40 ("terminate called
without an active exception", after its results were written), and CI saw the same in
hf_trainer.py's replica mode. A core dump showed the cause, in torch rather than in the
code under test: gloo's worker thread released a finished collective's tensors after the
main thread had begun finalizing; releasing a tensor that has a Python object takes the
GIL, a finalizing interpreter answers by ending that thread, and the unwinding crosses a
``noexcept`` destructor, hence ``std::terminate``.
"""

from __future__ import annotations

import os
import sys

import torch.distributed as dist


def end_rank() -> None:
    """Waits for every rank, destroys the process group and exits with status 0. Called
    last, once the script's results are written: a failure before it still exits non-zero."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
