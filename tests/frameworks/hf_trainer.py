"""HF Trainer (transformers + accelerate) with Shampoo under DDP, launched by torchrun on
2 gloo CPU ranks from tests/test_frameworks.py: a tiny randomly initialized GPT-2 built
from a config (no downloads).

    torchrun --nproc_per_node=2 tests/frameworks/hf_trainer.py OUT MODE

MODE "replica": ``Trainer(optimizers=(Shampoo(..., distributed=False), None))``, the
documented fix for Trainer's rank-0-only saving: trains 6 steps saving at 3, then a new
Trainer resumes from checkpoint-3; rank 0 writes both runs' final parameters.
MODE "sharded": ``optimizer_cls_and_kwargs=(Shampoo, ...)`` with the default sharded
state: the save at step 3 must fail on rank 0, in ``state_dict()``, with the fix; rank 0
writes the error message.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import transformers
from rank_exit import end_rank  # the script's folder is on sys.path

from scalable_shampoo import Shampoo, distributed_state

OPTIONS = dict(lr=3e-3, block_size=16, precondition_frequency=2, start_preconditioning_step=2,
               epsilon=1e-6, weight_decay=0.01)


def tiny_gpt2() -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1,
                                     n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


class Tokens(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.ids = torch.randint(0, 64, (48, 16), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def trainer(out: Path, mode: str) -> transformers.Trainer:
    args = transformers.TrainingArguments(
        output_dir=str(out / mode), max_steps=6, save_steps=3, per_device_train_batch_size=4,
        learning_rate=OPTIONS["lr"], lr_scheduler_type="constant", use_cpu=True,
        ddp_backend="gloo", report_to=[], logging_steps=100, seed=0, data_seed=0,
        dataloader_num_workers=0, disable_tqdm=True)
    model = tiny_gpt2()
    if mode == "replica":
        optimizer = Shampoo(model.parameters(), **OPTIONS, distributed=False)
        return transformers.Trainer(model=model, args=args, train_dataset=Tokens(),
                                    optimizers=(optimizer, None))
    kwargs = {k: v for k, v in OPTIONS.items() if k != "lr"}
    return transformers.Trainer(model=model, args=args, train_dataset=Tokens(),
                                optimizer_cls_and_kwargs=(Shampoo, kwargs))


def main(out: Path, mode: str) -> None:
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    if mode == "sharded":
        distributed_state.TIMEOUT_S = 5.0
        try:
            trainer(out, mode).train()
        except RuntimeError as error:
            if rank == 0:
                (out / "sharded_error.txt").write_text(str(error))
            os._exit(0)  # the other rank waits in the next step's all-reduce: end the job
        return
    first = trainer(out, mode)
    first.train()
    straight = [p.detach().clone() for p in first.model.parameters()]
    resumed = trainer(out, mode)
    resumed.train(resume_from_checkpoint=str(out / mode / "checkpoint-3"))
    if rank == 0:
        torch.save({"straight": straight,
                    "resumed": [p.detach().clone() for p in resumed.model.parameters()]},
                   out / "hf_replica.pt")
    end_rank()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
