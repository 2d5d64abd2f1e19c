"""Data-parallel Shampoo with DistributedDataParallel on CPU processes (gloo).

    torchrun --nproc_per_node=2 examples/ddp_train.py [--steps 300] [--checkpoint DIR]
    torchrun --nproc_per_node=3 examples/ddp_train.py --resume DIR

Every rank trains the quickstart's MLP (``scalable_shampoo.quickstart``) on its share of
each mini-batch; DDP averages the gradients. Shampoo, built after the process group,
shares its preconditioner work: each rank keeps the statistics, roots, grafting and
momentum state of its own blocks only, and the ranks all-gather the update directions
so that every rank applies the same update. At the end each rank prints its share of
the work and rank 0 checks that the parameters are bit-identical on every rank.

``--checkpoint DIR`` saves model and optimizer with ``torch.distributed.checkpoint``
halfway through; ``--resume DIR`` continues from such a checkpoint, at any number of
processes (run it with another ``--nproc_per_node``).
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from scalable_shampoo import Shampoo
from scalable_shampoo.distributed import load_checkpoint, save_checkpoint
from scalable_shampoo.quickstart import make_model, make_problem

BATCH = 120  # divisible by 1 to 6 ranks: every rank's share weighs equally in DDP's mean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--checkpoint", help="save model and optimizer here halfway")
    parser.add_argument("--resume", help="continue from a checkpoint saved by --checkpoint")
    args = parser.parse_args()

    dist.init_process_group("gloo")  # torchrun provides rank, world size and address
    rank, world_size = dist.get_rank(), dist.get_world_size()
    inputs, targets = make_problem(seed=0)
    model = make_model(seed=1)
    optimizer = Shampoo(model.parameters(), lr=3e-2, block_size=32, precondition_frequency=10)
    ddp_model = DistributedDataParallel(model)
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
        torch.nn.functional.mse_loss(ddp_model(inputs[share]), targets[share]).backward()
        optimizer.step()
        if args.checkpoint and step + 1 == args.steps // 2:
            save_checkpoint(args.checkpoint, optimizer, model=model)
            if rank == 0:
                print(f"saved the state after step {step + 1} to {args.checkpoint}")

    metrics = optimizer.metrics()
    print(f"rank {rank}/{world_size}: {metrics['owned_blocks']} of {metrics['num_blocks']} "
          f"blocks, {metrics['state_bytes']} state bytes, {metrics['root_seconds']:.3f} s "
          "in roots", flush=True)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    everyone = [torch.empty_like(flat) for _ in range(world_size)]
    dist.all_gather(everyone, flat)
    if rank == 0:
        with torch.no_grad():
            loss = torch.nn.functional.mse_loss(model(inputs), targets).item()
        identical = all(torch.equal(flat, other) for other in everyone)
        print(f"after step {args.steps}: full-data loss {loss:.4e}; parameters identical on "
              f"all {world_size} ranks: {identical}")
    # DDP's reducer holds the process group from C++; let it go before the group is
    # destroyed. Freed after it, with torch 2.13 and gloo, it can hang the rank at exit.
    del ddp_model
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
