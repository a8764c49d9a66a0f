"""What ``python -m pard_train.evaluate`` checks before it measures anything, so that a measurement is never thrown
away at its end and never made on a pair that export would refuse:

- ``output_dir`` can be written (a file is created and removed there), checked before any model is loaded;
- every draft (``draft``, ``ar_draft``) maps tokens to the same ids as every target: the same check as export
  (:func:`pard_train.modelio.vocab.check_target_vocabulary`), where equal row counts are not enough.
"""

from __future__ import annotations

import os
from pathlib import Path

from pard_train.base.errors import ConfigError, VocabularyError
from pard_train.evaluate.config import EvalConfig


def check_output_dir(output_dir: str | Path) -> None:
    """Create ``output_dir`` and write a file into it; ConfigError naming it and the OS's reason if that fails."""
    path = Path(output_dir)
    probe = path / f".writable-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ConfigError(
            f"output_dir: cannot write to {path} ({error.strerror or error}); choose a writable output_dir=DIR "
            "(checked before measuring, so no measurement is lost)"
        ) from None


def _tokenizer(path: str, trust_remote_code: bool):
    from pard_train.modelio.model import load_tokenizer

    try:
        return load_tokenizer(path, trust_remote_code)
    except Exception:  # a draft without tokenizer files: nothing to compare (the embedding rows are still checked)
        return None


def check_tokenizers(config: EvalConfig) -> None:
    """VocabularyError when a draft's tokenizer maps any token to another id than a target's."""
    targets = list(config.targets or []) or [config.target]
    drafts = [(name, path) for name, path in (("draft", config.draft), ("ar_draft", config.ar_draft)) if path]
    for target in filter(None, targets):
        reference = _tokenizer(target, config.trust_remote_code)
        if reference is None:
            continue
        vocabulary = reference.get_vocab()
        for key, path in drafts:
            tokenizer = _tokenizer(path, config.trust_remote_code)
            if tokenizer is None:
                continue
            theirs = tokenizer.get_vocab()
            if theirs != vocabulary:
                differing = sorted(set(theirs.items()) ^ set(vocabulary.items()))
                token = differing[0][0] if differing else "?"
                raise VocabularyError(
                    f"{key}: tokenizer mismatch: {path} and the target {target} map tokens to different ids (e.g. "
                    f"{token!r}: {theirs.get(token)} in the draft, {vocabulary.get(token)} in the target); a draft "
                    "must share its target's tokenizer, as export checks: measure a draft of the target's family"
                )


def check_before_measuring(config: EvalConfig) -> None:
    check_output_dir(config.output_dir)
    if config.build_tiny:  # the tiny pair is built by the run itself: build it now so its tokenizers can be read
        from pard_train.testing.tiny_pair import ensure_tiny_pair

        if config.target and config.draft:
            ensure_tiny_pair(config.target, config.draft, num_draft_tokens=config.num_draft_tokens or 4)
    check_tokenizers(config)
