"""Publish layer: the draft as a server receives it.

Owns: ``export`` (the Hugging Face directory vLLM serves and its model card; ``python -m pard_train.export``),
``serving_check`` (what vLLM would do with a draft: ``export --check``), ``serving`` (vLLM's speculative config, its
command line and the K a sweep recommends).
May import: base, core, data, modelio, run, evaluate (an evaluation report rendered into the card).
"""
