"""vLLM, the server of every draft: how a draft is served (:mod:`.serving`: the speculative config and command line),
and vLLM in its own environment: where its interpreter is (:mod:`.locate`), the script that interpreter runs
(:mod:`.worker`: imports only vLLM and the standard library) and the training side's handle on it (:mod:`.client`);
``vllm_path/`` holds what vLLM's own processes import by name (the hidden-states connector of the teacher cache).

vLLM pins an older transformers than pard_train, so it is never imported here: a worker process runs it, and JSON
lines carry token ids in and token ids, verify steps and timings out.
"""
