"""python -m pard_train +config=NAME [key=value ...] — train a PARD draft with a preset from configs/config/."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from pard_train.base.config import register_configs, to_config
from pard_train.run.cli import run_hydra, user_errors
from pard_train.run.logs import setup_logging
from pard_train.run.sweep_dirs import job_run_name

register_configs()


@hydra.main(config_path="../configs", config_name="train", version_base=None)
def main(cfg: DictConfig) -> None:
    setup_logging()  # first: the training stack imports DeepSpeed
    from pard_train.training.train import train

    with user_errors("pard_train"):
        config = to_config(cfg)
        config.run.name = job_run_name(config.run)
        train(config)


if __name__ == "__main__":
    run_hydra(main, "pard_train")
