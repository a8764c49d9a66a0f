"""The one FLOP count behind every MFU we print (the trainer's log and every benchmark), and the devices' peaks.

Useful work of one training step (forward + backward = 3 forwards), counted from the batch as it was trained:

- the decoder's weights: 6 FLOPs per parameter per non-padding layout token (the input embedding is a lookup and is
  not counted);
- the LM head: 6 FLOPs per head weight per *labelled* token (``pard_loss`` runs the head on labelled positions only;
  the reference path's logits at every position are waste and are not credited to it either);
- attention: per layer, 2 FLOPs per multiply-add of ``q.k`` and of ``p.v`` over ``heads x head_dim``, times 3 for
  the backward, for each (query, key) pair the PARD rule allows, queries on padding excluded. Blocks are counted by
  the pairs they allow, not by their size: a FlexAttention block that is partly masked does the whole block's work,
  but only its allowed pairs are useful, so MFU never rises by visiting masked positions.

Not counted: recomputation under gradient checkpointing, softmax and norms, the optimizer (MFU, not hardware FLOPs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pard_train.core.layout import PAD_DOCUMENT, PardBatch

# Dense bf16 peak FLOP/s of one torch device (vendor data sheets; no sparsity), most specific name first: the first
# key found in the device name wins, so "H100 PCIe" is not read as the SXM part. An MI250X package holds two GCDs and
# torch sees each GCD as a device, so its entry is half the package's 383 TFLOP/s (MI250 likewise: 362 / 2).
PEAK_BF16_FLOPS = {
    "H100PCIE": 756e12,
    "H100NVL": 835e12,  # 1671 TFLOP/s per NVL pair
    "H100": 989e12,  # SXM5 (torch names it "NVIDIA H100 80GB HBM3")
    "GH200": 989e12,
    "H200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "MI300X": 1307e12,
    "MI250X": 191.5e12,
    "MI250": 181e12,
    "L40S": 362e12,
}


def peak_flops(device_name: str) -> float | None:
    """Datasheet peak bf16 FLOP/s of one GPU device by its name, None when unknown (then no MFU is given)."""
    name = device_name.upper().replace(" ", "").replace("-", "")
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def _numel(parameter) -> int:
    return getattr(parameter, "ds_numel", parameter.numel())  # a ZeRO-3 stub reports its full size there


@dataclass(frozen=True)
class ModelFlops:
    """What the count needs of a model: weight counts and the attention's width and depth."""

    body_params: int
    """Parameters other than the input embedding and the LM head (tied or not)."""
    head_params: int
    layers: int
    heads: int
    head_dim: int

    @classmethod
    def of(cls, model) -> ModelFlops:
        embedding = model.get_input_embeddings().weight
        head = model.get_output_embeddings().weight
        body = sum(_numel(p) for p in model.parameters() if p is not embedding and p is not head)
        config = model.config.get_text_config()
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(body, _numel(head), config.num_hidden_layers, heads, head_dim)

    def step(self, tokens: int, labelled: int, attended_pairs: int) -> float:
        """FLOPs of one forward + backward over ``tokens`` non-padding tokens, ``labelled`` of them with a target, and
        ``attended_pairs`` allowed (query, key) pairs."""
        weights = 6 * (self.body_params * tokens + self.head_params * labelled)
        return float(weights + 12 * self.layers * self.heads * self.head_dim * attended_pairs)

    def batch(self, batch: PardBatch) -> float:
        """FLOPs of one forward + backward over ``batch``."""
        tokens = int((batch.document != PAD_DOCUMENT).sum())
        return self.step(tokens, batch.num_labels, attended_pairs(batch))


def attended_pairs(batch: PardBatch) -> int:
    """How many (query, key) pairs of ``batch`` the PARD rule allows, padding queries excluded; O(T log T) per row.

    Equals ``dense_attention_mask(batch)`` summed over real queries, without the ``T x T`` grid: a query (depth d,
    anchor a) of document D sees the real tokens of D with anchor <= a, and the masks of D with anchor a and depth
    1..d. Both are counted by binary search in sorted keys; real tokens' anchors are their own positions.
    """
    depth, anchor, document = batch.depth.cpu().long(), batch.anchor.cpu().long(), batch.document.cpu().long()
    real_query = document != PAD_DOCUMENT
    rows, length = depth.shape
    if rows == 0 or length == 0:
        return 0
    depths = int(depth.max()) + 2
    span = int(anchor.max()) + 2  # anchors shifted by 1 so that -1 (padding) still sorts first
    # Lexicographic keys (row, document, anchor[, depth]) as one int64; padding documents get their own bucket.
    row = torch.arange(rows)[:, None].expand(rows, length)
    group = row * (length + 2) + (document + 1)
    real_keys = torch.sort((group * span + anchor + 1)[(depth == 0) & real_query]).values
    chain_keys = torch.sort(((group * span + anchor + 1) * depths + depth)[(depth >= 1) & real_query]).values
    query_group = group[real_query] * span
    query_anchor, query_depth = anchor[real_query] + 1, depth[real_query]
    prefix = torch.searchsorted(real_keys, query_group + query_anchor, right=True)
    prefix -= torch.searchsorted(real_keys, query_group, right=False)
    chain_base = (query_group + query_anchor) * depths
    chain = torch.searchsorted(chain_keys, chain_base + query_depth, right=True)
    chain -= torch.searchsorted(chain_keys, chain_base + 1, right=False)
    return int(prefix.sum() + chain.sum())
