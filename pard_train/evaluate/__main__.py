"""python -m pard_train.evaluate +evaluate=NAME [key=value ...] — acceptance length and speed of a draft with a target.

Examples: ``python -m pard_train.evaluate +evaluate=tiny`` (tiny random models on CPU, seconds);
``python -m pard_train.evaluate target=meta-llama/Llama-3.1-8B-Instruct draft=exports/pard-llama-1b
ar_draft=meta-llama/Llama-3.2-1B-Instruct output_dir=runs/evaluate/llama``. Writes report.json, report.md and PNG
plots into ``output_dir``; every key is documented in pard_train/evaluate/config.py.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from pard_train.cli import run_hydra, user_errors
from pard_train.evaluate.config import register_configs

register_configs()


@hydra.main(config_path="../../configs", config_name="evaluate", version_base=None)
def main(cfg: DictConfig) -> None:
    from pard_train.evaluate.config import to_config
    from pard_train.evaluate.report import write_report
    from pard_train.evaluate.runner import evaluate

    with user_errors("pard_train.evaluate"):
        config = to_config(cfg)
        report = evaluate(config)
    out = write_report(report, config.output_dir)
    print((out / "report.md").read_text())
    print(f"wrote {out}/report.json, report.md, acceptance_length.png, acceptance_by_position.png")


if __name__ == "__main__":
    run_hydra(main, "pard_train.evaluate")
