"""The teacher cache built by vLLM (method.cache_engine=vllm) is the transformers-built cache: on the tiny pair, with
float32 storage, the same top-k ids, log-probabilities, rest-of-mass buckets and dual-mode features within 1e-4, and
training from either gives the same losses step by step. The mapping from vLLM's prompt log-probabilities and
hidden-states files to the cache is checked first without vLLM, against a stand-in engine that scores each document
with the target in transformers and writes its states as vLLM's connector does (ascending ids, each once)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pard_train.base.config import AttentionBackend, CacheEngine, FeatureCapture, MethodConfig, MethodName
from pard_train.base.errors import ConfigError
from pard_train.data.packing import PackedRow
from pard_train.evaluate.feature_capture import aux_ids
from pard_train.methods.teacher_cache import MANIFEST
from pard_train.methods.teacher_cache_builder import TransformersScorer
from pard_train.methods.teacher_cache_vllm import VllmScorer, documents
from pard_train.testing.tiny import build_tiny_model
from pard_train.vllm_env.client import PromptLogprobs

VOCAB = 96


class TransformersAsVllm:
    """What vLLM's ``prompt_logprobs`` returns, computed per prompt by a transformers model: rows ``u - 1`` for
    ``u = 1 .. n-1``, the prompt token's log-probability and the top-k, most likely first; with ``aux_ids``, each
    prompt's residual stream at those ids (``L``: the final norm's input) in a file of its own, as the connector
    writes it."""

    def __init__(self, model, aux_ids=None, directory=None):
        self.model, self.vocab_size = model, model.get_output_embeddings().weight.shape[0]
        self.aux_ids, self.directory = aux_ids, directory

    @torch.no_grad()
    def prompt_logprobs(self, prompts, top_k):
        from safetensors.torch import save_file

        from pard_train.evaluate.feature_capture import final_norm_input

        scored = []
        for number, ids in enumerate(prompts):
            with final_norm_input(self.model) as captured:
                out = self.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
            log_p = out.logits[0, :-1].float().log_softmax(-1)
            token = torch.tensor(ids[1:])
            values, top = log_p.topk(top_k, dim=-1)
            chosen = log_p.gather(-1, token[:, None]).squeeze(-1)
            path = None
            if self.aux_ids is not None:
                stream = [*out.hidden_states[:-1], captured["pre_norm"]]  # id i < L: hidden_states[i]; id L: pre-norm
                states = torch.stack([stream[i][0] for i in self.aux_ids], dim=1)
                path = str(self.directory / f"{number}.safetensors")
                save_file({"hidden_states": states.contiguous(), "token_ids": torch.tensor(ids)}, path)
            scored.append(PromptLogprobs(token.numpy(), chosen.numpy(), top.int().numpy(), values.numpy(), path))
        return scored, 0.0


def _rows() -> list[PackedRow]:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for lengths in ([7, 1, 12], [20], [3, 2, 1, 9]):  # one-token documents too
        ids, document, supervised = [], [], []
        for index, length in enumerate(lengths):
            ids += torch.randint(4, VOCAB, (length,), generator=generator).tolist()
            document += [index] * length
            supervised += (torch.rand(length, generator=generator) > 0.3).tolist()
        rows.append(PackedRow(ids, document, supervised))
    return rows


def test_documents_are_the_spans_of_equal_ids():
    assert documents(PackedRow([5] * 6, [0, 0, 1, 2, 2, 2], [True] * 6)) == [(0, 2), (2, 3), (3, 6)]
    assert documents(PackedRow([5], [0], [True])) == [(0, 1)]


def test_prompt_logprobs_per_document_give_the_transformers_builders_signals(tmp_path):
    torch.manual_seed(0)
    model = build_tiny_model(vocab_size=VOCAB, hidden_size=32, num_layers=2).eval()
    rows = _rows()
    # -1 and 2 are one id (2 = L: the final norm's input), sent once and read twice; the ids' order is not the file's.
    layers = [-1, 0, -2, 2]
    sdpa, cpu = AttentionBackend.sdpa, torch.device("cpu")
    expected = TransformersScorer(model, sdpa, cpu, layers, FeatureCapture.vllm).signals(rows, 8, 1.0)
    got = VllmScorer(TransformersAsVllm(model, [0, 1, 2], tmp_path), blocks=[2, 0, 1, 2]).signals(rows, 8, 1.0)
    for (log_g, ids, log_p, features), want in zip(got, expected, strict=True):
        want_log_g, want_ids, want_log_p, want_features = want
        assert log_g.shape == want_log_g.shape and ids.shape == want_ids.shape
        torch.testing.assert_close(log_g, want_log_g, atol=1e-5, rtol=0)
        assert torch.equal(ids, want_ids)
        torch.testing.assert_close(log_p, want_log_p, atol=1e-5, rtol=0)
        assert features.shape == want_features.shape == (len(log_g), 4 * 32)
        torch.testing.assert_close(features, want_features, atol=1e-5, rtol=0)
    assert sum(ids.shape[0] for _, ids, _, _ in got) > 20  # labelled positions in every row: the check has content
    assert not list(tmp_path.iterdir())  # every file read is deleted


def test_feature_layers_become_non_negative_ids_and_a_layer_outside_is_refused():
    assert aux_ids([-1, -8, -16, -24], 32) == [32, 25, 17, 9]  # Llama-3.1-8B, as vLLM maps them
    assert aux_ids([-1, 0, 4, -5], 4) == [4, 0, 4, 0]
    with pytest.raises(ConfigError, match=r"method.feature_layers: \[-6, 5\] outside the target's 5 hidden states"):
        aux_ids([-6, -1, 5], 4)


def test_vllm_refuses_a_temperature_it_cannot_give_in_one_line():
    settings = dict(name=MethodName.pard2, target="t", teacher="cache", cache_engine=CacheEngine.vllm)
    MethodConfig(**settings)  # temperature 1: built
    with pytest.raises(ConfigError, match=r"^method.cache_engine: vllm gives .* temperature 1 only") as caught:
        MethodConfig(**settings, kd_temperature=2.0)
    assert "\n" not in str(caught.value) and "method.cache_engine=transformers" in str(caught.value)


def test_vllm_refuses_the_training_capture_in_one_line():
    settings = dict(name=MethodName.pard2, target="t", teacher="cache", cache_engine=CacheEngine.vllm, features=True)
    MethodConfig(**settings, feature_capture=FeatureCapture.vllm)  # what vLLM captures: built
    MethodConfig(**{**settings, "features": False}, feature_capture=FeatureCapture.training)  # no features: built
    with pytest.raises(ConfigError, match=r"^method.feature_capture: training .* final norm's input") as caught:
        MethodConfig(**settings, feature_capture=FeatureCapture.training)
    assert "\n" not in str(caught.value) and "method.cache_engine=transformers" in str(caught.value)


def _shards(directory):
    manifest = json.loads((directory / MANIFEST).read_text())
    return manifest, [torch.load(directory / entry["name"], weights_only=True) for entry in manifest["shards"]]


@pytest.mark.vllm
@pytest.mark.integration
def test_a_cache_built_by_vllm_equals_the_transformers_cache_and_trains_the_same(tiny_checkpoint, tmp_path):
    from conftest import compose
    from launch import pard2_tiny_steps

    from pard_train.base.config import to_config
    from pard_train.methods.teacher_cache_builder import build_for_config
    from pard_train.training.train import train

    settings = [
        *pard2_tiny_steps(tiny_checkpoint),
        "method.top_k=8",
        "method.top_k_dtype=float32",
        "method.feature_cache_dtype=float32",  # features on (pard2_tiny: layers -1, -2, -3, captured as vLLM does)
        "method.cache_shard_rows=8",
    ]

    def config(engine, *extra):
        cache = f"data.cache_dir={tmp_path / engine / 'cache'}"
        root = f"run.output_root={tmp_path / engine}"
        return to_config(compose(*settings, cache, root, f"method.cache_engine={engine}", *extra))

    caches = {}
    for engine in ("transformers", "vllm"):
        directory, complete = build_for_config(config(engine))
        assert complete
        caches[engine] = _shards(directory)
    (manifest, hf), (vllm_manifest, served) = caches["transformers"], caches["vllm"]
    states = tmp_path / "vllm" / "cache" / "vllm-hidden-states-0"
    assert states.is_dir() and not list(states.iterdir())  # every document's file and lock read and removed
    assert vllm_manifest["key"] == manifest["key"] and vllm_manifest["labelled_tokens"] == manifest["labelled_tokens"]
    assert manifest["key"]["feature_layers"] == [-1, -2, -3]
    assert manifest["labelled_tokens"] > 500 and len(hf) > 1  # several shards, hundreds of positions compared
    for a, b in zip(hf, served, strict=True):
        for name in ("real_offsets", "label_offsets"):
            assert torch.equal(a[name], b[name])
        assert torch.equal(a["top_ids"], b["top_ids"])
        assert (a["top_log_p"] - b["top_log_p"]).abs().max() <= 1e-4
        assert (a["log_g"] - b["log_g"]).abs().max() <= 1e-4
        assert a["features"].shape == b["features"].shape == (a["log_g"].numel(), 3 * 64)
        assert a["features"].dtype == b["features"].dtype == torch.float32
        difference = float((a["features"] - b["features"]).abs().max())
        print(f"features: max |vLLM - transformers| {difference:.2e}")  # shown with -s
        assert difference <= 1e-4, difference
        buckets = [1 - shard["top_log_p"].double().exp().sum(-1) for shard in (a, b)]
        assert (buckets[0] - buckets[1]).abs().max() <= 1e-4
        assert buckets[0].min() > 0.01  # k < vocabulary: the bucket holds real mass, so the check has content
    assert np.isfinite(served[0]["top_log_p"].numpy()).all()
    assert hf[0]["features"].abs().max() > 0.05  # real states (the tiny model's are small), not zeros
    assert not list((tmp_path / "vllm" / "cache" / "vllm-hidden-states-0").iterdir())  # each file deleted once read

    losses = {}
    for engine in ("transformers", "vllm"):
        final = train(config(engine, "method.teacher=cache"))
        losses[engine] = [json.loads(line) for line in (final.parent / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses["vllm"]] == [r["step"] for r in losses["transformers"]] == [1, 2, 3]
    for a, b in zip(losses["transformers"], losses["vllm"], strict=True):
        assert a["kd"] > 0
        for key in ("loss", "kd", "cat_weight/depth_2"):  # steps 2 and 3 read the features through W
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
