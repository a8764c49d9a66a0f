"""The training side's handle on vLLM: a worker process (:mod:`pard_train.vllm_env.worker`) under vLLM's own
interpreter, spoken to in JSON lines. Nothing of vLLM is imported here.

    with VllmEngine(target, draft=draft, num_speculative_tokens=4, log_path=out / "vllm-pard.log") as engine:
        result = engine.generate([prompt_ids], max_tokens=128, stop_token_ids=[2])

The worker is a process group of its own: closing the engine (or a time-out, or an error) ends the whole group,
vLLM's engine processes included, and the worker ends itself when our end of its stdin closes, so no vLLM process
outlives the caller.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import selectors
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pard_train.vllm_env.locate import INSTALL_HINT, VllmUnavailable, find_vllm_python, worker_environment
from pard_train.vllm_env.serving import speculative_config

WORKER = Path(__file__).with_name("worker.py")
START_TIMEOUT = 900.0
"""Seconds an engine may take to start (30-65 s for SmolLM2 on 2 cores; a large model loads for longer)."""


class VllmError(VllmUnavailable):
    """vLLM started but refused or failed; the message ends with the log that holds its traceback."""


@dataclass
class VllmOutput:
    """One prompt's result: generated ids (the stop token included), why it ended, and vLLM's verify steps."""

    token_ids: list[int]
    finish_reason: str
    steps_drafted: list[int] = field(default_factory=list)
    steps_accepted: list[int] = field(default_factory=list)
    """Per verify step (empty without a draft): tokens proposed, and how many of them the target accepted (vLLM
    counts a step's accepted drafts before cutting at ``max_tokens`` or a stop token)."""


@dataclass
class VllmResult:
    outputs: list[VllmOutput]
    seconds: float
    """Wall-clock time of ``LLM.generate`` in the worker (not the JSON round trip)."""


@dataclass
class PromptLogprobs:
    """One prompt scored by the target, per position ``u = 1 .. n-1`` (row ``u - 1``): ``token_log_p[u - 1]`` is
    ``log p(x_u | x_<u)``, ``top_ids``/``top_log_p`` ``[n - 1, k]`` the k most likely ids there, most likely first."""

    token_ids: np.ndarray
    token_log_p: np.ndarray
    top_ids: np.ndarray
    top_log_p: np.ndarray
    hidden_states_path: str | None = None
    """With an engine started with ``hidden_states`` (the worker's docstring): the file of the prompt's states,
    ``hidden_states [n, ids, hidden]`` in the model's dtype and ``token_ids [n]`` (safetensors), whole; the reader
    deletes it."""


class VllmEngine:
    """One ``vllm.LLM`` (the target, with the draft as parallel drafter when ``draft`` is given), in a worker."""

    def __init__(
        self,
        model: str | Path,
        *,
        draft: str | Path | None = None,
        num_speculative_tokens: int = 4,
        dtype: str = "float32",
        max_model_len: int | None = None,
        seed: int = 0,
        log_path: str | Path | None = None,
        python: str | None = None,
        timeout: float = START_TIMEOUT,
        **engine_args,
    ):
        """``engine_args``: further ``vllm.LLM`` arguments (``tensor_parallel_size``, ``max_logprobs``, ...), and
        ``hidden_states={"layer_ids", "directory"}`` to capture the target's states while scoring prompts."""
        self.python = find_vllm_python(python)
        settings = {"model": str(model), "dtype": dtype, "max_model_len": max_model_len, "seed": seed} | engine_args
        if draft is not None:
            settings["speculative_config"] = speculative_config(str(draft), num_speculative_tokens)
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="vllm-", suffix=".log")[1])
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._process = _start(self.python, "serve", self.log_path)
        try:
            ready = self._ask(settings, timeout, what="start")
        except BaseException:
            self.close()
            raise
        self.version, self.start_seconds, self.vocab_size = ready["vllm"], ready["start_seconds"], ready["vocab_size"]

    def generate(
        self,
        prompts: list[list[int]],
        *,
        max_tokens: int,
        stop_token_ids: Sequence[int] = (),
        temperature: float = 0.0,
        seed: int | None = None,
        timeout: float | None = None,
    ) -> VllmResult:
        """Greedy (or sampled) continuations of ``prompts`` (token ids), in one ``LLM.generate`` call. Without a
        ``timeout`` it waits as long as vLLM works: a worker that dies ends the wait at once."""
        request = {
            "prompts": [list(map(int, ids)) for ids in prompts],
            "max_tokens": int(max_tokens),
            "stop_token_ids": sorted(int(i) for i in stop_token_ids),
            "temperature": float(temperature),
            "seed": seed,
        }
        answer = self._ask(request, timeout, what="generate")
        outputs = [
            VllmOutput(
                token_ids=o["token_ids"],
                finish_reason=o["finish_reason"],
                steps_drafted=(o["spec"] or {}).get("per_step_drafted", []),
                steps_accepted=(o["spec"] or {}).get("per_step_accepted", []),
            )
            for o in answer["outputs"]
        ]
        return VllmResult(outputs, answer["seconds"])

    def prompt_logprobs(self, prompts: list[list[int]], top_k: int) -> tuple[list[PromptLogprobs], float]:
        """The target's log-probabilities over each prompt (vLLM's ``SamplingParams(prompt_logprobs=top_k)``, in the
        engine's ``logprobs_mode``) and the seconds ``LLM.generate`` took. Needs an engine ``max_logprobs >= top_k``."""
        request = {"prompts": [list(map(int, ids)) for ids in prompts], "prompt_logprobs": int(top_k)}
        answer = self._ask(request, None, what="score the prompts")
        scored = []
        for prompt, part in zip(prompts, answer["scored"], strict=True):
            shape = (len(prompt) - 1, top_k + 1)
            ids = np.frombuffer(base64.b64decode(part["ids"]), dtype="<i4").reshape(shape)
            values = np.frombuffer(base64.b64decode(part["logprobs"]), dtype="<f4").reshape(shape)
            path = part.get("hidden_states_path")
            scored.append(PromptLogprobs(ids[:, 0], values[:, 0], ids[:, 1:], values[:, 1:], path))
        return scored, answer["seconds"]

    def _ask(self, message: dict, timeout: float | None, what: str) -> dict:
        process = self._process
        try:
            process.stdin.write(json.dumps(message) + "\n")
            process.stdin.flush()
        except BrokenPipeError:
            raise self._failure(f"the vLLM worker exited before {what}") from None
        answer = _read_line(process, timeout)
        if answer is None:
            if process.poll() is None:
                self.close()
                raise self._failure(f"vLLM did not {what} within {timeout:.0f} s")  # only with a timeout
            raise self._failure(f"the vLLM worker exited during {what} (code {process.wait()})")
        if "error" in answer:
            broken = answer["error"].startswith(("ModuleNotFoundError", "ImportError"))
            raise self._failure(f"vLLM could not {what}: {answer['error']}" + (f"; {INSTALL_HINT}" if broken else ""))
        return answer

    def _failure(self, text: str) -> VllmError:
        return VllmError(f"{text}; its log: {self.log_path}")

    def close(self) -> None:
        """Ask the worker to shut vLLM down, then end its process group whatever it did."""
        process = getattr(self, "_process", None)
        if process is None:
            return
        self._process = None
        try:
            process.stdin.close()  # end of input: the worker shuts the engine down and exits
            process.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            pass
        _kill_group(process)

    def __enter__(self) -> VllmEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def validate(cases: list[dict], python: str | None = None, log_path: str | Path | None = None) -> list[dict]:
    """vLLM's own checks of each ``{"name", "model", "speculative_config", ...}`` (engine arguments), without
    starting an engine: ``[{"name", "ok", "error", "mask_token_id"}]`` (see the worker's ``validate``)."""
    python = find_vllm_python(python)
    log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="vllm-validate-", suffix=".log")[1])
    process = _start(python, "validate", log_path)
    try:
        process.stdin.write(json.dumps(cases))
        process.stdin.close()
        answer = _read_line(process, START_TIMEOUT)
    finally:
        _kill_group(process)
    if answer is None or "error" in answer:
        reason = "no answer" if answer is None else answer["error"]
        raise VllmError(f"vLLM's validation failed ({reason}); its log: {log_path}")
    return answer["results"]


def _start(python: Path, command: str, log_path: Path) -> subprocess.Popen:
    with open(log_path, "ab") as log:  # the child keeps its own descriptor
        try:
            return subprocess.Popen(
                [str(python), str(WORKER), command],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env=worker_environment(python),
                start_new_session=True,  # its own process group, ended as a whole
            )
        except OSError as error:
            raise VllmUnavailable(f"cannot start vLLM's Python {python}: {error.strerror}") from None


def _read_line(process: subprocess.Popen, timeout: float | None) -> dict | None:
    """The worker's next JSON line, or None if it exits or ``timeout`` (None: no limit) passes first."""
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            return None
    line = process.stdout.readline()
    return json.loads(line) if line.strip() else None


def _kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
