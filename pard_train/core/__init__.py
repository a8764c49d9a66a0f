"""Core layer: the PARD math, on tensors and a model's forward.

Owns: ``layout`` (depths, drop-token, labels, the attention rule; pure tensors), ``attention`` (the rule as a
FlexAttention BlockMask or an SDPA mask), ``loss`` (the PARD loss and per-depth metrics), ``lm_head_loss`` (the
chunked LM head whose gradients are taken in the forward), ``mask_token`` (the mask id), ``flops`` (the one FLOP count).
May import: base.
"""
