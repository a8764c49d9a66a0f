"""pard_train: train PARD parallel draft models for speculative decoding (see README.md).

The sub-packages are layers; a module imports only from layers below its own (tests/test_module_graph.py checks it,
imports inside functions included, and that no import cycle exists):

- ``base``: errors, files written whole, the typed config (torch-free);
- ``core``: the PARD math (layout, attention rule, loss, chunked LM head, mask token, FLOPs);
- ``data``: training data, from files to packed layout batches;
- ``modelio``: models in and out (loading, GGUF, derived drafts, vocabularies, the draft format's one owner);
- ``run``, ``evaluate``: run infrastructure (processes, checkpoints, locks, signals, tracking, the CLI frame), and the
  speculative-decoding harness;
- ``methods``, ``publish``: what the draft learns (PARD, PARD-2), and the exported directory (card, serving check,
  vLLM's command);
- ``training``: the loop, its evaluators, acceptance around training;
- the application: ``__main__`` (``python -m pard_train``), each sub-package's ``__main__`` and the thin command
  modules ``export``, ``derive``, ``gguf`` and ``teacher_cache`` (``python -m pard_train.export`` ...), which only
  call into the layers.

``testing`` (tiny models and tokenizers built offline) sits beside ``evaluate``; the tiny presets may import it from
any layer. Importing ``pard_train`` itself imports nothing else: start-up stays cheap.
"""
