"""Lightning's ModelParallelStrategy (FSDP2: ``fully_shard`` in ``configure_model``) with
Shampoo, launched by torchrun on 2 gloo CPU ranks from tests/test_frameworks.py. Lightning
saves a distributed checkpoint (DCP, through ``get_optimizer_state_dict``) and resumes
from it through ``set_optimizer_state_dict``.

    torchrun --nproc_per_node=2 tests/frameworks/lightning_fsdp2.py OUT

Trains 2 epochs of 3 steps, checkpointing at the end of each, then a new Trainer resumes
from the first epoch's checkpoint; rank 0 writes both runs' final (full) parameters.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard
from rank_exit import end_rank  # the script's folder is on sys.path

from scalable_shampoo import Shampoo

OPTIONS = dict(lr=3e-3, block_size=8, precondition_frequency=2, start_preconditioning_step=2,
               root_delay=1, epsilon=1e-6, weight_decay=0.01)


class Regression(lightning.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(),
                                       torch.nn.Linear(12, 2))

    def configure_model(self) -> None:
        for layer in self.net:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=self.device_mesh["data_parallel"])
        fully_shard(self.net, mesh=self.device_mesh["data_parallel"])

    def training_step(self, batch: list[torch.Tensor], index: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Shampoo:
        return Shampoo(self.parameters(), **OPTIONS)


def data() -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 6, generator=gen), torch.randn(24, 2, generator=gen)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)


def fit(out: Path, ckpt_path: str | None = None) -> list[torch.Tensor]:
    module = Regression()
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1,
                                     process_group_backend="gloo")
    trainer = lightning.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_epochs=2,
        default_root_dir=str(out), logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[ModelCheckpoint(dirpath=str(out / "checkpoints"), save_top_k=-1,
                                   every_n_epochs=1, filename="{epoch}")])
    trainer.fit(module, train_dataloaders=data(), ckpt_path=ckpt_path)
    return [p.full_tensor().detach().clone() for p in module.parameters()]


def main(out: Path) -> None:
    torch.set_num_threads(1)
    straight = fit(out)
    resumed = fit(out, str(out / "checkpoints" / "epoch=0.ckpt"))
    if int(os.environ["RANK"]) == 0:
        torch.save({"straight": straight, "resumed": resumed}, out / "lightning_fsdp2.pt")
    end_rank()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
