"""A run directory belongs to one configuration, through the real entry point, in process:
another configuration is refused in one line naming the keys and ``final/`` is kept; a finished rerun says so and exits
0 (``run.force=true`` trains again); a multirun gives each job its own directory; a resume applies, logs or refuses
each changed key, and the run's files record what ran; the model is identified by its files, not its path."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from launch import REPO, entry, one_error_line, records

from pard_train.run.run_record import key_class

DATA = str(REPO / "data_recipes" / "self_instruct" / "self_instruct.jsonl")


def overrides(model: Path, root: Path, *extra: str) -> list[str]:
    return [
        "+config=tiny",
        f"model.path={model}",
        f"run.output_root={root}",
        f"data.train_files=[{DATA}]",
        "data.max_samples=32",
        "data.max_length=64",
        "train.micro_batch_size=2",
        "train.max_steps=3",
        "train.log_every=1",
        *extra,
    ]


def digest(path: Path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_another_configuration_is_refused_a_finished_one_is_not_retrained(tiny_checkpoint, tmp_path, capsys):
    run_dir, args = tmp_path / "tiny", overrides(tiny_checkpoint, tmp_path)
    code, _, err = entry(capsys, *args)
    assert code == 0, err[-3000:]
    assert not (run_dir / "checkpoints").exists()  # a short run: no checkpoint, the guard must not depend on one
    first = digest(run_dir / "final")

    error = one_error_line(*entry(capsys, *args, "pard.num_draft_tokens=3")[::2])
    assert "pard.num_draft_tokens: 4 there, 3 now" in error and "run.name=" in error, error
    assert digest(run_dir / "final") == first

    code, out, _ = entry(capsys, *args)
    assert code == 0 and "already holds this configuration's finished draft" in out and "run.force=true" in out
    assert digest(run_dir / "final") == first and len(records(run_dir)) == 3

    # Other data in a finished run: not "finished", refused once its rows are known.
    changed = tmp_path / "changed.jsonl"
    changed.write_text("".join(Path(DATA).read_text().splitlines(keepends=True)[40:120]))
    error = one_error_line(*entry(capsys, *args, f"data.train_files=[{changed}]")[::2])
    assert "was trained on other data (fingerprint" in error and "another run.name" in error, error

    # The same model by another path, a byte-identical copy: the same run (finished).
    copy = tmp_path / "copy-of-tiny"
    shutil.copytree(tiny_checkpoint, copy)
    code, out, _ = entry(capsys, *overrides(copy, tmp_path))
    assert code == 0 and "already holds" in out
    # Another model at the same path: refused, naming the model files.
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    error = one_error_line(*entry(capsys, *overrides(copy, tmp_path))[::2])
    assert "model files:" in error and "config and weight sha256" in error, error

    code, out, err = entry(capsys, *args, "run.force=true")
    assert code == 0 and "already holds" not in out, err[-2000:]
    assert [r["step"] for r in records(run_dir)] == [1, 2, 3]  # trained again from step 0, each step once


def test_multirun_gives_each_job_its_own_directory(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Hydra's own files must not land in the current directory
    code, _, err = entry(
        capsys, "-m", *overrides(tiny_checkpoint, tmp_path / "runs", "train.max_steps=1"), "pard.num_draft_tokens=2,3"
    )
    assert code == 0, err[-3000:]
    for k in (2, 3):
        final = tmp_path / "runs" / "tiny" / f"pard.num_draft_tokens={k}" / "final"
        assert json.loads((final / "config.json").read_text())["num_draft_tokens"] == k
    assert not (tmp_path / "multirun").exists() and (tmp_path / "runs" / "multirun").is_dir()


def test_resume_applies_logs_or_refuses_each_key(tiny_checkpoint, tmp_path, capsys):
    run_dir = tmp_path / "tiny"
    args = overrides(tiny_checkpoint, tmp_path, "train.max_steps=4", "checkpoint.every_steps=2")
    code, _, err = entry(capsys, *args)
    assert code == 0, err[-3000:]
    assert (run_dir / "checkpoints" / "step_00000002").is_dir()

    # Refused: a setting the optimizer state or the data depend on.
    error = one_error_line(*entry(capsys, *args, "train.max_steps=6", "train.weight_decay=0.1")[::2])
    assert "train.weight_decay: 0.0 there, 0.1 now" in error, error

    # A save killed at a step no later cadence reaches: its staging copy is removed at start.
    stale = run_dir / "checkpoints" / ".step_00000099.partial"
    stale.mkdir()
    (stale / "optimizer.bin").write_bytes(b"x" * 1000)
    # And an export killed while writing final/ (its staging is named after the dead process).
    export_staging = run_dir / ".final.partial-99999"
    export_staging.mkdir()
    (export_staging / "model.safetensors").write_bytes(b"x" * 1000)

    # Applied silently (length, logging) and applied with a line (LR): resumes from step 2 at the new LR.
    code, out, err = entry(capsys, *args, "train.max_steps=6", "train.log_every=3", "train.lr=1e-4")
    assert code == 0, err[-3000:]
    assert "removed .step_00000099.partial, left by a save or export that did not finish" in out
    assert "removed .final.partial-99999, left by a save or export that did not finish" in out
    assert not stale.exists() and not export_staging.exists()
    assert "resume at step 2: train.lr changed from 0.003 to 0.0001; applied from step 3" in out, out
    assert "log_every" not in out and "max_steps" not in out
    rows = records(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 6]  # each step once: steps 3 and 4 of the first launch are gone
    assert [r["steps"] for r in rows] == [1, 1, 1, 3]  # the row at step 3 covers the one step since the resume
    assert all(r["lr"] <= 1e-4 for r in rows[2:]) and rows[1]["lr"] > 1e-3, rows
    saved = (run_dir / "config.yaml").read_text()
    assert saved.startswith("# changed on resume: train.lr 0.003 -> 0.0001 at step 2") and "lr: 0.0001" in saved
    card = (run_dir / "final" / "README.md").read_text()
    assert "train.lr 0.003 -> 0.0001 at step 2" in card and "lr=0.0001" in card


@pytest.mark.parametrize(
    "key, kind",
    [
        ("train.max_steps", "applied"),
        ("checkpoint.every_steps", "applied"),
        ("train.log_every", "applied"),
        ("model.path", "applied"),  # compared by content instead
        ("train.lr", "logged"),
        ("train.schedule", "logged"),
        ("train.weight_decay", "identity"),
        ("pard.num_draft_tokens", "identity"),
        ("data.max_length", "identity"),
        ("train.precision", "identity"),
    ],
)
def test_every_key_has_a_class(key, kind):
    assert key_class(key) == kind


def test_a_launch_that_trained_nothing_does_not_claim_the_directory(tmp_path):
    """A first launch that failed before its first step (a bad mask id, say) leaves run.json; fixing the setting must
    not be refused as "another configuration". Once a step is logged, it is."""
    from conftest import compose

    from pard_train.base.config import to_config
    from pard_train.base.errors import ResumeError
    from pard_train.run.run_record import claim

    first = to_config(compose("+config=tiny", "model.mask_token_id=7"))
    fixed = to_config(compose("+config=tiny", "model.mask_token_id=9"))
    claim(tmp_path, first, "m")
    record, status = claim(tmp_path, fixed, "m")
    assert status == "continue" and record.identity["model.mask_token_id"] == 9
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ResumeError, match="model.mask_token_id: 9 there, 7 now"):
        claim(tmp_path, first, "m")


def test_model_identity_is_the_files_not_the_path(tmp_path):
    from pard_train.modelio.model_identity import model_files_digest, model_fingerprint

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 8}')
    (model / "model.safetensors").write_bytes(b"weights" * 100)
    (model / "README.md").write_text("a model card edit is the same model")
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(model, copy)
    (copy / "README.md").write_text("another card")
    hashes = tmp_path / "hashes.json"
    assert model_fingerprint(str(model), hashes) == model_fingerprint(str(copy), hashes)
    assert model_fingerprint(str(model), hashes) == model_fingerprint(str(tmp_path / "elsewhere" / ".." / "model"))
    (copy / "model.safetensors").write_bytes(b"weightz" * 100)  # same size, other bytes
    assert model_fingerprint(str(model), hashes) != model_fingerprint(str(copy), hashes)
    assert model_files_digest("meta-llama/Llama-3.2-1B-Instruct") == {"id": "meta-llama/Llama-3.2-1B-Instruct"}
    # A hub snapshot's file links to blobs/<sha256>: that name is its digest, the blob is not read.
    blob = tmp_path / "blobs" / ("ab" * 32)
    blob.parent.mkdir()
    blob.write_bytes(b"not what the name says")
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "model.safetensors").symlink_to(blob)
    assert model_files_digest(str(snapshot)) == {"model.safetensors": "ab" * 32}


def test_sweep_job_directory_names():
    from pard_train.run.sweep_dirs import job_dir_name, swept_keys

    argv = ["+config=tiny", "model.path=/m/x", "pard.num_draft_tokens=2,3", "train.lr=range(1,3)", "-m"]
    assert swept_keys(argv) == {"pard.num_draft_tokens", "train.lr"}
    assert swept_keys(["+config=tiny", "train.lr=1"]) is None
    assert job_dir_name(["pard.num_draft_tokens=2", "train.lr=1e-4"], 0) == "pard.num_draft_tokens=2,train.lr=1e-4"
    assert job_dir_name(["model.path=/a/b", "run.output_root=x", "+config=tiny"], 7) == "job7"
