"""An exception in the middle of a step still runs the whole teardown: the process group is left, the signal handlers
are restored, DataLoader workers are stopped and the tracker is closed, so the same process can train again."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from launch import REPO, env, free_port, tiny_overrides

SCRIPT = textwrap.dedent(
    """
    import multiprocessing, signal, sys
    import torch
    sys.path.insert(0, {tests!r})
    from conftest import compose
    import pard_train.training.train as trainer
    import pard_train.run.tracking as tracking
    from pard_train.base.config import to_config

    closed = []
    original_close = tracking.Trackers.close
    tracking.Trackers.close = lambda self: (closed.append(True), original_close(self))

    original_step = trainer.Trainer.train_step
    calls = []
    def failing_step(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected failure in step 3")
        return original_step(self, *args)
    trainer.Trainer.train_step = failing_step

    from pard_train.run.logs import setup_logging

    setup_logging()  # as the entry point does: the resume line goes to stdout
    config = to_config(compose(*{overrides!r}))
    handler = signal.getsignal(signal.SIGTERM)
    try:
        trainer.train(config)
        raise SystemExit("the injected failure did not propagate")
    except RuntimeError as error:
        assert "injected failure in step 3" in str(error), error
    assert not torch.distributed.is_initialized(), "process group leaked"
    assert signal.getsignal(signal.SIGTERM) is handler, "SIGTERM handler not restored"
    assert closed == [True], closed
    assert not multiprocessing.active_children(), multiprocessing.active_children()

    trainer.Trainer.train_step = original_step
    final = trainer.train(config)  # the same process trains again, from the checkpoint of step 2
    assert final is not None and (final / "model.safetensors").exists()
    assert not torch.distributed.is_initialized()
    print("TEARDOWN OK")
    """
)


@pytest.mark.slow
def test_teardown_runs_after_an_exception_mid_step(tiny_checkpoint, tmp_path):
    overrides = tiny_overrides(
        tiny_checkpoint,
        tmp_path,
        "deepspeed=zero2",  # a real process group (gloo) that must be left
        "train.max_steps=5",
        "checkpoint.every_steps=2",
        "data.loader_workers=1",
        "tracking.backend=tensorboard",
    )
    script = tmp_path / "teardown.py"
    script.write_text(SCRIPT.format(tests=str(REPO / "tests"), overrides=overrides))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port"]
    result = subprocess.run(
        [*launcher, str(free_port()), str(script)],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0 and "TEARDOWN OK" in result.stdout, (result.stdout + result.stderr)[-4000:]
    assert "resuming from" in result.stdout
