"""VLLM_PYTHON pard_train/vllm_env/worker.py serve|validate — runs under vLLM's interpreter, not pard_train's.

Imports vLLM and the standard library only (vLLM's environment has no pard_train and another transformers), so it is
run by path. The client (:mod:`pard_train.vllm_env.client`) starts it and speaks JSON lines over stdin/stdout; vLLM's
own logs go to stderr, which the client keeps in a log file.

``serve``: the first stdin line is the engine's settings (``model``, ``dtype``, ``max_model_len``, ``seed`` and,
for speculative decoding, ``speculative_config``); the worker builds one ``vllm.LLM`` and answers
``{"ready": true, "vllm": VERSION, "start_seconds": S, "vocab_size": V}``. Each further line is a request
``{"prompts": [[ids], ...], "max_tokens": N, "stop_token_ids": [...], "temperature": T, "seed": S}``, answered with
``{"outputs": [{"token_ids", "finish_reason", "spec"}], "seconds": S}``: ``spec`` is vLLM's per-request record of
each verify step (``per_step_drafted``, ``per_step_accepted``; null without a draft) and ``seconds`` the wall-clock
time of ``LLM.generate`` alone. A request ``{"prompts": [[ids], ...], "prompt_logprobs": k}`` scores the prompts
instead (:func:`_score`): ``{"scored": [{"ids", "logprobs", "hidden_states_path"}], "seconds": S}``. End of input
(or ``{"quit": true}``) shuts the engine down.

The setting ``hidden_states: {"layer_ids": [...], "directory": DIR}`` (non-negative ids, ascending, no repeats)
makes the engine capture the target's residual stream at those aux ids for every prompt token, with vLLM's
``extract_hidden_states`` method and the connector of ``vllm_path/hidden_states_connector.py``: each scored prompt's
states are then a file in DIR, whole when the answer names it (:func:`_wait_written`), which the reader deletes.

``validate``: stdin is a JSON list of ``{"name", "model", "speculative_config"}``; for each, vLLM builds its engine
config (``EngineArgs.create_engine_config``: model and draft configs, the speculative checks) and resolves the draft's
mask token as its parallel drafter does, without starting an engine. Prints one JSON list of
``{"name", "ok", "error", "mask_token_id"}``.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
import traceback

WRITE_TIMEOUT = 600.0
"""Seconds a prompt's hidden-states file may take to appear after ``LLM.generate`` returned."""


def _protocol_stream():
    """The real stdout, for JSON lines only; fd 1 becomes stderr so that vLLM (and its engine processes, which
    inherit fd 1) log to the client's log file instead of into the protocol."""
    stream = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return stream


def reason(error: Exception) -> str:
    """One line: a pydantic validation error's messages (vLLM's configs are pydantic), else the first line."""
    try:
        text = "; ".join(str(item["msg"]) for item in error.errors())
    except (AttributeError, TypeError, KeyError):
        text = next((line for line in str(error).splitlines() if line.strip()), "")
    return f"{type(error).__name__}: {text}"


def _send(stream, message: dict) -> None:
    stream.write(json.dumps(message) + "\n")
    stream.flush()


def _spec(completion) -> dict | None:
    metrics = getattr(completion, "spec_decode_metrics", None)
    if metrics is None:
        return None
    return {
        "per_step_drafted": list(metrics.per_step_drafted),
        "per_step_accepted": list(metrics.per_step_accepted),
        "num_draft_tokens": metrics.num_draft_tokens,
    }


def serve(stream) -> None:
    from vllm import LLM, SamplingParams
    from vllm import __version__ as version
    from vllm.inputs import TokensPrompt

    settings = json.loads(sys.stdin.readline())
    started = time.perf_counter()
    # enforce_eager: no graph capture on CPU; per_request_spec_decode_metrics=detailed puts each verify step's
    # drafted/accepted counts on the request's output (vLLM refuses it without a draft).
    if settings.get("speculative_config"):
        settings["per_request_spec_decode_metrics"] = "detailed"
    capture = settings.pop("hidden_states", None)
    if capture:
        settings |= _hidden_states_settings(capture["layer_ids"], capture["directory"])
    llm = LLM(enforce_eager=True, disable_log_stats=False, **settings)
    ready = {"ready": True, "vllm": version, "start_seconds": time.perf_counter() - started}
    _send(stream, ready | {"vocab_size": llm.model_config.get_vocab_size()})
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("quit"):
            break
        if "prompt_logprobs" in request:
            _send(stream, _score(llm, request, SamplingParams, TokensPrompt))
            continue
        try:
            params = SamplingParams(
                temperature=request.get("temperature", 0.0),
                seed=request.get("seed"),
                max_tokens=request["max_tokens"],
                stop_token_ids=request.get("stop_token_ids") or None,
                detokenize=False,
            )
            prompts = [TokensPrompt(prompt_token_ids=ids) for ids in request["prompts"]]
            begin = time.perf_counter()
            results = llm.generate(prompts, params, use_tqdm=False)
            seconds = time.perf_counter() - begin
        except Exception as error:  # noqa: BLE001 — one bad request is answered, the engine keeps serving
            _send(stream, {"error": reason(error)})
            continue
        outputs = [
            {
                "token_ids": list(result.outputs[0].token_ids),
                "finish_reason": result.outputs[0].finish_reason,
                "spec": _spec(result.outputs[0]),
            }
            for result in results
        ]
        _send(stream, {"outputs": outputs, "seconds": seconds})


def _hidden_states_settings(layer_ids: list[int], directory: str) -> dict:
    """vLLM 0.32's ``extract_hidden_states``: the aux ids' residual streams (id ``i < L`` the input of layer ``i``,
    id ``L`` the final norm's input) for every prompt token, kept in KV-cache slots of their own and written per
    request by the connector (one speculative token: the method asserts it)."""
    return {
        "speculative_config": {
            "method": "extract_hidden_states",
            "num_speculative_tokens": 1,
            "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": list(layer_ids)}},
        },
        "kv_transfer_config": {
            "kv_connector": "HiddenStatesConnector",
            "kv_connector_module_path": "hidden_states_connector",
            "kv_role": "kv_producer",
            "kv_connector_extra_config": {"shared_storage_path": directory},
        },
    }


def _wait_written(path: str) -> None:
    """Until the connector has written ``path``: it holds an exclusive lock on ``path.lock`` from the request's first
    step until the file is whole, after ``LLM.generate`` has returned. Then the lock file goes."""
    lock, deadline = path + ".lock", time.monotonic() + WRITE_TIMEOUT
    while True:
        free = True
        try:
            fd = os.open(lock, os.O_RDONLY)
        except FileNotFoundError:
            pass
        else:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                free = False
            finally:
                os.close(fd)
        if free and os.path.exists(path):
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"vLLM wrote no hidden states to {path} within {WRITE_TIMEOUT:.0f} s")
        time.sleep(0.01)
    if os.path.exists(lock):
        os.remove(lock)


def _score(llm, request: dict, SamplingParams, TokensPrompt) -> dict:  # noqa: N803 — vLLM's classes, passed in
    """The target's log-probabilities over each prompt: per position after the first, the prompt token's own and the
    top ``prompt_logprobs`` ids and values (``flat_logprobs``: vLLM's lists, without a dict per position). Sent as
    base64 of little-endian arrays ``[positions, 1 + k]``: int32 ids and float32 log-probabilities, column 0 the
    prompt token's, as vLLM's sampler gathers them (``Sampler.gather_logprobs``)."""
    import base64

    import numpy as np

    k = int(request["prompt_logprobs"])
    try:
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, flat_logprobs=True, detokenize=False)
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in request["prompts"]]
        begin = time.perf_counter()
        results = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - begin
    except Exception as error:  # noqa: BLE001 — one bad request is answered, the engine keeps serving
        return {"error": reason(error)}
    scored = []
    for result in results:
        flat = result.prompt_logprobs  # position 0 holds nothing (no prediction precedes the first token)
        ids = np.asarray(flat.token_ids, dtype="<i4").reshape(-1, k + 1)
        values = np.asarray(flat.logprobs, dtype="<f4").reshape(-1, k + 1)
        path = (result.kv_transfer_params or {}).get("hidden_states_path")
        if path is not None:
            _wait_written(path)
        scored.append(
            {
                "ids": base64.b64encode(ids.tobytes()).decode(),
                "logprobs": base64.b64encode(values.tobytes()).decode(),
                "hidden_states_path": path,
            }
        )
    return {"scored": scored, "seconds": seconds}


def validate(stream) -> None:
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.worker.gpu.spec_decode.utils import get_parallel_drafting_token_id

    results = []
    for case in json.loads(sys.stdin.read()):
        name = case.pop("name")
        try:
            config = EngineArgs(**case).create_engine_config()
            draft = config.speculative_config.draft_model_config.hf_config
            results.append(
                {"name": name, "ok": True, "error": None, "mask_token_id": get_parallel_drafting_token_id(draft)}
            )
        except Exception as error:  # noqa: BLE001 — vLLM's refusal is the result
            results.append({"name": name, "ok": False, "error": reason(error), "mask_token_id": None})
    _send(stream, {"results": results})


def main() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command not in ("serve", "validate"):
        sys.exit("usage: worker.py serve|validate (JSON on stdin)")
    stream = _protocol_stream()
    try:
        serve(stream) if command == "serve" else validate(stream)
    except Exception as error:  # noqa: BLE001 — the client gets the reason in one line, the log the traceback
        traceback.print_exc()
        _send(stream, {"error": reason(error)})
        sys.exit(1)


if __name__ == "__main__":  # vLLM starts its engine with multiprocessing spawn: the guard is required
    main()
