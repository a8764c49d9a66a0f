"""How a draft is served: vLLM's speculative config and command line, and the K a K sweep recommends.

The one owner of these strings. Export (the model card, the printed command), the serving check (``export --check``)
and the sweep (its recommended K) all read them here, so none of them imports another for them. Imports nothing of
pard_train: a sweep report is a plain dict here.
"""

from __future__ import annotations

import json
import shlex


def speculative_config(path: str, num_draft_tokens: int) -> dict:
    """vLLM's ``--speculative-config`` for a PARD draft at ``path`` proposing ``num_draft_tokens`` per round."""
    return {
        "model": path,
        "method": "draft_model",
        "parallel_drafting": True,
        "num_speculative_tokens": num_draft_tokens,
    }


def vllm_command(path: str, num_draft_tokens: int, target: str = "TARGET_MODEL") -> str:
    """The ``vllm serve`` command line that serves ``target`` with the draft at ``path`` (quoted for a POSIX shell:
    a path with a quote or a space stays one argument)."""
    config = json.dumps(speculative_config(path, num_draft_tokens))
    return f"vllm serve {shlex.quote(target)} --speculative-config {shlex.quote(config)}"


def recommended_serving(report: dict, draft_path: str = "PATH_TO_DRAFT", target: str | None = None):
    """``(K, vLLM command)`` recommended by a K-sweep report (for the model card); None if it holds no K sweep.

    With several targets, ``target`` picks one (default: the first swept).
    """
    sweep = report.get("k_sweep")
    if not sweep or not sweep["targets"]:
        return None
    target = target or next(iter(sweep["targets"]))
    k = sweep["targets"][target]["recommended_k"]
    if k is None:
        return None
    return k, vllm_command(draft_path, k, target)
