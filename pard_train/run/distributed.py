"""Process-group set-up through accelerate (DDP or DeepSpeed ZeRO), and rank-aware helpers.

The same ``python -m pard_train`` runs alone, under ``torchrun``, ``accelerate launch`` or ``deepspeed``: the
launcher only sets the rendezvous environment (RANK, WORLD_SIZE, MASTER_ADDR, ...), which accelerate reads.
Nothing here is CUDA-specific: ROCm builds of torch report their GPUs through ``torch.cuda`` too.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from datetime import timedelta

import torch
from accelerate import Accelerator, DeepSpeedPlugin
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import InitProcessGroupKwargs

from pard_train.base.config import DeepSpeedConfig, Precision, TrainConfig
from pard_train.base.errors import PardTrainError

logger = logging.getLogger(__name__)

# Process-group timeout. NCCL's and DeepSpeed's default (10 min) is shorter than what rank 0 alone may take while the
# others wait in a collective: tokenising a large data set on first use, measuring acceptance length, exporting or
# writing a ZeRO-3 checkpoint to slow storage. A real hang still ends, after this long.
PROCESS_GROUP_TIMEOUT = timedelta(hours=2)

# Variables through which SLURM and the GPU runtimes say which GPUs this process was given.
GPU_ALLOCATION_VARIABLES = (
    "SLURM_GPUS_ON_NODE",
    "SLURM_JOB_GPUS",
    "SLURM_STEP_GPUS",
    "CUDA_VISIBLE_DEVICES",
    "ROCR_VISIBLE_DEVICES",
    "HIP_VISIBLE_DEVICES",
)


class NoVisibleGpuError(PardTrainError, RuntimeError):
    """GPUs were allocated to the job but torch sees none: training would silently run on the CPU."""


def allocated_gpus(environ=os.environ) -> dict[str, str]:
    """The variables that say GPUs were given to this process (empty values, ``-1`` and ``0`` counts mean none)."""
    found = {}
    for name in GPU_ALLOCATION_VARIABLES:
        value = environ.get(name, "").strip()
        if value in ("", "-1", "NoDevFiles") or (name == "SLURM_GPUS_ON_NODE" and value == "0"):
            continue
        found[name] = value
    return found


def check_gpus_visible(environ=os.environ) -> None:
    """Refuse to start on the CPU when the job was allocated GPUs that torch cannot see (a CPU-only torch build, or
    ROCm given both ROCR_VISIBLE_DEVICES and CUDA/HIP_VISIBLE_DEVICES, which are applied one after the other and can
    leave no device: partial-node jobs on some ROCm sites)."""
    if torch.cuda.is_available():
        return
    allocated = allocated_gpus(environ)
    if allocated:
        shown = " ".join(f"{name}={value}" for name, value in allocated.items())
        build = (
            f"torch {torch.__version__} ("
            + ("ROCm" if torch.version.hip else "CUDA" if torch.version.cuda else "CPU-only")
            + ")"
        )
        raise NoVisibleGpuError(
            f"GPUs were allocated ({shown}) but {build} sees none; on ROCm export only ROCR_VISIBLE_DEVICES "
            "(unset CUDA_VISIBLE_DEVICES and HIP_VISIBLE_DEVICES), else install a GPU build of torch; to train on "
            "the CPU on purpose, unset these variables"
        )


def mixed_precision_for(precision: Precision) -> str:
    """accelerate's ``mixed_precision``: bf16 on GPUs that support it when ``auto``, fp32 (``no``) otherwise."""
    if precision == Precision.auto:
        # Emulated bf16 (V100, T4) counts as supported by default, and runs far slower than fp32 there.
        native = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
        return "bf16" if native else "no"
    return {Precision.bf16: "bf16", Precision.fp32: "no"}[precision]


def deepspeed_config(ds: DeepSpeedConfig, train: TrainConfig, mixed_precision: str) -> dict:
    """The DeepSpeed JSON, built from the typed config (nothing to keep in sync by hand).

    ``gradient_clipping`` makes the engine clip; the optimizer stays ``torch.optim.AdamW`` (built by the trainer),
    also with ``offload_optimizer``: accelerate would otherwise swap it for DeepSpeed's CPU Adam, a C++ op that every
    rank JIT-compiles at start (a compiler and ninja on every node, minutes per rank).
    ``zero_force_ds_cpu_optimizer: false`` keeps torch's AdamW, which steps the offloaded fp32 master weights on the
    CPU: slower per step than the compiled op, but it runs wherever torch runs and matches the non-DeepSpeed path.

    With bf16, gradients are accumulated (``data_types.grad_accum_dtype``) and all-reduced or reduce-scattered
    (``communication_data_type``) in fp32: DeepSpeed's default is the model dtype, bf16, whose 8-bit mantissa loses
    the small per-micro-batch and per-rank contributions when summed. ZeRO-1 then uses DeepSpeed's BF16 optimizer
    with fp32 gradients, ZeRO-2 its fp32 gradient partitions; ZeRO-3 keeps its fp32 partitions and reduces in fp32.
    """
    zero: dict = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.zero_stage == 3:
        # Gather full weights when saving the final model, so that it is a normal Hugging Face checkpoint.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    bf16 = mixed_precision == "bf16"
    precision: dict = {"communication_data_type": "fp32", "data_types": {"grad_accum_dtype": "fp32"}} if bf16 else {}
    return {
        **precision,
        "zero_force_ds_cpu_optimizer": False,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "gradient_clipping": train.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def join_alone(environ=os.environ) -> bool:
    """A process started without a launcher (``python -m pard_train deepspeed=zero2``) is a world of one: DeepSpeed
    needs a process group all the same, so set the rendezvous a launcher would (rank 0 of 1, a free local port).
    Returns whether it did; under a launcher (``RANK`` or ``WORLD_SIZE`` set) nothing changes."""
    if "RANK" in environ or "WORLD_SIZE" in environ:
        return False
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    return True


def build_accelerator(train: TrainConfig, ds: DeepSpeedConfig) -> Accelerator:
    """An Accelerator for this process; gradient accumulation is accelerate's, so DDP and DeepSpeed agree on it."""
    for name in ("accelerate.checkpointing", "accelerate.accelerator"):  # one line per saved file otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    check_gpus_visible()
    mixed_precision = mixed_precision_for(train.precision)
    on_cpu = not torch.cuda.is_available()
    # accelerate hands the timeout to torch.distributed (DDP) and to deepspeed.init_distributed (DeepSpeed) alike.
    group = {"timeout": PROCESS_GROUP_TIMEOUT}
    plugin = None
    if ds.enabled:
        if join_alone():
            logger.info(
                f"DeepSpeed ZeRO-{ds.zero_stage} in one process (started without a launcher); for N processes: "
                "torchrun --nproc_per_node N -m pard_train ..."
            )
        if on_cpu:
            # DeepSpeed picks its accelerator at import; without this it probes for CUDA and fails.
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            # Without an explicit gloo group accelerate believes the world size is 1 under DeepSpeed on CPU.
            group["backend"] = "gloo"
        plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config(ds, train, mixed_precision))
    return Accelerator(
        mixed_precision=mixed_precision,
        cpu=on_cpu and plugin is None,
        deepspeed_plugin=plugin,
        gradient_accumulation_steps=train.grad_accum_steps,
        kwargs_handlers=[InitProcessGroupKwargs(**group)],
    )


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.state.deepspeed_plugin is not None


def shutdown(accelerator: Accelerator) -> None:
    """Leave the process group cleanly (gloo otherwise warns, and a later run in the same process cannot start)."""
    if is_deepspeed(accelerator) and torch.distributed.is_initialized():
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()  # also drops DeepSpeed's cached groups, so it can start again
    accelerator.end_training()  # leaves the process group (when DeepSpeed has not already)
    # accelerate keeps process-wide singletons; reset them so a later train() in this process starts fresh.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def clip_grad_norm(accelerator: Accelerator, model, max_norm: float) -> float:
    """Clip the global gradient norm and return it before clipping (NaN when clipping is off)."""
    if is_deepspeed(accelerator):  # the engine clipped already (``gradient_clipping``); this reads its norm
        norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
        return float("nan") if norm is None else float(norm)
    if max_norm <= 0:
        return float("nan")
    return float(accelerator.clip_grad_norm_(model.parameters(), max_norm))


def check_replicas_agree(accelerator: Accelerator, model) -> None:
    """Data-parallel replicas must hold identical weights: an all-gather of a float64 checksum catches divergence
    (nondeterministic kernels, a rank that skipped a step). ZeRO-3 keeps one sharded copy: nothing to compare.

    The checksum is summed parameter by parameter, so at most one parameter's float64 copy exists at a time."""
    plugin = accelerator.state.deepspeed_plugin
    if accelerator.num_processes == 1 or (plugin is not None and plugin.zero_stage == 3):
        return
    local = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for parameter in accelerator.unwrap_model(model).parameters():
        value = parameter.detach().double()
        local += torch.stack([value.sum(), value.square().sum()])
        del value
    gathered = accelerator.gather(local[None]).cpu()
    if not torch.equal(gathered, gathered[:1].expand_as(gathered)):
        raise RuntimeError(f"data-parallel replicas diverged: parameter checksums per rank {gathered.tolist()}")
    logger.info(f"replicas agree: {accelerator.num_processes} processes hold identical parameters")


def on_main(accelerator: Accelerator, action):
    """``action()`` on the main process, its result on every rank; a user error there is raised on every rank (a
    rank that raised alone would leave the others waiting at the next collective)."""
    box = [(None, None)]
    if accelerator.is_main_process:
        try:
            box = [(action(), None)]
        except PardTrainError as error:
            box = [(None, error)]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(box)
    result, error = box[0]
    if error is not None:
        raise error
    return result


def gather_all(accelerator: Accelerator, value) -> list:
    """Every rank's ``value``, in rank order, on every rank (a collective, so also a barrier)."""
    if accelerator.num_processes == 1:
        return [value]
    from accelerate.utils import gather_object

    return gather_object([value])


def together(
    accelerator: Accelerator,
    action: Callable,
    *,
    main_only: bool = False,
    catch: tuple[type[BaseException], ...] = (OSError,),
    describe: Callable[[BaseException], str] = str,
) -> tuple[list, tuple[int, str] | None]:
    """Run ``action`` on every rank (or on rank 0 alone) and agree on whether it failed: the gather is also the
    barrier. Returns every rank's result in rank order, and ``(rank, description)`` of the first rank whose action
    raised one of ``catch`` (None if none did), the same on every rank, so every rank can raise the same error (a
    rank that raised alone would leave the others waiting at the next collective). Other exceptions are bugs and
    propagate."""
    result, error = None, None
    if accelerator.is_main_process or not main_only:
        try:
            result = action()
        except catch as failure:
            error = describe(failure)
    gathered = gather_all(accelerator, (error, result))
    failed = [(rank, error) for rank, (error, _) in enumerate(gathered) if error is not None]
    return [result for _, result in gathered], (failed[0] if failed else None)
