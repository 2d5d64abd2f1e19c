"""Shampoo on an FSDP2-sharded model (``fully_shard``) on CPU processes (gloo).

    torchrun --nproc_per_node=2 examples/fsdp2_train.py [--steps 300] [--checkpoint DIR]
    torchrun --nproc_per_node=3 examples/fsdp2_train.py --resume DIR
    python examples/fsdp2_train.py --resume DIR            # one process, unsharded

``fully_shard`` makes every parameter a DTensor sharded along dimension 0: each rank
holds its rows of the parameters, gradients and (in FSDP's hands) nothing more. Shampoo
works on the blocks of the full parameters (lossless: the trajectory is one process's,
to rounding): per step each rank sends the owner of each block (its state lives on that
rank only) the elements of that block in its rows, the owners compute the blocks'
directions, and each rank gets back the update of its rows and adds it to its shard; no
rank holds a full parameter. At the end each rank prints its share of the state and
rank 0 the full-data loss.

``--checkpoint DIR`` saves model and optimizer with ``torch.distributed.checkpoint``
halfway through; ``--resume DIR`` continues from it at any number of processes,
including one without ``torchrun`` (then the model is not sharded).
"""

from __future__ import annotations

import argparse
import gc
import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from scalable_shampoo import Shampoo
from scalable_shampoo.distributed import load_checkpoint, save_checkpoint
from scalable_shampoo.quickstart import make_model, make_problem

BATCH = 120  # divisible by 1 to 6 ranks: every rank's share weighs equally


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--checkpoint", help="save model and optimizer here halfway")
    parser.add_argument("--resume", help="continue from a checkpoint saved by --checkpoint")
    args = parser.parse_args()

    sharded = "RANK" in os.environ  # under torchrun
    if sharded:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if sharded else 0
    world_size = dist.get_world_size() if sharded else 1
    inputs, targets = make_problem(seed=0)
    model = make_model(seed=1)
    if sharded:
        shard(model)
    # Built after fully_shard: the optimizer must see the sharded (DTensor) parameters.
    optimizer = Shampoo(model.parameters(), lr=3e-2, block_size=32, precondition_frequency=10)
    if args.resume:
        load_checkpoint(args.resume, optimizer, model=model)
    start = optimizer.metrics()["step"]
    if args.resume and rank == 0:
        print(f"resumed from {args.resume} after step {start}")

    for step in range(start, args.steps):
        # The same global mini-batch on every rank; each takes its share.
        batch = torch.randint(len(inputs), (BATCH,), generator=torch.Generator().manual_seed(step))
        share = batch.chunk(world_size)[rank]
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(inputs[share]), targets[share]).backward()
        optimizer.step()
        if args.checkpoint and step + 1 == args.steps // 2:
            save_checkpoint(args.checkpoint, optimizer, model=model)
            if rank == 0:
                print(f"saved the state after step {step + 1} to {args.checkpoint}")

    metrics = optimizer.metrics()
    print(f"rank {rank}/{world_size}: {metrics['owned_blocks']} of {metrics['num_blocks']} "
          f"blocks, {metrics['state_bytes']} state bytes, {metrics['root_seconds']:.3f} s "
          "in roots", flush=True)
    with torch.no_grad():
        loss = torch.nn.functional.mse_loss(model(inputs), targets).item()
    if rank == 0:
        print(f"after step {args.steps}: full-data loss {loss:.4e}")
    if sharded:
        del model, optimizer
        end_process_group()


def shard(model: torch.nn.Module) -> None:
    """Each Linear its own FSDP unit, then the root. (A function of its own: a loop
    variable left in main() would keep a layer, and with it the process group, alive.)"""
    for layer in model.modules():
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)


def end_process_group() -> None:
    """Destroys the process group once nothing else holds it, so that its gloo threads
    end here. Left alive to interpreter exit, with torch 2.13 a rank can abort there
    ("terminate called without an active exception")."""
    # DTensor's sharding-propagation cache keeps the device mesh, and with it the group,
    # alive (a private helper clears it; skipped where a torch lacks it); fully_shard's
    # modules hold the group in reference cycles until collected.
    try:
        from torch.distributed.tensor.debug import _clear_sharding_prop_cache
    except ImportError:
        pass
    else:
        _clear_sharding_prop_cache()
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
