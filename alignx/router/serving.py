"""Stage 2 at serving time: the calibrated MoCaE router of a run, ready to route.

:func:`load` is the routing-model factory of the Serve ingress (``AppArgs.routing_model =
"alignx.router.serving:load"``) and :func:`route_prompts` backs ``alignx route``. Both read
``<run_dir>/router/`` (written by ``alignx calibrate``) and refuse a router made for another
base model or encoder.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from alignx.artifacts import ArtifactLayout, ArtifactNotFoundError, read_manifest_dict
from alignx.axes import Axis, parse_axis
from alignx.router.mocae import MoCaERouter, route
from alignx.router.ood import HiddenStateOOD
from alignx.serve.router import RoutingInfo


class CalibratedRouter:
    """A fitted :class:`MoCaERouter` plus its manifest (encoder id, policy, threshold, ...)
    and, when the manifest names one, its hidden-state OOD detector (:mod:`alignx.router.ood`).

    Its features are :meth:`features`' (``(N, d)``, or ``(N, d + d_h)`` with the detector:
    h(x) followed by the detector layer's pooled state); ``route`` / ``dispatch`` take them.

    Raises:
        ValueError: the manifest names a hidden-state detector and none is given.
    """

    def __init__(self, router: MoCaERouter, manifest: dict[str, Any],
                 directory: str | Path | None = None, ood: HiddenStateOOD | None = None):
        if manifest.get("ood_detector", {}).get("kind") == "hidden" and ood is None:
            raise ValueError("the router manifest names a hidden-state OOD detector, but none "
                             "was loaded (ood.json / ood.safetensors; run `alignx calibrate` "
                             "again)")
        self.router = router
        self.ood = ood
        self.manifest = manifest
        self.axes: list[Axis] = [parse_axis(a) for a in manifest["axes"]]
        self.encoder_id: str = manifest["encoder"]
        self.base_model: str = manifest["base_model"]
        # fine-tuned encoder weights (router.finetune_epochs > 0), relative to the router dir
        rel = manifest.get("encoder_weights")
        self.encoder_weights: Path | None = (
            Path(directory or ".") / rel if rel else None)

    def build_encoder(self, model_cfg: Any) -> Any:
        """The encoder this router was calibrated on (with its fine-tuned weights, if any).

        Raises:
            ValueError: the encoder built differs from the one in the manifest.
            FileNotFoundError: the fine-tuned weights are missing.
        """
        from alignx.router.features import build_encoder

        kind = self.encoder_id.split(":", 1)[0]
        encoder = build_encoder(kind, model_cfg, self.encoder_weights)  # type: ignore[arg-type]
        if encoder.id != self.encoder_id:
            raise ValueError(f"router was calibrated on encoder {self.encoder_id!r}, not "
                             f"{encoder.id!r} (run `alignx calibrate` again)")
        return encoder

    @property
    def hidden_layer(self) -> int | None:
        """The encoder layer whose state the OOD detector reads (None: no detector)."""
        return self.ood.layer if self.ood is not None else None

    def features(self, encoder: Any) -> Callable[[Sequence[str]], np.ndarray]:
        """``texts -> features`` for :meth:`route`: the calibration job's feature function
        (:func:`~alignx.router.features.router_features`) bound to this router's layer."""
        from alignx.router.features import router_features

        layer = self.hidden_layer
        return lambda texts: router_features(encoder, texts, layer)

    def split(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """``features`` -> (h(x) (N, d), the detector layer's state (N, d_h) or None).

        Raises:
            ValueError: the width is not the router's (names what :meth:`features` gives).
        """
        x = np.atleast_2d(np.asarray(features, np.float32))
        d = self.router.mean.shape[0]
        want = d + (self.ood.dim if self.ood is not None else 0)
        if x.shape[1] != want:
            raise ValueError(
                f"features have {x.shape[1]} columns; this router takes {want} "
                + (f"(h(x), {d}, then layer {self.ood.layer}'s state, {self.ood.dim}: "
                   "CalibratedRouter.features(encoder))" if self.ood is not None else "(h(x))"))
        return (x[:, :d], x[:, d:]) if self.ood is not None else (x, None)

    def _predict(self, features: np.ndarray) -> tuple[Any, np.ndarray]:
        h, g = self.split(features)
        res = self.router.predict(h)
        return res, (self.ood.flag(g) if self.ood is not None and g is not None else res.ood)

    def route(self, features: np.ndarray) -> list[RoutingInfo]:
        """Features (:meth:`features`) -> N routing decisions (argmax axis, weights,
        confidence, ood). ``ood`` is the hidden-state detector's flag when the router has
        one, else the fractal calibrator's radius test."""
        res, ood = self._predict(features)
        return self._infos(res.weights, ood)

    def route_softmax(self, features: np.ndarray) -> list[RoutingInfo]:
        """The uncalibrated baseline: weights are the linear router's raw softmax (T = 1; the
        ``raw_softmax`` row of the ablation table), with no temperature, calibrators or OOD
        flag (``ood`` is always False: a plain softmax router has no way to raise it)."""
        h, _ = self.split(features)
        p = self.router.ablation_probs(h)["raw_softmax"]  # (N, A)
        return self._infos(p, np.zeros(len(p), dtype=bool))

    def _infos(self, weights: np.ndarray, ood: np.ndarray) -> list[RoutingInfo]:
        return [
            RoutingInfo(
                axis=self.axes[int(weights[i].argmax())],
                weights={a: float(weights[i, j]) for j, a in enumerate(self.axes)},
                confidence=float(weights[i].max()),
                ood=bool(ood[i]),
            )
            for i in range(len(weights))
        ]

    def dispatch(self, features: np.ndarray, policy: str | None = None,
                 threshold: float | None = None, fallback: str | None = None,
                 miss_cost: Mapping[str, float] | None = None) -> list[Axis]:
        """The expert each request goes to under the policy (default: the manifest's)."""
        res, ood = self._predict(features)
        idx = route(res.weights, res.confidence, ood,
                    policy=policy or self.manifest["policy"],  # type: ignore[arg-type]
                    threshold=self.manifest["threshold"] if threshold is None else threshold,
                    fallback=fallback or self.manifest["fallback"], axes=self.axes,
                    miss_cost=self.manifest.get("miss_cost", {}) if miss_cost is None else miss_cost)
        return [self.axes[int(i)] for i in idx]


def load(run_dir: str | Path) -> CalibratedRouter:
    """Load ``<run_dir>/router`` (``run_dir`` may be the run's URI on shared storage: the
    finished router is then fetched into a local mirror, see :func:`alignx.storage.localize`).

    Raises:
        ArtifactNotFoundError: no finished router (names ``alignx calibrate``).
        ValueError: an unreadable manifest.
    """
    from alignx.storage import localize

    d = ArtifactLayout(localize(run_dir, "router")).root / "router"
    if not (d / "manifest.json").is_file():
        raise ArtifactNotFoundError(
            f"no calibrated router in {d.parent} (run `alignx calibrate --run-dir {d.parent}`)")
    manifest = read_manifest_dict(d / "manifest.json", required=("axes", "encoder", "base_model"))
    kind = manifest.get("ood_detector", {}).get("kind", "fractal")
    try:
        ood = HiddenStateOOD.load(d) if kind == "hidden" else None
    except FileNotFoundError as e:
        raise ArtifactNotFoundError(f"the router in {d} names a hidden-state OOD detector but "
                                    f"{Path(e.filename or '').name or 'its files'} is missing "
                                    f"(run `alignx calibrate --run-dir {d.parent}` again)") from None
    return CalibratedRouter(MoCaERouter.load(d), manifest, d, ood=ood)


def route_prompts(run_dir: str | Path, lines: list[str], model_cfg: Any,
                  router_cfg: Any = None) -> list[dict[str, Any]]:
    """``alignx route``: JSON Lines with a ``prompt`` field, or plain lines -> one decision each.

    ``router_cfg`` (the config's ``router`` section) sets the dispatch policy, as it does for
    serving; without it the manifest's (the config the router was calibrated with) applies.
    """
    from alignx.artifacts import check_same_base
    from alignx.modeling import base_model_id
    from alignx.router.features import router_text

    cr = load(run_dir)
    check_same_base(base_model_id(model_cfg), cr.base_model, "the router")
    prompts = []
    for n, line in enumerate(lines, 1):
        s = line.strip()
        if not s:
            continue
        if s.startswith("{"):
            try:
                obj = json.loads(s)
            except json.JSONDecodeError as e:
                raise ValueError(f"line {n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
                raise ValueError(f"line {n}: field 'prompt' must be a non-empty string")
            s = obj["prompt"]
        prompts.append(router_text([{"role": "user", "content": s}],
                                   cr.manifest.get("context_turns", 0)))
    if not prompts:
        return []
    h = cr.features(cr.build_encoder(model_cfg))(prompts)
    policy = {} if router_cfg is None else dict(
        policy=router_cfg.policy, threshold=router_cfg.threshold,
        fallback=router_cfg.fallback.value,
        miss_cost={a.value: c for a, c in router_cfg.miss_cost.items()})
    infos, chosen = cr.route(h), cr.dispatch(h, **policy)
    return [{"axis": c.value, "weights": {a.value: round(w, 6) for a, w in i.weights.items()},
             "confidence": round(i.confidence, 6), "ood": i.ood, "argmax": i.axis.value}
            for i, c in zip(infos, chosen, strict=False)]
