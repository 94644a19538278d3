"""``ExplicitMultiheadAttention``: ``nn.MultiheadAttention`` with its projections as real ``nn.Linear``s.

``nn.MultiheadAttention.forward`` hands ``in_proj_weight`` and ``out_proj.weight`` to a functional
kernel as raw tensors and never calls ``out_proj``, so a LoRA layer swapped into it is silently
ignored. This module computes the same attention (scaled dot-product, per head)::

    q, k, v = query @ Wq^T + bq,  key @ Wk^T + bk,  value @ Wv^T + bv        [B, L|S, E]
    out     = softmax(q_h k_h^T / sqrt(E / H) + mask) v_h   per head h       [B, L, E]
    out     = out @ Wo^T + bo

with ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` as modules, so each of them can be replaced.
Every projection runs batch-first (``[B, L, E]``), whatever the original ``batch_first`` was, so a
replacement sees the batch on dim 0 (what a member-major LoRA-Ensemble layer needs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ExplicitMultiheadAttention", "replace_multihead_attention"]


def _as_float_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """nn.MultiheadAttention's mask convention (bool: True = masked out; float: added) -> additive float."""
    if mask is None or mask.is_floating_point():
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


class ExplicitMultiheadAttention(nn.Module):
    """Multi-head attention equal to ``nn.MultiheadAttention`` with explicit projection modules.

    Build it with :meth:`from_multihead_attention`; ``forward`` takes and returns what
    ``nn.MultiheadAttention.forward`` does (``(attn_output, attn_weights | None)``), in the
    original's ``batch_first`` layout (``[B, L, E]`` or ``[L, B, E]``; unbatched ``[L, E]``).

    Attributes:
        q_proj, k_proj, v_proj: ``nn.Linear`` ``E -> E`` (``kdim``/``vdim -> E`` for key/value).
        out_proj: ``nn.Linear`` ``E -> E``.
        num_heads, head_dim, dropout, batch_first: as in the original module.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 kdim: int | None = None, vdim: int | None = None, batch_first: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(kdim or embed_dim, embed_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(vdim or embed_dim, embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)

    @classmethod
    def from_multihead_attention(cls, mha: nn.MultiheadAttention) -> ExplicitMultiheadAttention:
        """An equivalent module holding copies of ``mha``'s weights (``requires_grad`` carried over).

        Raises:
            ValueError: ``mha`` uses ``add_bias_kv`` or ``add_zero_attn``, which this module does not model.
        """
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha must be an nn.MultiheadAttention, got {type(mha).__name__}")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("nn.MultiheadAttention with add_bias_kv=True or add_zero_attn=True is not supported")
        has_bias = mha.in_proj_bias is not None
        ref = mha.out_proj.weight
        out = cls(mha.embed_dim, mha.num_heads, dropout=mha.dropout, bias=has_bias, kdim=mha.kdim,
                  vdim=mha.vdim, batch_first=mha.batch_first, device=ref.device, dtype=ref.dtype)
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.chunk(3)
            grad = mha.in_proj_weight.requires_grad
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
            grad = mha.q_proj_weight.requires_grad
        biases = mha.in_proj_bias.chunk(3) if has_bias else (None, None, None)
        with torch.no_grad():
            for proj, w, b in zip((out.q_proj, out.k_proj, out.v_proj), weights, biases):
                proj.weight.copy_(w)
                proj.weight.requires_grad_(grad)
                if b is not None:
                    proj.bias.copy_(b)
                    proj.bias.requires_grad_(mha.in_proj_bias.requires_grad)
            out.out_proj.weight.copy_(mha.out_proj.weight)
            out.out_proj.weight.requires_grad_(mha.out_proj.weight.requires_grad)
            if has_bias:
                out.out_proj.bias.copy_(mha.out_proj.bias)
                out.out_proj.bias.requires_grad_(mha.out_proj.bias.requires_grad)
        out.train(mha.training)
        return out

    def _split_heads(self, t: Tensor) -> Tensor:
        # [B, L, E] -> [B, H, L, Dh]
        return t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None,
                average_attn_weights: bool = True, is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        """Attention of ``query [B, L, E]`` over ``key [B, S, kdim]`` / ``value [B, S, vdim]``
        (``[L, B, E]`` etc. when not ``batch_first``; ``[L, E]`` unbatched).

        Masks follow ``nn.MultiheadAttention``: ``key_padding_mask [B, S]`` and ``attn_mask [L, S]``
        or ``[B*H, L, S]``, bool (True = masked out) or float (added to the scores); with
        ``is_causal`` the ``attn_mask`` given is the causal mask.

        Returns:
            ``(out, weights)``: ``out`` in the input layout; ``weights [B, L, S]`` (averaged over heads)
            or ``[B, H, L, S]`` when ``need_weights``, else None.
        """
        if is_causal and attn_mask is None:
            raise ValueError("is_causal=True needs the causal attn_mask, as nn.MultiheadAttention does")
        unbatched = query.dim() == 2
        if unbatched:  # [L, E] -> [1, L, E]
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        batch, tgt_len = query.shape[0], query.shape[1]
        src_len = key.shape[1]
        q = self._split_heads(self.q_proj(query))
        k = self._split_heads(self.k_proj(key))
        v = self._split_heads(self.v_proj(value))

        mask = _as_float_mask(attn_mask, q.dtype)
        if mask is not None and mask.dim() == 3:
            mask = mask.view(batch, self.num_heads, tgt_len, src_len)
        padding = _as_float_mask(key_padding_mask, q.dtype)
        if padding is not None:
            padding = padding.view(batch, 1, 1, src_len)
            mask = padding if mask is None else mask + padding
        dropout_p = self.dropout if self.training else 0.0

        if need_weights:
            scores = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores + mask
            weights = scores.softmax(dim=-1)
            out = F.dropout(weights, p=dropout_p) @ v
            returned = weights.mean(dim=1) if average_attn_weights else weights
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
            returned = None
        out = self.out_proj(out.transpose(1, 2).flatten(2))  # [B, L, E]

        if unbatched:
            out = out.squeeze(0)
            returned = returned.squeeze(0) if returned is not None else None
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, returned

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
                f"batch_first={self.batch_first}")


def replace_multihead_attention(model: nn.Module) -> list[str]:
    """Swap every ``nn.MultiheadAttention`` in ``model`` for an equivalent
    :class:`ExplicitMultiheadAttention`, instance by instance (no class is patched).

    Returns:
        The dotted names of the replaced modules.
    """
    names = [name for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, ExplicitMultiheadAttention.from_multihead_attention(getattr(parent, child)))
    return names
