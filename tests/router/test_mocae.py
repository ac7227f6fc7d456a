"""MoCaE router pieces on small synthetic clouds where the right answer is known."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest

from alignx.axes import AXES, Axis
from alignx.router import metrics
from alignx.router.mocae import (
    MIN_ROWS_PER_AXIS_T,
    FractalCalibrator,
    MoCaEConfig,
    MoCaERouter,
    _distance_t,
    _fit_distance_pool_temperature,
    _fit_per_axis_pool_temperature,
    _fit_pool_temperature,
    _pool,
    correlation_dimension,
    epsilon_net,
    fisher_rao_barycentre,
    fisher_rao_distance,
    fit_scale_bias,
    fit_temperature,
    route,
)

RADII = 0.05 * 2.0 ** np.arange(6)  # the default ladder: 0.05 .. 1.6


def _clusters(n_per: int, d: int = 8, spread: float = 0.3, seed: int = 0):
    """Three well-separated Gaussian clusters at 5 e_0, 5 e_1, 5 e_2 in R^d; labels 0, 1, 2."""
    rng = np.random.default_rng(seed)
    centres = 5.0 * np.eye(d)[:3]
    x = np.concatenate([c + spread * rng.standard_normal((n_per, d)) for c in centres])
    y = np.repeat(np.arange(3), n_per)
    return x.astype(np.float32), y


@pytest.fixture(scope="module")
def fitted_router() -> tuple[MoCaERouter, np.ndarray, np.ndarray]:
    x_tr, y_tr = _clusters(60, seed=0)
    x_va, y_va = _clusters(20, seed=1)
    cfg = MoCaEConfig(latent_dim=256, lr=1e-2, max_epochs=60, ood_radius=1.0)
    router = MoCaERouter(cfg).fit(x_tr, y_tr, x_va, y_va)
    x_te, y_te = _clusters(30, seed=2)
    return router, x_te, y_te


# --------------------------------------------------------------------------- fractal pieces
def test_correlation_dimension_of_a_line_is_one() -> None:
    rng = np.random.default_rng(0)
    t = rng.uniform(0, 10, size=2000)[:, None]
    direction = np.array([[1.0, 2.0, -1.0]]) / math.sqrt(6)
    dim, _ = correlation_dimension(t * direction, RADII)
    assert dim == pytest.approx(1.0, abs=0.1)


def test_correlation_dimension_of_a_plane_is_two() -> None:
    rng = np.random.default_rng(0)
    uv = rng.uniform(0, 10, size=(2000, 2))
    basis = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    basis[0] /= math.sqrt(2)
    dim, _ = correlation_dimension(uv @ basis, RADII)
    assert dim == pytest.approx(2.0, abs=0.2)


def test_correlation_dimension_needs_radii_that_span_the_cloud() -> None:
    with pytest.raises(ValueError, match="widen the radii"):
        correlation_dimension(np.zeros((10, 3)) + np.arange(10)[:, None] * 100.0, RADII)


def test_epsilon_net_covers_every_point() -> None:
    rng = np.random.default_rng(0)
    z = rng.uniform(0, 1, size=(700, 2)).astype(np.float32)
    leaders, counts = epsilon_net(z, 0.1, chunk=128)  # several blocks
    assert counts.sum() == len(z)
    dist = np.linalg.norm(z[:, None, :] - leaders[None, :, :], axis=2)
    assert dist.min(axis=1).max() <= 0.1 + 1e-6  # every point within epsilon of a leader
    lead_d = np.linalg.norm(leaders[:, None] - leaders[None], axis=2) + np.eye(len(leaders)) * 9
    assert lead_d.min() > 0.1  # leaders are epsilon-separated
    assert len(leaders) < len(z)


def _sphere_cloud(direction: np.ndarray, n: int, spread: float, rng) -> np.ndarray:
    z = direction + spread * rng.standard_normal((n, direction.size))
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def test_far_away_point_is_ood_and_gets_uniform_weights() -> None:
    rng = np.random.default_rng(0)
    e = np.eye(4)
    z = np.concatenate([_sphere_cloud(e[a], 80, 0.05, rng) for a in range(3)])
    y = np.repeat(np.arange(3), 80)
    cal = FractalCalibrator.fit(z, y, 3, epsilon=0.05, n_scales=6)
    far = -(e[0] + e[1] + e[2]) / math.sqrt(3)  # 1.78 from every cloud centre > r_max = 1.6
    query = np.stack([_sphere_cloud(e[1], 1, 0.05, rng)[0], far])  # near axis 1 ; far away
    out = cal.log_rho(query)
    assert out["ood"].tolist() == [False, True]
    for mode in ("corr_integral", "knn"):
        c_f = cal.probs(out[mode], out["ood"], mode)
        assert c_f[0].argmax() == 1
        np.testing.assert_allclose(c_f[1], np.full(3, 1 / 3))


def test_knn_mode_gives_a_compact_cloud_its_own_centre() -> None:
    # axis 0 is diffuse, axis 1 compact; a query at the compact cloud's centre belongs to it
    rng = np.random.default_rng(1)
    e = np.eye(6)
    z = np.concatenate([_sphere_cloud(e[0], 200, 0.6, rng), _sphere_cloud(e[1], 200, 0.05, rng)])
    y = np.repeat([0, 1], 200)
    cal = FractalCalibrator.fit(z, y, 2)
    out = cal.log_rho(e[1][None, :])
    assert cal.probs(out["knn"], out["ood"], "knn")[0].argmax() == 1


# --------------------------------------------------------------------------- natural pieces
def test_fisher_rao_distance_to_itself_is_zero_and_to_a_vertex_follows_the_formula() -> None:
    p = np.array([[0.25, 0.25, 0.5]])
    assert fisher_rao_distance(p, p)[0, 0] == pytest.approx(0.0, abs=1e-6)
    vertices = np.eye(3)
    d = fisher_rao_distance(p, vertices)[0]
    np.testing.assert_allclose(d, 2 * np.arccos(np.sqrt(p[0])))  # 2 arccos sqrt(p_j)
    assert d[2] == pytest.approx(math.pi / 2)
    assert fisher_rao_distance(np.eye(3)[:1], np.eye(3)[1:2])[0, 0] == pytest.approx(math.pi)


def test_fisher_rao_barycentre_in_sqrt_space() -> None:
    p = np.array([[0.2, 0.3, 0.5]])
    np.testing.assert_allclose(fisher_rao_barycentre(np.repeat(p, 4, axis=0)), p[0])
    np.testing.assert_allclose(fisher_rao_barycentre(np.eye(3)[:2]), [0.5, 0.5, 0.0])
    with pytest.raises(ValueError, match="empty"):
        fisher_rao_barycentre(np.zeros((0, 3)))


# --------------------------------------------------------------------------- temperature
def test_temperature_scaling_fixes_an_overconfident_set() -> None:
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 1.5, size=(3000, 3))
    p_true = np.exp(true_logits) / np.exp(true_logits).sum(1, keepdims=True)
    labels = np.array([rng.choice(3, p=p) for p in p_true])
    logits = 4.0 * true_logits  # an overconfident model: 4x too sharp
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(4.0, rel=0.15)
    raw = np.exp(logits - logits.max(1, keepdims=True))
    raw /= raw.sum(1, keepdims=True)
    scaled = np.exp(logits / t - (logits / t).max(1, keepdims=True))
    scaled /= scaled.sum(1, keepdims=True)
    assert metrics.nll(scaled, labels) < metrics.nll(raw, labels)
    assert metrics.ece(scaled, labels) < metrics.ece(raw, labels)
    assert metrics.accuracy(scaled, labels) == metrics.accuracy(raw, labels)


def test_fit_scale_bias_recovers_a_known_temperature_and_offset() -> None:
    rng = np.random.default_rng(0)
    scores = 3.0 * rng.standard_normal((5000, 3))
    t_true, b_true = 2.0, np.array([0.0, 1.5, -0.7])
    p = np.exp(scores / t_true + b_true)
    p /= p.sum(1, keepdims=True)
    labels = np.array([rng.choice(3, p=pi) for pi in p])
    t, b = fit_scale_bias(scores, labels)
    assert t == pytest.approx(t_true, rel=0.05)
    np.testing.assert_allclose(b, b_true, atol=0.1)
    assert b[0] == 0.0
    # an axis with no mass (-inf) for a few rows does not break the fit
    scores[:10, 2] = -np.inf
    t2, b2 = fit_scale_bias(scores, labels)
    assert np.isfinite(t2) and np.all(np.isfinite(b2))
    # weights count: the same rows weighted 2x fit the same (T, b)
    t3, b3 = fit_scale_bias(scores, labels, np.full(len(labels), 2.0))
    assert t3 == pytest.approx(t2) and np.allclose(b3, b2)
    with pytest.raises(ValueError, match="must agree"):
        fit_scale_bias(scores, labels[:-1])
    # a separable set has no finite optimum: the fit stops at its bounds instead of diverging
    sep = np.eye(3)[np.repeat(np.arange(3), 5)] * 10.0
    t4, b4 = fit_scale_bias(sep, np.repeat(np.arange(3), 5))
    assert 1e-2 <= t4 <= 1e3 and np.all(np.abs(b4) <= 20.0)


def test_fractal_bias_fits_what_temperature_alone_cannot(tmp_path: Path) -> None:
    """Axis 1's cloud is wider than the others: its density scores sit on another scale."""
    rng = np.random.default_rng(0)
    d, centres, spreads = 8, 1.2 * np.eye(8)[:3], (0.25, 0.7, 0.25)

    def draw(n):
        x = np.concatenate([c + s * rng.standard_normal((n, d))
                            for c, s in zip(centres, spreads, strict=True)])
        return x.astype(np.float32), np.repeat(np.arange(3), n)

    (x_tr, y_tr), (x_va, y_va) = draw(120), draw(60)
    fits = {}
    for on in (False, True):
        cfg = MoCaEConfig(lr=1e-2, max_epochs=40, fractal_bias=on)
        fits[on] = MoCaERouter(cfg).fit(x_tr, y_tr, x_va, y_va)
    for mode in ("corr_integral", "knn"):
        # (T_F, b = 0) is one candidate of the joint fit: it cannot end with a higher NLL
        key = f"fractal_{mode}"
        assert fits[True].val_nll[key] <= fits[False].val_nll[key] + 1e-9
        b = fits[True].fractal.bias[mode]
        assert b.shape == (3,) and b[0] == 0.0 and np.abs(b[1:]).max() > 0.05
    assert fits[False].fractal.bias == {}
    # the offsets travel with the router
    fits[True].save(tmp_path / "r")
    loaded = MoCaERouter.load(tmp_path / "r")
    for mode, b in fits[True].fractal.bias.items():
        np.testing.assert_array_equal(loaded.fractal.bias[mode], b)
    np.testing.assert_array_equal(loaded.predict(x_va).weights, fits[True].predict(x_va).weights)


def test_per_axis_pool_temperature_recovers_each_predicted_axis_own_miscalibration() -> None:
    """Rows predicted as axis 0 are 3x too sharp, axis 1 calibrated, axis 2 2x too soft."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1.5, size=(6000, 3))
    q = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)  # the true distributions
    labels = np.array([rng.choice(3, p=row) for row in q])
    t_true = np.array([1 / 3, 1.0, 2.0])[q.argmax(1)][:, None]  # reported = q^(1/t), renormed
    p = np.exp(np.log(q) / t_true)
    p /= p.sum(1, keepdims=True)
    w = np.ones(len(labels))
    shared = _fit_pool_temperature(p, p, 0.5, labels, w)
    per_axis = _fit_per_axis_pool_temperature(p, p, 0.5, labels, w, shared)
    assert np.ndim(shared) == 0 and per_axis.shape == (3,)
    np.testing.assert_allclose(per_axis, [3.0, 1.0, 0.5], rtol=0.15)
    fixed = {"shared": _pool(p, p, 0.5, shared), "per_axis": _pool(p, p, 0.5, per_axis)}
    assert metrics.nll(fixed["per_axis"], labels) < metrics.nll(fixed["shared"], labels)
    assert metrics.ece(fixed["per_axis"], labels) < metrics.ece(fixed["shared"], labels)
    for out in fixed.values():  # a row's classes share one exponent: the argmax never moves
        np.testing.assert_array_equal(out.argmax(1), p.argmax(1))
        np.testing.assert_allclose(out.sum(1), 1.0)
    # an axis predicted for too few rows keeps the shared temperature
    few = np.concatenate([np.flatnonzero(p.argmax(1) != 2),
                          np.flatnonzero(p.argmax(1) == 2)[: MIN_ROWS_PER_AXIS_T - 1]])
    shared_few = _fit_pool_temperature(p[few], p[few], 0.5, labels[few], w[few])
    t_few = _fit_per_axis_pool_temperature(p[few], p[few], 0.5, labels[few], w[few], shared_few)
    assert t_few[2] == shared_few and t_few[0] == pytest.approx(3.0, rel=0.15)


def _distance_miscalibrated(a0: float, b0: float, n: int = 8000, seed: int = 0):
    """Pool inputs whose sharpness depends on a distance z ~ N(0, 1): the reported p is the true
    q raised to exp(a0 + b0 z), so T_pool(x) = exp(a0 + b0 z) undoes it exactly."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.5, size=(n, 3))
    q = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = np.array([rng.choice(3, p=row) for row in q])
    z = rng.standard_normal(n)
    p = np.exp(np.log(q) * np.exp(a0 + b0 * z)[:, None])
    return p / p.sum(1, keepdims=True), labels, z


def test_distance_pool_temperature_recovers_a_sharpness_that_grows_with_distance() -> None:
    """Too sharp far from the clouds (z > 0), too soft near them: exp(0.2 + 0.5 z)."""
    p, labels, z = _distance_miscalibrated(0.2, 0.5)
    w = np.ones(len(labels))
    shared = _fit_pool_temperature(p, p, 0.5, labels, w)
    a, b = _fit_distance_pool_temperature(p, p, 0.5, labels, w, z, shared)
    assert a == pytest.approx(0.2, abs=0.08) and b == pytest.approx(0.5, abs=0.08)
    out = {"shared": _pool(p, p, 0.5, shared), "distance": _pool(p, p, 0.5, _distance_t((a, b), z))}
    assert metrics.nll(out["distance"], labels) < metrics.nll(out["shared"], labels)
    assert metrics.ece(out["distance"], labels) < metrics.ece(out["shared"], labels)
    for q in out.values():  # one exponent per row: the argmax never moves
        np.testing.assert_array_equal(q.argmax(1), p.argmax(1))
        np.testing.assert_allclose(q.sum(1), 1.0)


def test_distance_pool_temperature_is_flat_when_sharpness_does_not_depend_on_distance() -> None:
    p, labels, z = _distance_miscalibrated(0.4, 0.0)
    w = np.ones(len(labels))
    shared = _fit_pool_temperature(p, p, 0.5, labels, w)
    a, b = _fit_distance_pool_temperature(p, p, 0.5, labels, w, z, shared)
    assert abs(b) < 0.06 and a == pytest.approx(math.log(shared), abs=0.05)
    assert shared == pytest.approx(math.exp(0.4), rel=0.08)
    # an extreme distance cannot push T_pool outside the search range
    t = _distance_t((a, 2.0), np.array([-100.0, 0.0, 100.0]))
    assert t.shape == (3, 1) and t[0, 0] == pytest.approx(0.05) and t[2, 0] == pytest.approx(20.0)


def test_distance_pool_temperature_router_keeps_every_argmax_and_round_trips(
    tmp_path: Path,
) -> None:
    x_tr, y_tr = _clusters(60, seed=0, spread=1.5)
    x_va, y_va = _clusters(40, seed=1, spread=1.5)
    x_te, y_te = _clusters(30, seed=2, spread=1.5)
    x_te[:10] *= 1.6  # some requests farther from the clouds
    fits = {on: MoCaERouter(MoCaEConfig(lr=1e-2, max_epochs=40, pool_temperature_distance=on))
            .fit(x_tr, y_tr, x_va, y_va) for on in (False, True)}
    shared, dist = fits[False], fits[True]
    assert (shared.pool_form, dist.pool_form) == ("shared", "distance")
    assert dist.distance_temperature == shared.distance_temperature  # always fitted
    mu, sd = dist.distance_stats
    assert sd > 0 and mu == pytest.approx(
        float(dist.fractal.log_rho(dist._latent(x_va))["ood_score"].mean()))
    a, b = dist.predict(x_te), shared.predict(x_te)
    np.testing.assert_array_equal(a.axis_idx, b.axis_idx)
    # the per-row temperature is exp(a + b z) of each request's own distance
    ab = dist.distance_ab
    assert ab is not None and dist.pool_t == shared.pool_t
    t_rows = _distance_t(ab, (a.ood_score - mu) / sd)
    rows = dist.ablation_probs(x_te)
    np.testing.assert_allclose(a.weights, _pool(rows["fractal"], rows["natural"],
                                                dist.lambdas[0], t_rows))
    key = f"mocae_fitted_{dist.fractal_mode}"
    assert dist.val_nll[f"{key}_distance"] <= dist.val_nll[key] + 1e-9  # (a, b) may be (T, 0)
    # each router shows the other forms as rows, and they are what the other router routes
    np.testing.assert_array_equal(shared.ablation_probs(x_te)["mocae_distance_pool_t"], a.weights)
    np.testing.assert_array_equal(rows["mocae_shared_pool_t"], b.weights)
    assert {"mocae_shared_pool_t", "mocae_per_axis_pool_t"} <= set(dist.evaluate(x_te, y_te))
    assert "mocae_distance_pool_t" not in dist.evaluate(x_te, y_te)
    dist.save(tmp_path / "r")
    loaded = MoCaERouter.load(tmp_path / "r")
    assert loaded.pool_form == "distance" and loaded.distance_ab == ab
    np.testing.assert_array_equal(loaded.predict(x_te).weights, a.weights)


def test_per_axis_and_distance_pool_temperatures_are_exclusive() -> None:
    with pytest.raises(ValueError, match="exclusive"):
        MoCaEConfig(pool_temperature_per_axis=True, pool_temperature_distance=True)


def test_per_axis_pool_temperature_keeps_every_argmax(tmp_path: Path) -> None:
    x_tr, y_tr = _clusters(60, seed=0, spread=1.5)
    x_va, y_va = _clusters(40, seed=1, spread=1.5)
    x_te, y_te = _clusters(30, seed=2, spread=1.5)
    fits = {on: MoCaERouter(MoCaEConfig(lr=1e-2, max_epochs=40, pool_temperature_per_axis=on))
            .fit(x_tr, y_tr, x_va, y_va) for on in (False, True)}
    shared, per_axis = fits[False], fits[True]
    assert per_axis.fractal_mode == shared.fractal_mode
    assert per_axis.lambda_fitted == shared.lambda_fitted
    # ... because the mode is chosen on the shared-T_pool NLL, not the per-axis one
    assert per_axis.fractal_mode == min(
        ("corr_integral", "knn"), key=lambda m: per_axis.val_nll[f"mocae_fitted_{m}"])
    assert np.shape(per_axis.pool_t) == (3,) and np.ndim(shared.pool_t) == 0
    a, b = shared.predict(x_te), per_axis.predict(x_te)
    np.testing.assert_array_equal(a.axis_idx, b.axis_idx)
    assert not np.allclose(a.confidence, b.confidence)  # ... but the confidences are refitted
    # each group's NLL is minimised over a range that contains the shared T: never higher
    key = f"mocae_fitted_{per_axis.fractal_mode}"
    assert per_axis.val_nll[f"{key}_per_axis"] <= per_axis.val_nll[key] + 1e-9
    assert per_axis.val_nll == shared.val_nll  # both settings are always fitted
    # each router reports the other setting as a row, and it is what the other router routes
    np.testing.assert_array_equal(shared.ablation_probs(x_te)["mocae_per_axis_pool_t"], b.weights)
    np.testing.assert_array_equal(per_axis.ablation_probs(x_te)["mocae_shared_pool_t"], a.weights)
    assert "mocae_per_axis_pool_t" in shared.evaluate(x_te, y_te)
    assert "mocae_shared_pool_t" not in shared.evaluate(x_te, y_te)
    per_axis.save(tmp_path / "r")
    loaded = MoCaERouter.load(tmp_path / "r")
    np.testing.assert_array_equal(loaded.pool_t, per_axis.pool_t)
    np.testing.assert_array_equal(loaded.predict(x_te).weights, b.weights)


def test_router_temperature_does_not_raise_validation_nll(fitted_router) -> None:
    router, _, _ = fitted_router
    # T is fitted on validation NLL, and T = 1 is a candidate: NLL cannot get worse there
    assert router.val_nll["temperature"] <= router.val_nll["temperature"] + 1e-12
    x_va, y_va = _clusters(20, seed=1)
    rows = router.ablation_probs(x_va)
    assert metrics.nll(rows["temperature"], y_va) <= metrics.nll(rows["raw_softmax"], y_va) + 1e-6


# --------------------------------------------------------------------------- dispatch
def test_route_top1_and_threshold() -> None:
    p_hat = np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25], [0.1, 0.1, 0.8]])
    conf = p_hat.max(1)
    ood = np.array([False, False, True])
    assert route(p_hat, conf, ood, "top1").tolist() == [0, 0, 2]
    harmless = AXES.index(Axis.HARMLESSNESS)
    assert route(p_hat, conf, ood, "threshold", 0.5).tolist() == [0, harmless, harmless]
    assert route(p_hat, conf, ood, "threshold", 0.3, fallback="honesty").tolist() == [0, 0, 2]
    assert route(p_hat[0], conf[:1], ood[:1], "threshold", 0.9).tolist() == [harmless]


def test_route_cost_sends_to_harmlessness_once_its_weighted_share_is_largest() -> None:
    help_, harm, hon = (AXES.index(a) for a in (Axis.HELPFULNESS, Axis.HARMLESSNESS,
                                                  Axis.HONESTY))
    p = np.zeros((3, 3))
    p[0, [help_, harm, hon]] = 0.5, 0.3, 0.2  # 2 * 0.3 > 0.5; 1.5 * 0.3 < 0.5
    p[1, [help_, harm, hon]] = 0.2, 0.1, 0.7
    p[2, [help_, harm, hon]] = 0.9, 0.05, 0.05  # out of distribution
    ood = np.array([False, False, True])
    conf = p.max(1)
    assert route(p, conf, ood, "cost", miss_cost={"harmlessness": 2}).tolist() == [harm, hon, harm]
    assert route(p, conf, ood, "cost", miss_cost={Axis.HARMLESSNESS: 1.5}).tolist() == [
        help_, hon, harm]
    # no costs: top1 but for the OOD row, which goes to the fallback
    assert route(p, conf, ood, "cost", fallback="honesty").tolist() == [help_, hon, hon]
    two = [a for a in AXES if a is not Axis.HONESTY]  # a router without the honesty expert
    with pytest.raises(ValueError, match="miss_cost names 'honesty', not one of the router"):
        route(p[:, [AXES.index(a) for a in two]], conf, ood, "cost", axes=two,
              miss_cost={"honesty": 2})


def test_route_cost_is_the_least_expected_cost_of_a_miss() -> None:
    """Brute force: E[cost | e] = sum over y != e of p_y c_y, on random weights and costs."""
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(3), size=500)
    for _ in range(5):
        c = rng.uniform(0.2, 6, size=3)
        chosen = route(p, p.max(1), np.zeros(500, bool), "cost",
                       miss_cost=dict(zip(AXES, c.tolist(), strict=True)))
        expected = np.array([[sum(p[i, y] * c[y] for y in range(3) if y != e) for e in range(3)]
                             for i in range(500)])
        assert (expected[np.arange(500), chosen] <= expected.min(1) + 1e-12).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"policy": "cost", "miss_cost": {"harmlessness": 0}}, "finite number > 0"),
        ({"policy": "cost", "miss_cost": {"harmlessness": float("nan")}}, "finite number > 0"),
        ({"policy": "blend"}, "policy"),
        ({"policy": "threshold", "threshold": 1.5}, "threshold"),
        ({"policy": "threshold", "fallback": "kindness"}, "unknown axis"),
        ({"policy": "threshold", "fallback": Axis.HONESTY, "axes": AXES[:2]}, "columns"),
    ],
)
def test_route_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    p_hat = np.array([[0.7, 0.2, 0.1]])
    with pytest.raises(ValueError, match=match):
        route(p_hat, p_hat.max(1), np.array([False]), **kwargs)


# --------------------------------------------------------------------------- the router
def test_separated_clusters_are_routed_correctly(fitted_router) -> None:
    router, x_te, y_te = fitted_router
    res = router.predict(x_te)
    assert (res.axis_idx == y_te).all()
    assert not res.ood.any()
    rows = router.ablation_probs(x_te)
    for name in (
        "raw_softmax",
        "temperature",
        "fractal_knn",
        "natural",
        "mocae_fixed",
        "mocae_fitted",
        "mocae",
    ):
        assert metrics.accuracy(rows[name], y_te) == 1.0, name
    # the report's "mocae" row is what serving routes with
    np.testing.assert_allclose(rows["mocae"], res.weights, atol=1e-12)


def test_weights_are_a_distribution(fitted_router) -> None:
    router, x_te, _ = fitted_router
    rng = np.random.default_rng(3)
    queries = np.concatenate([x_te, rng.normal(0, 5, size=(40, x_te.shape[1]))])
    res = router.predict(queries)
    assert res.weights.shape == (len(queries), 3)
    assert np.all(res.weights >= 0) and np.all(res.weights <= 1)
    np.testing.assert_allclose(res.weights.sum(axis=1), 1.0, atol=1e-9)
    np.testing.assert_allclose(res.confidence, res.weights.max(axis=1))
    for name, p in router.ablation_probs(queries).items():
        if p.ndim == 2:
            np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-9, err_msg=name)


def test_query_off_every_cluster_is_flagged_ood(fitted_router) -> None:
    router, x_te, _ = fitted_router
    far = router.mean + 5.0 * np.eye(8)[5]  # orthogonal to every cluster direction
    res = router.predict(far)
    assert res.ood.tolist() == [True]
    assert res.ood_score[0] > router.predict(x_te).ood_score.max()
    np.testing.assert_allclose(router.ablation_probs(far[None])["fractal"][0], 1 / 3)


def test_ood_radius_defaults_to_a_validation_quantile() -> None:
    """Without an explicit radius, ~1% of validation codes lie beyond the OOD radius (the 0.99
    quantile of their nearest-centroid distance), fresh in-distribution queries are rarely
    flagged, and a query off every cluster is; ood_quantile=None keeps the largest radius."""
    x_tr, y_tr = _clusters(60, seed=0)
    x_va, y_va = _clusters(100, seed=1)
    router = MoCaERouter(MoCaEConfig(lr=1e-2, max_epochs=30)).fit(x_tr, y_tr, x_va, y_va)
    val = router.predict(x_va)
    assert router.fractal.ood_radius == pytest.approx(np.quantile(val.ood_score, 0.99))
    assert 0 < val.ood.mean() <= 0.02
    x_te, _ = _clusters(100, seed=2)
    assert router.predict(x_te).ood.mean() <= 0.05
    assert router.predict(router.mean + 5.0 * np.eye(8)[5]).ood.tolist() == [True]
    ladder = MoCaERouter(MoCaEConfig(lr=1e-2, max_epochs=30, ood_quantile=None)).fit(
        x_tr, y_tr, x_va, y_va)
    assert ladder.fractal.ood_radius == pytest.approx(ladder.fractal.radii[-1])
    with pytest.raises(ValueError, match="ood_quantile"):
        MoCaEConfig(ood_quantile=1.5)


def test_effective_latent_dim_is_recorded(fitted_router) -> None:
    router, _, _ = fitted_router
    _, meta = router.state()
    assert router.projection.shape == (8, 8)  # min(k=256, d=8, N-1)
    assert meta["latent_dim"] == 8 and meta["feature_dim"] == 8


def test_save_load_round_trip_gives_identical_predictions(fitted_router, tmp_path: Path) -> None:
    router, x_te, _ = fitted_router
    router.save(tmp_path / "router")
    assert sorted(p.name for p in (tmp_path / "router").iterdir()) == [
        "router.json",
        "router.safetensors",
    ]
    loaded = MoCaERouter.load(tmp_path / "router")
    a, b = router.predict(x_te), loaded.predict(x_te)
    np.testing.assert_array_equal(a.weights, b.weights)
    np.testing.assert_array_equal(a.ood, b.ood)
    assert loaded.axes == router.axes and loaded.fractal_mode == router.fractal_mode


def test_a_router_saved_before_fractal_bias_loads_and_routes_as_before(tmp_path: Path) -> None:
    import json

    x_tr, y_tr = _clusters(60, seed=0)
    x_va, y_va = _clusters(20, seed=1)
    old = MoCaERouter(MoCaEConfig(lr=1e-2, max_epochs=30, fractal_bias=False)).fit(
        x_tr, y_tr, x_va, y_va)
    old.save(tmp_path / "r")
    meta_path = tmp_path / "r" / "router.json"
    meta = json.loads(meta_path.read_text())
    del meta["fractal_bias"], meta["config"]["fractal_bias"]  # what earlier versions wrote
    del meta["config"]["pool_temperature_per_axis"], meta["config"]["pool_temperature_distance"]
    del meta["distance_temperature"], meta["distance_stats"]
    meta["pool_temperature"] = {k: v for k, v in meta["pool_temperature"].items()
                                if not k.endswith("_per_axis")}
    meta_path.write_text(json.dumps(meta))
    loaded = MoCaERouter.load(tmp_path / "r")
    assert loaded.config.fractal_bias is False and loaded.fractal.bias == {}
    assert loaded.config.pool_temperature_per_axis is False
    assert loaded.config.pool_temperature_distance is False and loaded.distance_ab is None
    rows = loaded.evaluate(x_va, y_va)
    assert "mocae_per_axis_pool_t" not in rows and "mocae_distance_pool_t" not in rows  # nothing
    x_te, _ = _clusters(30, seed=2)
    np.testing.assert_array_equal(loaded.predict(x_te).weights, old.predict(x_te).weights)


def test_load_refuses_an_unreadable_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read a MoCaE router"):
        MoCaERouter.load(tmp_path)


def test_one_request_routes_well_under_a_millisecond(fitted_router) -> None:
    router, x_te, _ = fitted_router
    router.predict(x_te[0])
    times = []
    for i in range(50):
        t0 = time.perf_counter()
        router.predict(x_te[i % len(x_te)])
        times.append(time.perf_counter() - t0)
    assert np.median(times) < 1e-3  # generous: a loaded 2-core CI box still passes


def test_fit_rejects_bad_sets() -> None:
    x, y = _clusters(10)
    router = MoCaERouter(MoCaEConfig(max_epochs=2))
    with pytest.raises(ValueError, match="no example of axis"):
        router.fit(x[y == 0], y[y == 0], x, y)  # one-axis training set
    with pytest.raises(ValueError, match="y_train must have shape"):
        router.fit(x, y[:-1], x, y)
    with pytest.raises(ValueError, match="feature dimension"):
        router.fit(x, y, x[:, :4], y)
    with pytest.raises(ValueError, match="h_train is empty"):
        router.fit(np.zeros((0, 8)), np.zeros(0, dtype=int), x, y)
    with pytest.raises(RuntimeError, match="not fitted"):
        router.predict(x)


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="calibration_weights"):
        MoCaEConfig(calibration_weights=(0.7, 0.7))
    with pytest.raises(ValueError, match="fractal_mode"):
        MoCaEConfig(fractal_mode="box")  # type: ignore[arg-type]


def test_labels_may_be_axis_names(fitted_router) -> None:
    x, y = _clusters(15, seed=4)
    names = [AXES[i].value for i in y]
    router = MoCaERouter(MoCaEConfig(max_epochs=5, lr=1e-2)).fit(x, names, x, names)
    assert router.evaluate(x, names)["mocae"]["accuracy"] == 1.0
