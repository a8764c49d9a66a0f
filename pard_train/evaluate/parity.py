"""``engine=both``: the harness and vLLM, prompt by prompt, on the same token ids.

For each mode both engines ran and each prompt: are the outputs identical, turn by turn? Did they take the same
number of verify steps, and did each step emit the same number of tokens? And, where they differ, the first
divergence: the turn and token index where the outputs part, or the turn and verify step where the rounds do.
"""

from __future__ import annotations

from pard_train.evaluate.eval_report import EvalReport


def compare_prompt(ours: list[list[int]], theirs: list[list[int]], our_rounds, their_rounds) -> dict:
    """One prompt: ``outputs_equal``, ``steps_equal`` (verify steps per turn), ``rounds_equal`` (tokens per step)
    and the ``first_divergence`` (None when all are equal)."""
    outputs_equal = ours == theirs
    steps_equal = [len(r) for r in our_rounds] == [len(r) for r in their_rounds]
    rounds_equal = our_rounds == their_rounds
    divergence = None
    for turn, (a, b) in enumerate(zip(ours, theirs, strict=False)):
        if a != b:
            index = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            divergence = {
                "turn": turn + 1,
                "token": index,
                "harness": a[index : index + 1],
                "vllm": b[index : index + 1],
            }
            break
        if our_rounds[turn] != their_rounds[turn]:
            pairs = zip(our_rounds[turn], their_rounds[turn], strict=False)
            step = next(
                (i for i, (x, y) in enumerate(pairs) if x != y), min(len(our_rounds[turn]), len(their_rounds[turn]))
            )
            divergence = {
                "turn": turn + 1,
                "step": step + 1,
                "harness_emitted": our_rounds[turn][step : step + 1],
                "vllm_emitted": their_rounds[turn][step : step + 1],
            }
            break
    if divergence is None and len(ours) != len(theirs):
        divergence = {"turn": min(len(ours), len(theirs)) + 1, "token": 0, "harness": [], "vllm": []}
    return {
        "outputs_equal": outputs_equal,
        "steps_equal": steps_equal,
        "rounds_equal": rounds_equal,
        "verify_steps": {"harness": sum(map(len, our_rounds)), "vllm": sum(map(len, their_rounds))},
        "first_divergence": divergence,
    }


def parity(harness: EvalReport, vllm: EvalReport) -> dict:
    """Per mode both ran: counts of equal prompts and the per-prompt comparison (from the reports' in-process runs)."""
    section = {}
    modes = [m for m in harness.runs[next(iter(harness.runs))] if m in vllm.runs[next(iter(vllm.runs))]]
    for mode in modes:
        prompts = []
        for name, by_mode in harness.runs.items():
            ours, theirs = by_mode[mode], vllm.runs[name][mode]
            for pid, outputs in ours.outputs.items():
                entry = compare_prompt(outputs, theirs.outputs[pid], ours.rounds[pid], theirs.rounds[pid])
                prompts.append({"benchmark": name, "id": pid, **entry})
        section[mode.value] = {
            "prompts": len(prompts),
            "outputs_equal": sum(p["outputs_equal"] for p in prompts),
            "steps_equal": sum(p["steps_equal"] for p in prompts),
            "rounds_equal": sum(p["rounds_equal"] for p in prompts),
            "per_prompt": prompts,
        }
    return section


def identical(section: dict) -> bool:
    """Every prompt of every mode: same outputs and same verify steps."""
    return all(m["outputs_equal"] == m["steps_equal"] == m["prompts"] for m in section.values())


def parity_markdown(section: dict) -> str:
    lines = [
        "",
        "## Parity: the harness and vLLM on the same token ids",
        "",
        "| mode | prompts | equal outputs | equal verify steps | equal tokens per step | first divergence |",
        "|---|---|---|---|---|---|",
    ]
    for mode, entry in section.items():
        first = next((p for p in entry["per_prompt"] if p["first_divergence"]), None)
        where = "–" if first is None else f"{first['benchmark']} {first['id']}: {first['first_divergence']}"
        lines.append(
            f"| {mode} | {entry['prompts']} | {entry['outputs_equal']} | {entry['steps_equal']} | "
            f"{entry['rounds_equal']} | {where} |"
        )
    return "\n".join(lines) + "\n"
