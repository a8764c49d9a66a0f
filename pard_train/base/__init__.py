"""Base layer: what every other layer may use.

Owns: ``errors`` (every user-facing error, one family), ``atomic`` (files and directories written whole, sha256),
``config`` (the typed config tree and its validation, torch-free), ``unknown_keys`` (``+key`` typos refused).
May import: nothing of pard_train.
"""
