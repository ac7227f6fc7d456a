"""Stage 2 (MoCaE router): the Mixture of Calibrated Experts router of METHOD.md, Stage 2.

Per request, the router maps prompt features ``h`` (from ``alignx.router.features``) to
calibrated weights over the axis experts, a confidence, and an out-of-distribution flag:

    h (d,) --step 2--> z = normalize(P (h - mean))            latent code on the unit sphere (k,)
           --step 3--> p = softmax((W_r z + b) / T)            linear router + temperature
           --step 4--> c_F(z)                                  fractal calibrator (+ ood flag)
           --step 5--> c_N(p) = softmax(-d_FR(p, mu) / tau_N)  natural (Fisher-Rao) calibrator
           --step 6--> p_hat = pool(lambda_1 c_F + lambda_2 c_N) calibrated weights, conf = max
           --step 8--> route(p_hat, conf, ood, policy)         dispatch (pure function)

Fitting (``MoCaERouter.fit``) uses torch only to train the router; ``predict`` is vectorised
numpy so that routing one request costs well under a millisecond on CPU.

Where this module departs from the literal METHOD.md text, it is on purpose and measured (see
METHOD.md "Measured caveats"), and the literal form stays available as an ablation row:

* the fractal calibrator has two modes, ``corr_integral`` (the literal multi-scale
  correlation-integral score) and ``knn`` (k-nearest-neighbour local scale), chosen on
  validation NLL;
* optionally (``fractal_bias``, off by default), c_F gets a per-axis log-offset ``b_a`` fitted
  with ``T_F`` on validation NLL, since the axes' density scores are not on one scale;
* each calibrator's sharpness is fitted on validation NLL: ``T`` (router), ``T_F`` (c_F),
  ``tau_N`` (c_N), and ``T_pool`` on the lambda-mixture, because a linear pool of two
  calibrated distributions is under-confident where they disagree (``mocae_paper`` is the
  un-pooled 0.6/0.4 mixture); lambda itself is the paper's or fitted (``lambda_mode``);
* with ``class_prior="balanced"`` (default) every axis weighs the same in training and in the
  validation objectives, so the router does not inherit the source datasets' sizes.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from alignx.axes import AXES, Axis, parse_axis
from alignx.router import metrics

PoolTemperature = float | np.ndarray  # one T_pool, or one per predicted axis (A,)
PoolForm = Literal["shared", "per_axis", "distance"]

# Fewest validation rows a predicted axis needs for its own T_pool (else it keeps the shared one)
MIN_ROWS_PER_AXIS_T = 30
_PER_AXIS = "_per_axis"  # suffix of the per-axis T_pool entries in ``pool_temperature``

__all__ = [
    "FractalCalibrator",
    "FractalMode",
    "MoCaEConfig",
    "MoCaERouter",
    "NaturalCalibrator",
    "RouteResult",
    "correlation_dimension",
    "epsilon_net",
    "fisher_rao_barycentre",
    "fisher_rao_distance",
    "fit_scale_bias",
    "fit_temperature",
    "miss_cost_vector",
    "route",
]

logger = logging.getLogger(__name__)

FractalMode = Literal["corr_integral", "knn"]
FRACTAL_MODES: tuple[FractalMode, ...] = ("corr_integral", "knn")
Policy = Literal["top1", "threshold", "cost"]
LambdaMode = Literal["fixed", "fitted"]

#: Names of the ablation rows returned by :meth:`MoCaERouter.ablation_probs`.
ABLATION_ROWS: tuple[str, ...] = (
    "raw_softmax",
    "temperature",
    "fractal_corr_integral",
    "fractal_knn",
    "fractal",
    "natural",
    "mocae_paper",
    "mocae_fixed",
    "mocae_fitted",
    "mocae",
    "mocae_shared_pool_t",
    "mocae_per_axis_pool_t",
    "mocae_distance_pool_t",
)

WEIGHTS_FILE = "router.safetensors"
META_FILE = "router.json"
_FORMAT_VERSION = 1
_CHUNK = 256  # rows per block when scoring large batches against the epsilon-nets


# ---------------------------------------------------------------------------------------------
# small numeric helpers (private: each has several call sites in this module)
# ---------------------------------------------------------------------------------------------


def _softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, A) scores in float64; rows of all -inf become uniform."""
    x = np.asarray(x, dtype=np.float64)
    m = np.max(x, axis=1, keepdims=True)  # (N, 1)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(x - m)  # (N, A)
    s = e.sum(axis=1, keepdims=True)  # (N, 1)
    uniform = np.full_like(e, 1.0 / e.shape[1])
    return np.where(s > 0, e / np.where(s > 0, s, 1.0), uniform)


def _nll(p: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    """Weighted mean NLL of labels y (N,) under p (N, A) with row weights w (N,)."""
    py = np.clip(p[np.arange(len(y)), y], 1e-12, 1.0)
    return float(-np.sum(w * np.log(py)) / np.sum(w))


def _prior_weights(y: np.ndarray, n_axes: int, prior: str) -> np.ndarray:
    """Row weights (N,): 1 each (``empirical``) or 1 / (A n_y) (``balanced``: equal axes)."""
    if prior == "empirical":
        return np.ones(len(y))
    counts = np.bincount(y, minlength=n_axes).astype(np.float64)
    return 1.0 / (n_axes * counts[y])


def _golden_min(f: Callable[[float], float], lo: float, hi: float, iters: int = 60) -> float:
    """Minimise a unimodal 1-D function on [lo, hi] by golden-section search; returns argmin."""
    g = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    best = min((fc, c), (fd, d), (f(lo), lo), (f(hi), hi))
    return best[1]


def _pairwise_dist(x: np.ndarray, y: np.ndarray, y_sqnorm: np.ndarray | None = None) -> np.ndarray:
    """Euclidean distances between rows of x (N, k) and y (M, k) -> (N, M), via one matmul."""
    xx = np.einsum("ij,ij->i", x, x)[:, None]  # (N, 1)
    yy = (np.einsum("ij,ij->i", y, y) if y_sqnorm is None else y_sqnorm)[None, :]  # (1, M)
    d2 = xx + yy - 2.0 * (x @ y.T)  # (N, M)
    return np.sqrt(np.maximum(d2, 0.0))


def _as_2d(h: np.ndarray, name: str, dim: int | None = None) -> np.ndarray:
    arr = np.asarray(h, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"{name} must have shape (N, d), got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is empty; need at least one row")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{name} has feature dimension {arr.shape[1]}, the router expects {dim}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


# ---------------------------------------------------------------------------------------------
# Step 4 building blocks: epsilon-net and correlation dimension
# ---------------------------------------------------------------------------------------------


def epsilon_net(z: np.ndarray, epsilon: float, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Cover points with an epsilon-net by greedy leader clustering (METHOD.md step 4).

    Points are visited in order; a point within ``epsilon`` of an existing leader joins the
    nearest such leader, otherwise it becomes a new leader. The sequential rule is exact; the
    distances are computed in blocks (one matmul per block) so that fitting 10^4 codes takes
    about a second.

    Args:
        z: points (N, k).
        epsilon: covering radius (> 0).
        chunk: block size of the vectorised distance computation.

    Returns:
        ``(leaders, counts)``: leader points (L, k) and the number of points each covers (L,),
        ``counts.sum() == N``.

    Raises:
        ValueError: for an empty set or a non-positive epsilon.
    """
    z = np.asarray(z, dtype=np.float32)
    if z.ndim != 2 or z.shape[0] == 0:
        raise ValueError(f"z must be a non-empty (N, k) array, got shape {z.shape}")
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    n = z.shape[0]
    leaders = np.empty_like(z)  # (N, k) preallocated; the first n_lead rows are used
    sqn = np.empty(n, dtype=np.float32)  # squared norms of the leaders
    counts = np.zeros(n, dtype=np.int64)
    n_lead = 0
    for start in range(0, n, chunk):
        block = z[start : start + chunk]  # (B, k)
        if n_lead:
            d_old = _pairwise_dist(block, leaders[:n_lead], sqn[:n_lead])  # (B, L)
            nearest = d_old.argmin(axis=1)  # (B,)
            covered = d_old[np.arange(len(block)), nearest] <= epsilon  # (B,)
            np.add.at(counts, nearest[covered], 1)
        else:
            covered = np.zeros(len(block), dtype=bool)
        rest = np.flatnonzero(~covered)
        if rest.size == 0:
            continue
        d_in = _pairwise_dist(block[rest], block[rest])  # (R, R) within the block
        new_ids: list[int] = []  # positions in `rest` of the block's new leaders
        for i in range(rest.size):
            if new_ids:
                dists = d_in[i, new_ids]
                j = int(np.argmin(dists))
                if dists[j] <= epsilon:
                    counts[n_lead - len(new_ids) + j] += 1
                    continue
            leaders[n_lead] = block[rest[i]]
            sqn[n_lead] = float(block[rest[i]] @ block[rest[i]])
            counts[n_lead] = 1
            new_ids.append(i)
            n_lead += 1
    return leaders[:n_lead].copy(), counts[:n_lead].copy()


def correlation_dimension(
    z: np.ndarray, radii: np.ndarray, max_points: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Grassberger-Procaccia correlation dimension and median pairwise distance of a cloud.

    ``C(r)`` is the share of point pairs closer than ``r``; the dimension is the least-squares
    slope of ``log C(r_j)`` against ``log r_j`` over the radii where ``0 < C(r_j) < 1`` (the
    scaling region; saturated and empty radii carry no slope information).

    Args:
        z: points (N, k), N >= 2.
        radii: increasing radii (J,), e.g. ``epsilon * 2**j``.
        max_points: the pairs are computed on a random subsample of at most this many points.
        seed: seed of that subsample.

    Returns:
        ``(D, R)``: the correlation dimension and the median pairwise distance R.

    Raises:
        ValueError: for fewer than 2 points, or fewer than 2 radii inside the scaling region.
    """
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] < 2:
        raise ValueError(f"z must hold at least 2 points (N, k), got shape {z.shape}")
    if z.shape[0] > max_points:
        z = z[np.random.default_rng(seed).choice(z.shape[0], max_points, replace=False)]
    d = _pairwise_dist(z, z)[np.triu_indices(z.shape[0], k=1)]  # (n(n-1)/2,)
    radii = np.asarray(radii, dtype=np.float64)
    c = np.array([np.mean(d < r) for r in radii])  # (J,) correlation integral C(r_j)
    ok = (c > 0) & (c < 1)
    if ok.sum() < 2:
        raise ValueError(
            f"radii {np.round(radii, 4).tolist()} give fewer than 2 values of C(r) strictly "
            f"between 0 and 1 (C = {np.round(c, 4).tolist()}); widen the radii (epsilon, "
            "n_scales) so they span the cloud's scale"
        )
    slope = np.polyfit(np.log(radii[ok]), np.log(c[ok]), 1)[0]
    return float(slope), float(np.median(d))


# ---------------------------------------------------------------------------------------------
# Step 4: the fractal calibrator
# ---------------------------------------------------------------------------------------------


@dataclass
class FractalCalibrator:
    """Fractal calibrator c_F (METHOD.md step 4) over per-axis epsilon-nets.

    Both modes read only the epsilon-net centroids and their member counts at query time, so
    the cost of a query grows with the covering number, not with the number of codes.

    ``corr_integral`` (literal METHOD.md form): local mass ``M_a(z, r_j)`` = share of axis a's
    codes within ``r_j`` of z; ``rho_a = mean_j M_a(z, r_j) / min(1, (r_j / R_a)^{D_a})``.

    ``knn`` (measured caveat of METHOD.md): local scale ``s_a(z)`` = distance from z to its
    ``knn_k``-th nearest code of axis a (counting centroid multiplicities); ``S_a`` = the median
    of the same quantity over axis a's own codes; ``rho_a = (S_a / s_a(z))^{D}``, the mass
    ratio a D-dimensional cloud predicts between the two scales. D is the axes' mean local
    (Levina-Bickel kNN maximum-likelihood) dimension: on the unit sphere of a 256-d latent the
    dyadic radii ``epsilon * 2^j`` do not resolve the clouds' scale (C(r) jumps from ~1e-4 at
    r = 0.8 to 1 at r = 1.6), so the Grassberger-Procaccia D_a are unreliable there; a shared
    exponent also stops one axis from being favoured by its dimension estimate alone.

    In both modes ``c_F = softmax(log rho / T_F + b)``: ``T_F`` and the per-axis log-offsets
    ``b`` (b_0 = 0) are fitted on validation NLL (``T_F = 1, b = 0`` is the literal form
    ``rho_a / sum rho``; with ``fractal_bias`` off only T_F is fitted). ``ood`` is raised,
    with c_F uniform, when z has no mass in any axis within ``ood_radius`` (default: the
    largest radius).

    Attributes:
        centroids: epsilon-net centroids of all axes, stacked axis by axis (L, k).
        counts: member count of each centroid (L,).
        offsets: centroid rows of axis a are ``offsets[a]:offsets[a+1]`` (A+1,).
        radii: radii ``r_j = epsilon * 2^j`` (J,).
        dim: Grassberger-Procaccia correlation dimension D_a per axis (A,).
        knn_dim: Levina-Bickel kNN maximum-likelihood dimension per axis (A,).
        median_dist: median pairwise distance R_a per axis (A,).
        knn_scale: S_a per axis (A,).
        knn_k: k of the kNN local scale.
        ood_radius: radius of the OOD test.
        temperature: T_F per mode.
        bias: per-axis log-offset b (A,) per mode; a mode without one uses b = 0.
    """

    centroids: np.ndarray
    counts: np.ndarray
    offsets: np.ndarray
    radii: np.ndarray
    dim: np.ndarray
    median_dist: np.ndarray
    knn_scale: np.ndarray
    knn_dim: np.ndarray
    knn_k: int
    ood_radius: float
    temperature: dict[str, float] = field(default_factory=lambda: {m: 1.0 for m in FRACTAL_MODES})
    bias: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._sqn = np.einsum("ij,ij->i", self.centroids, self.centroids).astype(np.float32)
        self._counts32 = self.counts.astype(np.float32)
        self._axis_sizes = np.add.reduceat(self.counts, self.offsets[:-1]).astype(np.float64)

    @property
    def n_axes(self) -> int:
        return len(self.offsets) - 1

    @classmethod
    def fit(
        cls,
        z: np.ndarray,
        y: np.ndarray,
        n_axes: int,
        epsilon: float = 0.05,
        n_scales: int = 6,
        knn_k: int = 5,
        ood_radius: float | None = None,
        max_codes_per_axis: int | None = None,
        seed: int = 0,
        sample_weight: np.ndarray | None = None,
    ) -> FractalCalibrator:
        """Build each axis's epsilon-net and estimate D_a, R_a and S_a from its codes.

        Args:
            z: codes (N, k).
            y: axis index per code (N,), every axis in ``range(n_axes)`` present.
            n_axes: number of axes A.
            epsilon: epsilon-net radius and first radius of the scale ladder.
            n_scales: number J of radii ``epsilon * 2^j``, j = 0..J-1.
            knn_k: neighbour rank of the kNN local scale.
            ood_radius: radius of the OOD test (default: the largest radius).
            max_codes_per_axis: random subsample per axis before the net is built (bounds
                memory and query time on large axes); None keeps every code.
            seed: seed of the subsamples.
            sample_weight: optional weight per code (N,); the per-axis subsample draws codes
                with probability proportional to it.

        Returns:
            The fitted calibrator (``temperature`` at 1 for both modes).

        Raises:
            ValueError: if an axis has fewer than 2 codes, or the radii miss its scale.
        """
        rng = np.random.default_rng(seed)
        radii = epsilon * 2.0 ** np.arange(n_scales)  # (J,)
        cents, cnts, offsets = [], [], [0]
        dims, meds, scales, lb_dims = [], [], [], []
        for a in range(n_axes):
            za = z[y == a]  # (N_a, k)
            if za.shape[0] < 2:
                raise ValueError(f"axis {a} has {za.shape[0]} codes; the calibrator needs >= 2")
            if max_codes_per_axis is not None and za.shape[0] > max_codes_per_axis:
                # heavier rows (e.g. hand-labelled seeds) are kept preferentially
                w_a = None if sample_weight is None else sample_weight[y == a].astype(np.float64)
                p_a = None if w_a is None else w_a / w_a.sum()
                za = za[rng.choice(za.shape[0], max_codes_per_axis, replace=False, p=p_a)]
            c_a, n_a = epsilon_net(za, epsilon)  # (L_a, k), (L_a,)
            try:
                d_a, r_a = correlation_dimension(za, radii, seed=seed)
            except ValueError as e:
                # Too few codes (or radii off the cloud's scale) for a Grassberger-Procaccia
                # slope: use the Levina-Bickel kNN estimate of D_a, so the literal form stays
                # defined (it is an ablation row; `auto` chooses the mode on validation anyway).
                sub = za[rng.choice(za.shape[0], min(1000, za.shape[0]), replace=False)]
                pd = _pairwise_dist(sub, sub)[np.triu_indices(len(sub), 1)]
                r_a = float(np.median(pd)) if pd.size else 1.0
                d_a = _levina_bickel(sub, za, max(knn_k, 5))
                logger.warning("axis %d: correlation dimension undefined (%s); using the "
                               "Levina-Bickel estimate D=%.2f", a, e, d_a)
            cents.append(c_a)
            cnts.append(n_a)
            offsets.append(offsets[-1] + len(c_a))
            dims.append(d_a)
            meds.append(r_a)
            # S_a: median over (a sample of) the axis's own codes of their kNN distance, with
            # the code itself excluded by asking for rank knn_k + 1 (the code counts itself).
            probe = za[rng.choice(za.shape[0], min(1000, za.shape[0]), replace=False)]
            dist = _pairwise_dist(probe, c_a)  # (n_probe, L_a)
            scales.append(float(np.median(_kth_weighted(dist, n_a, knn_k + 1))))
            lb_dims.append(_levina_bickel(probe, za, max(knn_k, 5)))
            logger.info(
                "fractal axis %d: %d codes -> %d centroids, D_GP=%.2f, D_LB=%.2f, R=%.3f, S=%.3f",
                a,
                za.shape[0],
                len(c_a),
                d_a,
                lb_dims[-1],
                r_a,
                scales[-1],
            )
        return cls(
            centroids=np.concatenate(cents).astype(np.float32),
            counts=np.concatenate(cnts),
            offsets=np.asarray(offsets, dtype=np.int64),
            radii=radii,
            dim=np.asarray(dims),
            median_dist=np.asarray(meds),
            knn_scale=np.maximum(np.asarray(scales), 1e-6),
            knn_dim=np.asarray(lb_dims),
            knn_k=knn_k,
            ood_radius=float(radii[-1] if ood_radius is None else ood_radius),
        )

    def log_rho(
        self, z: np.ndarray, modes: Sequence[FractalMode] = FRACTAL_MODES
    ) -> dict[str, np.ndarray]:
        """Unnormalised log-scores ``log rho_a(z)`` of the requested modes, OOD flag and score.

        Args:
            z: codes (N, k).
            modes: which modes to score (predict asks only for the selected one).

        Returns:
            Dict with one (N, A) log-score array per mode in ``modes`` (-inf for no mass),
            ``ood_score`` (N,): distance to the nearest centroid of any axis, and ``ood`` (N,):
            ``ood_score > ood_radius``, i.e. no axis has a code within the OOD radius.
        """
        z = np.asarray(z, dtype=np.float32)
        if z.shape[0] > _CHUNK:  # bound the (N, L, J) temporaries of large batches
            parts = [self.log_rho(z[i : i + _CHUNK], modes) for i in range(0, len(z), _CHUNK)]
            return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
        dist = _pairwise_dist(z, self.centroids, self._sqn)  # (N, L)
        n, n_ax = z.shape[0], self.n_axes
        out: dict[str, np.ndarray] = {m: np.empty((n, n_ax)) for m in modes}
        # mass a D_a-dimensional cloud of median radius R_a holds within r_j, capped at 1: (A, J)
        expected = np.minimum(
            1.0, (self.radii[None, :] / self.median_dist[:, None]) ** self.dim[:, None]
        )
        d_shared = float(np.mean(self.knn_dim))
        for a in range(n_ax):
            sl = slice(self.offsets[a], self.offsets[a + 1])
            d_a = dist[:, sl]  # (N, L_a)
            with np.errstate(divide="ignore"):
                if "corr_integral" in out:
                    # M_a(z, r_j): share of axis a's codes within r_j of z             (N, J)
                    inside = (d_a[:, :, None] <= self.radii[None, None, :]).astype(np.float32)
                    mass = np.einsum("nlj,l->nj", inside, self._counts32[sl]) / self._axis_sizes[a]
                    # rho_a = mean_j M_a(z, r_j) / min(1, (r_j / R_a)^{D_a})
                    out["corr_integral"][:, a] = np.log(np.mean(mass / expected[a], axis=1))
                if "knn" in out:
                    # rho_a = (S_a / s_a(z))^D, s_a = weighted knn_k-th neighbour distance (N,)
                    s_a = np.maximum(_kth_weighted(d_a, self.counts[sl], self.knn_k), 1e-6)
                    out["knn"][:, a] = d_shared * (np.log(self.knn_scale[a]) - np.log(s_a))
        ood_score = dist.min(axis=1)  # (N,)
        out["ood_score"] = ood_score
        out["ood"] = ood_score > self.ood_radius  # no mass in any axis within the OOD radius
        return out

    def probs(self, log_rho: np.ndarray, ood: np.ndarray, mode: FractalMode) -> np.ndarray:
        """c_F = softmax(log rho / T_F + b) over axes; uniform where ``ood``.

        Args:
            log_rho: (N, A) log-scores of ``mode`` from :meth:`log_rho`.
            ood: (N,) OOD flags.
            mode: which mode's temperature to apply.

        Returns:
            c_F (N, A), rows summing to 1.
        """
        return _fractal_probs(log_rho, ood, self.temperature[mode], self.bias.get(mode))


def _levina_bickel(probe: np.ndarray, cloud: np.ndarray, k: int) -> float:
    """Median Levina-Bickel kNN maximum-likelihood intrinsic dimension of ``cloud`` at ``probe``.

    ``m(x) = [(1/(k-1)) sum_{j<k} log(T_k(x) / T_j(x))]^{-1}`` with T_j the distance to the j-th
    neighbour; the probe points belong to the cloud, so their own zero distance is skipped.
    """
    k = min(k, cloud.shape[0] - 1)
    if k < 2:  # one neighbour carries no scaling information
        return 1.0
    d = np.sort(_pairwise_dist(probe, cloud), axis=1)[:, 1 : k + 1]  # (P, k) self excluded
    d = np.maximum(d, 1e-6)
    inv = np.mean(np.log(d[:, -1:] / d[:, :-1]), axis=1)  # (P,)
    return float(np.median(1.0 / np.maximum(inv, 1e-6)))


def _kth_weighted(dist: np.ndarray, counts: np.ndarray, k: int) -> np.ndarray:
    """Distance to the k-th nearest point when centroid l stands for ``counts[l]`` points.

    Args:
        dist: distances to the centroids (N, L).
        counts: multiplicities (L,), each >= 1.
        k: rank (>= 1); capped at the total count.

    Returns:
        (N,) the smallest distance at which the cumulative count reaches k.
    """
    k = int(min(k, counts.sum()))
    m = min(k, dist.shape[1])  # the k-th point lies among the k nearest centroids
    idx = (
        np.argpartition(dist, m - 1, axis=1)[:, :m]
        if m < dist.shape[1]
        else np.broadcast_to(np.arange(dist.shape[1]), dist.shape)
    )
    d_m = np.take_along_axis(dist, idx, axis=1)  # (N, m)
    order = np.argsort(d_m, axis=1)
    d_sorted = np.take_along_axis(d_m, order, axis=1)  # (N, m)
    cum = np.cumsum(counts[np.take_along_axis(idx, order, axis=1)], axis=1)  # (N, m)
    first = np.argmax(cum >= k, axis=1)  # (N,) first rank where k points are reached
    return d_sorted[np.arange(dist.shape[0]), first]


# ---------------------------------------------------------------------------------------------
# Step 5: the natural (Fisher-Rao) calibrator
# ---------------------------------------------------------------------------------------------


def fisher_rao_distance(p: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """Fisher-Rao distance on the simplex: ``d(p, mu) = 2 arccos(sum_i sqrt(p_i mu_i))``.

    Args:
        p: distributions (N, A).
        mu: reference distributions (M, A).

    Returns:
        (N, M) distances in [0, pi].

    Raises:
        ValueError: if the last dimensions differ.
    """
    p = np.atleast_2d(np.asarray(p, dtype=np.float64))
    mu = np.atleast_2d(np.asarray(mu, dtype=np.float64))
    if p.shape[1] != mu.shape[1]:
        raise ValueError(f"p has {p.shape[1]} classes, mu has {mu.shape[1]}")
    bc = np.sqrt(np.clip(p, 0, None)) @ np.sqrt(np.clip(mu, 0, None)).T  # (N, M) Bhattacharyya
    return 2.0 * np.arccos(np.clip(bc, 0.0, 1.0))


def fisher_rao_barycentre(p: np.ndarray) -> np.ndarray:
    """Fisher-Rao barycentre of distributions, computed in sqrt-space (METHOD.md step 5).

    The map p -> sqrt(p) sends the simplex onto the positive orthant of the unit sphere,
    where Fisher-Rao is (twice) the great-circle distance; the barycentre is the normalised
    mean of sqrt(p), squared back onto the simplex.

    Args:
        p: distributions (N, A), N >= 1.

    Returns:
        The barycentre (A,), summing to 1.

    Raises:
        ValueError: for an empty set.
    """
    p = np.atleast_2d(np.asarray(p, dtype=np.float64))
    if p.shape[0] == 0:
        raise ValueError("p is empty; the barycentre needs at least one distribution")
    m = np.sqrt(np.clip(p, 0, None)).mean(axis=0)  # (A,)
    m = m / np.linalg.norm(m)
    return m**2


@dataclass
class NaturalCalibrator:
    """Natural calibrator c_N (METHOD.md step 5): ``softmax(-d_FR(p, mu_a) / tau_N)``.

    Attributes:
        barycentres: mu_a, one row per axis (A, A).
        tau: tau_N.
    """

    barycentres: np.ndarray
    tau: float = 1.0

    @classmethod
    def fit(
        cls, p_val: np.ndarray, y_val: np.ndarray, n_axes: int, weights: np.ndarray | None = None
    ) -> NaturalCalibrator:
        """Barycentres from validation router outputs, then tau_N by validation NLL.

        Args:
            p_val: router distributions on validation prompts (N, A).
            y_val: their axes (N,).
            n_axes: A.
            weights: row weights (N,) of the NLL (default: 1 each).

        Returns:
            The fitted calibrator.
        """
        w = np.ones(len(y_val)) if weights is None else np.asarray(weights, dtype=np.float64)
        mu = np.stack([fisher_rao_barycentre(p_val[y_val == a]) for a in range(n_axes)])
        cal = cls(barycentres=mu)
        d = fisher_rao_distance(p_val, mu)  # (N, A)
        # NLL is convex in 1/tau, so unimodal in log tau: golden-section search
        log_tau = _golden_min(
            lambda lt: _nll(_softmax(-d / math.exp(lt)), y_val, w),
            math.log(1e-3),
            math.log(10.0),
        )
        cal.tau = math.exp(log_tau)
        return cal

    def probs(self, p: np.ndarray) -> np.ndarray:
        """c_N (N, A) for router distributions p (N, A)."""
        return _softmax(-fisher_rao_distance(p, self.barycentres) / self.tau)


def fit_temperature(
    logits: np.ndarray,
    labels: np.ndarray,
    weights: np.ndarray | None = None,
    bounds: tuple[float, float] = (0.05, 20.0),
) -> float:
    """Temperature scaling (METHOD.md step 3): T minimising the NLL of ``softmax(logits / T)``.

    The NLL is convex in 1/T, hence unimodal in log T: a golden-section search on
    ``log T`` in ``log(bounds)`` finds the minimum.

    Args:
        logits: validation logits (N, A).
        labels: validation labels (N,).
        weights: optional row weights (N,) of the NLL.
        bounds: search interval for T.

    Returns:
        The fitted temperature T (> 0).

    Raises:
        ValueError: for mismatched shapes or an empty set.
    """
    logits = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if logits.ndim != 2 or logits.shape[0] == 0 or y.shape != (logits.shape[0],):
        raise ValueError(
            f"logits (N, A) and labels (N,) must agree and be non-empty, got "
            f"{logits.shape} and {y.shape}"
        )
    w = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=np.float64)
    return math.exp(
        _golden_min(
            lambda lt: _nll(_softmax(logits / math.exp(lt)), y, w),
            math.log(bounds[0]),
            math.log(bounds[1]),
        )
    )


# ---------------------------------------------------------------------------------------------
# Step 8: dispatch
# ---------------------------------------------------------------------------------------------


def route(
    p_hat: np.ndarray,
    confidence: np.ndarray,
    ood: np.ndarray,
    policy: Policy = "top1",
    threshold: float = 0.5,
    fallback: Axis | str = Axis.HARMLESSNESS,
    axes: Sequence[Axis] = AXES,
    miss_cost: Mapping[Axis | str, float] | None = None,
) -> np.ndarray:
    """Choose one expert per request from calibrated weights (METHOD.md step 8; pure).

    ``top1``: the argmax axis. ``threshold``: the argmax axis when ``confidence >= threshold``
    and the request is not out of distribution, otherwise ``fallback`` (when unsure, be safe).
    ``cost`` (an addition to METHOD.md): the expert with the least expected cost when sending
    a request whose right expert is ``y`` elsewhere costs ``miss_cost[y]`` (1 for axes not
    named) and the weights are the probabilities of ``y``::

        E[cost | e] = sum_{y != e} p_y c_y = sum_y p_y c_y - p_e c_e   ->   e* = argmax_e c_e p_e

    so a harmlessness cost of 3 sends a request to the cautious expert once its weight is a
    third of the largest other weight. Out-of-distribution requests go to ``fallback``. This is
    the Bayes decision only if the weights are calibrated, which is what MoCaE is for.

    Args:
        p_hat: calibrated weights (N, A) in ``axes`` order (a single (A,) row is accepted).
        confidence: (N,) confidence, normally ``p_hat.max(1)``.
        ood: (N,) out-of-distribution flags.
        policy: ``"top1"`` or ``"threshold"``.
        threshold: theta of the ``threshold`` policy, in [0, 1].
        fallback: the expert used below the threshold or out of distribution.
        axes: axis order of the columns of ``p_hat``.
        miss_cost: ``cost`` policy: per-axis cost of a miss, > 0 (axes not named: 1).

    Returns:
        (N,) int64 index into ``axes`` of the chosen expert.

    Raises:
        ValueError: for an unknown policy, a threshold outside [0, 1], a fallback not in
            ``axes``, a miss cost that is not a positive number or names an axis not in
            ``axes``, or mismatched shapes.
    """
    p = np.atleast_2d(np.asarray(p_hat))
    conf = np.atleast_1d(np.asarray(confidence))
    flag = np.atleast_1d(np.asarray(ood, dtype=bool))
    if p.shape[1] != len(axes):
        raise ValueError(f"p_hat has {p.shape[1]} columns but {len(axes)} axes were given")
    if not (conf.shape == flag.shape == (p.shape[0],)):
        raise ValueError(
            f"confidence {conf.shape} and ood {flag.shape} must both have shape ({p.shape[0]},)"
        )
    top1 = p.argmax(axis=1).astype(np.int64)  # (N,)
    if policy == "top1":
        return top1
    if policy not in ("threshold", "cost"):
        raise ValueError(f"policy must be 'top1', 'threshold' or 'cost', got {policy!r}")
    fb = parse_axis(fallback)
    if fb not in axes:
        raise ValueError(f"fallback {fb.value!r} is not one of the router axes {list(axes)}")
    if policy == "cost":
        c = miss_cost_vector(miss_cost or {}, axes)  # (A,)
        chosen = (p * c).argmax(axis=1)  # (N,)
        return np.where(flag, list(axes).index(fb), chosen).astype(np.int64)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    return np.where((conf >= threshold) & ~flag, top1, list(axes).index(fb)).astype(np.int64)


def miss_cost_vector(miss_cost: Mapping[Axis | str, float], axes: Sequence[Axis]) -> np.ndarray:
    """``{axis: cost}`` -> (A,) costs in ``axes`` order, 1 for axes not named.

    Raises:
        ValueError: an axis not in ``axes``, or a cost that is not a finite number > 0.
    """
    out = np.ones(len(axes))
    for key, cost in miss_cost.items():
        a = parse_axis(key)
        if a not in axes:
            raise ValueError(f"miss_cost names {a.value!r}, not one of the router axes "
                             f"{[x.value for x in axes]}")
        if isinstance(cost, bool) or not (isinstance(cost, (int, float)) and np.isfinite(cost)
                                          and cost > 0):
            raise ValueError(f"miss_cost[{a.value!r}] must be a finite number > 0, got {cost!r}")
        out[list(axes).index(a)] = float(cost)
    return out


# ---------------------------------------------------------------------------------------------
# The router
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MoCaEConfig:
    """Hyperparameters of :class:`MoCaERouter` (paper values where the paper gives them).

    Attributes:
        latent_dim: k of the latent projection P (k x d); the effective k is
            ``min(k, d, N_train - 1)``.
        learn_projection: fine-tune P jointly with the router (else P stays the PCA basis).
        epsilon: epsilon-net granularity and first radius of the scale ladder.
        n_scales: number of radii ``epsilon * 2^j`` (j = 0..n_scales-1).
        fractal_mode: ``corr_integral``, ``knn``, or ``auto`` (lower validation NLL of MoCaE).
        knn_k: neighbour rank of the ``knn`` local scale.
        max_codes_per_axis: subsample per axis for the fractal epsilon-nets (query cost).
        ood_radius: radius of the OOD test; None = set from ``ood_quantile``.
        ood_quantile: with ``ood_radius`` None, the radius is this quantile of the
            validation codes' distance to their nearest centroid, so that about
            ``1 - ood_quantile`` of in-distribution requests are flagged; None = the largest
            radius of the scale ladder (on real sentence features nothing is that far).
        calibration_weights: the paper's (lambda_1, lambda_2) for c_F and c_N.
        lambda_mode: ``fixed`` (paper weights) or ``fitted`` (lambda_1 by validation NLL)
            for the weights that :meth:`MoCaERouter.predict` returns.
        lr: AdamW learning rate of the router (the paper's 2e-5 is for LLM fine-tuning; a
            linear router on frozen features needs a larger step).
        weight_decay: AdamW weight decay.
        batch_size: minibatch size.
        max_epochs: epoch cap; training stops earlier when validation NLL stalls.
        patience: epochs without validation-NLL improvement before stopping.
        class_prior: ``balanced`` weighs every axis equally in the training cross-entropy
            and in every validation objective (early stopping, T, T_F, tau_N, lambda, mode),
            so the router does not inherit the sizes of the source datasets (traffic mix is
            unknown at calibration time); ``empirical`` weighs every prompt equally.
        seed: seed of initialisation, shuffling and subsampling.
        fractal_bias: fit a per-axis log-offset b of c_F jointly with T_F (validation NLL):
            the axes' density scores are not on one scale (cloud size, spread, dimension
            estimate differ). Off (default) = T_F only: on the real data it lowered the
            validation NLL in every run and ECE in most, but cost accuracy (README).
        pool_temperature_per_axis: one pooling temperature T_pool per predicted axis (fitted
            on the validation rows the pool sends to that axis) instead of one shared T_pool.
            Lambda and the fractal mode are still chosen with the shared T_pool and a row's
            classes share one exponent, so the argmax (every ``top1`` decision) is that of the
            shared form; only confidences move, which can change ``threshold`` fallbacks.
        pool_temperature_distance: a pooling temperature that grows with the request's
            distance from the training clouds, ``T_pool(x) = exp(a + b z(x))``, z the fractal
            OOD score (nearest-centroid distance) standardised over the validation rows,
            (a, b) by validation NLL after lambda and the mode are chosen with the shared
            T_pool (``docs/experiments/seeds_4_protocol.md``). Argmax-preserving, as above.
            Exclusive with ``pool_temperature_per_axis``.
    """

    latent_dim: int = 256
    learn_projection: bool = False
    epsilon: float = 0.05
    n_scales: int = 6
    fractal_mode: FractalMode | Literal["auto"] = "auto"
    knn_k: int = 5
    max_codes_per_axis: int | None = 4000
    ood_radius: float | None = None
    ood_quantile: float | None = 0.99
    calibration_weights: tuple[float, float] = (0.6, 0.4)
    lambda_mode: LambdaMode = "fitted"
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 64
    max_epochs: int = 200
    patience: int = 10
    class_prior: Literal["empirical", "balanced"] = "balanced"
    seed: int = 0
    fractal_bias: bool = False
    pool_temperature_per_axis: bool = False
    pool_temperature_distance: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.latent_dim < 1:
            problems.append(f"latent_dim must be >= 1, got {self.latent_dim}")
        if self.epsilon <= 0:
            problems.append(f"epsilon must be > 0, got {self.epsilon}")
        if self.n_scales < 2:
            problems.append(f"n_scales must be >= 2, got {self.n_scales}")
        if self.fractal_mode not in (*FRACTAL_MODES, "auto"):
            problems.append(
                f"fractal_mode must be corr_integral|knn|auto, got {self.fractal_mode!r}"
            )
        if self.lambda_mode not in ("fixed", "fitted"):
            problems.append(f"lambda_mode must be fixed|fitted, got {self.lambda_mode!r}")
        if self.class_prior not in ("empirical", "balanced"):
            problems.append(f"class_prior must be empirical|balanced, got {self.class_prior!r}")
        lam = self.calibration_weights
        if len(lam) != 2 or min(lam) < 0 or abs(sum(lam) - 1.0) > 1e-6:
            problems.append(
                f"calibration_weights must be 2 non-negative weights summing to 1, got {lam}"
            )
        if self.knn_k < 1:
            problems.append(f"knn_k must be >= 1, got {self.knn_k}")
        if self.ood_quantile is not None and not 0.0 < self.ood_quantile <= 1.0:
            problems.append(f"ood_quantile must be in (0, 1] or None, got {self.ood_quantile}")
        if self.pool_temperature_per_axis and self.pool_temperature_distance:
            problems.append("pool_temperature_per_axis and pool_temperature_distance are "
                            "exclusive: choose one form of T_pool")
        if problems:
            raise ValueError("invalid MoCaEConfig: " + "; ".join(problems))


@dataclass(frozen=True)
class RouteResult:
    """Output of :meth:`MoCaERouter.predict` for N requests.

    Attributes:
        weights: calibrated weights p_hat (N, A) in the router's axis order; rows sum to 1.
        confidence: max_a p_hat_a (N,).
        ood: out-of-distribution flags (N,).
        axis_idx: argmax axis index (N,) (``top1``; apply :func:`route` for other policies).
        ood_score: distance to the nearest calibration centroid (N,); higher = more unusual.
    """

    weights: np.ndarray
    confidence: np.ndarray
    ood: np.ndarray
    axis_idx: np.ndarray
    ood_score: np.ndarray


class MoCaERouter:
    """The MoCaE router: latent projection, linear router, fractal + natural calibrators.

    Example:
        >>> router = MoCaERouter(MoCaEConfig(latent_dim=256)).fit(H_tr, y_tr, H_val, y_val)
        >>> res = router.predict(H)                 # RouteResult
        >>> rows = router.ablation_probs(H_test)    # {"raw_softmax": (N, A), ...}
        >>> router.save("run/router"); MoCaERouter.load("run/router")

    Labels are axis indices into ``axes`` (ints) or axis names / :class:`Axis` values.
    """

    def __init__(self, config: MoCaEConfig | None = None, axes: Sequence[Axis | str] = AXES):
        self.config = config or MoCaEConfig()
        self.axes: tuple[Axis, ...] = tuple(parse_axis(a) for a in axes)
        if len(self.axes) < 2 or len(set(self.axes)) != len(self.axes):
            raise ValueError(f"axes must be >= 2 distinct axes, got {[str(a) for a in axes]}")
        self.fitted = False
        # learned state, set by fit() or load()
        self.mean: np.ndarray  # (d,)
        self.projection: np.ndarray  # (k, d)
        self.router_weight: np.ndarray  # (A, k)
        self.router_bias: np.ndarray  # (A,)
        self.temperature: float = 1.0
        self.fractal: FractalCalibrator
        self.natural: NaturalCalibrator
        self.fractal_mode: FractalMode = "knn"
        self.lambda_fitted: dict[str, float] = {}  # lambda_1 per fractal mode
        # T_pool per "<fixed|fitted>_<mode>"; per axis (A,) under "<fixed|fitted>_<mode>_per_axis"
        self.pool_temperature: dict[str, PoolTemperature] = {}
        # distance-aware T_pool: (a, b) per "<fixed|fitted>_<mode>", z = (d - mu) / sd with
        # distance_stats = (mu, sd) of the validation OOD scores
        self.distance_temperature: dict[str, tuple[float, float]] = {}
        self.distance_stats: tuple[float, float] = (0.0, 1.0)
        self.val_nll: dict[str, float] = {}

    # ------------------------------------------------------------------ fit
    def _labels(self, y: Sequence[int | str | Axis] | np.ndarray, name: str, n: int) -> np.ndarray:
        arr = np.asarray(y)
        if arr.ndim != 1 or arr.shape[0] != n:
            raise ValueError(
                f"{name} must have shape ({n},) to match the features, got {arr.shape}"
            )
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            arr = np.array([self.axes.index(parse_axis(v)) for v in arr], dtype=np.int64)
        arr = arr.astype(np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= len(self.axes)):
            raise ValueError(f"{name} holds axis indices outside [0, {len(self.axes)})")
        missing = [self.axes[a].value for a in range(len(self.axes)) if not np.any(arr == a)]
        if missing:
            raise ValueError(
                f"{name} has no example of axis {', '.join(missing)}; every router axis needs "
                "calibration prompts (an empty or one-axis set cannot be routed)"
            )
        return arr

    def fit(
        self,
        h_train: np.ndarray,
        y_train: Sequence[int | str | Axis] | np.ndarray,
        h_val: np.ndarray,
        y_val: Sequence[int | str | Axis] | np.ndarray,
        sample_weight: np.ndarray | None = None,
    ) -> MoCaERouter:
        """Fit P, the router, T, both fractal modes, the natural calibrator and lambda.

        Training data build P, W_r, b and the fractal epsilon-nets; validation data early-stop
        the router and fit T, T_F, mu_a, tau_N, lambda and the fractal mode.

        Args:
            h_train: training features (N, d).
            y_train: training axes (N,).
            h_val: validation features (M, d).
            y_val: validation axes (M,).
            sample_weight: optional weight per training row (N,) in the cross-entropy, e.g.
                to up-weight hand-labelled seed prompts.

        Returns:
            self.

        Raises:
            ValueError: for empty sets, a missing axis, or shape mismatches.
        """
        cfg = self.config
        h_train = _as_2d(h_train, "h_train")
        h_val = _as_2d(h_val, "h_val", h_train.shape[1])
        y_tr = self._labels(y_train, "y_train", h_train.shape[0])
        y_va = self._labels(y_val, "y_val", h_val.shape[0])
        n_ax = len(self.axes)
        w_va = _prior_weights(y_va, n_ax, cfg.class_prior)  # (M,) weights of every val objective

        # Step 2: latent projection P (k, d), PCA-initialised on the centred training features
        self.mean = h_train.mean(axis=0)  # (d,)
        k_eff = min(cfg.latent_dim, h_train.shape[1], h_train.shape[0] - 1)
        if k_eff < cfg.latent_dim:
            logger.warning(
                "latent_dim %d reduced to %d (d=%d, N=%d)",
                cfg.latent_dim,
                k_eff,
                h_train.shape[1],
                h_train.shape[0],
            )
        rng = np.random.default_rng(cfg.seed)
        sub = h_train if len(h_train) <= 20000 else h_train[rng.choice(len(h_train), 20000, False)]
        _, _, vt = np.linalg.svd(sub - self.mean, full_matrices=False)
        self.projection = vt[:k_eff].astype(np.float32)  # (k, d)

        # Step 3: router W_r (A, k), b (A,) by cross-entropy, early stopping on validation NLL
        if sample_weight is None:
            sw = np.ones(len(y_tr), dtype=np.float32)
        else:
            sw = np.asarray(sample_weight, dtype=np.float32)
            if sw.shape != y_tr.shape or np.any(sw < 0):
                raise ValueError(
                    f"sample_weight must be ({len(y_tr)},) non-negative weights, "
                    f"got shape {sw.shape}"
                )
        self._train_router(h_train, y_tr, h_val, y_va, sw)
        logits_val = self._logits(self._latent(h_val))  # (M, A)
        self.temperature = fit_temperature(logits_val, y_va, w_va)  # T by validation NLL
        p_val = _softmax(logits_val / self.temperature)  # (M, A)

        # Step 4: fractal calibrator on the training codes; T_F per mode on validation
        z_tr = self._latent(h_train)
        self.fractal = FractalCalibrator.fit(
            z_tr,
            y_tr,
            n_ax,
            cfg.epsilon,
            cfg.n_scales,
            cfg.knn_k,
            cfg.ood_radius,
            cfg.max_codes_per_axis,
            cfg.seed,
            sample_weight=sw,
        )
        fr_val = self.fractal.log_rho(self._latent(h_val))
        if cfg.ood_radius is None and cfg.ood_quantile is not None:
            # OOD radius from validation: ~(1 - q) of in-distribution codes lie farther out;
            # only the flag depends on the radius, so the scores are not recomputed
            self.fractal.ood_radius = float(np.quantile(fr_val["ood_score"], cfg.ood_quantile))
            fr_val["ood"] = fr_val["ood_score"] > self.fractal.ood_radius
        keep = ~fr_val["ood"]  # OOD rows get a uniform c_F whatever T_F and b are
        for mode in FRACTAL_MODES:
            if cfg.fractal_bias and keep.any():
                # T_F and a per-axis log-offset b_a jointly (fit_scale_bias handles -inf)
                t_f, b = fit_scale_bias(fr_val[mode][keep], y_va[keep], w_va[keep])
                self.fractal.temperature[mode], self.fractal.bias[mode] = t_f, b
                continue
            # -inf (no mass) -> a very negative finite score so that 0 * inf never appears
            lr_m = np.where(np.isfinite(fr_val[mode]), fr_val[mode], -1e30)
            self.fractal.temperature[mode] = math.exp(
                _golden_min(
                    lambda lt, lr_m=lr_m: _nll(
                        _fractal_probs(lr_m, fr_val["ood"], math.exp(lt)), y_va, w_va
                    ),
                    math.log(1e-2),
                    math.log(1e3),
                )
            )

        # Step 5: natural calibrator: barycentres and tau_N on validation
        self.natural = NaturalCalibrator.fit(p_val, y_va, n_ax, w_va)
        c_n = self.natural.probs(p_val)

        # Step 6: p_hat = pool(lambda_1 c_F + lambda_2 c_N); per fractal mode, the paper lambda
        # and a fitted one, each with its pooling temperature, then the mode by validation NLL
        lam1 = cfg.calibration_weights[0]
        d_va = fr_val["ood_score"]  # (M,) nearest-centroid distance, for the distance T_pool
        self.distance_stats = (float(d_va.mean()), float(max(d_va.std(), 1e-12)))
        z_va = self._standardise(d_va)  # (M,)
        self.val_nll = {"temperature": _nll(p_val, y_va, w_va), "natural": _nll(c_n, y_va, w_va)}
        for mode in FRACTAL_MODES:
            c_f = self.fractal.probs(fr_val[mode], fr_val["ood"], mode)
            self.val_nll[f"fractal_{mode}"] = _nll(c_f, y_va, w_va)
            self.val_nll[f"mocae_paper_{mode}"] = _nll(_pool(c_f, c_n, lam1, 1.0), y_va, w_va)
            t_fixed = _fit_pool_temperature(c_f, c_n, lam1, y_va, w_va)
            fits = [(_fit_pool_temperature(c_f, c_n, l1, y_va, w_va), l1) for l1 in _LAMBDA_GRID]
            nlls = [_nll(_pool(c_f, c_n, l1, t), y_va, w_va) for t, l1 in fits]
            t_fit, l_fit = fits[int(np.argmin(nlls))]
            self.lambda_fitted[mode] = l_fit
            self.pool_temperature[f"fixed_{mode}"] = t_fixed
            self.pool_temperature[f"fitted_{mode}"] = t_fit
            self.val_nll[f"mocae_fixed_{mode}"] = _nll(_pool(c_f, c_n, lam1, t_fixed), y_va, w_va)
            self.val_nll[f"mocae_fitted_{mode}"] = float(np.min(nlls))
            # one T_pool per predicted axis, fitted (always; used if configured) after lambda
            # and, below, the mode are chosen with the shared T_pool: the per-axis temperatures
            # recalibrate the pool without moving any argmax
            for kind, l1, t_shared in (("fixed", lam1, t_fixed), ("fitted", l_fit, t_fit)):
                t_ax = _fit_per_axis_pool_temperature(c_f, c_n, l1, y_va, w_va, t_shared)
                self.pool_temperature[f"{kind}_{mode}{_PER_AXIS}"] = t_ax
                self.val_nll[f"mocae_{kind}_{mode}{_PER_AXIS}"] = _nll(
                    _pool(c_f, c_n, l1, t_ax), y_va, w_va)
                # distance-aware T_pool (a, b), likewise after lambda (always fitted)
                ab = _fit_distance_pool_temperature(c_f, c_n, l1, y_va, w_va, z_va, t_shared)
                self.distance_temperature[f"{kind}_{mode}"] = ab
                self.val_nll[f"mocae_{kind}_{mode}_distance"] = _nll(
                    _pool(c_f, c_n, l1, _distance_t(ab, z_va)), y_va, w_va)
        if cfg.fractal_mode == "auto":
            self.fractal_mode = min(
                FRACTAL_MODES, key=lambda m: self.val_nll[f"mocae_{cfg.lambda_mode}_{m}"]
            )
        else:
            self.fractal_mode = cfg.fractal_mode
        self.fitted = True
        logger.info(
            "MoCaE fitted: k=%d T=%.3f T_F=%s tau_N=%.4f lambda_fitted=%s T_pool=%s mode=%s",
            k_eff,
            self.temperature,
            self.fractal.temperature,
            self.natural.tau,
            self.lambda_fitted,
            self.pool_temperature,
            self.fractal_mode,
        )
        return self

    def _train_router(
        self,
        h_tr: np.ndarray,
        y_tr: np.ndarray,
        h_va: np.ndarray,
        y_va: np.ndarray,
        sample_weight: np.ndarray,
    ) -> None:
        """Train W_r, b (and optionally P) with AdamW + cross-entropy; keep the best epoch."""
        import torch  # imported here: predict() and load() never need torch

        cfg = self.config
        gen = torch.Generator().manual_seed(cfg.seed)
        k, n_ax = self.projection.shape[0], len(self.axes)
        mean = torch.from_numpy(self.mean)
        proj = torch.nn.Parameter(
            torch.from_numpy(self.projection.copy()), requires_grad=cfg.learn_projection
        )
        lin = torch.nn.Linear(k, n_ax)
        with torch.no_grad():  # seeded init, independent of the global torch RNG
            lin.weight.uniform_(-(k**-0.5), k**-0.5, generator=gen)
            lin.bias.zero_()
        params = list(lin.parameters()) + ([proj] if cfg.learn_projection else [])
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        # per-row weight = sample weight x (class-balancing weight of the row's axis)
        counts = np.bincount(y_tr, weights=sample_weight, minlength=n_ax)
        cls_w = counts.sum() / (n_ax * counts) if cfg.class_prior == "balanced" else np.ones(n_ax)
        row_w = torch.from_numpy((sample_weight * cls_w[y_tr]).astype(np.float32))
        x_tr, t_tr = torch.from_numpy(h_tr), torch.from_numpy(y_tr)
        x_va, t_va = torch.from_numpy(h_va), torch.from_numpy(y_va)
        w_va = torch.from_numpy(_prior_weights(y_va, n_ax, cfg.class_prior))

        def forward(x: torch.Tensor) -> torch.Tensor:
            z = torch.nn.functional.normalize((x - mean) @ proj.T, dim=1)  # (B, k) step 2
            return lin(z)  # (B, A) step 3

        # a (B, k) x (k, A) model gains nothing from intra-op threads, and on a busy machine
        # their spin-waits cost ~100x; run single-threaded and restore the caller's setting
        n_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        best, best_state, stale = float("inf"), None, 0
        try:
            for epoch in range(cfg.max_epochs):
                perm = torch.randperm(len(x_tr), generator=gen)
                for i in range(0, len(perm), cfg.batch_size):
                    idx = perm[i : i + cfg.batch_size]
                    opt.zero_grad()
                    ce = torch.nn.functional.cross_entropy(
                        forward(x_tr[idx]), t_tr[idx], reduction="none"
                    )  # (B,)
                    (ce * row_w[idx]).sum().div(row_w[idx].sum()).backward()
                    opt.step()
                with torch.no_grad():
                    ce = torch.nn.functional.cross_entropy(forward(x_va), t_va, reduction="none")
                    val = float((ce.double() * w_va).sum() / w_va.sum())
                if val < best - 1e-5:
                    best, stale = val, 0
                    best_state = (
                        proj.detach().clone(),
                        lin.weight.detach().clone(),
                        lin.bias.detach().clone(),
                        epoch,
                    )
                else:
                    stale += 1
                    if stale >= cfg.patience:
                        break
        finally:
            torch.set_num_threads(n_threads)
        assert best_state is not None
        logger.info(
            "router trained: best epoch %d of %d, val NLL %.4f", best_state[3] + 1, epoch + 1, best
        )
        self.projection = best_state[0].numpy().astype(np.float32)
        self.router_weight = best_state[1].numpy().astype(np.float32)
        self.router_bias = best_state[2].numpy().astype(np.float32)

    # ------------------------------------------------------------------ inference
    def _latent(self, h: np.ndarray) -> np.ndarray:
        """Step 2: z = normalize(P (h - mean)); (N, d) -> (N, k)."""
        z = (h - self.mean) @ self.projection.T  # (N, k)
        return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)

    def _logits(self, z: np.ndarray) -> np.ndarray:
        """Step 3: r = W_r z + b; (N, k) -> (N, A)."""
        return z @ self.router_weight.T + self.router_bias

    def _check_fitted(self) -> None:
        if not self.fitted:
            raise RuntimeError("the router is not fitted; call fit() or MoCaERouter.load()")

    def ablation_probs(self, h: np.ndarray) -> dict[str, np.ndarray]:
        """Class probabilities (N, A) of every ablation row for features h.

        Rows: ``raw_softmax`` (T = 1), ``temperature`` (fitted T), ``fractal_corr_integral``,
        ``fractal_knn``, ``fractal`` (the selected mode), ``natural``, ``mocae_paper``
        (0.6 c_F + 0.4 c_N, literally), ``mocae_fixed`` (paper lambda + pooling temperature),
        ``mocae_fitted`` (validation lambda + pooling temperature), ``mocae`` (what predict
        returns), ``mocae_shared_pool_t`` / ``mocae_per_axis_pool_t`` /
        ``mocae_distance_pool_t`` (``mocae`` with each T_pool form not configured; a form is
        missing for routers saved before it existed), plus ``ood`` (N,) and ``ood_score`` (N,).

        Args:
            h: features (N, d).

        Returns:
            Dict of row name -> array.

        Raises:
            RuntimeError: if the router is not fitted.
            ValueError: for features of the wrong dimension.
        """
        self._check_fitted()
        h = _as_2d(h, "h", self.mean.shape[0])
        z = self._latent(h)  # (N, k)
        logits = self._logits(z)  # (N, A)
        p_t = _softmax(logits / self.temperature)  # (N, A)
        fr = self.fractal.log_rho(z)
        c_n = self.natural.probs(p_t)  # (N, A)
        out: dict[str, np.ndarray] = {"raw_softmax": _softmax(logits), "temperature": p_t}
        for mode in FRACTAL_MODES:
            out[f"fractal_{mode}"] = self.fractal.probs(fr[mode], fr["ood"], mode)
        c_f = out[f"fractal_{self.fractal_mode}"]
        out["fractal"] = c_f
        out["natural"] = c_n
        lam1, mode = self.config.calibration_weights[0], self.fractal_mode
        out["mocae_paper"] = _pool(c_f, c_n, lam1, 1.0)  # step 6 literally
        lams = {"fixed": lam1, "fitted": self.lambda_fitted[mode]}
        for kind, l1 in lams.items():
            t = self._row_pool_temperature(kind, self.pool_form, fr["ood_score"])
            out[f"mocae_{kind}"] = _pool(c_f, c_n, l1, t)
        out["mocae"] = out[f"mocae_{self.config.lambda_mode}"]
        # "mocae" with each other pooling-temperature form; routers saved before a form existed
        # have none of it
        kind = self.config.lambda_mode
        for form in ("shared", "per_axis", "distance"):
            if form == self.pool_form:
                continue
            t = self._row_pool_temperature(kind, form, fr["ood_score"])
            if t is not None:
                out[f"mocae_{form}_pool_t"] = _pool(c_f, c_n, lams[kind], t)
        out["ood"] = fr["ood"]
        out["ood_score"] = fr["ood_score"]
        return out

    @property
    def lambdas(self) -> tuple[float, float]:
        """(lambda_1, lambda_2) used by :meth:`predict`."""
        self._check_fitted()
        if self.config.lambda_mode == "fixed":
            return tuple(self.config.calibration_weights)  # type: ignore[return-value]
        lf = self.lambda_fitted[self.fractal_mode]
        return (lf, 1.0 - lf)

    @property
    def pool_form(self) -> PoolForm:
        """The configured form of T_pool: ``shared``, ``per_axis`` or ``distance``."""
        if self.config.pool_temperature_distance:
            return "distance"
        return "per_axis" if self.config.pool_temperature_per_axis else "shared"

    def _standardise(self, d: np.ndarray) -> np.ndarray:
        """z = (d - mu) / sd of OOD scores d (N,) with the validation statistics."""
        mu, sd = self.distance_stats
        return (np.asarray(d, dtype=np.float64) - mu) / sd

    def _row_pool_temperature(
        self, kind: str, form: PoolForm, ood_score: np.ndarray | None = None
    ) -> PoolTemperature | None:
        """T_pool of the ``fixed``/``fitted`` pool at the chosen mode in a given form: a float,
        (A,) per predicted axis, or (N, 1) per row for ``distance`` (which needs the rows'
        ``ood_score``); None if not fitted."""
        key = f"{kind}_{self.fractal_mode}"
        if form == "distance":
            if ood_score is None:
                raise ValueError("the distance-aware T_pool needs the rows' OOD scores")
            ab = self.distance_temperature.get(key)
            return None if ab is None else _distance_t(ab, self._standardise(ood_score))
        return self.pool_temperature.get(key + (_PER_AXIS if form == "per_axis" else ""))

    @property
    def pool_t(self) -> PoolTemperature:
        """The shared or per-axis T_pool of :meth:`predict`: one float, or (A,) one per predicted
        axis; with the distance form, the shared T_pool (its coefficients: ``distance_ab``)."""
        self._check_fitted()
        form = "per_axis" if self.pool_form == "per_axis" else "shared"
        return self._row_pool_temperature(self.config.lambda_mode, form)

    @property
    def distance_ab(self) -> tuple[float, float] | None:
        """(a, b) of the distance-aware T_pool at the chosen lambda and mode, if fitted."""
        self._check_fitted()
        return self.distance_temperature.get(f"{self.config.lambda_mode}_{self.fractal_mode}")

    def predict(self, h: np.ndarray) -> RouteResult:
        """Calibrated routing weights for features h (METHOD.md steps 2-6); numpy only.

        Args:
            h: features (N, d) or one request (d,).

        Returns:
            The :class:`RouteResult`.

        Raises:
            RuntimeError: if the router is not fitted.
            ValueError: for features of the wrong dimension.
        """
        self._check_fitted()
        h = _as_2d(h, "h", self.mean.shape[0])
        z = self._latent(h)  # (N, k)                                         step 2
        p_t = _softmax(self._logits(z) / self.temperature)  # (N, A)          step 3
        fr = self.fractal.log_rho(z, (self.fractal_mode,))  #                 step 4
        c_f = self.fractal.probs(fr[self.fractal_mode], fr["ood"], self.fractal_mode)
        c_n = self.natural.probs(p_t)  # (N, A)                                step 5
        t_pool = self._row_pool_temperature(self.config.lambda_mode, self.pool_form,
                                            fr["ood_score"])
        p_hat = _pool(c_f, c_n, self.lambdas[0], t_pool)  # (N, A)             step 6
        return RouteResult(
            weights=p_hat,
            confidence=p_hat.max(axis=1),
            ood=fr["ood"],
            axis_idx=p_hat.argmax(axis=1),
            ood_score=fr["ood_score"],
        )

    def evaluate(
        self, h: np.ndarray, y: Sequence[int | str | Axis] | np.ndarray, n_bins: int = 15
    ) -> dict[str, dict[str, float]]:
        """Report metrics of every ablation row on labelled features.

        Args:
            h: features (N, d).
            y: true axes (N,).
            n_bins: ECE bins.

        Returns:
            ``{row: {accuracy, macro_f1, nll, ece, brier, selective_accuracy_90,
            confident_errors_90}}``.
        """
        rows = self.ablation_probs(h)
        arr = np.asarray(y)
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            arr = np.array([self.axes.index(parse_axis(v)) for v in arr], dtype=np.int64)
        return {name: metrics.scores(rows[name], arr, n_bins)
                for name in ABLATION_ROWS if name in rows}

    # ------------------------------------------------------------------ persistence
    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        """The router as (arrays for safetensors, JSON-able scalars)."""
        self._check_fitted()
        fr = self.fractal
        names = [a.value for a in self.axes]
        arrays = {
            "mean": self.mean,
            "projection": self.projection,
            "router_weight": self.router_weight,
            "router_bias": self.router_bias,
            "fractal_centroids": fr.centroids,
            "fractal_counts": fr.counts,
            "fractal_offsets": fr.offsets,
            "fractal_radii": fr.radii,
            "fractal_dim": fr.dim,
            "fractal_median_dist": fr.median_dist,
            "fractal_knn_scale": fr.knn_scale,
            "fractal_knn_dim": fr.knn_dim,
            "natural_barycentres": self.natural.barycentres,
        }
        meta = {
            "format_version": _FORMAT_VERSION,
            "axes": [a.value for a in self.axes],
            "feature_dim": int(self.mean.shape[0]),
            "latent_dim": int(self.projection.shape[0]),
            "temperature": self.temperature,
            "tau_n": self.natural.tau,
            "fractal_mode": self.fractal_mode,
            "fractal_temperature": dict(fr.temperature),
            "fractal_bias": {m: [float(v) for v in b] for m, b in fr.bias.items()},
            "knn_k": fr.knn_k,
            "ood_radius": fr.ood_radius,
            "lambda_fixed": list(self.config.calibration_weights),
            "lambda_fitted": dict(self.lambda_fitted),
            "pool_temperature": {k: _jsonable_t(v) for k, v in self.pool_temperature.items()},
            "lambdas": list(self.lambdas),
            "pool_temperature_used": _jsonable_t(self.pool_t),
            "distance_temperature": {k: list(v) for k, v in self.distance_temperature.items()},
            "distance_stats": list(self.distance_stats),
            "correlation_dimension": dict(zip(names, fr.dim.tolist(), strict=True)),
            "knn_dimension": dict(zip(names, fr.knn_dim.tolist(), strict=True)),
            "val_nll": dict(self.val_nll),
            "config": asdict(self.config),
        }
        return {k: np.ascontiguousarray(v) for k, v in arrays.items()}, meta

    def save(self, directory: str | Path) -> Path:
        """Write ``router.safetensors`` (all arrays) and ``router.json`` (scalars) to a folder.

        Args:
            directory: target folder (created if missing).

        Returns:
            The folder.
        """
        from safetensors.numpy import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        arrays, meta = self.state()
        save_file(arrays, str(out / WEIGHTS_FILE))
        (out / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return out

    @classmethod
    def load(cls, directory: str | Path) -> MoCaERouter:
        """Read a router written by :meth:`save`.

        Args:
            directory: folder holding ``router.safetensors`` and ``router.json``.

        Returns:
            The fitted router.

        Raises:
            ValueError: if a file is missing, unreadable, or of another format version.
        """
        from safetensors.numpy import load_file

        src = Path(directory)
        try:
            meta = json.loads((src / META_FILE).read_text())
            arrays = load_file(str(src / WEIGHTS_FILE))
        except (OSError, json.JSONDecodeError, Exception) as err:  # safetensors raises its own
            raise ValueError(f"cannot read a MoCaE router from {src}: {err}") from err
        if meta.get("format_version") != _FORMAT_VERSION:
            raise ValueError(
                f"{src / META_FILE}: format_version {meta.get('format_version')!r}, "
                f"this code reads {_FORMAT_VERSION}"
            )
        cfg = dict(meta["config"])
        cfg["calibration_weights"] = tuple(cfg["calibration_weights"])
        cfg.setdefault("fractal_bias", False)  # routers saved before the per-axis offsets
        cfg.setdefault("pool_temperature_per_axis", False)  # ... and before per-axis T_pool
        cfg.setdefault("pool_temperature_distance", False)  # ... and before distance T_pool
        router = cls(MoCaEConfig(**cfg), axes=meta["axes"])
        router.mean = arrays["mean"]
        router.projection = arrays["projection"]
        router.router_weight = arrays["router_weight"]
        router.router_bias = arrays["router_bias"]
        router.temperature = float(meta["temperature"])
        router.fractal = FractalCalibrator(
            centroids=arrays["fractal_centroids"],
            counts=arrays["fractal_counts"],
            offsets=arrays["fractal_offsets"],
            radii=arrays["fractal_radii"],
            dim=arrays["fractal_dim"],
            median_dist=arrays["fractal_median_dist"],
            knn_scale=arrays["fractal_knn_scale"],
            knn_dim=arrays["fractal_knn_dim"],
            knn_k=int(meta["knn_k"]),
            ood_radius=float(meta["ood_radius"]),
            temperature={k: float(v) for k, v in meta["fractal_temperature"].items()},
            bias={k: np.asarray(v, dtype=np.float64)
                  for k, v in meta.get("fractal_bias", {}).items()},
        )
        router.natural = NaturalCalibrator(arrays["natural_barycentres"], float(meta["tau_n"]))
        router.fractal_mode = meta["fractal_mode"]
        router.lambda_fitted = {k: float(v) for k, v in meta["lambda_fitted"].items()}
        router.pool_temperature = {
            k: np.asarray(v, dtype=np.float64) if isinstance(v, list) else float(v)
            for k, v in meta["pool_temperature"].items()
        }
        router.distance_temperature = {
            k: (float(v[0]), float(v[1])) for k, v in meta.get("distance_temperature", {}).items()}
        router.distance_stats = tuple(meta.get("distance_stats", (0.0, 1.0)))  # type: ignore[assignment]
        router.val_nll = dict(meta["val_nll"])
        router.fitted = True
        return router


def _jsonable_t(t: PoolTemperature) -> float | list[float]:
    """A T_pool for router.json: a float, or a list of per-axis floats."""
    return float(t) if np.ndim(t) == 0 else [float(v) for v in t]


_LAMBDA_GRID = np.linspace(0.0, 1.0, 21)  # lambda_1 candidates of the fitted pool
_LOG_T_POOL = (math.log(0.05), math.log(20.0))  # search range (and distance-form clip) of log T_pool


def _pool(c_f: np.ndarray, c_n: np.ndarray, lam1: float, t_pool: PoolTemperature) -> np.ndarray:
    """Step 6: ``p_hat ~ (lambda_1 c_F + (1 - lambda_1) c_N)^{1 / T_pool}`` (N, A).

    A linear pool of two calibrated distributions is under-confident wherever they disagree;
    one temperature on the pool, fitted on validation NLL, restores calibration without
    changing the argmax (T_pool = 1 is METHOD.md's literal form). With one T_pool per axis
    (A,), each row takes the temperature of its argmax axis; with one per row (N, 1) (the
    distance form), each row its own: still argmax-preserving, since a row's classes share one
    exponent.
    """
    p = lam1 * c_f + (1.0 - lam1) * c_n  # (N, A)
    if np.ndim(t_pool) == 2:  # (N, 1) per row
        return _softmax(np.log(np.clip(p, 1e-12, 1.0)) / t_pool)
    if np.ndim(t_pool) == 0:
        if t_pool == 1.0:
            return p
        return _softmax(np.log(np.clip(p, 1e-12, 1.0)) / t_pool)
    t_row = np.asarray(t_pool, dtype=np.float64)[p.argmax(axis=1)][:, None]  # (N, 1)
    return _softmax(np.log(np.clip(p, 1e-12, 1.0)) / t_row)


def _fit_pool_temperature(
    c_f: np.ndarray, c_n: np.ndarray, lam1: float, y: np.ndarray, w: np.ndarray
) -> float:
    """T_pool minimising the weighted validation NLL of the pool (golden section on log T)."""
    return math.exp(
        _golden_min(
            lambda lt: _nll(_pool(c_f, c_n, lam1, math.exp(lt)), y, w), *_LOG_T_POOL
        )
    )


def _fit_per_axis_pool_temperature(
    c_f: np.ndarray, c_n: np.ndarray, lam1: float, y: np.ndarray, w: np.ndarray, shared: float
) -> np.ndarray:
    """One T_pool per predicted axis (A,), each fitted on the rows whose pool argmax is that axis.

    The NLL separates by group, as the argmax does not move with T; an axis predicted for
    fewer than ``MIN_ROWS_PER_AXIS_T`` rows keeps ``shared`` (the fitted shared T_pool).
    """
    pred = (lam1 * c_f + (1.0 - lam1) * c_n).argmax(axis=1)  # (M,)
    t_axis = np.full(c_f.shape[1], shared)
    for a in range(c_f.shape[1]):
        rows = np.flatnonzero(pred == a)
        if len(rows) >= MIN_ROWS_PER_AXIS_T:
            t_axis[a] = _fit_pool_temperature(c_f[rows], c_n[rows], lam1, y[rows], w[rows])
    return t_axis


def _distance_t(ab: tuple[float, float], z: np.ndarray) -> np.ndarray:
    """Per-row T_pool (N, 1) = exp(a + b z), the exponent clipped to the T_pool search range."""
    a, b = ab
    return np.exp(np.clip(a + b * np.asarray(z, dtype=np.float64), *_LOG_T_POOL))[:, None]


def _fit_distance_pool_temperature(
    c_f: np.ndarray,
    c_n: np.ndarray,
    lam1: float,
    y: np.ndarray,
    w: np.ndarray,
    z: np.ndarray,
    shared: float,
) -> tuple[float, float]:
    """(a, b) of ``T_pool(x) = exp(a + b z(x))`` minimising the weighted validation NLL.

    Golden section on b in [-2, 2] (per standard deviation of distance), each b with the best
    a in the T_pool range; kept only if it beats b = 0, a = log ``shared`` (the shared T_pool).
    """
    def nll(a: float, b: float) -> float:
        return _nll(_pool(c_f, c_n, lam1, _distance_t((a, b), z)), y, w)

    def best_a(b: float) -> float:
        return _golden_min(lambda a: nll(a, b), *_LOG_T_POOL, iters=40)

    b = _golden_min(lambda b: nll(best_a(b), b), -2.0, 2.0, iters=40)
    a = best_a(b)
    base = (math.log(shared), 0.0)
    return (a, b) if nll(a, b) < nll(*base) else base


def _fractal_probs(
    log_rho: np.ndarray, ood: np.ndarray, temperature: float, bias: np.ndarray | None = None
) -> np.ndarray:
    """c_F (N, A) for a given T_F and per-axis bias b (A,): softmax(log rho / T_F + b)."""
    c_f = _softmax(log_rho / temperature + (0.0 if bias is None else bias))
    c_f[ood] = 1.0 / c_f.shape[1]
    return c_f


def fit_scale_bias(
    scores: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None, iters: int = 50
) -> tuple[float, np.ndarray]:
    """T and b (A,) minimising the weighted NLL of ``softmax(scores / T + b)``, with b_0 = 0.

    In (1/T, b) this is a multinomial logistic regression with one shared slope, so the NLL
    is convex: Newton steps with backtracking reach the minimum in a few iterations.
    Non-finite scores (an axis with no mass) are set 20 nats below the lowest finite one.

    Args:
        scores: log-scores (N, A), e.g. the fractal calibrator's log rho.
        labels: classes (N,).
        weights: row weights (N,) of the NLL (default 1 each).
        iters: Newton iteration cap.

    Returns:
        (T, b): T in [0.01, 1000], b (A,) with b[0] = 0 and |b| <= 20.

    Raises:
        ValueError: for mismatched shapes or an empty set.
    """
    x = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if x.ndim != 2 or x.shape[0] == 0 or y.shape != (x.shape[0],):
        raise ValueError(f"scores (N, A) and labels (N,) must agree and be non-empty, got "
                         f"{x.shape} and {y.shape}")
    n, n_ax = x.shape
    fin = np.isfinite(x)
    x = np.where(fin, x, (x[fin].min() if fin.any() else 0.0) - 20.0)
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    onehot = np.eye(n_ax)[y]  # (N, A)
    # d z_ic / d theta for theta = (a, b_1..b_{A-1}): (N, A, P)
    jac = np.concatenate([x[:, :, None], np.broadcast_to(np.eye(n_ax)[:, 1:], (n, n_ax, n_ax - 1))],
                         axis=2)

    def objective(th: np.ndarray) -> tuple[float, np.ndarray]:
        z = th[0] * x + np.concatenate([[0.0], th[1:]])  # (N, A)
        z = z - z.max(axis=1, keepdims=True)
        lse = np.log(np.exp(z).sum(axis=1))
        return float(np.sum(w * (lse - z[np.arange(n), y]))), np.exp(z - lse[:, None])

    th = np.concatenate([[1.0], np.zeros(n_ax - 1)])
    f, p = objective(th)
    for _ in range(iters):
        grad = np.einsum("n,nc,ncp->p", w, p - onehot, jac)  # (P,)
        cov = p[:, :, None] * (np.eye(n_ax)[None] - p[:, None, :])  # (N, A, A)
        hess = np.einsum("n,ncp,ncd,ndq->pq", w, jac, cov, jac) + 1e-9 * np.eye(len(th))
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-6:  # backtracking; keep 1/T inside [1e-3, 1e2] and |b| <= 20 (separable sets)
            cand = th - t * step
            if 1e-3 <= cand[0] <= 1e2 and np.all(np.abs(cand[1:]) <= 20.0):
                f_new, p_new = objective(cand)
                if f_new <= f:
                    break
            t *= 0.5
        else:
            break
        converged = f - f_new < 1e-12
        th, f, p = cand, f_new, p_new
        if converged:
            break
    return 1.0 / th[0], np.concatenate([[0.0], th[1:]])
