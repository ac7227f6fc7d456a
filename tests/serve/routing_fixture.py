"""Deterministic routing models for the serve tests (not part of the package).

* :class:`KeywordEncoder` + :class:`KeywordRouting`: no model at all (unit tests).
* :func:`load_centroid_routing`: nearest centroid over the *real* serving encoder's features
  of a few labelled prompts stored in ``<run_dir>/test_routing.json`` (the slow Serve tests
  import it inside the router replica as ``tests.serve.routing_fixture:load_centroid_routing``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from alignx.axes import AXES, Axis
from alignx.serve.router import RoutingInfo

KEYWORDS = {
    Axis.HELPFULNESS: ("poem", "recipe", "tips", "write"),
    Axis.HARMLESSNESS: ("weapon", "steal", "hurt", "poison"),
    Axis.HONESTY: ("true", "really", "fact", "myth"),
}


class KeywordEncoder:
    id = "fake:keywords"
    dim = 3

    def encode(self, texts, batch_size: int = 64) -> np.ndarray:
        out = np.zeros((len(texts), 3), np.float32)
        for i, t in enumerate(texts):
            low = t.lower()
            for j, axis in enumerate(AXES):
                out[i, j] = sum(k in low for k in KEYWORDS[axis])
        return out


class KeywordRouting:
    """Softmax over keyword counts (temperature 0.5); no keyword at all -> flat and OOD."""

    axes = list(AXES)
    encoder_id = KeywordEncoder.id

    def route(self, features: np.ndarray) -> list[RoutingInfo]:
        out = []
        for f in features:
            z = np.exp((f - f.max()) / 0.5)
            p = z / z.sum()
            j = int(p.argmax())
            out.append(RoutingInfo(self.axes[j], dict(zip(self.axes, p.tolist(), strict=False)),
                                   float(p.max()), ood=bool(f.sum() == 0)))
        return out


class CentroidRouting:
    """Nearest centroid; weights = softmax(-distance / scale)."""

    def __init__(self, encoder, prompts: dict[str, list[str]]):
        self.axes = [Axis(a) for a in prompts]
        self.encoder_id = encoder.id
        self.centroids = np.stack([encoder.encode(prompts[a.value]).mean(0) for a in self.axes])
        d = np.linalg.norm(self.centroids[:, None] - self.centroids[None], axis=-1)
        self.scale = float(d[d > 0].mean()) / 4 if (d > 0).any() else 1.0

    def route(self, features: np.ndarray) -> list[RoutingInfo]:
        out = []
        for f in features:
            d = np.linalg.norm(self.centroids - f, axis=1)
            z = np.exp(-(d - d.min()) / self.scale)
            p = z / z.sum()
            j = int(p.argmax())
            out.append(RoutingInfo(self.axes[j], dict(zip(self.axes, p.tolist(), strict=False)),
                                   float(p.max()), ood=False))
        return out


ROUTING_FILE = "test_routing.json"


def write_routing_prompts(run_dir: Path, prompts: dict[str, list[str]], model: str) -> None:
    (Path(run_dir) / ROUTING_FILE).write_text(json.dumps({"model": model, "prompts": prompts}))


def load_centroid_routing(run_dir: Path) -> CentroidRouting:
    from alignx.config import ModelCfg
    from alignx.router.features import build_encoder

    spec = json.loads((Path(run_dir) / ROUTING_FILE).read_text())
    return CentroidRouting(build_encoder("base", ModelCfg(name=spec["model"])), spec["prompts"])
