"""The LM head and a per-token loss over labelled tokens, chunk by chunk, with the head computed once.

The ``[tokens, vocabulary]`` logits of every labelled token would outweigh the model with a 128k vocabulary, so the
head runs on chunks of tokens. Each chunk's gradients with respect to its hidden states and the head's parameters are
computed in the forward pass, right after its loss, and its logits are freed; the backward pass only hands those
gradients on, scaled by the gradient it receives (as fused linear cross-entropy kernels do, here in plain torch so CPU
and ROCm run it). Recomputing each chunk in the backward pass instead (checkpointing) would run the head matmul and
the softmax twice. Per chunk: one matmul forward and two backward, against four with recomputation. The price: the
head's gradient (fp32, vocabulary x width) is held from the forward to the backward pass, and under ZeRO-3 the head's
weight stays gathered for the objective's whole forward and backward (:func:`gather_head_with`).

Used by PARD's cross-entropy (:func:`pard_train.methods.pard.pard_loss`), PARD-2's weighted CE + KD
(:func:`pard_train.methods.pard2_loss.pard2_loss`) and the teacher's confidences (:mod:`pard_train.methods.teacher`, no
gradient).

Under bf16 autocast on a CPU without bf16 matrix support (no oneDNN bf16: AVX2-only x86, for instance), torch's bf16
matrix product falls back to plain loops that run 10-90x slower than fp32 and, for the head's backward
(``[tokens, vocabulary] @ [vocabulary, width]``), took 60% of a training step. There the head's three products run in
fp32 on the bf16-rounded operands and are rounded to bf16 afterwards (:func:`head_linear`): the same inputs and output
dtype as autocast's, and the fallback also accumulates in fp32, so results differ only in summation order.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK_TOKENS = 4096
"""Labelled tokens whose logits exist at once (4096 x 128k fp32 logits = 2 GiB); read at each call, so a test can
make every caller chunk finely."""

TokenTerms = Callable[[Tensor, slice], tuple[Tensor, tuple[Tensor, ...]]]
"""``(logits [n, V], the chunk's slice of the labelled tokens) -> (objective [n], outputs)``: the per-token objective,
differentiable in the logits, and per-token values (metrics) that need no gradient."""


def postprocess_logits(model, logits: Tensor) -> Tensor:
    """Whatever the architecture's forward does after the LM head, in the same order and dtype.

    The loss runs the LM head itself instead of calling ``model(...)``, so this must be repeated here or the draft is
    trained on logits the server never computes. Gemma 2/3: ``cap * tanh(logits / cap)``
    (``final_logit_softcapping``); Cohere: ``* logit_scale``; Granite: ``/ logits_scaling``. The others (Llama, Qwen,
    Mistral, Phi-3, OLMo-2) use the head as is.
    """
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    scale = getattr(config, "logit_scale", None)
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        logits = logits * scale
    divisor = getattr(config, "logits_scaling", None)
    if isinstance(divisor, (int, float)) and not isinstance(divisor, bool):
        logits = logits / divisor
    return logits


def project_logits(model, hidden: Tensor) -> Tensor:
    """The model's own logits for ``hidden``: its LM head module, then :func:`postprocess_logits`."""
    return postprocess_logits(model, model.get_output_embeddings()(hidden))


@functools.cache
def _native_bf16_matmul() -> bool:
    """Whether this CPU's bf16 matrix products run in oneDNN (what ``torch.mm`` picks when it can), rather than in
    torch's slow fallback loops."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without the query: leave autocast alone
        return True


def head_linear(hidden: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(hidden, weight, bias)`` (``hidden``: ``[N, H]``) as autocast computes it, faster where the CPU has
    no bf16 matrix support.

    There, under bf16 autocast, the product and its two backward products run in fp32 on operands rounded to bf16,
    and each result is rounded to bf16 (:class:`_Bf16LinearInFp32`): autocast's dtypes, gradients included.
    Elsewhere it is ``F.linear`` itself.
    """
    device = hidden.device.type
    if (
        device != "cpu"
        or not torch.is_autocast_enabled(device)
        or torch.get_autocast_dtype(device) != torch.bfloat16
        or _native_bf16_matmul()
    ):
        return F.linear(hidden, weight, bias)
    return _Bf16LinearInFp32.apply(hidden, weight, bias)


class _Bf16LinearInFp32(torch.autograd.Function):
    """A bf16 linear layer computed in fp32: operands rounded to bf16, products in fp32 with autocast off (autograd's
    backward runs under the caller's autocast, which would turn a plain fp32 backward product into bf16 again), every
    result rounded to bf16 and handed back in its input's dtype, as autocast's casts do."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        low = [None if tensor is None else tensor.to(torch.bfloat16) for tensor in (hidden, weight, bias)]
        ctx.save_for_backward(low[0], low[1])
        ctx.dtypes = [None if tensor is None else tensor.dtype for tensor in (hidden, weight, bias)]
        with torch.autocast("cpu", enabled=False):
            return F.linear(*(None if tensor is None else tensor.float() for tensor in low)).to(torch.bfloat16)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        hidden, weight = ctx.saved_tensors
        hidden_dtype, weight_dtype, bias_dtype = ctx.dtypes
        wants_hidden, wants_weight, wants_bias = ctx.needs_input_grad
        grads = [None, None, None]
        with torch.autocast("cpu", enabled=False):
            grad = grad_output.float()
            if wants_hidden:
                grads[0] = (grad @ weight.float()).to(torch.bfloat16).to(hidden_dtype)
            if wants_weight:
                grads[1] = (grad.t() @ hidden.float()).to(torch.bfloat16).to(weight_dtype)
            if wants_bias and bias_dtype is not None:
                grads[2] = grad.sum(0).to(torch.bfloat16).to(bias_dtype)
        return tuple(grads)


def head_parameters(model) -> list[torch.nn.Parameter]:
    """The LM head's weight (shared with the input embedding when tied) and its bias if it has one."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"the loss runs the LM head as a linear layer; {type(head).__name__} is not one")
    return [head.weight] if head.bias is None else [head.weight, head.bias]


def gather_head_with(module: torch.nn.Module, model) -> None:
    """Under ZeRO-3, have ``module``'s forward and backward gather the head's partitioned parameters.

    The loss reads the head's weight directly instead of calling the head module (whose hooks would gather it for
    that call only), and its gradient is handed to the weight in ``module``'s backward pass, so the weight must be
    whole from ``module``'s forward to the end of its backward. Elsewhere this does nothing.
    """
    partitioned = [p for p in head_parameters(model) if hasattr(p, "ds_id")]
    if partitioned:
        import deepspeed  # ``deepspeed.zero`` is an attribute of the package, not an importable module

        for parameter in partitioned:
            deepspeed.zero.register_external_parameter(module, parameter)


class _GradientsFromForward(torch.autograd.Function):
    """Returns ``value``; its backward returns the gradients computed in the forward, times the incoming gradient
    and ``scale`` (so gradient accumulation's loss division and loss scaling apply as to any loss)."""

    @staticmethod
    def forward(ctx, value: Tensor, scale: float, grads: tuple, *inputs: Tensor) -> Tensor:
        ctx.scale, ctx.grads = scale, grads
        ctx.dtypes = [tensor.dtype for tensor in inputs]
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        factor = grad_output.float() * ctx.scale
        grads = [None if g is None else (g.float() * factor).to(dtype) for g, dtype in zip(ctx.grads, ctx.dtypes)]
        ctx.grads = None  # free them now, not when the graph is collected
        return None, None, None, *grads


def chunked_head_loss(
    model, hidden: Tensor, token_terms: TokenTerms, normalizer: float = 1.0, chunk_tokens: int | None = None
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """``sum(objective) / normalizer`` over all labelled tokens and the concatenated per-token outputs.

    ``hidden`` is ``[N, H]`` (the decoder's output at the labelled tokens); the loss is differentiable in ``hidden``
    and in the head's parameters. Only one chunk's logits (and its softmax) exist at a time: ``chunk_tokens``, by
    default :data:`CHUNK_TOKENS`.
    """
    chunk_tokens = chunk_tokens or CHUNK_TOKENS
    params = head_parameters(model)
    inputs = [hidden, *params]
    train = torch.is_grad_enabled() and any(tensor.requires_grad for tensor in inputs)
    frozen = not any(parameter.requires_grad for parameter in params)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    hidden_grads, param_grads, outputs = [], [None] * len(params), []
    for begin in range(0, max(hidden.shape[0], 1), chunk_tokens):  # one empty chunk when there are no tokens
        part = slice(begin, begin + chunk_tokens)
        if not train:
            with torch.no_grad():
                # A frozen model's head is called as a module (a ZeRO-3 inference engine's hooks gather its weight);
                # a trained one's weight is read directly, held whole by gather_head_with under ZeRO-3.
                head = project_logits(model, hidden[part]) if frozen else head_linear(hidden[part], *params)
                objective, values = token_terms(head if frozen else postprocess_logits(model, head), part)
            total += objective.float().sum()
            outputs.append(values)
            continue
        # Leaves cut from the graph: autograd.grad then stops here and leaves the parameters' .grad (and the hooks
        # that DDP and DeepSpeed hang on them) alone until the real backward pass.
        leaves = [hidden[part].detach(), *(p.detach() for p in params)]
        for leaf, source in zip(leaves, inputs):
            leaf.requires_grad_(source.requires_grad)
        with torch.enable_grad():
            objective, values = token_terms(postprocess_logits(model, head_linear(*leaves)), part)
            chunk_sum = objective.float().sum()
            wanted = [leaf for leaf in leaves if leaf.requires_grad]
            grads = iter(torch.autograd.grad(chunk_sum, wanted))
        total += chunk_sum.detach()
        outputs.append(values)
        chunk_grads = [next(grads) if leaf.requires_grad else None for leaf in leaves]
        hidden_grads.append(chunk_grads[0])
        for i, grad in enumerate(chunk_grads[1:]):
            if grad is not None:  # the head's gradient summed over chunks in fp32
                param_grads[i] = grad.float() if param_grads[i] is None else param_grads[i].add_(grad)
    merged = tuple(torch.cat(parts) for parts in zip(*outputs))
    if not train:
        return total / normalizer, merged
    grads = (torch.cat(hidden_grads) if hidden.requires_grad else None, *param_grads)
    return _GradientsFromForward.apply(total / normalizer, 1.0 / normalizer, grads, *inputs), merged
