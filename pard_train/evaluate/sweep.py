"""Family, K and thinking sweeps: one draft against several targets, several K, thinking off and on — one report.

python -m pard_train.evaluate draft=DRAFT targets=[A,B] ks=[2,4,8] compare_thinking=true [key=value ...]

Every cell (target x K x thinking) is an ordinary evaluation (:func:`pard_train.evaluate.runner.evaluate`); the sweep
adds the AL matrix (targets x benchmarks), per-position acceptance per target, thinking off/on side by side, and for
a K sweep the expected speed-up per K from forward times measured at the shapes each K runs, and the recommended K.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace

from pard_train.evaluate.config import EvalConfig
from pard_train.evaluate.eval_report import EvalReport
from pard_train.evaluate.forward_timing import forward_seconds
from pard_train.evaluate.session import EvalSession
from pard_train.evaluate.sweep_report import pard_al

logger = logging.getLogger(__name__)

SPEEDUP_FORMULA = (
    "expected speed-up(K) = AL(K) * t_target(1) / (t_draft(K - 1 + ceil(AL)) + t_target(K + 1)): tokens per round "
    "over the time of one round, against one target forward per token without drafting. t_model(n) = fastest of "
    "timing_repeats timed forwards of n new tokens after a cached prefix of timing_context tokens (a PARD draft feeds "
    "the tokens accepted last round plus K-1 masks; the target verifies the pending token plus K drafts). Sampling, "
    "scheduling and batching overheads are left out: it ranks K for this hardware, it does not promise a server's "
    "throughput."
)


def expected_speedup(al: float, t_draft: float, t_verify: float, t_decode: float) -> float:
    """Tokens per second with drafting over tokens per second without (see :data:`SPEEDUP_FORMULA`)."""
    return al * t_decode / (t_draft + t_verify)


def _time_k(config: EvalConfig, target_path: str, ks_and_al: list[tuple[int, float]], session: EvalSession) -> dict:
    """Forward times of the target and the draft at the shapes each K runs, and the expected speed-up per K."""
    from pard_train.evaluate.runner import resolve_device, resolve_dtype

    device = resolve_device(config)
    dtype = resolve_dtype(config, device)
    target = session.model(target_path, config, device, dtype)
    draft = session.model(config.draft, config, device, dtype)
    context, repeats = config.timing_context, config.timing_repeats
    t_decode = forward_seconds(target, context, 1, repeats)
    rows = {}
    for k, al in ks_and_al:
        draft_tokens = k - 1 + max(1, math.ceil(al))
        t_draft = forward_seconds(draft, context, draft_tokens, repeats)
        t_verify = forward_seconds(target, context, k + 1, repeats)
        rows[str(k)] = {
            "acceptance_length": al,
            "draft_tokens_per_forward": draft_tokens,
            "t_draft": t_draft,
            "t_verify": t_verify,
            "t_decode": t_decode,
            "expected_speedup": expected_speedup(al, t_draft, t_verify, t_decode),
        }
        logger.info(f"K={k}: AL {al:.3f}, expected speed-up {rows[str(k)]['expected_speedup']:.2f}x")
    return rows


def run_sweep(config: EvalConfig, on_cell=None) -> dict:
    """Evaluate every cell and assemble the sweep report (written by :func:`write_sweep_report`).

    ``on_cell``, if given, is called with each cell as it finishes (the CLI writes its report then, so a crash in a
    later cell keeps the finished ones)."""
    from pard_train.evaluate.runner import evaluate

    if config.build_tiny:
        from pard_train.testing.tiny_pair import ensure_tiny_family, ensure_tiny_pair

        if config.targets:
            ensure_tiny_family(config.targets, config.draft, num_draft_tokens=4)
        else:
            ensure_tiny_pair(config.target, config.draft, num_draft_tokens=4)
    # Each model is loaded once, target-only decoding (independent of K) runs once per target and thinking setting,
    # and a target leaves memory before the next one loads (a family's largest may need all of it).
    cells, session, timings = [], EvalSession(), {}
    timed = config.enable_thinking and not config.compare_thinking  # K is chosen with thinking off if both ran
    for target in config.targets or [config.target]:
        for thinking in [False, True] if config.compare_thinking else [config.enable_thinking]:
            for k in config.ks or [config.num_draft_tokens]:
                logger.info(f"--- target {target}, K={k or 'from draft'}, thinking {'on' if thinking else 'off'}")
                single = replace(
                    config,
                    target=target,
                    targets=None,
                    num_draft_tokens=k,
                    ks=None,
                    enable_thinking=thinking,
                    compare_thinking=False,
                    build_tiny=False,
                )
                report = evaluate(single, session=session)
                # A cell holds its report's JSON: the sweep's report.json nests it as is.
                cell = {
                    "target": target,
                    "k": report.num_draft_tokens,
                    "thinking": thinking,
                    "report": report.to_json(),
                }
                cells.append(cell)
                if on_cell is not None:
                    on_cell(cell)
        if config.ks and len(config.ks) > 1:
            swept = [c for c in cells if c["target"] == target and c["thinking"] == timed]
            timings[target] = _k_sweep_rows(config, target, swept, session)
        if target != config.draft:
            session.release(target)
    sweep = {
        "kind": "sweep",
        "config": cells[0]["report"]["config"] | {"targets": config.targets, "ks": config.ks},
        "environment": cells[0]["report"]["environment"],
        "trained_num_draft_tokens": cells[0]["report"].get("trained_num_draft_tokens"),
        "cells": cells,
    }
    if timings:
        sweep["k_sweep"] = {"formula": SPEEDUP_FORMULA, "timing_context": config.timing_context, "targets": timings}
    return sweep


def _k_sweep_rows(config: EvalConfig, target: str, swept: list[dict], session: EvalSession) -> dict:
    """Per K: AL, measured forward times, expected and measured speed-up; and the recommended K."""

    measured = [(c["k"], pard_al(c["report"])) for c in swept]
    rows = _time_k(config, target, [(k, al) for k, al in measured if al is not None], session)
    for cell in swept:  # the wall-clock speed-up of the runs themselves, when target mode ran, beside it
        if str(cell["k"]) in rows:
            pard = EvalReport.from_json(cell["report"]).summary("pard") or {}
            rows[str(cell["k"])]["measured_speedup"] = pard.get("speedup")
    best = max(rows, key=lambda key: rows[key]["expected_speedup"]) if rows else None
    return {"per_k": rows, "recommended_k": None if best is None else int(best)}
