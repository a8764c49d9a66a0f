"""Wall-clock speed of every mode, and where the measured speed-up departs from the expected one.

The runner decodes every benchmark ``repeats`` times per mode, the modes interleaved (their order rotates each
repeat, so load on a shared machine falls on all of them alike), with the same target, dtype, KV cache and threads,
after an untimed warm-up. Per mode this module reports tokens/s per repeat, its median and spread, and for
speculative modes the ratio to target-only tokens/s of the same repeat (median and spread over repeats).

The expected speed-up is the K sweep's formula (:data:`pard_train.evaluate.sweep.SPEEDUP_FORMULA`) with forward times
measured in isolation (``t_decode``, ``t_verify``, ``t_draft``). The measured one differs by what the formula leaves
out or assumes; each term's factor is the change in speed-up from replacing its isolated time by the one seen in the
run (``decode``: the target-only forward plus its loop overhead; ``draft`` and ``verify``: per round; ``overhead``:
the decoding loop's own time per round, which the formula takes as zero). When measured and expected disagree by more
than :data:`DISAGREEMENT`, the report names the term whose factor is farthest from 1.
"""

from __future__ import annotations

import math
import statistics

DISAGREEMENT = 0.2
"""Relative difference between measured and expected speed-up above which the report says which term is off."""


def spread(values: list[float]) -> dict:
    """Median, min, max and (max - min) / median of ``values`` (one per repeat)."""
    median = statistics.median(values)
    return {
        "median": median,
        "min": min(values),
        "max": max(values),
        "spread": (max(values) - min(values)) / median if median else None,
        "values": values,
    }


def per_repeat_speed(totals: dict[str, list[tuple[int, float]]]) -> dict:
    """``totals[mode]`` = (generated tokens, wall seconds) per repeat, every benchmark together: tokens/s per mode
    and, beside the target mode, each mode's speed-up over the target's tokens/s of the same repeat."""
    out = {}
    baseline = totals.get("target")
    for mode, runs in totals.items():
        rates = [tokens / seconds for tokens, seconds in runs]
        entry = {"tokens_per_s": spread(rates)}
        if baseline is not None and mode != "target":
            ratios = [rate / (t / s) for rate, (t, s) in zip(rates, baseline, strict=True)]
            entry["speedup"] = spread(ratios)
        out[mode] = entry
    return out


def run_terms(target_summary: dict, mode_summary: dict) -> dict:
    """Seconds per forward or round seen while decoding: the target alone, and ``mode``'s draft, verify, overhead."""
    decode_forwards = target_summary["target_forwards"] - target_summary["generations"]  # minus prefills
    decode_seconds = target_summary["wall_seconds"] - target_summary["prefill_seconds"]
    rounds = mode_summary["rounds"]
    verify_seconds = mode_summary["target_seconds"] - mode_summary["prefill_seconds"]
    loop = mode_summary["wall_seconds"] - mode_summary["target_seconds"] - mode_summary["draft_seconds"]
    return {
        "t_decode": decode_seconds / decode_forwards if decode_forwards else None,
        "t_draft": mode_summary["draft_seconds"] / rounds if rounds else None,
        "t_verify": verify_seconds / rounds if rounds else None,
        "overhead": loop / rounds if rounds else None,
    }


def explain(al: float, isolated: dict, seen: dict, measured: float | None) -> dict:
    """Expected speed-up from the isolated forward times, the factor of each term, and (if measured and expected
    disagree by more than :data:`DISAGREEMENT`) the term that is off."""
    d, v, t = isolated["t_draft"], isolated["t_verify"], isolated["t_decode"]
    expected = al * t / (d + v)
    factors = {}
    if None not in seen.values():
        factors = {
            "decode": seen["t_decode"] / t,
            "draft": (d + v) / (seen["t_draft"] + v),
            "verify": (d + v) / (d + seen["t_verify"]),
            "overhead": (d + v) / (d + v + max(seen["overhead"], 0.0)),
        }
    off = None
    if measured is not None and factors and abs(measured - expected) > DISAGREEMENT * expected:
        off = max(factors, key=lambda key: abs(math.log(factors[key])))
    return {
        "acceptance_length": al,
        "expected_speedup": expected,
        "measured_speedup": measured,
        "isolated": isolated,
        "seen_in_run": seen,
        "factors": factors,
        "term_off": off,
    }


def describe(entry: dict) -> str:
    """One line for the report: expected beside measured, and the term that is off when they disagree."""
    measured, expected = entry["measured_speedup"], entry["expected_speedup"]
    text = f"expected {expected:.2f}x" + ("" if measured is None else f", measured {measured:.2f}x")
    if entry["term_off"] is None:
        return text + (" (within 20%)" if measured is not None else "")
    term = entry["term_off"]
    factor = entry["factors"][term]
    seen, isolated = entry["seen_in_run"], entry["isolated"]
    if term == "overhead":
        detail = f"the decoding loop adds {1000 * seen['overhead']:.1f} ms per round that the formula leaves out"
    else:
        key = f"t_{term}"
        detail = f"{key} was {1000 * seen[key]:.1f} ms in the run against {1000 * isolated[key]:.1f} ms in isolation"
    return f"{text}: off by more than 20%, mostly {term} (factor {factor:.2f}: {detail})"
