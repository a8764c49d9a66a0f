"""vLLM 0.32's ``ExampleHiddenStatesConnector`` with a write that works on any device, for the teacher cache's
features (``extract_hidden_states``, :mod:`pard_train.vllm_env.worker`).

vLLM's engine processes import it by name (``kv_connector_module_path="hidden_states_connector"``): this directory is
on their PYTHONPATH (:func:`pard_train.vllm_env.locate.worker_environment`), and like the worker it imports only vLLM
and what vLLM itself depends on (torch, safetensors), since it runs under vLLM's interpreter.

Why a subclass: the stock connector writes each finished request's file from a CUDA stream into pinned memory
(``_submit_async_write``: ``torch.cuda.Stream``, ``torch.cuda.Event``, ``pin_memory=True``), which a CPU build of
torch refuses at the first finished request, and the engine dies. On CUDA (and ROCm) devices the stock method runs
unchanged; on any other device the slots are gathered synchronously and the same file is written (``hidden_states``
``[prompt tokens, ids, hidden]`` in the model's dtype, ``token_ids``), under the same lock, before the request is
reported done.
"""

from __future__ import annotations

import fcntl
import os

import torch
from safetensors.torch import save_file
from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (
    ExampleHiddenStatesConnector,
    PendingSave,
    extract_from_kv_cache,
)


class _Written:
    """What ``get_finished`` polls in place of the stock connector's CUDA event: the file is already written."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


class HiddenStatesConnector(ExampleHiddenStatesConnector):
    def _submit_async_write(self, pending: PendingSave) -> None:
        if self._kv_cache is not None and self._kv_cache.device.type == "cuda":
            super()._submit_async_write(pending)
            return
        if not self._is_tp_rank_zero:  # as the stock connector: only tensor-parallel rank 0 writes
            return
        block_ids = torch.tensor(pending.block_ids, dtype=torch.long)
        offsets = torch.arange(self._block_size, dtype=torch.long)
        slots = (offsets[None, :] + block_ids[:, None] * self._block_size).flatten()
        states = extract_from_kv_cache(self._kv_cache, slots, pending.token_ids.shape[0]).to("cpu").clone()
        os.makedirs(os.path.dirname(pending.filename) or ".", exist_ok=True)
        lock_fd = self._lock_fds.pop(pending.req_id, None)  # taken when the request was scheduled
        if lock_fd is None and self.use_lock:
            lock_fd = os.open(pending.filename + ".lock", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
        try:
            # Whole or absent: a reader that does not take the lock never sees half a file.
            partial = pending.filename + ".partial"
            save_file({"hidden_states": states, "token_ids": pending.token_ids.clone()}, partial)
            os.replace(partial, pending.filename)
        finally:
            if lock_fd is not None:
                os.close(lock_fd)  # releases the lock readers wait on
        self._req_copy_events[pending.req_id] = _Written()
