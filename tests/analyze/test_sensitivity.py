"""The pure parts: streaming error statistics, SQNR delta rules, scores and rank correlation."""
import math
import warnings

import numpy as np
import pytest

from quantune_edge.analyze.sensitivity import IDEAL_INT8_SQNR_DB, SCORES, LayerMetrics, ranking, score, spearman, sqnr_delta
from quantune_edge.common.metrics import ErrorStats, paired_top1, pooled_sqnr_db, top1_correct


def test_error_stats_match_numpy_over_several_samples():
    rng = np.random.default_rng(0)
    refs = [rng.normal(size=(3, 5)) for _ in range(4)]
    approxs = [r + rng.normal(0, 0.1, r.shape) for r in refs]
    stats = ErrorStats()
    for r, a in zip(refs, approxs):
        assert stats.add(r, a)
    ref, approx = np.stack(refs), np.stack(approxs)
    assert stats.count == ref.size
    assert stats.mse == pytest.approx(np.mean((ref - approx) ** 2), rel=1e-5)
    assert stats.sqnr_db == pytest.approx(10 * np.log10(np.sum(ref**2) / np.sum((ref - approx) ** 2)), abs=1e-4)
    assert stats.nmse == pytest.approx(np.mean((ref - approx) ** 2) / np.var(ref), rel=1e-4)
    assert stats.max_abs == pytest.approx(np.max(np.abs(ref - approx)), rel=1e-6)


def test_zero_variance_and_exact_tensors():
    exact = ErrorStats()
    exact.add(np.full(10, 3.0), np.full(10, 3.0))
    assert exact.sqnr_db == math.inf and exact.nmse == 0.0 and exact.variance == 0.0
    constant_but_wrong = ErrorStats()
    constant_but_wrong.add(np.full(10, 3.0), np.full(10, 2.5))
    assert math.isfinite(constant_but_wrong.sqnr_db) and constant_but_wrong.nmse == math.inf
    zeros = ErrorStats()
    zeros.add(np.zeros(4), np.ones(4))
    assert zeros.sqnr_db == -math.inf
    assert pooled_sqnr_db([exact, constant_but_wrong]) == pytest.approx(10 * np.log10(180 / 2.5), abs=1e-6)


def test_nan_and_inf_are_refused_not_accumulated():
    stats = ErrorStats()
    assert not stats.add(np.array([1.0, np.nan]), np.array([1.0, 1.0]))
    assert not stats.add(np.array([1.0, 2.0]), np.array([np.inf, 1.0]))
    assert stats.count == 0
    big = ErrorStats()  # finite values whose float32 squares overflow are still accepted
    assert big.add(np.array([3e20, 1.0]), np.array([3e20, 0.0])) and big.noise == pytest.approx(1.0)
    huge = ErrorStats()  # near float32's limit: sums and differences overflow float32, not float64
    ref, approx = np.array([3e38, 3e38, -1e38], np.float32), np.array([-3e38, 3e38, -1e38], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert huge.add(ref, approx)
    assert huge.total == pytest.approx(float(np.sum(ref, dtype=np.float64)), rel=1e-6)
    assert huge.max_abs == pytest.approx(6e38, rel=1e-6) and math.isfinite(huge.variance)


def test_sqnr_delta_rules():
    assert sqnr_delta(30.0, 20.0) == 10.0
    assert sqnr_delta(20.0, 25.0) == -5.0  # a layer can also average noise away
    assert sqnr_delta(math.inf, 30.0) == pytest.approx(IDEAL_INT8_SQNR_DB - 30.0)
    assert sqnr_delta(math.inf, math.inf) == 0.0 and sqnr_delta(12.0, math.inf) == 0.0


def _layer(i, **kw):
    base = dict(index=i, name=f"l{i}", short_name=f"l{i}", op_type="CONV_2D", params=10, macs=100, fused_activation=None,
                act_sqnr_db=20.0, act_mse=0.1, act_nmse=0.01, act_max_abs_err=0.5, act_scale=0.1, act_zero_point=0,
                input_sqnr_db=25.0, sqnr_delta_db=5.0, weight_sqnr_db=40.0, weight_mse=1e-4, local_sqnr_db=30.0,
                local_rmse_lsb=0.5, output_share=0.02)
    base.update(kw)
    return LayerMetrics(**base)


def test_every_score_ranks_the_obviously_bad_layer_first():
    layers = [_layer(0), _layer(1, act_sqnr_db=5.0, act_mse=2.0, act_nmse=0.5, sqnr_delta_db=20.0, weight_sqnr_db=10.0, weight_mse=1e-2,
                     local_rmse_lsb=6.0, output_share=0.6),
              _layer(2, op_type="ADD", weight_sqnr_db=None, weight_mse=None, sqnr_delta_db=math.inf)]
    for metric in SCORES:
        if metric == "sqnr_delta":
            assert ranking(layers, metric)[0] == 2  # infinite delta: finite ranks still defined
            assert np.all(np.isfinite(score(layers, metric)))
        else:
            assert ranking(layers, metric)[0] == 1, metric
    assert ranking(layers, "weight_sqnr")[-1] == 2  # layers without weights rank last on weight metrics


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_oracle_repeatability_and_its_ceiling():
    from quantune_edge.analyze.oracle import repeatability

    same = repeatability([(0.1, 0.2), (0.5, 0.9), (0.3, 0.4), (float("inf"), 0.0)], 16)
    assert same["spearman_between_halves"] == pytest.approx(1.0)  # the non-finite pair is left out
    assert same["reliability"] == pytest.approx(1.0) and same["rho_ceiling"] == pytest.approx(1.0)
    half = repeatability([(1, 1), (2, 3), (3, 2), (4, 4), (5, 5)], 16)
    r = half["spearman_between_halves"]
    assert r == pytest.approx(0.9)
    assert half["reliability"] == pytest.approx(2 * r / (1 + r))  # Spearman-Brown: the full sample set is twice a half
    assert half["rho_ceiling"] == pytest.approx(math.sqrt(half["reliability"]))
    reversed_ = repeatability([(1, 3), (2, 2), (3, 1)], 16)
    assert reversed_["spearman_between_halves"] == pytest.approx(-1.0) and math.isnan(reversed_["rho_ceiling"])
    assert math.isnan(repeatability([(1, 1), (2, 2), (3, 3)], 1)["spearman_between_halves"])  # one sample per half: no ranking


def test_paired_top1_counts_the_images_one_model_alone_gets_right():
    outputs = np.eye(4)[[0, 1, 2, 3, 0, 1]]  # top-1 indices 0 1 2 3 0 1
    a = top1_correct(outputs, np.array([0, 1, 2, -1, 1, 1]))
    np.testing.assert_array_equal(a, [True, True, True, False, True])  # the unlabelled sample is dropped
    b = np.array([True, False, False, True, True])
    r = paired_top1(a, b)
    assert (r["wins"], r["losses"], r["net"]) == (2, 1, 1)
    assert r["p_value"] == 1.0  # 2 vs 1 of 3 discordant: 2·P(X ≤ 1), X ~ Bin(3, ½) = 2·4/8
    # paired differences +1, +1, −1, 0, 0: mean 0.2, variance 3/5 − 0.04 = 0.56, half-width 1.96·√(0.56/5)
    assert r["difference"] == pytest.approx(0.2)
    assert r["difference_ci95"] == pytest.approx([0.2 - 1.96 * math.sqrt(0.112), 0.2 + 1.96 * math.sqrt(0.112)])
    lopsided = paired_top1(np.ones(10, bool), np.zeros(10, bool))
    assert lopsided["wins"] == 10 and lopsided["p_value"] == 2 / 2**10
    assert paired_top1(a, a) == {"wins": 0, "losses": 0, "net": 0, "p_value": 1.0, "difference": 0.0, "difference_ci95": [0.0, 0.0]}
    with pytest.raises(ValueError, match="same images"):
        paired_top1(a, b[:3])
