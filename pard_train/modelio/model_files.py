"""What ``model.path`` must hold before the trainer loads it: the tiny preset's random checkpoint, a GGUF package's
conversion, and with ``model.keep_layers`` the derived draft. Apart from the loaders (``model``), since deriving a
draft itself loads models with them."""

from __future__ import annotations

from pard_train.base.config import ModelConfig


def prepare_model_files(config: ModelConfig, train_files: list[str]) -> None:
    """Write what ``model.path`` must hold before it can be loaded: the tiny preset's random checkpoint (its BPE
    tokenizer trained on the training files), or the GGUF package's conversion; then, with ``model.keep_layers``,
    the draft derived from it (``model.draft_path``). Run it on one process first
    (``main_process_first``); loading is collective."""
    if config.gguf_package:
        from pard_train.modelio.gguf import ensure_converted

        ensure_converted(config.gguf_package, config.path)
    if config.build_tiny:
        from pard_train.data.dataset import expand_files
        from pard_train.testing.tiny import ensure_tiny_checkpoint

        # Read only if the tokenizer is built; any bytes do for its training (the data loader judges the rows).
        texts = (path.read_text(encoding="utf-8", errors="replace") for path in expand_files(train_files))
        ensure_tiny_checkpoint(config.path, texts=texts)
    if config.keep_layers is not None:
        from pard_train.modelio.derive import ensure_derived

        ensure_derived(config.path, config.draft_path, config.keep_layers, config.trust_remote_code)
