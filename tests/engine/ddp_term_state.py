"""Run under torchrun by test_distributed: train a config and save this rank's term state and student weights.

usage: torchrun --nproc_per_node 2 ddp_term_state.py OUT_DIR CONFIG [key=value ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from distkd.api import _device
from distkd.config import load_config
from distkd.engine import distributed
from distkd.engine.trainer import Trainer, seed_everything
from distkd.tasks import get_task


def main(out: Path, config: str, overrides: list[str]) -> None:
    cfg = load_config(config, overrides)
    device = _device(cfg.train)
    seed_everything(cfg.seed + distributed.rank())  # as distkd.api.train: every rank starts differently
    trainer = Trainer(cfg, get_task(cfg.task).build(cfg, device), device, cfg.run_dir)
    initial = {k: v.clone() for k, v in trainer.distiller.term_state_dict().items()}
    trainer.fit()
    torch.save({"initial": initial, "terms": trainer.distiller.term_state_dict(),
                "model": trainer.student.state_dict()}, out / f"rank{distributed.rank()}.pt")
    distributed.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3:])
