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
"""

from __future__ import annotations

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
                head = project_logits(model, hidden[part]) if frozen else F.linear(hidden[part], *params)
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
            objective, values = token_terms(postprocess_logits(model, F.linear(*leaves)), part)
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
