"""HF Trainer (transformers + accelerate) with Shampoo under FSDP2 (``fsdp_version: 2``),
launched by torchrun on 2 gloo CPU ranks from tests/test_frameworks.py: the tiny GPT-2 of
hf_trainer.py, wrapped per transformer block by accelerate's ``fully_shard``. Trainer
saves the optimizer on every rank through DCP's ``get_optimizer_state_dict``.

    torchrun --nproc_per_node=2 tests/frameworks/hf_fsdp2.py OUT

Trainer builds the optimizer on the unsharded model and accelerate then swaps its
parameters for the sharded ones. Trains 6 steps saving at 3 (``SHARDED_STATE_DICT``),
then a new Trainer resumes from checkpoint-3; rank 0 writes both runs' final (full)
parameters. (With ``FULL_STATE_DICT`` transformers' own model saving fails on DTensors
of tied weights, before the optimizer is saved.)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
import transformers
from hf_trainer import OPTIONS, Tokens, tiny_gpt2  # the script's folder is on sys.path
from rank_exit import end_rank

from scalable_shampoo import Shampoo


def _fsdp_on_cpu() -> None:
    """accelerate turns FSDP on for accelerators only (on the CPU it ignores the FSDP
    config and runs DDP): this process's AcceleratorState turns it on for the CPU too."""
    import accelerate.state as state

    init = state.AcceleratorState.__init__

    def patched(self: Any, *args: Any, fsdp_plugin: Any = None, **kwargs: Any) -> None:
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == state.DistributedType.MULTI_CPU:
            self.distributed_type = state.DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    state.AcceleratorState.__init__ = patched


def trainer(out: Path) -> transformers.Trainer:
    args = transformers.TrainingArguments(
        output_dir=str(out / "fsdp2"), max_steps=6, save_steps=3,
        per_device_train_batch_size=4, learning_rate=OPTIONS["lr"],
        lr_scheduler_type="constant", use_cpu=True, ddp_backend="gloo", report_to=[],
        logging_steps=100, seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True,
        fsdp="full_shard", fsdp_config={
            "fsdp_version": 2, "reshard_after_forward": True,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": ["GPT2Block"],
            "state_dict_type": "SHARDED_STATE_DICT"})
    kwargs = {k: v for k, v in OPTIONS.items() if k != "lr"}
    return transformers.Trainer(model=tiny_gpt2(), args=args, train_dataset=Tokens(),
                                optimizer_cls_and_kwargs=(Shampoo, kwargs))


def full(model: torch.nn.Module) -> list[torch.Tensor]:
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for p in model.parameters()]


def main(out: Path) -> None:
    torch.set_num_threads(1)
    _fsdp_on_cpu()
    first = trainer(out)
    first.train()
    straight = full(first.model)
    sharded = sum(hasattr(p, "full_tensor") for p in first.model.parameters())
    resumed = trainer(out)
    resumed.train(resume_from_checkpoint=str(out / "fsdp2" / "checkpoint-3"))
    again = full(resumed.model)
    if int(os.environ["RANK"]) == 0:
        torch.save({"straight": straight, "resumed": again, "sharded": sharded},
                   out / "hf_fsdp2.pt")
    end_rank()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
