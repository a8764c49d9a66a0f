"""Training layer: the orchestration of one training run.

Owns: ``train`` (build, the loop, finish with one teardown), ``builders`` (the data order, the collator, the
optimizer and its schedule), ``evaluators`` (held-out loss and measured acceptance
during training, and which picks the best checkpoint), ``acceptance`` (the one owner of measuring acceptance around
training: its target, dtype, prompts, and the before/after comparison).
May import: every layer below (base, core, data, modelio, run, evaluate, methods, publish).
"""
