"""TRL's tree-packed attention in plain PyTorch, for training `AsyncGRPOTrainer` policies without FlashAttention-3.

TRL's async GRPO trainer packs a micro-batch as a tree (a prefix shared by several samples is forwarded once) and
runs attention with the FlashAttention-3 kernel, which exists for CUDA only. Here each segment of the tree (a run of
query tokens with the path of keys it sees) is one `scaled_dot_product_attention` call: slower than the kernel, the
same numbers up to rounding, and it runs on any device.
"""

import torch
import torch.nn.functional as F


def sdpa_tree_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    tree_kv_index: torch.Tensor,
    tree_cu_seqlens_q: torch.Tensor,
    tree_cu_seqlens_k: torch.Tensor,
    tree_max_seqlen_q: int | None = None,
    tree_max_seqlen_k: int | None = None,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention over a tree-packed row, with the signature of TRL's `packing.tree_attention`.

    Args:
        module: The attention layer (unused).
        query: [1, heads, N, head_dim] the packed row's queries.
        key: [1, kv_heads, N, head_dim] its keys.
        value: [1, kv_heads, N, head_dim] its values.
        attention_mask: Unused: the tree's segments define what each query sees.
        tree_kv_index: Row positions of the keys of every segment, segment after segment.
        tree_cu_seqlens_q: [S + 1] cumulative query counts of the segments.
        tree_cu_seqlens_k: [S + 1] cumulative key counts of the segments (into `tree_kv_index`).
        scaling: The softmax scale (default 1/sqrt(head_dim)).
        sliding_window: Keys further back than this many positions are masked.
        softcap: Not supported.

    Returns:
        [1, N, heads, head_dim] the attention output, and no attention weights.
    """
    if softcap:
        raise ValueError("sdpa_tree_attention does not support attention logit soft-capping (softcap).")
    q, k, v = (x.transpose(1, 2)[0] for x in (query, key, value))  # [N, heads, head_dim]
    starts_q, starts_k = tree_cu_seqlens_q.tolist(), tree_cu_seqlens_k.tolist()
    outputs = []
    for segment in range(len(starts_q) - 1):
        queries = q[starts_q[segment] : starts_q[segment + 1]]
        path = tree_kv_index[starts_k[segment] : starts_k[segment + 1]]
        keys, values = k.index_select(0, path), v.index_select(0, path)
        # The segment's queries are the last tokens of its path: causal, aligned to the bottom right.
        query_pos = keys.shape[0] - queries.shape[0] + torch.arange(queries.shape[0], device=q.device)[:, None]
        key_pos = torch.arange(keys.shape[0], device=q.device)[None, :]
        visible = key_pos <= query_pos
        if sliding_window:
            visible &= key_pos > query_pos - sliding_window
        out = F.scaled_dot_product_attention(
            queries.transpose(0, 1),
            keys.transpose(0, 1),
            values.transpose(0, 1),
            attn_mask=visible,
            scale=scaling,
            enable_gqa=True,
        )
        outputs.append(out.transpose(0, 1))
    return torch.cat(outputs, 0).unsqueeze(0), None
