"""Sample-quality metrics: mergeable float64 feature statistics, Frechet distance (FID, sFID, FD), Inception Score,
KID and precision/recall.

Pure numpy/torch. Statistics are sufficient sums (n, sum x, sum x x^T) in float64, so shards computed anywhere merge
by addition; everything downstream of the features runs in float64 and never produces a complex number.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from dcdit.errors import DCDiTError


class BiasedEstimateWarning(UserWarning):
    """A metric was computed from too few samples to be unbiased or comparable (e.g. FID with n < dim)."""


# --- statistics ----------------------------------------------------------------------------------------------------

@dataclass
class FeatureStats:
    """Sufficient statistics of a feature set: count, float64 sum and float64 sum of outer products.

    Merging is addition, so statistics of disjoint shards add up to those of the union, in any grouping.
    """

    n: int
    sum: np.ndarray  # (d,) float64
    sum_outer: np.ndarray  # (d, d) float64

    @classmethod
    def empty(cls, dim: int) -> FeatureStats:
        return cls(0, np.zeros(dim, np.float64), np.zeros((dim, dim), np.float64))

    @classmethod
    def from_features(cls, features) -> FeatureStats:
        stats = cls.empty(_as_matrix(features).shape[1])
        return stats.update(features)

    @property
    def dim(self) -> int:
        return int(self.sum.shape[0])

    def update(self, features) -> FeatureStats:
        """Add the rows of an (n, d) array (numpy or torch, any float dtype) in place; returns self."""
        x = _as_matrix(features)
        if x.shape[1] != self.dim:
            raise DCDiTError(f"features have {x.shape[1]} dimensions, the statistics {self.dim}")
        if not np.isfinite(x).all():
            raise DCDiTError("features contain NaN or inf (a diverged model or a broken extractor)")
        self.n += x.shape[0]
        self.sum += x.sum(axis=0)
        self.sum_outer += x.T @ x
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        """The statistics of both feature sets together (a new object)."""
        if other.dim != self.dim:
            raise DCDiTError(f"cannot merge statistics of {self.dim} and {other.dim} dimensions")
        return FeatureStats(self.n + other.n, self.sum + other.sum, self.sum_outer + other.sum_outer)

    __add__ = merge

    @staticmethod
    def merge_all(parts: Iterable[FeatureStats]) -> FeatureStats:
        """Sum of `parts` in the order given (a fixed order gives bit-identical results)."""
        total = None
        for part in parts:
            total = FeatureStats(part.n, part.sum.copy(), part.sum_outer.copy()) if total is None else total.merge(part)
        if total is None:
            raise DCDiTError("no statistics to merge")
        return total

    def mean(self) -> np.ndarray:
        if self.n < 1:
            raise DCDiTError("statistics of zero samples have no mean")
        return self.sum / self.n

    def covariance(self) -> np.ndarray:
        """Unbiased covariance (divides by n - 1), symmetrised."""
        if self.n < 2:
            raise DCDiTError(f"a covariance needs at least 2 samples, got {self.n}")
        mu = self.mean()
        cov = (self.sum_outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return (cov + cov.T) / 2

    def moments(self) -> Moments:
        return Moments(self.mean(), self.covariance(), self.n)

    def to_arrays(self, prefix: str = "", *, moments: bool = True) -> dict[str, np.ndarray]:
        """Arrays for an npz file: the sums, plus (with `moments`) ADM-compatible `mu`/`sigma`; prefix 's' gives
        n_s, sum_s, ..., mu_s, sigma_s."""
        suffix = f"_{prefix}" if prefix else ""
        out = {f"n{suffix}": np.array(self.n, np.int64), f"sum{suffix}": self.sum,
               f"sum_outer{suffix}": self.sum_outer}
        if moments and self.n >= 2:
            out[f"mu{suffix}"] = self.mean()
            out[f"sigma{suffix}"] = self.covariance()
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], prefix: str = "") -> FeatureStats:
        suffix = f"_{prefix}" if prefix else ""
        return cls(int(arrays[f"n{suffix}"]), np.asarray(arrays[f"sum{suffix}"], np.float64),
                   np.asarray(arrays[f"sum_outer{suffix}"], np.float64))


@dataclass
class Moments:
    """Mean and covariance of a feature distribution; `n` is None for reference files that do not record it."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int | None = None

    def __post_init__(self):
        self.mu = np.asarray(self.mu, np.float64).reshape(-1)
        self.sigma = np.asarray(self.sigma, np.float64)
        if self.sigma.shape != (self.mu.size, self.mu.size):
            raise DCDiTError(f"covariance of shape {self.sigma.shape} does not match a mean of {self.mu.size} values")

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], prefix: str = "") -> Moments:
        """From `mu`/`sigma` (or `mu_s`/`sigma_s`), as in ADM reference batches and this module's npz files."""
        suffix = f"_{prefix}" if prefix else ""
        if f"sum{suffix}" in arrays and f"n{suffix}" in arrays:
            return FeatureStats.from_arrays(arrays, prefix).moments()
        n = int(arrays[f"n{suffix}"]) if f"n{suffix}" in arrays else None
        return cls(arrays[f"mu{suffix}"], arrays[f"sigma{suffix}"], n)


def _as_matrix(features) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().double().numpy()
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise DCDiTError(f"features must be an (n, d) matrix, got shape {x.shape}")
    return x


# --- Frechet distance ----------------------------------------------------------------------------------------------

def frechet_distance(a: Moments | FeatureStats, b: Moments | FeatureStats, *, name: str = "FID",
                     method: str = "eigh") -> float:
    """|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2)) in float64; always a real number.

    method "eigh" (default): S_i = F_i F_i^T from symmetric eigendecompositions, then tr(sqrt(S1 S2)) is the sum
    of the singular values of F1^T F2, computed directly (not as square roots of eigenvalues of a product, which
    would square the condition number). Each spectrum is cut to the rank its sample count allows (n - 1), so
    singular covariances (n < dim) give the exact value rather than rounding noise.
    method "sqrtm": ADM's scipy.linalg.sqrtm(S1 S2) with the 1e-6 diagonal retry, for cross-checking.
    Warns (BiasedEstimateWarning) when a side has fewer samples than dimensions.
    """
    a = a.moments() if isinstance(a, FeatureStats) else a
    b = b.moments() if isinstance(b, FeatureStats) else b
    if a.mu.shape != b.mu.shape:
        raise DCDiTError(f"{name}: statistics of {a.mu.size} and {b.mu.size} dimensions cannot be compared "
                         "(different extractors or layers?)")
    dim = a.mu.size
    few = [str(m.n) for m in (a, b) if m.n is not None and m.n < dim]
    if few:
        warnings.warn(f"{name} from {' and '.join(few)} samples in {dim} dimensions: the covariance is singular and "
                      f"the estimate is biased; use at least {dim} samples for numbers that compare (papers use "
                      "50,000)", BiasedEstimateWarning, stacklevel=2)
    diff = a.mu - b.mu
    if method == "eigh":
        cross = _trace_sqrt_product(a, b)
    elif method == "sqrtm":
        cross = _trace_sqrt_product_sqrtm(a.sigma, b.sigma)
    else:
        raise DCDiTError(f"unknown Frechet distance method {method!r} (use 'eigh' or 'sqrtm')")
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2.0 * cross)


def _rank_bound(m: Moments) -> int:
    """The most nonzero eigenvalues m.sigma can have: d, or n - 1 for a sample covariance of n samples."""
    return m.mu.size if m.n is None else max(0, min(m.mu.size, m.n - 1))


def _psd_factor(m: Moments) -> torch.Tensor:
    """F (d x r) with F F^T = sigma: eigenvectors scaled by sqrt(eigenvalue), negative rounding clipped to 0,
    at most the `_rank_bound` largest directions."""
    w, v = torch.linalg.eigh(torch.from_numpy(m.sigma))  # ascending; torch's LAPACK beats numpy's on one thread
    keep = w > 0
    keep[: max(0, w.numel() - _rank_bound(m))] = False
    return v[:, keep] * torch.sqrt(w[keep])


def _trace_sqrt_product(a: Moments, b: Moments) -> float:
    fa, fb = _psd_factor(a), _psd_factor(b)
    if fa.shape[1] == 0 or fb.shape[1] == 0:
        return 0.0
    return float(torch.linalg.svdvals(fa.T @ fb).sum())


def _trace_sqrt_product_sqrtm(s1: np.ndarray, s2: np.ndarray) -> float:
    from scipy import linalg

    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise DCDiTError(f"sqrtm(S1 S2) has imaginary parts up to {np.abs(covmean.imag).max():.3g}; "
                             "use method='eigh'")
        covmean = covmean.real
    return float(np.trace(covmean))


# --- Inception Score -----------------------------------------------------------------------------------------------

def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """(mean, std) of exp(E KL(p(y|x) || p(y))) over `splits` consecutive equal parts, in the order given (no shuffle).

    `logits` are pre-softmax class scores (N, C); the Inception convention is 'logits_unbiased' (no fc bias).
    """
    x = torch.as_tensor(_as_matrix(logits))
    n = x.shape[0]
    if n < 2:
        raise DCDiTError(f"the Inception Score needs at least 2 samples, got {n}")
    splits = min(splits, n)
    if splits < 10:
        warnings.warn(f"Inception Score from {n} samples in {splits} splits: not comparable with papers (10 splits "
                      "of 5,000)", BiasedEstimateWarning, stacklevel=2)
    log_p = torch.log_softmax(x, dim=1)
    p = log_p.exp()
    scores = []
    for i in range(splits):
        part = slice(i * n // splits, (i + 1) * n // splits)
        p_part, log_p_part = p[part], log_p[part]
        log_q = torch.log(p_part.mean(dim=0, keepdim=True))
        kl = (p_part * (log_p_part - log_q)).sum(dim=1).mean()
        scores.append(float(torch.exp(kl)))
    return float(np.mean(scores)), float(np.std(scores))


# --- KID -----------------------------------------------------------------------------------------------------------

def kernel_distance(features_1, features_2, *, subsets: int = 100, subset_size: int = 1000, degree: int = 3,
                    gamma: float | None = None, coef0: float = 1.0, seed: int = 2020,
                    name: str = "KID") -> tuple[float, float]:
    """(mean, std) of the unbiased MMD^2 with the kernel (gamma x.y + coef0)^degree over random subsets.

    Subsets are drawn as torch-fidelity draws them (RandomState(seed), one choice per side per subset, without
    replacement), so the numbers match its KID on the same features; arithmetic is float64. With fewer samples than
    `subset_size` the subsets shrink to the smaller side (with a warning).
    """
    f1, f2 = _as_matrix(features_1), _as_matrix(features_2)
    if f1.shape[1] != f2.shape[1]:
        raise DCDiTError(f"{name}: features of {f1.shape[1]} and {f2.shape[1]} dimensions")
    m = min(subset_size, len(f1), len(f2))
    if m < 2:
        raise DCDiTError(f"{name} needs at least 2 samples on each side, got {len(f1)} and {len(f2)}")
    if m < subset_size:
        warnings.warn(f"{name} with subsets of {m} instead of {subset_size} samples: not comparable with papers",
                      BiasedEstimateWarning, stacklevel=2)
    gamma = 1.0 / f1.shape[1] if gamma is None else gamma
    rng = np.random.RandomState(seed)
    t1, t2 = torch.from_numpy(f1), torch.from_numpy(f2)
    values = np.empty(subsets)
    for i in range(subsets):
        x = t1[torch.from_numpy(rng.choice(len(f1), m, replace=False))]
        y = t2[torch.from_numpy(rng.choice(len(f2), m, replace=False))]
        k_xx = (x @ x.T * gamma + coef0) ** degree
        k_yy = (y @ y.T * gamma + coef0) ** degree
        k_xy = (x @ y.T * gamma + coef0) ** degree
        within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
        values[i] = float(within - 2.0 * k_xy.sum() / (m * m))
    return float(values.mean()), float(values.std())


# --- precision / recall --------------------------------------------------------------------------------------------

def precision_recall(real, fake, *, k: int = 3, block_size: int = 4096, dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu") -> tuple[float, float]:
    """Improved precision and recall (Kynkaenniemi et al. 2019) with k-NN balls, computed blockwise.

    precision: fraction of fake samples inside some real sample's ball (radius = distance to its k-th nearest real
    neighbour); recall: the same with the roles swapped. Distances are computed in `block_size` x `block_size` tiles,
    so 50K fake x 10K real needs a few hundred MB, never the full matrix. The fake-fake radii of 50K samples are
    ~10^13 FLOPs: pass device='cuda' where there is a GPU.
    """
    real_t = torch.as_tensor(_as_matrix(real), dtype=dtype, device=device)
    fake_t = torch.as_tensor(_as_matrix(fake), dtype=dtype, device=device)
    if real_t.shape[1] != fake_t.shape[1]:
        raise DCDiTError(f"precision/recall: features of {real_t.shape[1]} and {fake_t.shape[1]} dimensions")
    for side, t in (("real", real_t), ("fake", fake_t)):
        if t.shape[0] <= k:
            raise DCDiTError(f"precision/recall with k={k} needs more than {k} {side} samples, got {t.shape[0]}")
    real_radii = knn_radii(real_t, k, block_size)
    fake_radii = knn_radii(fake_t, k, block_size)
    precision = _inside_any_ball(fake_t, real_t, real_radii, block_size).double().mean().item()
    recall = _inside_any_ball(real_t, fake_t, fake_radii, block_size).double().mean().item()
    return float(precision), float(recall)


def knn_radii(x: torch.Tensor, k: int, block_size: int = 4096) -> torch.Tensor:
    """Distance from every row of x to its k-th nearest other row (the self-distance 0 is the first neighbour)."""
    out = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[0], block_size):
        rows = x[start:start + block_size]
        best = None
        for col in range(0, x.shape[0], block_size):
            d = torch.cdist(rows, x[col:col + block_size])
            merged = d if best is None else torch.cat([best, d], dim=1)
            best = torch.topk(merged, min(k + 1, merged.shape[1]), dim=1, largest=False).values
        out[start:start + rows.shape[0]] = best.max(dim=1).values
    return out


def _inside_any_ball(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, block_size: int) -> torch.Tensor:
    inside = torch.zeros(points.shape[0], dtype=torch.bool, device=points.device)
    for start in range(0, points.shape[0], block_size):
        rows = points[start:start + block_size]
        hit = torch.zeros(rows.shape[0], dtype=torch.bool, device=points.device)
        for col in range(0, centres.shape[0], block_size):
            d = torch.cdist(rows, centres[col:col + block_size])
            hit |= (d <= radii[col:col + block_size][None, :]).any(dim=1)
        inside[start:start + rows.shape[0]] = hit
    return inside


# --- classification ------------------------------------------------------------------------------------------------

def class_accuracy(logits, labels) -> float:
    """Fraction of samples whose arg-max class is their label (class fidelity of a conditional generator)."""
    pred = np.asarray(_as_matrix(logits)).argmax(axis=1)
    labels = np.asarray(labels).reshape(-1)
    if labels.shape[0] != pred.shape[0]:
        raise DCDiTError(f"{pred.shape[0]} predictions but {labels.shape[0]} labels")
    return float((pred == labels).mean())


def finite_or_none(value: float) -> float | None:
    """JSON-friendly: NaN and inf become None."""
    return value if value is not None and math.isfinite(value) else None


__all__ = ["BiasedEstimateWarning", "FeatureStats", "Moments", "frechet_distance", "inception_score",
           "kernel_distance", "precision_recall", "knn_radii", "class_accuracy", "finite_or_none"]
