"""Dynamic chunking after the router (dcdit.models.routers): hard chunking with tail dropping, de-chunk smoothing,
plug-back, the STE gate and the ratio loss (arXiv 2603.06351, sections on the router and de-chunk).

Everything here runs in float32 whatever the surrounding autocast: boundary probabilities near 0.5 decide which
tokens exist, and bf16 rounding there would flip them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.profiler import record_function

from dcdit.models.attention import Packing

# Profiler range names of the two steps that compare kept tokens with each other or with the grid (dcdit bench's
# breakdown); outside a profiler a range costs a few microseconds.
DECHUNK_LABEL = "de-chunk"
PLUG_BACK_LABEL = "plug-back"
P_CLAMP = 1e-4  # de-chunk clamps p to [P_CLAMP, 1 - P_CLAMP] so neither term of the mix vanishes exactly


def tail_drop_mask(mask: torch.Tensor, probs: torch.Tensor, rho: float | torch.Tensor | None) -> torch.Tensor:
    """Elastic inference: of each sample's kept tokens, drop the floor(rho * kept) with the lowest p.

    `rho` is a scalar or a per-sample (B,) tensor in [0, 1), read to 6 decimal places: a float32 0.9 (Lite-CFG's
    per-sample tensor) is 0.89999998, and floor(0.89999998 * 10) would drop 8 tokens instead of 9. Ties in p drop
    the earlier token in raster order.
    """
    if rho is None:
        return mask
    rho = torch.as_tensor(rho, device=mask.device).to(torch.float64).expand(mask.shape[0])
    if bool(((rho < 0) | (rho >= 1)).any()):
        raise ValueError(f"tail-drop fraction must be in [0, 1), got {rho.tolist()}")
    rho = torch.round(rho * 1e6) / 1e6
    kept = mask.sum(1)
    # The small epsilon keeps floor(0.3 * 10) at 3 despite 0.3 * 10 = 2.9999999999999996 style rounding.
    n_drop = torch.floor(rho * kept.double() + 1e-9).long()
    scores = torch.where(mask, probs.detach(), torch.full_like(probs, float("inf")))
    rank = torch.argsort(torch.argsort(scores, dim=1, stable=True), dim=1)
    return mask & (rank >= n_drop[:, None])


@dataclass
class Routing:
    """What the router decided for a batch; returned by DC-DiT next to its prediction."""

    probs: torch.Tensor  # (B, L) float32 boundary probabilities, first and last forced to 1
    router_mask: torch.Tensor  # (B, L) bool, p > 0.5: the chunking before tail dropping (the ratio loss uses it)
    mask: torch.Tensor  # (B, L) bool, the tokens the backbone actually ran on
    grid_size: tuple[int, int]

    @property
    def kept(self) -> torch.Tensor:
        """(B,) tokens each sample's backbone ran on."""
        return self.mask.sum(1)

    @property
    def kept_fraction(self) -> torch.Tensor:
        """(B,) fraction of grid positions kept after tail dropping."""
        return self.mask.float().mean(1)

    @property
    def compression(self) -> torch.Tensor:
        """Realised compression of the batch: grid positions per kept token."""
        return self.mask.numel() / self.mask.sum().clamp_min(1)


def kept_coordinates(mask: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat indices into (B*L), grid positions (T,) and (row, col) float coordinates (T, 2) of kept tokens."""
    flat = mask.reshape(-1).nonzero().squeeze(1)  # raster order within each sample, samples in order
    position = flat % mask.shape[1]
    coords = torch.stack([position // width, position % width], dim=1).float()
    return flat, position, coords


def pad_packed(x: torch.Tensor, packing: Packing) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, ...) packed rows -> (B, max_len, ...) zero-padded and the (B, max_len) validity mask."""
    slot = torch.arange(x.shape[0], device=x.device) - packing.cu_seqlens.long()[packing.sample_index]
    padded = x.new_zeros(packing.batch_size, packing.max_len, *x.shape[1:])
    padded[packing.sample_index, slot] = x
    valid = torch.zeros(packing.batch_size, packing.max_len, dtype=torch.bool, device=x.device)
    valid[packing.sample_index, slot] = True
    return padded, valid


def dechunk_smooth(h: torch.Tensor, p: torch.Tensor, coords: torch.Tensor, packing: Packing,
                   sigma: float) -> torch.Tensor:
    """De-chunk smoothing over each sample's kept tokens (float32).

    W_ij = exp(-|u_i - u_j|^2 / (2 sigma^2)) p_j, rows normalised; out_i = p_i h_i + (1 - p_i) sum_j W~_ij h_j.
    A confident boundary keeps its own features; an uncertain one borrows from confident spatial neighbours.
    """
    with record_function(DECHUNK_LABEL):
        p = p.float().clamp(P_CLAMP, 1 - P_CLAMP)
        hp, valid = pad_packed(h.float(), packing)
        pp, _ = pad_packed(p, packing)
        up, _ = pad_packed(coords, packing)
        dist2 = torch.cdist(up, up).square()
        weights = torch.exp(-dist2 / (2 * sigma**2)) * (pp * valid)[:, None, :]
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        smoothed = torch.bmm(weights, hp)
        out = pp[..., None] * hp + (1 - pp[..., None]) * smoothed
        return out[valid]


def nearest_kept(mask: torch.Tensor, height: int, width: int, packing: Packing) -> torch.Tensor:
    """(B, L) index into the packed kept tokens of each grid position's spatially nearest kept token.

    Euclidean distance on the grid; ties go to the earliest kept token in raster order. Exact integer arithmetic in
    O(B H L), not the O(B L M) of comparing every position with every kept token: within each grid row r', only the
    nearest kept column to the left and to the right of column c can be a row's closest token (the left one on a
    tie, the earlier in raster order), so the nearest kept token to (r, c) is the best of those over rows r', with
    the first minimum (smallest r') on ties.
    """
    with record_function(PLUG_BACK_LABEL):
        b = mask.shape[0]
        grid = mask.view(b, height, width)
        cols = torch.arange(width, device=mask.device, dtype=torch.int32)
        # A row without kept tokens gets a column offset larger than any distance on the grid, so it never wins.
        far = height + width
        left = torch.where(grid, cols, -far).cummax(dim=2).values
        right = torch.where(grid, cols, width + far).flip(2).cummin(dim=2).values.flip(2)
        nearest_col = torch.where(cols - left <= right - cols, left, right)  # (B, H', W) per source row r'
        rows = torch.arange(height, device=mask.device, dtype=torch.int32)
        d2 = (rows[:, None] - rows[None, :]).square()[None, :, :, None] + (nearest_col - cols).square()[:, None]
        best_row = d2.argmin(dim=2)  # (B, H, W); argmin returns the first minimum
        best_col = nearest_col.gather(1, best_row)
        position = (best_row * width + best_col).view(b, -1)
        rank = mask.cumsum(1) - 1  # a kept position's index among its sample's kept tokens
        return rank.gather(1, position) + packing.cu_seqlens.long()[:-1, None]


def straight_through_one(x: torch.Tensor) -> torch.Tensor:
    """Exactly 1 in the forward pass, identity gradient to x in the backward pass."""
    return 1.0 + (x - x.detach())


def gated_residual(dechunked: torch.Tensor, probs: torch.Tensor, router_mask: torch.Tensor,
                   residual: torch.Tensor) -> torch.Tensor:
    """dechunked * STE(p_sel) + residual, p_sel = p where the router kept the token and 1 - p elsewhere.

    The router's own decision (before tail dropping) selects, as in the release: a tail-dropped token is still
    gated with its own p, so multi-budget training does not reverse its gradient. The forward value is exactly
    dechunked + residual; the backward pass gives dL/dp_i = +-<dL/dout_i, dechunked_i> (+ for router-kept tokens).
    """
    gate = straight_through_one(torch.where(router_mask, probs, 1 - probs))
    return dechunked * gate[..., None] + residual


def ratio_loss(router_mask: torch.Tensor, probs: torch.Tensor, downsample_factor: float,
               group_size: int = 16) -> torch.Tensor:
    """Switch-style ratio loss averaged over groups of `group_size` samples (the last group may be smaller).

    L = N/(N-1) * ((1 - r)(1 - p_bar) + (N - 1) r p_bar), r = mean hard mask, p_bar = mean p, per group.
    It is 1 at r = p_bar = 1/N and only p_bar carries gradient: the hard mask is a count.
    """
    n = float(downsample_factor)
    losses = []
    for start in range(0, router_mask.shape[0], group_size):
        r = router_mask[start:start + group_size].float().mean()
        p_bar = probs[start:start + group_size].float().mean()
        losses.append(n / (n - 1) * ((1 - r) * (1 - p_bar) + (n - 1) * r * p_bar))
    return torch.stack(losses).mean()
