"""Dynamic chunking against brute-force computations of the paper's formulas."""

import math

import numpy as np
import pytest
import torch

import dcdit
from dcdit.models.attention import Packing
from dcdit.models.chunking import (dechunk_smooth, gated_residual, kept_coordinates, nearest_kept, ratio_loss,
                                   straight_through_one, tail_drop_mask)
from dcdit.models.routers import CosineRouter


def ratio_formula(r: float, p: float, n: float) -> float:
    return n / (n - 1) * ((1 - r) * (1 - p) + (n - 1) * r * p)


@pytest.mark.parametrize("n", [2.0, 4.0, 16.0])
def test_ratio_loss_is_one_at_target_and_smallest_there_along_the_diagonal(n):
    length = 4096
    k = int(length / n)
    mask = torch.zeros(1, length, dtype=torch.bool)
    mask[0, :k] = True
    probs = torch.full((1, length), k / length)
    assert ratio_loss(mask, probs, n).item() == pytest.approx(1.0, abs=1e-6)
    # Along r = p_bar = x the loss is N/(N-1) ((1-x)^2 + (N-1) x^2): minimal at x = 1/N.
    xs = np.linspace(0.01, 0.99, 99)
    values = []
    for x in xs:
        kx = int(round(x * length))
        m = torch.zeros(1, length, dtype=torch.bool)
        m[0, :kx] = True
        values.append(ratio_loss(m, torch.full((1, length), kx / length), n).item())
    assert abs(xs[int(np.argmin(values))] - 1 / n) <= 0.01
    assert min(values) >= 1.0 - 1e-5


def test_ratio_loss_averages_groups_and_matches_the_formula():
    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(40, 64, generator=gen)
    mask = probs > 0.6
    expected = []
    for start in range(0, 40, 16):  # groups of 16, 16 and 8
        r = mask[start:start + 16].double().mean().item()
        p = probs[start:start + 16].double().mean().item()
        expected.append(ratio_formula(r, p, 4.0))
    assert ratio_loss(mask, probs, 4.0, group_size=16).item() == pytest.approx(np.mean(expected), rel=1e-5)


def test_ratio_loss_gradient_flows_only_through_probabilities():
    probs = torch.full((16, 64), 0.1, requires_grad=True)
    mask = torch.zeros(16, 64, dtype=torch.bool)  # nothing kept: the loss must push p up
    ratio_loss(mask, probs, 4.0).backward()
    assert (probs.grad < 0).all()
    probs.grad = None
    mask[:] = True  # everything kept: the loss must push p down
    ratio_loss(mask, probs, 4.0).backward()
    assert (probs.grad > 0).all()


def test_straight_through_gate_is_one_forward_and_identity_backward():
    p = torch.rand(5, 7, requires_grad=True)
    gate = straight_through_one(p)
    assert torch.equal(gate, torch.ones_like(gate))
    upstream = torch.randn(5, 7)
    (gate * upstream).sum().backward()
    assert torch.allclose(p.grad, upstream)


def test_gate_gradient_values_for_a_kept_a_dropped_and_a_tail_dropped_token():
    # Three tokens of one sample: kept (router and after tail dropping), dropped by the router, and kept by the router
    # but tail-dropped. The gate selects with the router's own decision, so the tail-dropped token is gated with p.
    probs = torch.tensor([[0.8, 0.3, 0.6]], requires_grad=True)
    router_mask = torch.tensor([[True, False, True]])
    dechunked = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, -6.0]]])
    residual = torch.tensor([[[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]])
    out = gated_residual(dechunked, probs, router_mask, residual)
    torch.testing.assert_close(out, dechunked + residual)  # the gate is exactly 1 forward
    upstream = torch.tensor([[[1.0, 1.0], [2.0, -1.0], [0.5, 2.0]]])
    (out * upstream).sum().backward()
    # dL/dp = +<upstream, dechunked> where the router kept the token (p selected), - where it did not (1 - p):
    # kept 1*1 + 1*2 = 3; dropped -(2*3 - 1*4) = -2; tail-dropped +(0.5*5 + 2*(-6)) = -9.5.
    assert probs.grad.tolist() == [[3.0, -2.0, -9.5]]


def test_router_gradient_of_dropped_and_tail_dropped_tokens_through_the_whole_model():
    """dL/dlogit_i = +-p_i (1 - p_i) <dL/dtokens_i, dechunked_i> for tokens outside the kept set, computed from hooks;
    + for tail-dropped tokens (the router kept them), - for the router's dropped ones. Their p reaches the loss only
    through the gate (tail dropping ranks detached p; de-chunk reads only kept tokens' p)."""
    torch.manual_seed(3)
    model = dcdit.create_model("DC-DiT-S", depth=2, hidden_size=64, num_heads=2, input_size=8, num_classes=10)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.3 * torch.randn_like(param))
    captured = {}

    def retain(name, tensor):
        tensor.retain_grad()
        captured[name] = tensor

    model.router.scorer.register_forward_hook(lambda module, args, out: retain("logits", out))
    model.residual_proj.register_forward_hook(lambda module, args, out: retain("residual", out))
    model.decoder[0].register_forward_pre_hook(lambda module, args: retain("tokens", args[0]))
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([100, 700]), torch.tensor([1, 2])
    out, routing = model(x, t, y, tail_drop=0.5, return_routing=True)
    (out * torch.randn_like(out)).sum().backward()

    g = captured["tokens"].grad.flatten(2).transpose(1, 2)  # (B, L, d) = dL/d(gated tokens)
    dechunked = captured["tokens"].detach().flatten(2).transpose(1, 2) - captured["residual"].detach()
    p = routing.probs.detach()
    expected = p * (1 - p) * (g * dechunked).sum(-1)
    logit_grad = captured["logits"].grad.flatten(1)
    inner = torch.zeros_like(p, dtype=torch.bool)
    inner[:, 1:-1] = True  # the first and last token are forced to p = 1 and carry no gradient
    tail_dropped = routing.router_mask & ~routing.mask & inner
    dropped = ~routing.router_mask & inner
    assert tail_dropped.sum() >= 2 and dropped.sum() >= 2
    torch.testing.assert_close(logit_grad[tail_dropped], expected[tail_dropped], rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(logit_grad[dropped], -expected[dropped], rtol=1e-3, atol=1e-6)
    assert expected[tail_dropped].abs().min() > 0


def brute_force_tail_drop(mask, probs, rho):
    out = mask.clone()
    for b in range(mask.shape[0]):
        kept = [i for i in range(mask.shape[1]) if mask[b, i]]
        n_drop = math.floor(float(rho[b]) * len(kept) + 1e-9)
        # Lowest p first; equal p: earlier raster position first.
        order = sorted(kept, key=lambda i: (float(probs[b, i]), i))
        for i in order[:n_drop]:
            out[b, i] = False
    return out


def test_tail_drop_removes_floor_rho_kept_lowest_probability_tokens_per_sample():
    gen = torch.Generator().manual_seed(1)
    probs = torch.rand(6, 50, generator=gen)
    probs[2, 10:20] = 0.75  # ties
    mask = probs > 0.4
    rho = torch.tensor([0.0, 0.1, 0.3, 0.5, 0.7, 0.99])
    dropped = tail_drop_mask(mask, probs, rho)
    assert torch.equal(dropped, brute_force_tail_drop(mask, probs, rho))
    kept = mask.sum(1)
    assert torch.equal(kept - dropped.sum(1), torch.floor(rho.double() * kept + 1e-9).long())
    # A scalar rho applies to every sample.
    assert torch.equal(tail_drop_mask(mask, probs, 0.3), brute_force_tail_drop(mask, probs, torch.full((6,), 0.3)))
    with pytest.raises(ValueError):
        tail_drop_mask(mask, probs, 1.0)


def test_tail_drop_fractions_mean_their_decimal_value_even_as_float32():
    """Lite-CFG hands the model a float32 tensor: 0.9 of 10 kept tokens is 9 dropped (float32 0.9 * 10 < 9)."""
    mask = torch.zeros(3, 40, dtype=torch.bool)
    mask[:, :10] = True
    mask[2, :30] = True
    probs = torch.linspace(0.5, 1.0, 40).expand(3, 40).contiguous()
    for dtype in (torch.float32, torch.float64):
        rho = torch.tensor([0.9, 0.3, 0.9], dtype=dtype)
        dropped = tail_drop_mask(mask, probs, rho)
        assert (mask.sum(1) - dropped.sum(1)).tolist() == [9, 3, 27]


def brute_force_dechunk(h, p, coords, lengths, sigma):
    out = np.zeros_like(h, dtype=np.float64)
    start = 0
    p = np.clip(p.astype(np.float64), 1e-4, 1 - 1e-4)
    for n in lengths:
        for i in range(start, start + n):
            w = np.array([math.exp(-np.sum((coords[i] - coords[j]) ** 2) / (2 * sigma**2)) * p[j]
                          for j in range(start, start + n)])
            w /= w.sum()
            smooth = (w[:, None] * h[start:start + n]).sum(0)
            out[i] = p[i] * h[i] + (1 - p[i]) * smooth
        start += n
    return out


def test_dechunk_smoothing_matches_the_formula_per_sample():
    gen = torch.Generator().manual_seed(2)
    lengths = [5, 1, 9]
    total = sum(lengths)
    h = torch.randn(total, 6, generator=gen)
    p = torch.rand(total, generator=gen)
    coords = torch.randint(0, 8, (total, 2), generator=gen).float()
    packing = Packing.from_lengths(lengths)
    out = dechunk_smooth(h, p, coords, packing, sigma=1.5)
    expected = brute_force_dechunk(h.numpy(), p.numpy(), coords.numpy(), lengths, 1.5)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_dechunk_with_every_token_kept_and_p_near_one_is_the_identity():
    side = 6
    h = torch.randn(2 * side * side, 8)
    mask = torch.ones(2, side * side, dtype=torch.bool)
    _, _, coords = kept_coordinates(mask, side)
    out = dechunk_smooth(h, torch.ones(2 * side * side), coords, Packing.from_lengths([36, 36]), sigma=1.0)
    # p is clamped to 1 - 1e-4, so the identity holds to that tolerance.
    torch.testing.assert_close(out, h, rtol=0, atol=2e-4 * h.abs().max().item())


def test_plug_back_picks_the_spatially_nearest_kept_token():
    gen = torch.Generator().manual_seed(3)
    height, width = 7, 9
    mask = torch.rand(3, height * width, generator=gen) > 0.8
    mask[:, 0] = True
    packing = Packing.from_lengths(mask.sum(1))
    source = nearest_kept(mask, height, width, packing)
    flat, _, _ = kept_coordinates(mask, width)
    kept_positions = (flat % (height * width)).tolist()
    for b in range(3):
        start = int(packing.cu_seqlens[b])
        own = [(i, kept_positions[i]) for i in range(start, start + packing.lengths[b])]
        for pos in range(height * width):
            r, c = divmod(pos, width)
            best = min(own, key=lambda item: ((item[1] // width - r) ** 2 + (item[1] % width - c) ** 2, item[1]))
            assert int(source[b, pos]) == best[0]


def test_cosine_router_matches_neighbour_average_definition():
    torch.manual_seed(4)
    router = CosineRouter(8)
    with torch.no_grad():
        router.q_proj.weight.add_(0.1 * torch.randn(8, 8))
    grid = torch.randn(2, 8, 4, 5)
    p = router.probs(grid)
    tokens = grid.flatten(2).transpose(1, 2)
    q = torch.nn.functional.normalize(tokens @ router.q_proj.weight.T, dim=-1)
    k = torch.nn.functional.normalize(tokens @ router.k_proj.weight.T, dim=-1)
    for b in range(2):
        for r in range(4):
            for c in range(5):
                neighbours = [k[b, rr * 5 + cc] for rr in range(r - 1, r + 2) for cc in range(c - 1, c + 2)
                              if (rr, cc) != (r, c) and 0 <= rr < 4 and 0 <= cc < 5]
                k_bar = torch.stack(neighbours).mean(0)
                expected = (1 - torch.dot(q[b, r * 5 + c], k_bar)) / 2
                assert p[b, r * 5 + c].item() == pytest.approx(expected.item(), abs=1e-5)
