"""Publish layer: the draft as a server receives it.

Owns: ``export`` (the Hugging Face directory vLLM serves and its model card; ``python -m pard_train.export``),
``serving_check`` (what vLLM would do with a draft: ``export --check``).
May import: base, core, data, modelio, vllm_env (vLLM's speculative config and command line), run, evaluate (an
evaluation report rendered into the card).
"""
