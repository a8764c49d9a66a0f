"""Speculative decoding evaluation: acceptance length of a draft with a target."""
