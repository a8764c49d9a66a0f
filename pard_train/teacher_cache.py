"""python -m pard_train.teacher_cache +config=NAME [key=value ...] — build PARD-2's teacher cache for a training config.

Takes the training command's config and overrides (method.target, method.top_k, method.kd_temperature, data.*), packs
the same rows the trainer will, and computes the target's signals into ``<data.cache_dir>/teacher-<fingerprint>/``
(:mod:`pard_train.methods.teacher_cache_builder`). Data-parallel without a process group: under ``torchrun`` each rank
takes every WORLD_SIZE-th shard, in a SLURM array each task (SLURM_ARRAY_TASK_ID); rerunning resumes. Then train with
the same command plus ``method.teacher=cache``.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from pard_train.base.config import register_configs, to_config
from pard_train.methods.teacher_cache_builder import build_for_config
from pard_train.run.cli import run_hydra, user_errors
from pard_train.run.logs import setup_logging

register_configs()


@hydra.main(config_path="../configs", config_name="train", version_base=None)
def main(cfg: DictConfig) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # as the trainer: its loading bars would stand between the progress lines
    setup_logging()
    with user_errors("pard_train.teacher_cache"):
        build_for_config(to_config(cfg))  # pard_train.methods.teacher_cache_builder


if __name__ == "__main__":
    run_hydra(main, "pard_train.teacher_cache")
