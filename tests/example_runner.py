"""Runs an example as ``__main__`` (``python tests/example_runner.py SCRIPT ARGS...``, under
torchrun) and prints, each time the example calls ``destroy_process_group()``, how many
of gloo's threads still run after it: none, when nothing else held the group. With torch
2.13 a group that outlives that call can hang the rank or abort it at interpreter exit,
but only now and then; its threads outliving the call show the cause every time."""

from __future__ import annotations

import os
import runpy
import sys

import torch.distributed as dist


def gloo_threads() -> int | None:
    """The threads of this process that gloo started, by their Linux names (None
    elsewhere)."""
    if not os.path.isdir("/proc/self/task"):
        return None
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as comm:
                names.append(comm.read().strip())
        except OSError:  # ended since listed
            pass
    return sum(name.startswith(("gloo", "pt_gloo")) for name in names)


def _reporting(destroy):
    def destroy_process_group(*args, **kwargs):
        destroy(*args, **kwargs)
        print(f"gloo threads left after destroy_process_group: {gloo_threads()}", flush=True)
    return destroy_process_group


if __name__ == "__main__":
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    dist.destroy_process_group = _reporting(dist.destroy_process_group)
    runpy.run_path(script, run_name="__main__")
