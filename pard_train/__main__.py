"""python -m pard_train +config=NAME [key=value ...] — train a PARD draft with a preset from configs/config/."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from pard_train.config import ConfigError, register_configs, to_config

register_configs()


@hydra.main(config_path="../configs", config_name="train", version_base=None)
def main(cfg: DictConfig) -> None:
    from pard_train.data.dataset import DataError
    from pard_train.mask_token import MaskTokenError
    from pard_train.model import ModelNotFoundError
    from pard_train.train import train

    try:
        config = to_config(cfg)
        train(config)
    except (ConfigError, DataError, MaskTokenError, ModelNotFoundError) as error:
        print(f"pard_train: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
