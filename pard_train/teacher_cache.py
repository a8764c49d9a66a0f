"""python -m pard_train.teacher_cache +config=NAME [key=value ...] — build PARD-2's teacher cache for a training config.

Takes the training command's config and overrides (method.target, method.top_k, method.kd_temperature, data.*), packs
the same rows the trainer will, and computes the target's signals into ``<data.cache_dir>/teacher-<fingerprint>/``
(:mod:`pard_train.methods.teacher_cache_builder`). Data-parallel without a process group: under ``torchrun`` each rank
takes every WORLD_SIZE-th shard, in a SLURM array each task (SLURM_ARRAY_TASK_ID); rerunning resumes. Then train with
the same command plus ``method.teacher=cache``.
"""

from __future__ import annotations

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pard_train.cli import run_hydra, user_errors
from pard_train.config import register_configs, to_config
from pard_train.logs import setup_logging

register_configs()


def build_for_config(config, after_shard=None) -> tuple[Path, bool]:
    """Build (or finish) the teacher cache of a training config; return its directory and whether it is complete."""
    import torch

    from pard_train.attention import resolve_backend
    from pard_train.data import build_data
    from pard_train.data.documents import default_cache_dir
    from pard_train.errors import ConfigError
    from pard_train.methods.teacher_cache_builder import build, worker_from_environment
    from pard_train.model import load_causal_lm, load_tokenizer, prepare_model_files

    settings = config.method
    if settings.name.value != "pard2":
        raise ConfigError("method.name: the teacher cache is PARD-2's: add method=pard2 and method.target=ID|DIR")
    rank, world = worker_from_environment()
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    # Every worker (no process group to wait on): the files are written atomically, so a race only repeats work.
    prepare_model_files(config.model, config.data.train_files)
    tokenizer = load_tokenizer(config.model.draft_path, config.model.trust_remote_code)
    data = build_data(config.data, tokenizer, is_main=rank == 0)
    root = Path(config.data.cache_dir) if config.data.cache_dir else default_cache_dir()

    def load_target():
        backend = resolve_backend(config.model.attention, device)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # as the online teacher runs
        model = load_causal_lm(settings.target, backend, dtype=dtype).to(device).eval()
        return model, backend, device

    rows = {"train": data.train, "validation": data.validation}
    return build(rows, settings.target, settings, root, load_target, rank, world, after_shard)


@hydra.main(config_path="../configs", config_name="train", version_base=None)
def main(cfg: DictConfig) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # as the trainer: its loading bars would stand between the progress lines
    setup_logging()
    with user_errors("pard_train.teacher_cache"):
        build_for_config(to_config(cfg))


if __name__ == "__main__":
    run_hydra(main, "pard_train.teacher_cache")
