"""Packed variable-length attention: one API, the backend chosen at run time.

Tokens of a batch are packed into one (T, H, D) tensor with `Packing` describing where each sample starts.
Every backend computes attention within each sample only, so the result equals running samples one by one,
and the cost scales with sum_b L_b^2 rather than B * max(L)^2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Packing:
    """Layout of a packed batch: sample b owns tokens cu_seqlens[b]:cu_seqlens[b+1]."""

    lengths: tuple[int, ...]
    cu_seqlens: torch.Tensor  # (B + 1,) int32, on the tokens' device
    sample_index: torch.Tensor  # (T,) int64: the sample each token belongs to

    @classmethod
    def from_lengths(cls, lengths: torch.Tensor | list[int], device: torch.device | str | None = None) -> Packing:
        lengths_t = torch.as_tensor(lengths, dtype=torch.long, device=device)
        # A host-side list avoids a device sync; a device tensor (from routing) needs one here, once per forward.
        lengths_list = tuple(int(n) for n in (lengths if isinstance(lengths, (list, tuple)) else lengths_t.tolist()))
        cu = torch.zeros(len(lengths_list) + 1, dtype=torch.int32, device=lengths_t.device)
        cu[1:] = torch.cumsum(lengths_t, 0)
        index = torch.repeat_interleave(torch.arange(len(lengths_list), device=lengths_t.device), lengths_t)
        return cls(lengths_list, cu, index)

    @classmethod
    def uniform(cls, batch: int, length: int, device: torch.device | str | None = None) -> Packing:
        return cls.from_lengths([length] * batch, device=device)

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    @property
    def total(self) -> int:
        return sum(self.lengths)

    @property
    def max_len(self) -> int:
        return max(self.lengths, default=0)

    @property
    def is_uniform(self) -> bool:
        return len(set(self.lengths)) <= 1

    def per_token(self, per_sample: torch.Tensor) -> torch.Tensor:
        """Repeat a (B, ...) per-sample tensor to (T, ...) per-token rows."""
        return per_sample.index_select(0, self.sample_index)


BACKENDS = ("auto", "flash", "nested", "loop")


def select_backend(device: torch.device, requested: str = "auto") -> str:
    """The attention backend for `device`: flash-attn varlen on CUDA when installed, else SDPA variants."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown attention backend {requested!r}; choose one of {BACKENDS}")
    if requested != "auto":
        return requested
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            return "nested"
        return "flash"
    return "loop"


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing: Packing,
                     backend: str = "auto") -> torch.Tensor:
    """Softmax attention of (T, H, D) q/k/v within each packed sample; returns (T, H, D)."""
    if packing.is_uniform and packing.batch_size > 0:
        # Equal lengths (every DiT batch): one batched SDPA call over (B, H, L, D) views.
        b, n = packing.batch_size, packing.lengths[0]
        qb, kb, vb = (t.view(b, n, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(qb, kb, vb).transpose(1, 2).reshape(q.shape)
    backend = select_backend(q.device, backend)
    if backend == "flash":
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(q, k, v, packing.cu_seqlens, packing.cu_seqlens,
                                      packing.max_len, packing.max_len)
    if backend == "nested":
        return _nested_attention(q, k, v, packing)
    return _loop_attention(q, k, v, packing)


def _loop_attention(q, k, v, packing: Packing) -> torch.Tensor:
    out = torch.empty_like(q)
    start = 0
    for n in packing.lengths:
        if n:
            sl = slice(start, start + n)
            out[sl] = F.scaled_dot_product_attention(
                q[sl].transpose(0, 1), k[sl].transpose(0, 1), v[sl].transpose(0, 1)).transpose(0, 1)
        start += n
    return out


def _nested_attention(q, k, v, packing: Packing) -> torch.Tensor:
    offsets = packing.cu_seqlens.long()
    nq, nk, nv = (torch.nested.nested_tensor_from_jagged(t, offsets).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(nq, nk, nv).transpose(1, 2)
    return out.values()
