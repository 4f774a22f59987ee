"""Packed variable-length attention: one API, the backend chosen at run time.

Tokens of a batch are packed into one (T, H, D) tensor with `Packing` describing where each sample starts.
Every backend computes attention within each sample only, so the result equals running samples one by one,
and the cost scales with sum_b L_b^2 rather than B * max(L)^2.

Backends. Equal lengths (every DiT batch) always take one batched SDPA call on (B, H, L, D) views, whatever the
backend. Otherwise: "flash" (flash-attn varlen; CUDA, fp16/bf16, when installed), "nested" (SDPA on jagged nested
tensors; CUDA only) and "loop" (one SDPA call per sample on `split` views; any device). "auto" picks flash, then
nested on CUDA, and loop on CPU.

Which backend wins on CPU, and why (measured on the project's 2-core AVX-512/AMX machine, torch 2.14, one thread,
process CPU time because other jobs shared the cores; 8 samples of 235-270 tokens, 6 heads of 64, forward +
backward, best of 9): "loop" with torch's CPU flash kernel per sample, 65-80 ms fp32, against 90 ms for one padded,
masked SDPA call (which also pays B * max(L)^2), 110 ms for the earlier loop that assigned each sample into a
preallocated output (its backward builds a zero-filled full-size gradient per sample, so it grows with B^2; up to
10x worse with two threads under load) and 220 ms for nested tensors. Nested tensors are CUDA-only here: on CPU
their SDPA dispatcher queries CUDA when q/k/v are non-contiguous views (as the model makes them) and fails without
a driver, and with contiguous inputs it unbinds into per-sample math attention, 3x slower than loop. The CPU flash
kernel reads the strided (L, H, D) views without copies and writes (B, L, H, D), so the uniform path's final
transpose is free. In bf16 training the flash kernel's backward runs far below the AMX matmul rate; `_attend`
then uses baddbmm + softmax + bmm instead: 47 ms against 80 ms for the loop above, 35 ms against 81 ms for a
uniform 8 x 256 batch (bf16 inference keeps flash: faster forward, fp32 scores). fp32 keeps flash everywhere
(53 ms against 63-67 ms for matmul + softmax on 8 x 256), and bf16 autocast is the faster precision on this CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dcdit.errors import DCDiTError, did_you_mean


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
_default_backend: ContextVar[str] = ContextVar("dcdit_attention_backend", default="auto")


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Within the block, `packed_attention(..., backend="auto")` uses `name` (for benchmarks and tests)."""
    _check_name(name)
    token = _default_backend.set(name)
    try:
        yield
    finally:
        _default_backend.reset(token)


def _check_name(name: str) -> None:
    if name not in BACKENDS:
        raise DCDiTError(f"unknown attention backend {name!r}{did_you_mean(name, BACKENDS)}; "
                         f"choose one of {', '.join(BACKENDS)}")


def _flash_attn_installed() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def select_backend(device: torch.device, requested: str = "auto", dtype: torch.dtype | None = None) -> str:
    """The backend for tensors on `device` of `dtype`: flash-attn varlen, else nested SDPA on CUDA; loop on CPU.

    "auto" defers to an enclosing `attention_backend(...)` block first. An explicit request that cannot run here
    (flash or nested off CUDA, flash without flash-attn or on float32) is an error rather than a silent fallback.
    """
    _check_name(requested)
    if requested == "auto":
        requested = _default_backend.get()
    device = torch.device(device)
    half = dtype in (torch.float16, torch.bfloat16) if dtype is not None else True
    if requested == "auto":
        if device.type == "cuda":
            return "flash" if half and _flash_attn_installed() else "nested"
        return "loop"
    if requested in ("flash", "nested") and device.type != "cuda":
        raise DCDiTError(f"attention backend {requested!r} needs CUDA tensors, got {device.type}; use 'loop' or 'auto'")
    if requested == "flash" and not _flash_attn_installed():
        raise DCDiTError("attention backend 'flash' needs the flash-attn package; install it or use 'auto'")
    if requested == "flash" and not half:
        raise DCDiTError(f"attention backend 'flash' needs float16 or bfloat16 tensors, got {dtype}; "
                         "use bf16 autocast or 'auto'")
    return requested


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing: Packing,
                     backend: str = "auto") -> torch.Tensor:
    """Softmax attention of (T, H, D) q/k/v within each packed sample; returns (T, H, D)."""
    if q.shape[0] == 0:
        return q.new_empty(q.shape)
    if packing.is_uniform and packing.batch_size > 0:
        # Equal lengths (every DiT batch): one batched SDPA call over (B, H, L, D) views. On CPU the flash kernel
        # writes its output as (B, L, H, D), so the final transpose + reshape is free.
        b, n = packing.batch_size, packing.lengths[0]
        qb, kb, vb = (t.view(b, n, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
        return _attend(qb, kb, vb).transpose(1, 2).reshape(q.shape)
    backend = select_backend(q.device, backend, q.dtype)
    if backend == "flash":
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(q, k, v, packing.cu_seqlens, packing.cu_seqlens,
                                      packing.max_len, packing.max_len)
    if backend == "nested":
        return _nested_attention(q, k, v, packing)
    return _loop_attention(q, k, v, packing)


def _loop_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing: Packing) -> torch.Tensor:
    # `split` (not slice assignment into a preallocated output): its backward concatenates the per-sample gradients
    # once, where slice assignment materialises a zero-filled full-size gradient for every sample.
    outs = []
    for qs, ks, vs in zip(q.split(packing.lengths), k.split(packing.lengths), v.split(packing.lengths)):
        if qs.shape[0] == 0:
            outs.append(qs)
            continue
        outs.append(_attend(qs.transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1)).transpose(0, 1))
    return torch.cat(outs)


# Score entries per call up to which bf16 training on CPU uses matmul + softmax instead of the flash kernel.
MATH_ATTENTION_MAX_SCORES = 1 << 25


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA on (..., H, L, D), except bf16 training on CPU: there the flash kernel's backward runs at a quarter of
    the AMX matmul rate, and plain matmul + softmax is twice as fast for a whole forward + backward. Its scores are
    rounded to bf16 (as in the reference DiT's non-fused attention under autocast); inference keeps the flash
    kernel, which is faster there and keeps fp32 scores. Large score tensors keep flash for memory."""
    if (q.dtype == torch.bfloat16 and q.device.type == "cpu" and torch.is_grad_enabled()
            and (q.requires_grad or k.requires_grad or v.requires_grad)
            and q.shape[:-1].numel() * k.shape[-2] <= MATH_ATTENTION_MAX_SCORES):
        *lead, length, dim = q.shape
        q3, k3, v3 = (t.reshape(-1, t.shape[-2], dim) for t in (q, k, v))
        # The 1/sqrt(d) scale rides in the GEMM (alpha); beta = 0 ignores the placeholder input.
        scores = torch.baddbmm(q3.new_empty(1, 1, 1), q3, k3.transpose(1, 2), beta=0.0, alpha=dim**-0.5)
        return torch.bmm(torch.softmax(scores, dim=-1), v3).view(*lead, length, dim)
    return F.scaled_dot_product_attention(q, k, v)


def _nested_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing: Packing) -> torch.Tensor:
    offsets = packing.cu_seqlens.long()
    nq, nk, nv = (torch.nested.nested_tensor_from_jagged(t, offsets).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(nq, nk, nv).transpose(1, 2)
    return out.values()


__all__ = ["Packing", "packed_attention", "select_backend", "attention_backend", "BACKENDS"]
