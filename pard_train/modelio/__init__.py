"""Model I/O layer: models in and out of the trainer.

Owns: ``model`` (load a draft or any causal LM and its tokenizer; DraftSpec), ``model_files`` (what ``model.path``
must hold first: the tiny checkpoint, a GGUF conversion, a derived draft), ``gguf``, ``derive`` (a draft that keeps some
of a model's layers; their commands are :mod:`pard_train.gguf` and :mod:`pard_train.derive`), ``vocab`` (a draft's
vocabulary matched to a target's), ``model_identity`` (a model by content), ``draft_format`` (the draft directory's
keys and files: the only module that spells them).
May import: base, core, data; testing (the tiny preset).
"""
