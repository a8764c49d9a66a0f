"""Every mistake a user can make, as one exception family: every CLI catches :class:`PardTrainError`, prints its
message as one line and exits with code 2. Anything else is a bug and keeps its traceback.

This module imports nothing from the package, so any module can raise these without an import cycle.
"""

from __future__ import annotations


class PardTrainError(Exception):
    """A user-facing error: the message names what is wrong (key, file, row, model) and what to do."""


class ConfigError(PardTrainError, ValueError):
    """A setting that cannot work; the message names the key and what to do."""


class ResumeError(ConfigError):
    """The run directory holds a checkpoint this configuration must not continue from; the message says why."""


class DataError(PardTrainError, ValueError):
    """Training data that cannot be used: missing files, too many bad rows, an unusable chat template."""


class MaskTokenError(PardTrainError, ValueError):
    """The chosen mask token id cannot serve as the PARD mask for this model and tokenizer."""


class ModelNotFoundError(PardTrainError, FileNotFoundError):
    """The model is neither a local directory nor reachable on the hub."""


class GgufPackageError(ModelNotFoundError):
    """The package that should ship a GGUF model is not installed or holds no GGUF file."""


class ExportError(PardTrainError, ValueError):
    """The export cannot be written as asked; the message says what to change."""


class VocabularyError(ExportError):
    """Draft and target cannot share a vocabulary; the message says why."""


class BenchmarkError(PardTrainError, ValueError):
    """A prompt set that cannot be loaded: unknown name, missing file or malformed row."""


class RunLockedError(PardTrainError):
    """The run directory belongs to another live run (or its lock cannot be written); the message names the owner."""


class CheckpointSaveError(PardTrainError):
    """A checkpoint could not be written (no space, no permission, read-only); the previous one is untouched."""
