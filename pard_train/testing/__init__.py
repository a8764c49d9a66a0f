"""Offline fixtures: tiny random models, tokenizers and target/draft pairs built in seconds without a model hub.

Owns: ``tiny`` (the tiny Llama, its BPE tokenizer, the padded-rows rule), ``tiny_pair`` (a tiny target and PARD
draft, and a tiny family), ``family_tokenizer`` (tokenizers shaped like Llama 3's and ChatML's), ``shapes`` (random
Llamas of named shapes for the benchmarks and the GPU check).
Used by tests, benchmark scripts and the ``tiny`` presets (``model.build_tiny``, the tiny evaluation and sweep), which
may import it from any layer. May import: base, core, data, modelio.
"""
