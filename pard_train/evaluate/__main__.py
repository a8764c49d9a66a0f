"""python -m pard_train.evaluate +evaluate=NAME [key=value ...] — acceptance length and speed of a draft with a target.

Examples: ``python -m pard_train.evaluate +evaluate=tiny`` (tiny random models on CPU, seconds);
``python -m pard_train.evaluate +evaluate=tiny_family`` (a family and K sweep: ``targets=[A,B]``, ``ks=[2,4,8]``,
``compare_thinking=true``; see pard_train/evaluate/sweep.py);
``python -m pard_train.evaluate target=meta-llama/Llama-3.1-8B-Instruct draft=exports/pard-llama-1b
ar_draft=meta-llama/Llama-3.2-1B-Instruct output_dir=runs/evaluate/llama``. Writes report.json, report.md and PNG
plots into ``output_dir`` (while measuring, report.partial.json holds the finished parts: see
pard_train/evaluate/partial.py); every key is documented in pard_train/evaluate/config.py.
"""

from __future__ import annotations

import json
from contextlib import contextmanager

import hydra
from omegaconf import DictConfig

from pard_train.base.errors import PardTrainError
from pard_train.evaluate.config import register_configs
from pard_train.run.cli import run_hydra, user_errors
from pard_train.run.logs import setup_logging

register_configs()


@hydra.main(config_path="../../configs", config_name="evaluate", version_base=None)
def main(cfg: DictConfig) -> None:
    setup_logging()  # first: the harness's imports bring DeepSpeed
    from pard_train.evaluate.config import is_sweep, to_config
    from pard_train.evaluate.engines import measure
    from pard_train.evaluate.partial import PartialReportWriter, partial_cell_writer
    from pard_train.evaluate.preflight import check_before_measuring
    from pard_train.evaluate.report import write_report
    from pard_train.evaluate.sweep import run_sweep
    from pard_train.evaluate.sweep_report import write_sweep_report

    with user_errors("pard_train.evaluate"):
        config = to_config(cfg)
        check_before_measuring(config)  # output_dir writable, tokenizers shared: before any measurement
        # The parts are written as they finish (report.partial.json; a sweep's cells/), so a crash keeps them.
        partial = PartialReportWriter(config.output_dir)
        with partial.pointed_at_on_failure():
            if is_sweep(config):
                report = run_sweep(config, on_cell=partial_cell_writer(config.output_dir))
            else:
                report = measure(config, on_progress=partial)
    with user_errors("pard_train.evaluate"), _report_kept(report):
        if is_sweep(config):
            out = write_sweep_report(report, config.output_dir)
            print((out / "report.md").read_text())
            extra = ", k_sweep.png" if "k_sweep" in report else ""
            print(f"wrote {out}/report.json, report.md, al_heatmap.png" + extra)
            return
        out = write_report(report, config.output_dir)
        partial.remove()
        print((out / "report.md").read_text())
        print(f"wrote {out}/report.json, report.md, acceptance_length.png, acceptance_by_position.png")


@contextmanager
def _report_kept(report):
    """A report that cannot be written (the disk filled up, the directory went away while measuring) is printed as
    JSON on stdout, so the measurement survives, and the failure is one line."""
    try:
        yield
    except OSError as error:
        data = report if isinstance(report, dict) else report.to_json()  # a sweep's is a dict
        print(json.dumps(data, indent=1, default=str))
        where = f" ({error.filename})" if error.filename else ""
        raise PardTrainError(
            f"could not write the report: {error.strerror or error}{where}; the measurement is printed above as JSON"
        ) from None


if __name__ == "__main__":
    run_hydra(main, "pard_train.evaluate")
