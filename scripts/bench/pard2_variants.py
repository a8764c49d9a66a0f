"""python scripts/bench/pard2_variants.py [--root runs/pair] [--pard-run runs/pair/demo_derived]
    [--variants reference,tau2,no-cat,drop0,ti-only] [--calibration-steps 8] [--prompts 2] [--max-new-tokens 48]
    [--repeats 2] [--out bench_results/pard2_variants.json]

Which PARD-2 setting does best on the derived SmolLM2 pair, at **equal training wall-clock** with PARD, trained from
the teacher cache (``method.teacher=cache``: the target's top-32 log-probabilities and confidences computed once, so
a step costs about what a PARD step costs instead of 2.7x; the target still runs for dual mode's features). Each
variant changes one setting of the reference recipe (CAT, 0.1 CE + 1.0 KD, tau 1, features at -1/-8/-16/-24, 10% of
documents without features): ``tau2`` the KD temperature, ``no-cat`` CAT off, ``drop0`` every document with features
(all training for the target-dependent mode), ``ti-only`` no features (the target-independent draft alone, the
cheapest step). The budget is ``--pard-run``'s steps at the seconds per step PARD takes now; PARD and each variant's
kind of step are timed side by side in this run (``--calibration-steps``), and each variant gets as many steps as fit.
The teacher cache's one-off build is reported beside (one build per temperature).

The variants are compared on the benchmarks' **tuning split** (``NAME:tune``); the best target-dependent one (by
``pard2`` mode AL) and the best target-independent one (by ``pard`` mode AL) are then measured on the **reporting
split** (``NAME:report``, nothing chosen on it) beside PARD, with the wall-clock speed-up of each against the target
alone (greedy, batch 1, lossless, interleaved repeats, warm-up excluded).

Needs ``--root``/cache/smollm2-135m-instruct and ``--pard-run`` (a finished ``demo_derived`` run; its data is reused).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from _common import REPO, harness_report, markdown_table, run_logged, write_json
from omegaconf import OmegaConf
from pard2_vs_pard import REPORTING, speed, train, training_seconds

VARIANTS = {
    "reference": [],
    "tau2": ["method.kd_temperature=2"],
    "no-cat": ["method.cat=false"],
    "drop0": ["method.feature_drop=0"],
    "ti-only": ["method.features=false"],
}
"""Each changes one setting of ``configs/method/pard2.yaml`` (the reference recipe)."""


TUNING = [name.replace(":report", ":tune") for name in REPORTING]


def has_features(overrides: list[str]) -> bool:
    return "method.features=false" not in overrides


def temperature(overrides: list[str]) -> str:
    return next((o.split("=", 1)[1] for o in overrides if o.startswith("method.kd_temperature=")), "1.0")


def seconds_per_step(run_dir: Path) -> float:
    seconds, steps = training_seconds(run_dir, skip_first=True)
    return seconds / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO / "runs" / "pair")
    parser.add_argument("--pard-run", type=Path, default=None, help="a finished PARD run (default: ROOT/demo_derived)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--calibration-steps", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=2, help="prompts per benchmark, on each split")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved wall-clock repeats on the reporting split")
    parser.add_argument("--out", type=Path, default=REPO / "bench_results" / "pard2_variants.json")
    args = parser.parse_args()
    pard_run = (args.pard_run or args.root / "demo_derived").resolve()
    recorded = OmegaConf.load(pard_run / "config.yaml")
    model = Path(recorded.model.path)
    cache = model.parent
    data = Path(recorded.data.train_files[0]).parent.name  # the PARD run's answers, reused by every variant
    if list(recorded.data.train_files) != [f"{cache / data}/*.jsonl"]:  # the one form pard2_vs_pard.train writes
        sys.exit(f"{pard_run} trained on {list(recorded.data.train_files)}, not on one directory under {cache}")
    root = args.root / "pard2_variants"
    root.mkdir(parents=True, exist_ok=True)
    pard_steps = training_seconds(pard_run)[1]
    # Same preset, data, rate and seed as the PARD run; max_steps (not epochs) sets the length.
    common = [f"train.lr={recorded.train.lr}", "train.epochs=1000"]
    pard2 = ["method=pard2", f"method.target={model}", "method.teacher=cache", *common]
    chosen = {name: VARIANTS[name] for name in args.variants.split(",")}

    builds = {}  # one teacher cache per KD temperature, timed
    for tau in sorted({"1.0", *(temperature(o) for o in chosen.values())}):  # 1.0: the calibration runs
        started = time.perf_counter()
        command = [sys.executable, "-m", "pard_train.teacher_cache", "+config=demo_derived", f"run.output_root={root}"]
        command += [f"model.path={model}", f"data.train_files=[{cache / data}/*.jsonl]", *pard2]
        run_logged([*command, f"method.kd_temperature={tau}"], root / f"teacher-cache-tau{tau}.log")
        builds[tau] = time.perf_counter() - started

    calibrate = [f"train.max_steps={args.calibration_steps}", f"train.log_every={args.calibration_steps // 2}"]
    pard_calibration = train(root, cache, "demo_derived", "calibration-pard", [*common, *calibrate], data)
    rate = {"pard": seconds_per_step(pard_calibration)}
    for kind, extra in (("features", []), ("no features", ["method.features=false"])):
        if any(has_features(o) == (kind == "features") for o in chosen.values()):
            name = f"calibration-pard2-{kind.replace(' ', '-')}"
            rate[kind] = seconds_per_step(train(root, cache, "demo_derived", name, [*pard2, *extra, *calibrate], data))
    budget = pard_steps * rate["pard"]

    runs, tune = {}, {}
    for name, overrides in chosen.items():
        steps = max(1, round(budget / rate["features" if has_features(overrides) else "no features"]))
        runs[name] = train(
            root, cache, "demo_derived", f"{name}-{steps}", [*pard2, *overrides, f"train.max_steps={steps}"], data
        )
        modes = "[pard,pard2]" if has_features(overrides) else "[pard]"
        settings = [f"modes={modes}", f"benchmarks=[{','.join(TUNING)}]", f"num_prompts={args.prompts}"]
        settings += [f"max_new_tokens={args.max_new_tokens}", "dtype=fp32"]
        tune[name] = harness_report(model, runs[name] / "final", root / f"tune-{name}", *settings)["overall"]

    best_td = max((n for n in chosen if has_features(chosen[n])), key=lambda n: tune[n]["pard2"]["acceptance_length"])
    best_ti = max(chosen, key=lambda n: tune[n]["pard"]["acceptance_length"])
    report_settings = [f"benchmarks=[{','.join(REPORTING)}]", f"num_prompts={args.prompts}", "dtype=fp32"]
    report_settings += [f"max_new_tokens={args.max_new_tokens}", f"repeats={args.repeats}"]
    reported = {
        "PARD": harness_report(model, pard_run / "final", root / "report-pard", "modes=[target,pard]", *report_settings)
    }
    reported[best_td] = harness_report(
        model, runs[best_td] / "final", root / f"report-{best_td}", "modes=[target,pard,pard2]", *report_settings
    )
    if best_ti != best_td:
        reported[best_ti] = harness_report(
            model, runs[best_ti] / "final", root / f"report-{best_ti}", "modes=[target,pard]", *report_settings
        )

    tune_rows = []
    for name, overrides in chosen.items():
        seconds, steps = training_seconds(runs[name])
        td = tune[name].get("pard2", {}).get("acceptance_length")
        tune_rows.append(
            [
                name,
                " ".join(overrides) or "(reference)",
                steps,
                f"{seconds:.0f}",
                f"{tune[name]['pard']['acceptance_length']:.3f}",
            ]
            + ["–" if td is None else f"{td:.3f}"]
        )
    print("\nTuning split (AL; the winners go on to the reporting split):")
    print(markdown_table(["variant", "change", "steps", "training s", "TI AL", "TD AL"], tune_rows))

    report_rows, payload_rows = [], {}
    shown = [
        ("PARD", "PARD", "pard"),
        (f"PARD-2 {best_td} TD", best_td, "pard2"),
        (f"PARD-2 {best_ti} TI", best_ti, "pard"),
    ]
    for label, name, mode in shown:
        overall, sp = reported[name]["overall"][mode], speed(reported[name], mode)
        report_rows.append(
            [label, f"{overall['acceptance_length']:.3f}"]
            + ["–" if v is None else f"{100 * v:.0f}%" for v in overall["conditional_acceptance"]]
            + [f"{sp['measured']:.2f}× ({sp['min']:.2f}–{sp['max']:.2f})", f"{sp['expected']:.2f}×"]
            + ["yes" if overall["mismatched_prompts"] in (0, None) else f"no ({overall['mismatched_prompts']})"]
        )
        payload_rows[label] = {**overall, "speedup": sp}
    k = max(len(r) for r in report_rows) - 5
    print("\nReporting split:")
    header = ["draft", "AL", *[f"pos {i + 1}" for i in range(k)], "speed-up measured (min–max)", "expected", "lossless"]
    print(markdown_table(header, report_rows))
    write_json(
        args.out,
        {
            "pard_run": str(pard_run),
            "pard_steps": pard_steps,
            "seconds_per_step": rate,
            "budget_seconds": budget,
            "teacher_cache_build_seconds": builds,
            "tune": {n: {"overrides": chosen[n], "steps": training_seconds(runs[n])[1], **tune[n]} for n in chosen},
            "best_target_dependent": best_td,
            "best_target_independent": best_ti,
            "report": payload_rows,
            "prompts_per_benchmark": args.prompts,
            "max_new_tokens": args.max_new_tokens,
            "repeats": args.repeats,
        },
    )


if __name__ == "__main__":
    main()
