"""The hidden-state OOD detector, the router's feature function, and both at serving time."""

from __future__ import annotations

import json

import numpy as np
import pytest

from alignx.axes import AXES
from alignx.config import ModelCfg
from alignx.router.ood import OOD_META_FILE, OOD_WEIGHTS_FILE, HiddenStateOOD


def _clouds(rng, n, d=6, scale=0.5):
    means = 4.0 * np.eye(d)[:3]  # three classes on three axes
    y = np.repeat(np.arange(3), n)
    return (means[y] + scale * rng.standard_normal((3 * n, d))).astype(np.float32), y


def test_score_is_the_squared_mahalanobis_distance_to_the_nearest_mean():
    rng = np.random.default_rng(0)
    g, y = _clouds(rng, 4000)
    det = HiddenStateOOD.fit(g, y, g[:50], layer=3, shrinkage=0.0, quantile=0.99)
    # isotropic within-class covariance 0.25 I: the score is |x - mu|^2 / 0.25
    np.testing.assert_allclose(det.means, 4.0 * np.eye(6)[:3], atol=0.05)
    x = np.array([[4.0, 0.0, 0.0, 0.0, 0.0, 1.0]], np.float32)  # 1 away from mean 0
    assert det.score(x)[0] == pytest.approx(1.0 / 0.25, rel=0.05)
    assert det.score(det.means).max() == pytest.approx(0.0, abs=1e-4)


def test_radius_is_the_validation_quantile_and_far_points_are_flagged():
    rng = np.random.default_rng(1)
    g, y = _clouds(rng, 300)
    g_val, _ = _clouds(rng, 200)
    det = HiddenStateOOD.fit(g, y, g_val, layer=2, quantile=0.95)
    assert det.radius == pytest.approx(float(np.quantile(det.score(g_val), 0.95)))
    assert det.flag(g_val).mean() == pytest.approx(0.05, abs=0.01)
    far = np.full((2, 6), 10.0, np.float32)  # off every class
    between = np.array([[2.0, 2.0, 0, 0, 0, 0]], np.float32)  # between two means: unusual too
    assert det.flag(far).tolist() == [True, True] and det.flag(between).tolist() == [True]
    # quantile None: the largest validation score, so no validation row is flagged
    top = HiddenStateOOD.fit(g, y, g_val, layer=2, quantile=None)
    assert not top.flag(g_val).any() and top.radius == pytest.approx(top.score(g_val).max())


def test_a_spread_direction_the_classes_never_vary_in_is_what_flags():
    """Mahalanobis, not Euclidean: the same step is ordinary along a wide direction and far
    out along a narrow one."""
    rng = np.random.default_rng(2)
    g, y = _clouds(rng, 500, d=4, scale=0.05)
    g[:, 3] = 2.0 * rng.standard_normal(len(g))  # a wide, class-independent direction
    det = HiddenStateOOD.fit(g, y, g, layer=1, shrinkage=0.0)
    step = 1.0
    wide = det.means[0] + np.array([0, 0, 0, step], np.float32)
    narrow = det.means[0] + np.array([0, 0, step, 0], np.float32)
    assert not det.flag(wide[None])[0] and det.flag(narrow[None])[0]


def test_save_load_roundtrip_and_bad_files(tmp_path):
    rng = np.random.default_rng(3)
    g, y = _clouds(rng, 100)
    det = HiddenStateOOD.fit(g, y, g, layer=3)
    det.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([OOD_META_FILE, OOD_WEIGHTS_FILE])
    back = HiddenStateOOD.load(tmp_path)
    assert (back.layer, back.radius, back.quantile) == (3, det.radius, 0.99)
    np.testing.assert_array_equal(back.score(g), det.score(g))
    (tmp_path / OOD_META_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="unreadable OOD detector"):
        HiddenStateOOD.load(tmp_path)
    (tmp_path / OOD_META_FILE).unlink()
    with pytest.raises(FileNotFoundError):
        HiddenStateOOD.load(tmp_path)


def test_fit_refuses_bad_inputs():
    rng = np.random.default_rng(4)
    g, y = _clouds(rng, 20)
    with pytest.raises(ValueError, match="at least two classes"):
        HiddenStateOOD.fit(g, np.zeros(len(g), int), g, layer=1)
    with pytest.raises(ValueError, match="no validation states"):
        HiddenStateOOD.fit(g, y, g[:0], layer=1)
    with pytest.raises(ValueError, match="do not fit together"):
        HiddenStateOOD.fit(g, y[:-1], g, layer=1)
    with pytest.raises(ValueError, match="shrinkage"):
        HiddenStateOOD.fit(g, y, g, layer=1, shrinkage=1.5)
    det = HiddenStateOOD.fit(g, y, g, layer=1)
    with pytest.raises(ValueError, match="expects 6"):
        det.score(np.zeros((1, 5), np.float32))


# ----------------------------------------------------------------------------- features


def test_sentence_features_carry_the_middle_layer_from_one_pass():
    from alignx.router.features import SentenceEncoder, router_features

    enc = SentenceEncoder()
    texts = ["How do I bake bread?", "  padded text  ", "SELECT * FROM t;"]
    x = router_features(enc, texts, 3)
    assert x.shape == (3, 768)
    np.testing.assert_array_equal(x[:, :384], enc.encode(texts))
    np.testing.assert_allclose(np.linalg.norm(x[:, 384:], axis=1), 1.0, atol=1e-5)
    assert not np.allclose(x[:, 384:], x[:, :384])  # another layer, not a copy
    # the features are SentenceTransformer.encode's, to float rounding
    ref = enc.model.encode(texts, convert_to_numpy=True, normalize_embeddings=True)
    np.testing.assert_allclose(x[:, :384], ref, atol=1e-6)
    assert router_features(enc, texts).shape == (3, 384)
    with pytest.raises(ValueError, match=r"layers 0\.\.6"):
        enc.encode_with_hidden(texts, 7)


def test_base_encoder_hidden_state_is_batch_invariant():
    from alignx.router.features import BaseModelEncoder

    enc = BaseModelEncoder(ModelCfg(name="tiny-llama"))
    texts = ["short", "a much longer prompt than the first one", "two words"]
    h, g = enc.encode_with_hidden(texts, enc.n_layers // 2, batch_size=2)
    np.testing.assert_array_equal(h, enc.encode(texts, batch_size=2))
    _, g1 = enc.encode_with_hidden(texts[:1], enc.n_layers // 2)
    np.testing.assert_allclose(g[0], g1[0], atol=1e-5)
    assert g.shape == (3, enc.dim) and not np.allclose(g, h)
    # the job reads the shape without loading the weights
    from alignx.router.features import SentenceEncoder, encoder_shape

    assert encoder_shape("base", ModelCfg(name="tiny-llama")) == (enc.dim, enc.n_layers)
    assert encoder_shape("sentence", ModelCfg(name="tiny-llama")) == (384, 6) == (
        SentenceEncoder.dim, SentenceEncoder.n_layers)


def test_ood_layer_defaults_to_the_middle_and_refuses_a_layer_too_deep(tmp_path):
    from alignx.config import load_config
    from alignx.router.calibrate import ood_hidden_layer

    cfg = load_config("jobs/configs/smollm2_cpu.yaml", [], run_dir=str(tmp_path))
    assert cfg.router.ood_detector == "hidden" and ood_hidden_layer(cfg) == 3
    assert ood_hidden_layer(cfg.model_copy(update={"router": cfg.router.model_copy(
        update={"ood_detector": "fractal"})})) is None
    deep = cfg.model_copy(update={"router": cfg.router.model_copy(update={"ood_layer": 9})})
    with pytest.raises(ValueError, match=r"router.ood_layer=9.*layers 0\.\.6"):
        ood_hidden_layer(deep)
    with pytest.raises(Exception, match="ood_detector"):
        load_config("jobs/configs/smollm2_cpu.yaml", ["router.ood_detector=mahalanobis"],
                    run_dir=str(tmp_path))


# ----------------------------------------------------------------------------- serving


@pytest.fixture(scope="module")
def router_with_detector(tmp_path_factory):
    """A MoCaE router on 8-d clusters + a detector on 4-d 'hidden states', saved like a run."""
    from alignx.router.mocae import MoCaEConfig, MoCaERouter

    rng = np.random.default_rng(0)

    def clusters(n):
        x = np.concatenate([5.0 * np.eye(8)[i] + 0.3 * rng.standard_normal((n, 8)) for i in range(3)])
        return x.astype(np.float32), np.repeat(np.arange(3), n)

    (x_tr, y_tr), (x_va, y_va) = clusters(40), clusters(15)
    router = MoCaERouter(MoCaEConfig(latent_dim=256, lr=1e-2, max_epochs=40)).fit(
        x_tr, y_tr, x_va, y_va)
    g_tr, _ = _clouds(rng, 40, d=4, scale=0.3)
    g_va, _ = _clouds(rng, 15, d=4, scale=0.3)
    det = HiddenStateOOD.fit(g_tr, y_tr, g_va, layer=2, quantile=1.0)
    d = tmp_path_factory.mktemp("run") / "router"
    router.save(d)
    det.save(d)
    manifest = {"axes": [a.value for a in AXES], "encoder": "fake", "base_model": "tiny-llama",
                "policy": "threshold", "threshold": 0.5, "fallback": "harmlessness",
                "ood_detector": {"kind": "hidden", "layer": 2, "dim": 4}}
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d, x_va, g_va


def test_served_flag_is_the_detectors_and_sends_to_the_fallback(router_with_detector):
    from alignx.axes import Axis
    from alignx.router.serving import load

    d, x_va, g_va = router_with_detector
    cr = load(d.parent)
    assert cr.hidden_layer == 2 and cr.ood is not None
    x = np.concatenate([x_va[:3], g_va[:3]], axis=1)  # in distribution on both parts
    infos = cr.route(x)
    assert [i.ood for i in infos] == [False] * 3
    odd = x.copy()
    odd[:, 8:] = 9.0  # a hidden state far from every class; h(x) unchanged
    flagged = cr.route(odd)
    assert all(i.ood for i in flagged)
    assert [i.weights for i in flagged] == [i.weights for i in infos]  # weights do not change
    assert cr.dispatch(odd) == [Axis.HARMLESSNESS] * 3
    assert cr.dispatch(odd, policy="top1") == cr.dispatch(x, policy="top1")
    with pytest.raises(ValueError, match="features have 8 columns; this router takes 12"):
        cr.route(x_va[:3])


def test_features_function_binds_the_detectors_layer(router_with_detector):
    from alignx.router.serving import load

    cr = load(router_with_detector[0].parent)
    calls = []

    class Enc:
        def encode(self, texts):
            raise AssertionError("the detector's layer must come from the same pass")

        def encode_with_hidden(self, texts, layer):
            calls.append(layer)
            return np.zeros((len(texts), 8), np.float32), np.zeros((len(texts), 4), np.float32)

    assert cr.features(Enc())(["a", "b"]).shape == (2, 12) and calls == [2]


def test_load_names_a_missing_detector_file(router_with_detector, tmp_path):
    import shutil

    from alignx.artifacts import ArtifactNotFoundError
    from alignx.router.serving import load

    d = tmp_path / "router"
    shutil.copytree(router_with_detector[0], d)
    (d / OOD_WEIGHTS_FILE).unlink()
    with pytest.raises(ArtifactNotFoundError, match="ood.safetensors is missing.*alignx calibrate"):
        load(tmp_path)
