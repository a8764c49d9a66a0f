"""Which engine decodes (``engine=hf|vllm|both``): the harness, vLLM, or each on the same token ids with the parity
section that compares them (:mod:`.parity`)."""

from __future__ import annotations

from pard_train.evaluate.config import Engine, EvalConfig
from pard_train.evaluate.eval_report import EvalReport
from pard_train.evaluate.parity import parity
from pard_train.evaluate.runner import evaluate
from pard_train.evaluate.vllm_eval import evaluate_vllm


def measure(config: EvalConfig, on_progress=None, vllm_config: EvalConfig | None = None) -> EvalReport:
    """The report of ``python -m pard_train.evaluate`` (not a sweep): the harness's, vLLM's (``engine: vllm``), or
    with ``engine=both`` the harness's holding vLLM's report (``vllm``) and the ``parity`` section. ``vllm_config``:
    vLLM's settings when they differ from the harness's (other modes or repeats; the prompts must be the same)."""
    if config.engine == Engine.vllm:
        return evaluate_vllm(config, on_progress)
    report = evaluate(config, on_progress=on_progress)
    if config.engine == Engine.both:
        served = evaluate_vllm(vllm_config or config)
        report.vllm, report.parity = served.to_json(), parity(report, served)
    return report
