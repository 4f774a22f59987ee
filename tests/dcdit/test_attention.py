"""Packed attention against running every sample alone, on each backend this machine can run, and its cost."""

import pytest
import torch
import torch.nn.functional as F

from dcdit.errors import DCDiTError
from dcdit.flops import flop_counter
from dcdit.models import attention
from dcdit.models.attention import Packing, attention_backend, packed_attention, select_backend

HEADS, HEAD_DIM = 3, 16


def runnable_backends() -> list[str]:
    """Every backend usable here: loop always; nested and flash only on CUDA (flash when flash-attn is installed)."""
    backends = ["loop"]
    if torch.cuda.is_available():
        backends.append("nested")
        if attention._flash_attn_installed():
            backends.append("flash")
    return backends


def per_sample_reference(q, k, v, lengths):
    """Each sample alone through PyTorch's SDPA, concatenated."""
    outs, start = [], 0
    for n in lengths:
        sl = slice(start, start + n)
        outs.append(F.scaled_dot_product_attention(q[sl].transpose(0, 1), k[sl].transpose(0, 1),
                                                   v[sl].transpose(0, 1)).transpose(0, 1))
        start += n
    return torch.cat(outs)


def packed_qkv(lengths, dtype=torch.float32, seed=0):
    """q, k, v as the model makes them: unbound views of one (T, 3, H, D) projection (non-contiguous)."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(sum(lengths), 3, HEADS, HEAD_DIM, generator=gen).to(dtype).requires_grad_()
    return qkv


LENGTHS = {
    "random": [7, 1, 23, 12, 30, 2],
    "with_length_one": [1, 1, 5, 1],
    "uniform": [9, 9, 9],
    "single": [17],
}


@pytest.mark.parametrize("backend", runnable_backends())
@pytest.mark.parametrize("case", list(LENGTHS))
def test_packed_equals_per_sample_attention_values_and_gradients(backend, case):
    lengths = LENGTHS[case]
    qkv = packed_qkv(lengths)
    grad_out = torch.randn(sum(lengths), HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(1))
    out = packed_attention(*qkv.unbind(1), Packing.from_lengths(lengths), backend=backend)
    (grad,) = torch.autograd.grad(out, qkv, grad_out)
    ref_qkv = qkv.detach().clone().requires_grad_()
    ref = per_sample_reference(*ref_qkv.unbind(1), lengths)
    (ref_grad,) = torch.autograd.grad(ref, ref_qkv, grad_out)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5)


def test_random_lengths_many_draws_match_per_sample_attention():
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        lengths = torch.randint(1, 40, (int(torch.randint(1, 9, (1,), generator=gen)),), generator=gen).tolist()
        qkv = packed_qkv(lengths, seed=len(lengths))
        out = packed_attention(*qkv.unbind(1), Packing.from_lengths(lengths))
        torch.testing.assert_close(out, per_sample_reference(*qkv.unbind(1), lengths), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["random", "uniform"])
def test_bf16_training_path_matches_fp32_attention(case):
    """bf16 with gradients takes the matmul + softmax path on CPU: equal to fp32 attention to bf16 precision."""
    lengths = LENGTHS[case]
    qkv32 = packed_qkv(lengths)
    qkv16 = qkv32.detach().bfloat16().requires_grad_()
    grad_out = torch.randn(sum(lengths), HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(1))
    packing = Packing.from_lengths(lengths)
    out16 = packed_attention(*qkv16.unbind(1), packing)
    (grad16,) = torch.autograd.grad(out16, qkv16, grad_out.bfloat16())
    out32 = per_sample_reference(*qkv32.unbind(1), lengths)
    (grad32,) = torch.autograd.grad(out32, qkv32, grad_out)
    assert out16.dtype == torch.bfloat16
    assert (out16.float() - out32).norm() / out32.norm() < 0.02
    assert (grad16.float() - grad32).norm() / grad32.norm() < 0.03
    with torch.no_grad():  # inference keeps the flash kernel
        out16_inference = packed_attention(*qkv16.unbind(1), packing)
    assert (out16_inference.float() - out32).norm() / out32.norm() < 0.02


def test_every_token_attends_only_within_its_own_sample():
    lengths = [4, 6]
    qkv = packed_qkv(lengths).detach()
    q, k, v = qkv.unbind(1)
    v2 = v.clone()
    v2[4:] += 100.0  # change only the second sample's values
    packing = Packing.from_lengths(lengths)
    a = packed_attention(q, k, v, packing)
    b = packed_attention(q, k, v2, packing)
    torch.testing.assert_close(a[:4], b[:4])
    assert not torch.allclose(a[4:], b[4:])


def test_empty_batch_and_zero_length_samples():
    qkv = packed_qkv([0, 5, 0, 3])
    out = packed_attention(*qkv.unbind(1), Packing.from_lengths([0, 5, 0, 3]))
    torch.testing.assert_close(out, per_sample_reference(*qkv.unbind(1), [5, 3]))
    empty = torch.zeros(0, HEADS, HEAD_DIM)
    assert packed_attention(empty, empty, empty, Packing.from_lengths([])).shape == (0, HEADS, HEAD_DIM)


def test_cost_counts_sum_of_squared_lengths_not_padded_batch():
    lengths = [50, 3, 7, 1]
    qkv = packed_qkv(lengths).detach()
    with flop_counter() as counter:
        packed_attention(*qkv.unbind(1), Packing.from_lengths(lengths))
    # QK^T and AV: 2 matmuls x 2 FLOPs per MAC x H x D per score.
    per_score = 2 * 2 * HEADS * HEAD_DIM
    assert counter.get_total_flops() == per_score * sum(n * n for n in lengths)
    assert counter.get_total_flops() < per_score * len(lengths) * max(lengths) ** 2 / 3


def test_backward_cost_is_counted_too():
    lengths = [20, 5]
    qkv = packed_qkv(lengths)
    with flop_counter() as counter:
        packed_attention(*qkv.unbind(1), Packing.from_lengths(lengths)).sum().backward()
    scores = sum(n * n for n in lengths)
    # forward 2 matmuls, flash backward 5 (it recomputes the scores): 7 x 2 FLOPs x H x D per score.
    assert counter.get_total_flops() == 7 * 2 * HEADS * HEAD_DIM * scores


def test_auto_picks_loop_on_cpu_and_explicit_cuda_only_backends_are_refused():
    assert select_backend(torch.device("cpu")) == "loop"
    for backend in ("nested", "flash"):
        with pytest.raises(DCDiTError, match="needs CUDA"):
            select_backend(torch.device("cpu"), backend)
    with pytest.raises(DCDiTError, match="did you mean 'loop'"):
        select_backend(torch.device("cpu"), "lop")


def test_attention_backend_block_sets_what_auto_means():
    with attention_backend("loop"):
        assert select_backend(torch.device("cpu")) == "loop"
    with attention_backend("nested"), pytest.raises(DCDiTError, match="needs CUDA"):
        packed_attention(*packed_qkv([3, 4]).unbind(1), Packing.from_lengths([3, 4]))
    assert attention._default_backend.get() == "auto"


def test_packing_layout():
    packing = Packing.from_lengths(torch.tensor([2, 0, 3]))
    assert packing.lengths == (2, 0, 3)
    assert packing.cu_seqlens.tolist() == [0, 2, 2, 5]
    assert packing.sample_index.tolist() == [0, 0, 2, 2, 2]
    assert packing.total == 5 and packing.max_len == 3 and not packing.is_uniform
    per_sample = torch.tensor([[1.0], [2.0], [3.0]])
    assert packing.per_token(per_sample).squeeze(1).tolist() == [1.0, 1.0, 3.0, 3.0, 3.0]
