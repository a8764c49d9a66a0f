"""Publish layer: the draft as a server receives it.

Owns: ``export`` (the Hugging Face directory vLLM serves), ``model_card`` (its README.md and the training recipe),
``final_export`` (the trainer's ``<run>/final`` and what a failed write leaves), ``export_checkpoint`` (a trained
directory exported again: ``python -m pard_train.export``), ``serving_check`` (what vLLM would do with a draft:
``export --check``). No command line here: the command is :mod:`pard_train.export`.
May import: base, core, data, modelio, vllm_env (vLLM's speculative config and command line), run, evaluate (an
evaluation report rendered into the card).
"""
