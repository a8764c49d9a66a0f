"""Offline fixtures: tiny random models, tokenizers and target/draft pairs built in seconds without a model hub.

Owns: ``tiny`` (the tiny Llama, its BPE tokenizer, the padded-rows rule), ``tiny_pair`` (a tiny target and PARD
draft, and a tiny family), ``family_tokenizer`` (tokenizers shaped like Llama 3's and ChatML's).
Used by tests, benchmark scripts and the ``tiny`` presets (``model.build_tiny``, the tiny evaluation and sweep). It
may import the PARD core, model I/O and ``data.templates``; nothing in training or evaluation depends on it otherwise.
"""
