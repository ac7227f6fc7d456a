"""The router's out-of-distribution flag from the encoder's middle layer.

The fractal calibrator's radius test (METHOD.md, step 4) works in the router's latent space,
which the encoder fine-tune shapes to separate the three intents: code, logs, markup or a
French sentence land inside the class clouds there, and that flag fired on none of 200
non-request texts. The middle layer of the same encoder still keeps them apart
(``docs/experiments/ood_hidden_protocol.md``: AUROC 0.997-0.998, 94-98% of a held-out OOD set
flagged at a 1% in-distribution rate). :class:`HiddenStateOOD` is the Mahalanobis detector of
Lee et al. (2018) on that layer's mean-pooled states:

    s(x)  = min_a (g(x) - mu_a)^T Sigma^-1 (g(x) - mu_a)      g(x): pooled layer-L state
    flag  = s(x) > r,   r = quantile q of s over the validation prompts

with mu_a the class means of the router's training targets and Sigma the pooled within-class
covariance, shrunk toward ``trace(Sigma)/d * I``. The state comes from the forward pass that
computes the routing features (:func:`alignx.router.features.router_features`), so serving
pays no second encoder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["HiddenStateOOD", "OOD_WEIGHTS_FILE", "OOD_META_FILE"]

OOD_WEIGHTS_FILE = "ood.safetensors"
OOD_META_FILE = "ood.json"


@dataclass
class HiddenStateOOD:
    """Mahalanobis OOD detector on the pooled hidden state of one encoder layer.

    Attributes:
        layer: the encoder layer whose pooled state is scored (0 = embeddings).
        means: class means (A, d_h).
        precision: inverse of the shrunk shared covariance (d_h, d_h).
        radius: a score above it is flagged.
        shrinkage: weight of the scaled identity in the covariance.
        quantile: the validation quantile the radius was set at (None: the largest score).
    """

    layer: int
    means: np.ndarray
    precision: np.ndarray
    radius: float
    shrinkage: float
    quantile: float | None

    @classmethod
    def fit(cls, g: np.ndarray, y: np.ndarray, g_val: np.ndarray, *, layer: int,
            shrinkage: float = 0.1, quantile: float | None = 0.99) -> HiddenStateOOD:
        """Fit the class means and shared covariance on ``(g, y)``; the radius on ``g_val``.

        Args:
            g: training states (N, d_h).
            y: training targets (N,), ints.
            g_val: in-distribution validation states (M, d_h), M >= 1.
            layer: the layer the states come from (recorded; used at serving time).
            shrinkage: in [0, 1]; 0 = the sample covariance (singular when N < d_h).
            quantile: in (0, 1]; None = the largest validation score.

        Raises:
            ValueError: shapes disagree, a class has no row, no validation rows, or a parameter
                is out of range.
        """
        g = np.asarray(g, np.float64)
        g_val = np.asarray(g_val, np.float64)
        y = np.asarray(y)
        if g.ndim != 2 or g_val.ndim != 2 or g.shape[1] != g_val.shape[1] or len(g) != len(y):
            raise ValueError(f"states {g.shape}, targets {y.shape} and validation states "
                             f"{g_val.shape} do not fit together")
        if len(g_val) == 0:
            raise ValueError("no validation states to set the OOD radius on")
        if not 0.0 <= shrinkage <= 1.0:
            raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
        if quantile is not None and not 0.0 < quantile <= 1.0:
            raise ValueError(f"quantile must be in (0, 1] or None, got {quantile}")
        classes = np.unique(y)
        if len(classes) < 2:
            raise ValueError(f"need states of at least two classes, got {classes.tolist()}")
        means = np.stack([g[y == c].mean(0) for c in classes])  # (A, d_h)
        resid = g - means[np.searchsorted(classes, y)]  # (N, d_h)
        cov = resid.T @ resid / len(g)  # (d_h, d_h) pooled within-class
        d = cov.shape[0]
        cov = (1.0 - shrinkage) * cov + shrinkage * (np.trace(cov) / d) * np.eye(d)
        precision = np.linalg.pinv(cov, hermitian=True)
        det = cls(layer=int(layer), means=means.astype(np.float32),
                  precision=precision.astype(np.float32), radius=np.inf,
                  shrinkage=float(shrinkage), quantile=quantile)
        s_val = det.score(g_val)
        det.radius = float(np.max(s_val) if quantile is None else np.quantile(s_val, quantile))
        return det

    def score(self, g: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance to the nearest class mean, (N,); higher = more unusual.

        Raises:
            ValueError: ``g`` is not (N, d_h).
        """
        g = np.atleast_2d(np.asarray(g, np.float32))
        if g.shape[1] != self.means.shape[1]:
            raise ValueError(f"hidden states have {g.shape[1]} dims, the OOD detector expects "
                             f"{self.means.shape[1]} (layer {self.layer})")
        # (g - mu)^T P (g - mu) = g^T P g - 2 (P g)^T mu + mu^T P mu: one (N, d_h) x (d_h, d_h)
        # product for all classes instead of one per class
        gp = g @ self.precision  # (N, d_h)
        mpm = np.einsum("ad,ad->a", self.means @ self.precision, self.means)  # (A,)
        sq = np.einsum("nd,nd->n", gp, g)[:, None] - 2.0 * gp @ self.means.T + mpm  # (N, A)
        return np.maximum(sq.min(axis=1), 0.0)  # (N,); >= 0 up to float rounding

    def flag(self, g: np.ndarray) -> np.ndarray:
        """(N,) bool: the score exceeds the radius."""
        return self.score(g) > self.radius

    @property
    def dim(self) -> int:
        """d_h, the width of the states it scores."""
        return int(self.means.shape[1])

    def save(self, directory: str | Path) -> None:
        """Write ``ood.safetensors`` (means, precision) and ``ood.json`` (scalars), each
        atomically (a temporary file, then a rename)."""
        from safetensors.numpy import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / (OOD_WEIGHTS_FILE + ".tmp")
        save_file({"means": np.ascontiguousarray(self.means),
                   "precision": np.ascontiguousarray(self.precision)}, str(tmp))
        tmp.replace(out / OOD_WEIGHTS_FILE)
        meta = {"layer": self.layer, "radius": self.radius, "shrinkage": self.shrinkage,
                "quantile": self.quantile, "score": "min_a squared Mahalanobis distance"}
        tmp = out / (OOD_META_FILE + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        tmp.replace(out / OOD_META_FILE)

    @classmethod
    def load(cls, directory: str | Path) -> HiddenStateOOD:
        """Read what :meth:`save` wrote.

        Raises:
            FileNotFoundError: a file is missing.
            ValueError: the files are unreadable or disagree.
        """
        from safetensors.numpy import load_file

        d = Path(directory)
        for name in (OOD_META_FILE, OOD_WEIGHTS_FILE):
            if not (d / name).is_file():
                raise FileNotFoundError(2, f"{name} is missing in {d}", str(d / name))
        try:
            meta = json.loads((d / OOD_META_FILE).read_text())
            arrays = load_file(str(d / OOD_WEIGHTS_FILE))
            det = cls(layer=int(meta["layer"]), means=arrays["means"],
                      precision=arrays["precision"], radius=float(meta["radius"]),
                      shrinkage=float(meta["shrinkage"]), quantile=meta.get("quantile"))
        except FileNotFoundError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"unreadable OOD detector in {d}: {e}") from None
        if det.precision.shape != (det.dim, det.dim):
            raise ValueError(f"OOD detector in {d}: precision {det.precision.shape} does not "
                             f"match means {det.means.shape}")
        return det
