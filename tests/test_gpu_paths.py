"""The GPU and multi-node paths, reproduced on CPU: what the code would do on a cluster is decided by
environment variables, device names, DeepSpeed's JSON and signal handlers, all of which can be faked here."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launch import REPO, env, tiny_overrides

from pard_train.base.config import Precision
from pard_train.base.errors import PardTrainError
from pard_train.run import distributed
from pard_train.run.distributed import (
    PROCESS_GROUP_TIMEOUT,
    NoVisibleGpuError,
    allocated_gpus,
    check_gpus_visible,
    deepspeed_config,
    mixed_precision_for,
)
from pard_train.run.signals import StopSignals
from pard_train.run.tracking import peak_flops

NODE_SH = REPO / "scripts" / "slurm" / "node.sh"


# Emulated bf16 (V100, T4) must not choose bf16.
def test_auto_precision_ignores_emulated_bf16(monkeypatch):
    calls = []

    def is_bf16_supported(including_emulation=True):
        calls.append(including_emulation)
        return including_emulation  # a V100: bf16 only by emulation

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert mixed_precision_for(Precision.auto) == "no" and calls == [False]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # an A100
    assert mixed_precision_for(Precision.auto) == "bf16"


# Peaks per torch device; the SXM, PCIe and NVL H100s differ; an MI250X device is one GCD.
@pytest.mark.parametrize(
    "name, flops",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("AMD Instinct MI250X", 191.5e12),
        ("AMD Instinct MI250X/MI250", 191.5e12),
        ("AMD Instinct MI300X", 1307e12),
        ("Tesla V100-SXM2-32GB", None),
    ],
)
def test_peak_flops_per_device(name, flops):
    assert peak_flops(name) == flops


# GPUs allocated but none visible (ROCm partial node, CPU-only torch) is refused in one line.
@pytest.mark.parametrize(
    "environ",
    [
        {"SLURM_GPUS_ON_NODE": "2"},
        {"SLURM_JOB_GPUS": "4,5"},
        {"ROCR_VISIBLE_DEVICES": "4,5", "CUDA_VISIBLE_DEVICES": "4,5"},
        {"HIP_VISIBLE_DEVICES": "0"},
    ],
)
def test_allocated_but_invisible_gpus_refused(monkeypatch, environ):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(NoVisibleGpuError) as raised:
        check_gpus_visible(environ)
    assert isinstance(raised.value, PardTrainError) and "\n" not in str(raised.value)
    assert all(f"{name}={value}" in str(raised.value) for name, value in environ.items())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    check_gpus_visible(environ)  # visible: fine


def test_no_gpu_allocation_trains_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cleared = {"CUDA_VISIBLE_DEVICES": "", "ROCR_VISIBLE_DEVICES": "-1", "SLURM_GPUS_ON_NODE": "0"}
    assert allocated_gpus(cleared) == {}
    check_gpus_visible(cleared)
    check_gpus_visible({})


def test_trainer_refuses_allocated_gpus_it_cannot_see(tiny_checkpoint, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pard_train", *tiny_overrides(tiny_checkpoint, tmp_path, "train.max_steps=1")],
        cwd=REPO,
        env={**env(), "SLURM_GPUS_ON_NODE": "1", "ROCR_VISIBLE_DEVICES": "0", "CUDA_VISIBLE_DEVICES": "0"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert "GPUs were allocated" in lines[0] and "sees none" in lines[0]
    assert not (tmp_path / "tiny" / "checkpoints").exists()


# A long process-group timeout reaches accelerate (which passes it to torch.distributed and DeepSpeed).
def test_process_group_timeout_is_passed(monkeypatch, tiny_checkpoint):
    from conftest import compose

    from pard_train.base.config import to_config

    seen = {}
    # As under a launcher: a world of one would set the rendezvous in this process's environment for good.
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(distributed, "Accelerator", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr(distributed, "DeepSpeedPlugin", lambda **kwargs: kwargs)
    for preset in ("deepspeed=none", "deepspeed=zero3"):
        config = to_config(compose("+config=tiny", preset))
        distributed.build_accelerator(config.train, config.deepspeed)
        (handler,) = seen["kwargs_handlers"]
        kwargs = handler.to_kwargs()
        assert kwargs["timeout"] == PROCESS_GROUP_TIMEOUT and PROCESS_GROUP_TIMEOUT.total_seconds() > 600
        assert kwargs.get("backend") == ("gloo" if preset == "deepspeed=zero3" else None)


# The DeepSpeed JSON keeps torch's AdamW with offload and accumulates/reduces in fp32 under bf16.
def test_deepspeed_json_fp32_gradients_and_torch_adamw():
    from conftest import compose

    from pard_train.base.config import to_config

    config = to_config(compose("+config=tiny", "deepspeed=zero2", "deepspeed.offload_optimizer=true"))
    ds = deepspeed_config(config.deepspeed, config.train, "bf16")
    assert ds["communication_data_type"] == "fp32" and ds["data_types"] == {"grad_accum_dtype": "fp32"}
    assert ds["zero_force_ds_cpu_optimizer"] is False
    fp32 = deepspeed_config(config.deepspeed, config.train, "no")
    assert "communication_data_type" not in fp32 and "data_types" not in fp32


ENGINE_SCRIPT = r"""
import os, sys, torch, deepspeed
from conftest import compose
from pard_train.base.config import to_config
from pard_train.run.distributed import deepspeed_config
deepspeed.init_distributed(dist_backend="gloo")
for setting in sys.argv[1:]:  # one engine after the other in this process: the imports are most of the time
    stage, offload = int(setting.split("-")[0]), setting.endswith("-offload")
    overrides = ["+config=tiny", f"deepspeed=zero{stage}", "train.grad_accum_steps=2", "train.micro_batch_size=2"]
    if offload:
        overrides.append("deepspeed.offload_optimizer=true")
    composed = to_config(compose(*overrides))
    config = deepspeed_config(composed.deepspeed, composed.train, "bf16")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    before = [p.detach().float().clone() for p in engine.parameters()]
    for _ in range(2):
        x = torch.randn(2, 8, dtype=torch.bfloat16)
        loss = engine(x).float().square().mean()
        engine.backward(loss)
        engine.step()
    model_dtype, accum_dtype = engine.get_data_types()
    inner = getattr(optimizer, "optimizer", optimizer)
    changed = any(not torch.equal(a, b.detach().float()) for a, b in zip(before, engine.parameters()))
    print("RESULT", setting, model_dtype, accum_dtype, engine.communication_data_type, type(inner).__name__, changed)
    engine.destroy()
"""
ENGINE_SETTINGS = ["1-", "2-", "2-offload", "3-"]


@pytest.fixture(scope="module")
def engine_results(tmp_path_factory) -> dict[str, str]:
    """A real DeepSpeed 0.19.8 engine on CPU (gloo, one process) per ZeRO setting, built and stepped in one process."""
    from launch import free_port

    script = tmp_path_factory.mktemp("engine") / "engine.py"
    script.write_text(ENGINE_SCRIPT)
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1"}
    result = subprocess.run(
        [sys.executable, str(script), *ENGINE_SETTINGS],
        cwd=REPO,
        # This checkout's pard_train first (a shared venv may hold an editable install of another one), then conftest.
        env={**env(), **rendezvous, "LOCAL_RANK": "0", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])},
        capture_output=True,
        text=True,
        timeout=400,
    )
    lines = {line.split()[1]: line for line in result.stdout.splitlines() if line.startswith("RESULT")}
    return {setting: lines.get(setting) or (result.stdout + result.stderr)[-4000:] for setting in ENGINE_SETTINGS}


@pytest.mark.slow
@pytest.mark.parametrize("setting", ENGINE_SETTINGS)
def test_deepspeed_bf16_engine_steps_with_fp32_gradients(setting, engine_results):
    """The engine accepts our DeepSpeed JSON's keys under bf16 and steps with them."""
    line = engine_results[setting]
    assert line.startswith("RESULT"), line  # otherwise: the script's output, where it failed
    _, _, model_dtype, accum_dtype, communication, optimizer, changed = line.split()
    assert (model_dtype, accum_dtype, communication) == ("torch.bfloat16", "torch.float32", "torch.float32")
    assert optimizer == "AdamW" and changed == "True", line  # torch's AdamW, even with offload: nothing compiled


# The command node.sh builds, for one and two processes in total.
def _node_command(nproc: int, nodes: int = 1, launcher: str = "accelerate") -> str:
    result = subprocess.run(
        ["bash", str(NODE_SH), "+config=tiny"],
        env={
            **os.environ,
            "PYTHON": sys.executable,
            "PARD_DRY_RUN": "1",
            "PARD_LAUNCHER": launcher,
            "NPROC_PER_NODE": str(nproc),
            "SLURM_NNODES": str(nodes),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29500",
        },
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout


def test_node_sh_accelerate_multi_gpu_only_with_several_processes():
    one = _node_command(1)
    assert "--multi_gpu" not in one and "--num_processes 1 " in one
    two, two_nodes = _node_command(2), _node_command(1, nodes=2)  # each a Python start: once each
    assert "--multi_gpu" in two and "--num_processes 2 " in two
    assert "--multi_gpu" in two_nodes and "--num_processes 2 " in two_nodes
    assert "--nproc_per_node 1 " in _node_command(1, launcher="torchrun")


@pytest.mark.slow
def test_node_sh_accelerate_one_process_trains(tiny_checkpoint, tmp_path):
    """The one-process command node.sh builds is one accelerate accepts (it refuses --multi_gpu with 1 process)."""
    from launch import free_port

    result = subprocess.run(
        ["bash", str(NODE_SH), *tiny_overrides(tiny_checkpoint, tmp_path, "train.max_steps=1")],
        cwd=REPO,
        env={
            **env(),
            "PYTHON": sys.executable,
            "PARD_LAUNCHER": "accelerate",
            "NPROC_PER_NODE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
        },
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert (tmp_path / "tiny" / "final" / "model.safetensors").exists()


def test_node_sh_raises_torchrun_shutdown_timeout(tmp_path, monkeypatch):
    fake_python = tmp_path / "python"
    fake_python.write_text('#!/bin/bash\necho "timeout=$TORCH_ELASTIC_SHUTDOWN_TIMEOUT args=$*"\n')
    fake_python.chmod(0o755)
    base = {**os.environ, "PYTHON": str(fake_python), "NPROC_PER_NODE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    for extra, expected in (({}, "600"), ({"PARD_SHUTDOWN_TIMEOUT": "900"}, "900")):
        result = subprocess.run(["bash", str(NODE_SH)], env={**base, **extra}, capture_output=True, text=True)
        assert result.stdout.startswith(f"timeout={expected} args=-m torch.distributed.run"), result.stdout
        # torchrun 2.13 reads the variable when --shutdown-timeout is not given (default 30 s).
        from torch.distributed.launcher.api import LaunchConfig

        monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", expected)
        assert LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=1).shutdown_timeout == int(expected)


# Submitit's preemption handler is chained after the save, not replaced and not run mid-step.
class FakeSubmitit:
    def __init__(self):
        self.calls = []

    def checkpoint_and_try_requeue(self, signum, frame):
        self.calls.append(signum)


@pytest.mark.parametrize("sent", [signal.SIGUSR2, signal.SIGTERM])
def test_stop_signal_saves_then_chains_submitit_requeue(sent):
    submitit = FakeSubmitit()
    previous = signal.signal(signal.SIGUSR2, submitit.checkpoint_and_try_requeue)
    previous_term = signal.getsignal(signal.SIGTERM)
    try:
        with StopSignals() as stop:
            os.kill(os.getpid(), sent)
            assert stop.requested and stop.received == sent
            assert submitit.calls == [], "submitit's handler ran before the checkpoint"
        assert submitit.calls == [signal.SIGUSR2], "the job would not be requeued"
        assert signal.getsignal(signal.SIGUSR2) == submitit.checkpoint_and_try_requeue
        assert signal.getsignal(signal.SIGTERM) == previous_term
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_failed_run_and_quiet_run_do_not_chain():
    submitit = FakeSubmitit()
    previous = signal.signal(signal.SIGUSR2, submitit.checkpoint_and_try_requeue)
    try:
        with StopSignals():
            pass
        with pytest.raises(RuntimeError), StopSignals():
            os.kill(os.getpid(), signal.SIGUSR2)
            raise RuntimeError("crash after the signal")
        assert submitit.calls == []
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_submitit_requeue_exits_after_the_save(monkeypatch):
    """With submitit's real handler: after the save it requeues (mocked scontrol) and exits, so the job is not
    reported COMPLETED."""
    submitit = pytest.importorskip("submitit")
    from submitit.core.job_environment import SignalHandler
    from submitit.slurm.slurm import SlurmJobEnvironment

    requeued = []
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_PROCID", "0")
    environment = SlurmJobEnvironment()
    monkeypatch.setattr(environment, "_requeue", requeued.append)

    class Job:
        def __call__(self):
            pass

        def checkpoint(self):
            return submitit.helpers.DelayedSubmission(self)

    delayed = submitit.helpers.DelayedSubmission(Job())
    delayed.set_timeout(60, 3)
    paths = type("Paths", (), {"submitted_pickle": None})()
    handler = SignalHandler(environment, paths, delayed)
    monkeypatch.setattr(submitit.core.job_environment, "_checkpoint", lambda *args: "")
    previous = signal.signal(signal.SIGUSR2, handler.checkpoint_and_try_requeue)
    try:
        with pytest.raises(SystemExit) as exited, StopSignals() as stop:
            os.kill(os.getpid(), signal.SIGUSR2)
            assert stop.requested and requeued == []  # the trainer saves here
        assert requeued == [3] and exited.value.code == -1
    finally:
        signal.signal(signal.SIGUSR2, previous)


# The draft decodes through SDPA during the measurement and trains with its own attention afterwards.
def test_measured_acceptance_decodes_with_sdpa(tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    from pard_train.training.evaluators import decoding_attention

    draft = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, attn_implementation="flex_attention")
    with decoding_attention(draft):
        assert draft.config._attn_implementation == "sdpa"
    assert draft.config._attn_implementation == "flex_attention"


def test_measured_acceptance_target_in_bf16_on_gpu(monkeypatch):
    from conftest import compose

    import pard_train.modelio.model as model_module
    import pard_train.training.evaluators as evaluators
    from pard_train.base.config import to_config

    loaded = []

    class Target:
        def to(self, device):
            return self

        def eval(self):
            return self

    def load(path, backend, dtype=torch.float32, **kwargs):
        loaded.append((backend.value, dtype))
        return Target()

    monkeypatch.setattr(model_module, "load_causal_lm", load)
    accelerator = type("Acc", (), {"is_main_process": True, "device": torch.device("cuda", 0)})()
    config = to_config(compose("+config=tiny", "acceptance.every_steps=5", "acceptance.benchmarks=[gsm8k]"))
    evaluators.MeasuredAcceptance(config.acceptance, config.acceptance_target, None, None, None, accelerator)
    assert loaded == [("sdpa", torch.bfloat16)]


# The harness run from training checks losslessness in fp32, measures AL alone in the default dtype.
def test_lossless_check_runs_in_fp32(tmp_path):
    from conftest import compose

    from pard_train.base.config import to_config
    from pard_train.evaluate.config import DType
    from pard_train.modelio.model import DraftSpec
    from pard_train.training.acceptance import _harness_config

    spec = DraftSpec.__new__(DraftSpec)
    object.__setattr__(spec, "num_draft_tokens", 4)
    object.__setattr__(spec, "mask_token_id", 3)
    checked = to_config(compose("+config=tiny", "acceptance.modes=[target,pard]"))
    assert _harness_config(checked.acceptance, "t", Path("d"), spec, tmp_path).dtype == DType.fp32
    plain = to_config(compose("+config=tiny", "acceptance.modes=[pard]"))
    assert _harness_config(plain.acceptance, "t", Path("d"), spec, tmp_path).dtype == DType.auto


# Held-out evaluation with a validation split that does not divide evenly: every rank runs the same number
# of forwards (a rank short of rows scores a filler batch and drops it). Under ZeRO-3 each forward all-gathers the
# parameters, so a rank with one forward fewer would leave the other waiting forever (the timeout turns it into a
# failure); the scores must equal a single process's, so the filler batch counts nowhere.
@pytest.mark.slow
def test_held_out_eval_uneven_split_zero3_two_processes(tiny_checkpoint, tmp_path):
    from launch import records, run

    common = [
        "data.pack=false",
        "data.validation_fraction=0.2",
        "eval.every_steps=2",
        "eval.max_rows=5",  # 2 ranks x micro-batch 2: rank 0 scores rows 0, 2, 4 (2 batches), rank 1 rows 1, 3 (1)
        "train.max_steps=4",
        "checkpoint.every_steps=0",
        "train.schedule=constant",
        "train.warmup_steps=0",
    ]
    two, one = tmp_path / "two", tmp_path / "one"
    log = tmp_path / "two.txt"
    assert run(tiny_overrides(tiny_checkpoint, two, *common, "deepspeed=zero3"), nproc=2, log=log, timeout=400) == 0, (
        log.read_text()[-3000:]
    )
    log = tmp_path / "one.txt"
    assert run(tiny_overrides(tiny_checkpoint, one, *common, "train.grad_accum_steps=2"), log=log, timeout=400) == 0

    def evals(run_dir):
        return [r for r in records(run_dir / "tiny") if "eval/loss" in r]

    distributed, reference = evals(two), evals(one)
    assert [r["step"] for r in distributed] == [r["step"] for r in reference] == [2, 4]
    for a, b in zip(distributed, reference):
        assert a["eval/loss"] == pytest.approx(b["eval/loss"], rel=1e-4), (a, b)
        assert a["eval/estimated_al"] == pytest.approx(b["eval/estimated_al"], rel=1e-4), (a, b)
