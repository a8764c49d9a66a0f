"""Trackers: a short run with TensorBoard holds loss, accuracy and eval metrics per depth (read back with
EventAccumulator); wandb in offline mode records the same keys without network; non-main ranks log nothing."""

from __future__ import annotations

import json
import os
import time

import pytest
from conftest import compose

from pard_train.base.config import TrackerKind, TrackingConfig, to_config
from pard_train.run.tracking import Tracker, build_tracker, peak_flops
from pard_train.training.train import train

K = 4  # the tiny preset's num_draft_tokens


def per_depth_keys(prefix: str = "") -> set[str]:
    return {f"{prefix}{kind}/depth_{d}" for kind in ("loss", "acc") for d in range(K)} | {f"{prefix}estimated_al"}


@pytest.mark.slow
def test_tensorboard_run_holds_per_depth_metrics(tiny_checkpoint, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = to_config(
        compose(
            "+config=tiny",
            f"model.path={tiny_checkpoint}",
            f"run.output_root={tmp_path}",
            "data.max_samples=64",
            "data.max_length=128",
            "data.validation_fraction=0.2",
            "train.max_steps=4",
            "train.log_every=2",
            "eval.every_steps=2",
            "tracking.backend=tensorboard",
        )
    )
    train(config)
    run_dir = tmp_path / "tiny"
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = per_depth_keys() | per_depth_keys("eval/") | {"lr", "grad_norm", "labelled_tokens_per_s"}
    assert expected | {"samples_per_s", "memory/max_rss_gib"} <= tags, expected - tags
    assert [e.step for e in events.Scalars("acc/depth_3")] == [2, 4]
    assert [e.step for e in events.Scalars("eval/estimated_al")] == [2, 4]
    # The best checkpoint by held-out estimated AL is kept and linked.
    best = (run_dir / "checkpoints" / "best").resolve()
    assert (best / "COMPLETE").exists()
    assert json.loads((best / "train_state.json").read_text())["best_al"] == pytest.approx(
        max(e.value for e in events.Scalars("eval/estimated_al")), rel=1e-6
    )


def test_wandb_offline_records_per_depth_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    settings = TrackingConfig(backend=TrackerKind.wandb, project="pard-test", entity=None)
    tracker = build_tracker(settings, "tiny", tmp_path, is_main_process=True)
    metrics = {key: 0.5 for key in per_depth_keys()}
    tracker.log_config({"pard": {"num_draft_tokens": K}})
    tracker.log(metrics, step=3)
    tracker.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["acc/depth_3"] == 0.5
    # The offline log is a record file of protobufs that hold history keys verbatim (wandb ships no reader for it);
    # wandb's service process may still be flushing it when finish() returns.
    deadline = time.monotonic() + 20
    while True:
        logs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
        data = logs[0].read_bytes() if len(logs) == 1 else b""
        if all(key.encode() in data for key in per_depth_keys()) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(logs) == 1, os.listdir(tmp_path / "wandb")
    assert all(key.encode() in data for key in per_depth_keys()), data[:2000]
    assert (tmp_path / "wandb_run_id").read_text().strip() in logs[0].name  # a resumed run reuses this id


def test_only_the_main_process_tracks(tmp_path):
    tracker = build_tracker(TrackingConfig(backend=TrackerKind.tensorboard), "run", tmp_path / "run", False)
    assert type(tracker) is Tracker
    tracker.log({"loss": 1.0}, step=1)
    assert not (tmp_path / "run").exists()


def test_peak_flops_known_gpus_only():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("AMD Instinct MI300X") == 1307e12
    assert peak_flops("Some CPU") is None
