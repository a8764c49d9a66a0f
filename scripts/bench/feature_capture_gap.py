"""python scripts/bench/feature_capture_gap.py [--model runs/cache/smollm2-135m-instruct] [--prompts 4]
    [--layers -1,-8,-16,-24] [--out FILE.json]

How far apart the two captures of a PARD-2 draft's target features are on a real model: what training reads
(``output_hidden_states[l]``, layer -1 after the final norm) against what vLLM's PARD-2 serving captures (layer -1
before it), per feature block, over the real tokens of the reporting-split prompts (second half of each benchmark
file, rendered with the chat template). Reported per block: the RMS of each capture and the relative difference
``||f_vllm - f_train|| / ||f_train||``. W was trained on the training block; the ratio of RMS values is the factor by
which serving would scale that block's contribution to ``s * W f``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from _common import write_json
from pard2_vs_pard import REPO, reporting_split

from pard_train.evaluate.feature_capture import FeatureCapture, final_norm_input, target_features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "runs" / "cache" / "smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=4, help="reporting-split prompts per benchmark")
    parser.add_argument("--layers", default="-1,-8,-16,-24")
    parser.add_argument("--out", type=Path, default=REPO / "bench_results" / "feature_capture_gap.json")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    layers = [int(layer) for layer in args.layers.split(",")]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    files = reporting_split(REPO / "bench_results" / "feature_capture_split", args.prompts)
    prompts = []
    for path in files:
        for line in Path(path).read_text().splitlines():
            row = json.loads(line)
            text = row.get("data") or row.get("turns", [""])[0]
            messages = [{"role": "user", "content": text}]
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    sums = {capture: torch.zeros(len(layers)) for capture in FeatureCapture}
    difference, tokens = torch.zeros(len(layers)), 0
    width = model.config.hidden_size
    for ids in prompts:
        with torch.no_grad(), final_norm_input(model) as captured:
            out = model(torch.tensor([list(ids)]), output_hidden_states=True)
        features = {
            capture: target_features(out.hidden_states, layers, capture, captured["pre_norm"])[0].view(
                -1, len(layers), width
            )
            for capture in FeatureCapture
        }
        for capture, value in features.items():
            sums[capture] += value.pow(2).sum(dim=(0, 2))
        difference += (features[FeatureCapture.vllm] - features[FeatureCapture.training]).pow(2).sum(dim=(0, 2))
        tokens += len(ids)
    rows = []
    print(f"{args.model.name}: {len(prompts)} prompts, {tokens} tokens")
    print("| layer | RMS, training capture | RMS, vLLM capture | relative difference |")
    print("|---|---|---|---|")
    for index, layer in enumerate(layers):
        train_rms = float((sums[FeatureCapture.training][index] / (tokens * width)).sqrt())
        vllm_rms = float((sums[FeatureCapture.vllm][index] / (tokens * width)).sqrt())
        relative = float((difference[index] / sums[FeatureCapture.training][index]).sqrt())
        rows.append({"layer": layer, "rms_training": train_rms, "rms_vllm": vllm_rms, "relative_difference": relative})
        print(f"| {layer} | {train_rms:.3f} | {vllm_rms:.3f} | {relative:.3f} |")
    write_json(args.out, {"model": str(args.model), "prompts": len(prompts), "tokens": tokens, "blocks": rows})


if __name__ == "__main__":
    main()
