"""Computations restructured for speed or memory (#14) against the straightforward ones they replace, written here:
nearest plug-back by per-row search instead of comparing every position with every kept token, and the DiT block's
adaLN modulation broadcast over a sample's tokens instead of copied to every token.
"""

import pytest
import torch

from dcdit.models.attention import Packing
from dcdit.models.chunking import kept_coordinates, nearest_kept
from dcdit.models.dit import DiTBlock


def nearest_by_all_pairs(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Each grid position's nearest kept token from the full (B, L, M) table of squared distances (the computation
    nearest_kept replaced): integer squared distances, first minimum in raster order."""
    b, length = mask.shape
    position = torch.arange(length)
    grid = torch.stack([position // width, position % width], 1)
    out = torch.empty(b, length, dtype=torch.long)
    start = 0
    for i in range(b):
        kept = mask[i].nonzero().squeeze(1)
        kept_rc = torch.stack([kept // width, kept % width], 1)
        d2 = (grid[:, None, :] - kept_rc[None, :, :]).square().sum(-1)  # (L, M), ascending raster order of kept
        out[i] = d2.argmin(1) + start
        start += kept.numel()
    return out


def masks(height: int, width: int, seed: int) -> torch.Tensor:
    """Masks with many equidistant candidates: sparse and dense random ones, a lattice, one token, all tokens."""
    gen = torch.Generator().manual_seed(seed)
    length = height * width
    rows = [torch.rand(length, generator=gen) < fraction for fraction in (0.02, 0.25, 0.6)]
    lattice = torch.zeros(height, width, dtype=torch.bool)
    lattice[1::3, 2::4] = True  # a regular lattice: positions halfway between two tokens are exact ties
    single = torch.zeros(length, dtype=torch.bool)
    single[length // 2 + 1] = True
    rows += [lattice.reshape(-1), single, torch.ones(length, dtype=torch.bool)]
    out = torch.stack(rows)
    out[:, 0] |= ~out.any(1)  # every sample keeps something (the router forces its first and last token)
    return out


@pytest.mark.parametrize("height,width", [(16, 16), (9, 23), (40, 7), (1, 12), (12, 1)])
def test_per_row_plug_back_equals_the_all_pairs_search_exactly(height, width):
    mask = masks(height, width, seed=height * 100 + width)
    packing = Packing.from_lengths(mask.sum(1))
    assert torch.equal(nearest_kept(mask, height, width, packing), nearest_by_all_pairs(mask, height, width))


def test_plug_back_ties_go_to_the_earlier_kept_token_in_raster_order():
    # Kept (0, 1) and (2, 1) on a 3x3 grid: (1, 1) is equidistant from both; (0, 1) comes first. (1, 0) likewise.
    mask = torch.zeros(1, 9, dtype=torch.bool)
    mask[0, [1, 7]] = True
    source = nearest_kept(mask, 3, 3, Packing.from_lengths([2]))
    assert source.view(3, 3).tolist() == [[0, 0, 0], [0, 0, 0], [1, 1, 1]]
    # Same row, equidistant left and right: (0, 0) and (0, 2) from (0, 1); the left one is earlier.
    mask = torch.zeros(1, 3, dtype=torch.bool)
    mask[0, [0, 2]] = True
    assert nearest_kept(mask, 1, 3, Packing.from_lengths([2])).tolist() == [[0, 0, 1]]


def test_plug_back_indexes_into_each_samples_own_kept_tokens():
    mask = masks(10, 10, seed=5)
    packing = Packing.from_lengths(mask.sum(1))
    source = nearest_kept(mask, 10, 10, packing)
    flat, _, _ = kept_coordinates(mask, 10)
    owner = flat // 100  # the sample of each packed kept token
    assert torch.equal(owner[source], torch.arange(mask.shape[0])[:, None].expand_as(source))


def straightforward_block(block: DiTBlock, x: torch.Tensor, c: torch.Tensor, packing: Packing) -> torch.Tensor:
    """The DiT block with each sample's modulation copied to every one of its tokens (the computation replaced)."""
    mod = torch.repeat_interleave(block.adaLN_modulation(c), torch.tensor(packing.lengths), dim=0)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
    x = x + gate_msa * block.attn(block.norm1(x) * (1 + scale_msa) + shift_msa, packing)
    return x + gate_mlp * block.mlp(block.norm2(x) * (1 + scale_mlp) + shift_mlp)


def perturbed_block(seed: int = 0) -> DiTBlock:
    torch.manual_seed(seed)
    block = DiTBlock(32, 4)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.2 * torch.randn_like(p))  # adaLN-Zero starts at zero; give the modulation and gates signal
    return block


def test_broadcast_modulation_gives_the_per_token_result_bit_for_bit_and_gradients_within_rounding():
    block = perturbed_block()
    packing = Packing.uniform(3, 10)
    x = torch.randn(30, 32, requires_grad=True)
    c = torch.randn(3, 32, requires_grad=True)
    out = block(x, c, packing)
    expected = straightforward_block(block, x, c, packing)
    # The same float32 operations on the same values, element by element: equal to the bit.
    assert torch.equal(out, expected)
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, c, *block.parameters()], upstream)
    expected_grads = torch.autograd.grad(expected, [x, c, *block.parameters()], upstream)
    # The modulation's gradient sums over a sample's tokens: a broadcast's reduction and index_select's backward
    # add the same 10 products in different orders, so they agree to float32 rounding of a 10-term sum.
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_unequal_lengths_still_take_the_per_token_modulation():
    block = perturbed_block(1)
    packing = Packing.from_lengths([4, 9, 1])
    x, c = torch.randn(14, 32), torch.randn(3, 32)
    assert torch.equal(block(x, c, packing), straightforward_block(block, x, c, packing))


def saved_values(fn) -> int:
    """Floating-point elements of the distinct storages autograd keeps for the backward pass of fn() (parameters
    and integer index tensors excluded)."""
    storages = {}

    def pack(t):
        if t.is_floating_point() and not isinstance(t, torch.nn.Parameter):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() // t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_a_uniform_batch_no_longer_keeps_a_per_token_copy_of_the_modulation():
    block = perturbed_block(2)
    tokens, width = 64 * 4, 32
    packing = Packing.uniform(4, 64)
    x, c = torch.randn(tokens, width, requires_grad=True), torch.randn(4, width, requires_grad=True)
    broadcast = saved_values(lambda: block(x, c, packing))
    copied = saved_values(lambda: straightforward_block(block, x, c, packing))
    # The straightforward block keeps the (T, 6 d) modulation and its two (T, d) factors 1 + scale for the backward
    # pass; the broadcast one keeps them per sample: (B, 6 d) and (B, d).
    assert copied - broadcast == 8 * width * (tokens - 4)
