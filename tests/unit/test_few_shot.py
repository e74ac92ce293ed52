"""The few-shot protocol on synthetic features whose truth is known (no model, no files)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from ehrfm.evaluate.cross_fit import cross_fit_report
from ehrfm.evaluate.features import FeatureMatrix
from ehrfm.evaluate.few_shot import (
    FM_COUNTS_HGB,
    FM_ENS,
    FM_HGB,
    FM_LR,
    Design,
    Ensemble,
    FewShotConfig,
    NotEnoughShots,
    count_designs,
    draw_shots,
    fit_and_score,
    fm_boosted_design,
    fm_design,
    hgb_early_stopping,
    logistic_head,
    paired_differences,
    run_few_shot,
    summarize,
)
from ehrfm.evaluate.few_shot_job import paired_markdown
from ehrfm.metrics import auroc


def synthetic_rows(n: int = 2000, hidden: int = 24, seed: int = 0):
    """Label = feature 0 (plus a little noise) above its 88th percentile; 60% train, 10% val, 30% test."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, hidden)).astype(np.float32)
    y = (x[:, 0] + 0.2 * rng.standard_normal(n)) > 1.2
    split = rng.choice(["train", "val", "test"], size=n, p=[0.6, 0.1, 0.3])
    prs = rng.standard_normal((n, 3)).astype(np.float32)
    has_prs = rng.random(n) < 0.7
    return x, y, split, prs, has_prs


def test_draws_are_deterministic_disjoint_and_from_train_rows_only():
    _, y, split, _, _ = synthetic_rows()
    first = draw_shots(y, split, 16, replicate=2, seed=7)
    assert np.array_equal(first, draw_shots(y, split, 16, replicate=2, seed=7))
    assert not np.array_equal(first, draw_shots(y, split, 16, replicate=2, seed=8))
    assert not np.array_equal(first, draw_shots(y, split, 16, replicate=3, seed=7))
    positives, negatives = first[:16], first[16:]
    assert y[positives].all() and not y[negatives].any()
    assert len(set(first.tolist())) == 32  # no row twice, positives and negatives disjoint
    assert (split[first] == "train").all()


def test_fm_design_lays_out_states_mean_summary_then_prs_columns():
    rng = np.random.default_rng(2)
    hidden, mean, summary = (rng.standard_normal((5, 3)) for _ in range(3))
    prs, has_prs = rng.standard_normal((5, 4)), np.array([1, 0, 1, 1, 0], bool)
    assert fm_design(hidden, None, None).x.shape == (5, 3)
    full = fm_design(hidden, prs, has_prs, mean, summary).x
    assert full.shape == (5, 3 + 3 + 3 + 4 + 1)
    np.testing.assert_array_equal(full[:, 6:9], summary)
    np.testing.assert_array_equal(fm_design(hidden, None, None, None, summary).x[:, 3:], summary)


def test_an_impossible_k_is_reported_not_shrunk():
    x, y, split, prs, has_prs = synthetic_rows(n=400)
    train_positives = int((y & (split == "train")).sum())
    with pytest.raises(NotEnoughShots, match="fewer than k="):
        draw_shots(y, split, train_positives + 1, 0, 0)
    config = FewShotConfig(shots=[1, train_positives + 1], replicates=2, threads=1)
    records = run_few_shot({FM_LR: fm_design(x, prs, has_prs)}, y, split, config)
    assert len(records) == 4  # every (k, replicate) has a record
    impossible = [r for r in records if r["k"] == train_positives + 1]
    assert all(math.isnan(r["auroc"]) and "fewer than k=" in r["reason"] for r in impossible)
    summary = {r["k"]: r for r in summarize(records)}
    assert summary[train_positives + 1]["replicates_fit"] == 0
    assert "fewer than k=" in summary[train_positives + 1]["reason"]
    assert summary[1]["replicates_fit"] == 2 and summary[1]["reason"] is None


def test_fm_head_learns_the_feature_that_sets_the_label_as_k_grows():
    x, y, split, prs, has_prs = synthetic_rows()
    config = FewShotConfig(shots=[1, 4, 32], replicates=5, seed=0, threads=1)
    summary = {r["k"]: r for r in summarize(run_few_shot({FM_LR: fm_design(x, prs, has_prs)}, y, split, config))}
    assert summary[1]["auroc_mean"] < summary[4]["auroc_mean"] < summary[32]["auroc_mean"]
    assert summary[32]["auroc_mean"] > 0.9
    assert summary[32]["auroc_min"] <= summary[32]["auroc_mean"] <= summary[32]["auroc_max"]
    assert summary[32]["auroc_sd"] >= 0 and summary[32]["replicates_fit"] == 5
    assert 0 < summary[32]["auprc_mean"] <= 1


def test_gradient_boosting_fits_two_rows_and_count_designs_follow_the_baselines():
    x, y, split, prs, has_prs = synthetic_rows(n=600, hidden=6)
    counts = sp.csr_matrix(np.abs(np.round(x * 2)))  # count-like columns
    features = FeatureMatrix(counts, [f"c{i}" for i in range(6)], np.zeros(6, bool), np.arange(600), np.arange(600))
    config = FewShotConfig(shots=[1, 8], replicates=2, threads=1)
    designs = count_designs(features, prs, has_prs, split, config)
    assert set(designs) == {"counts_lr", "counts_prs_lr", "counts_hgb", "counts_prs_hgb"}
    assert designs["counts_prs_hgb"].x.shape[1] == designs["counts_hgb"].x.shape[1] + 4  # 3 PRS + has-PRS
    assert set(count_designs(features, None, None, split, config)) == {"counts_lr", "counts_hgb"}
    # values_hgb (opt-in) reads only the last-value (and age) columns of the same dense matrix
    value_cols = np.array([False, True, False, False, True, False])
    with_values = FeatureMatrix(counts, features.names, value_cols, np.arange(600), np.arange(600))
    opted = FewShotConfig(threads=1, models=["counts_hgb", "values_hgb"])
    both = count_designs(with_values, prs, has_prs, split, opted)
    assert set(both) == {"counts_hgb", "values_hgb"}
    np.testing.assert_array_equal(both["values_hgb"].x, both["counts_hgb"].x[:, value_cols])
    rows = draw_shots(y, split, 1, 0, 0)
    unmeasured = np.column_stack([designs["counts_hgb"].x, np.full(600, np.nan)])  # a value never measured
    risk = fit_and_score(Design("hgb", unmeasured), y, rows, np.flatnonzero(split == "test"), config)
    assert np.isfinite(risk).all() and np.ptp(risk) > 0  # two rows, one leaf each: it did split
    records = run_few_shot(designs, y, split, config)
    assert len(records) == 4 * 2 * 2 and all(math.isfinite(r["auroc"]) for r in records)


def test_boosting_stops_early_on_the_cross_fit_folds_but_never_on_the_shots():
    auto, off, on = (FewShotConfig(threads=1, hgb_early_stopping=m) for m in ("auto", "off", "on"))
    assert [hgb_early_stopping(rows, auto) for rows in (2, 256, 10_000, 10_001)] == [False, False, False, True]
    assert not hgb_early_stopping(50_000, off) and hgb_early_stopping(2, on)
    # a weak signal among many noise columns: 100 rounds at rate 0.1 fit the noise
    rng = np.random.default_rng(3)
    x = rng.standard_normal((13_000, 40)).astype(np.float32)
    y = (x[:, 0] + 2.5 * rng.standard_normal(13_000)) > 2.0
    fit, score = np.arange(11_000), np.arange(11_000, 13_000)
    risk = {
        name: fit_and_score(Design("hgb", x), y, fit, score, c)
        for name, c in (("auto", auto), ("off", off), ("on", on))
    }
    np.testing.assert_array_equal(risk["auto"], risk["on"])  # 11,000 fit rows: auto stops early
    assert auroc(y[score], risk["on"]) > auroc(y[score], risk["off"]) + 0.01
    few = np.arange(256)
    np.testing.assert_array_equal(
        fit_and_score(Design("hgb", x), y, few, score, auto), fit_and_score(Design("hgb", x), y, few, score, off)
    )


def test_fm_boosting_heads_read_the_states_and_the_counts_together():
    """Risk needs one state column and one count column: only fm_counts_hgb sees both, and the
    cross-fit report compares every FM head with every count head."""
    rng = np.random.default_rng(5)
    n = 3000
    states = rng.standard_normal((n, 4))
    counts = rng.poisson(1.0, size=(n, 3)).astype(float)
    y = ((states[:, 0] > 0.3) & (counts[:, 0] >= 2)).astype(int)
    split = np.where(np.arange(n) % 3 == 0, "test", "train")
    features = FeatureMatrix(sp.csr_matrix(counts), ["c0", "c1", "c2"], np.zeros(3, bool), np.arange(n), np.arange(n))
    models = [FM_LR, FM_HGB, FM_COUNTS_HGB, "counts_hgb"]
    config = FewShotConfig(shots=[], cross_fit_folds=3, threads=1, models=models)
    fm = fm_design(states, None, None)
    designs = {FM_LR: fm, FM_HGB: Design("hgb", fm.x)}
    designs |= count_designs(features, None, None, split, config, fm.x)
    assert set(designs) == set(models)
    assert designs[FM_COUNTS_HGB].x.shape == (n, 3 + 4) and designs[FM_HGB].kind == "hgb"
    assert FM_COUNTS_HGB not in count_designs(features, None, None, split, config)  # no states given
    report = cross_fit_report(designs, y, np.arange(n), config, n_boot=100)
    auc = {m: report["models"][m]["auroc"] for m in models}
    assert auc[FM_COUNTS_HGB] > 0.97 and auc[FM_COUNTS_HGB] > max(auc[FM_HGB], auc["counts_hgb"]) + 0.05
    assert set(report["comparisons"]) == {f"{m}-counts_hgb" for m in (FM_LR, FM_HGB, FM_COUNTS_HGB)}
    assert report["comparisons"][f"{FM_COUNTS_HGB}-counts_hgb"]["ci"][0] > 0
    defaults = FewShotConfig().models  # opt-in: the boosted FM heads, the ensemble and values_hgb
    assert defaults == [FM_LR, "counts_lr", "counts_prs_lr", "counts_hgb", "counts_prs_hgb"]


def test_lr_heads_can_choose_their_c_inside_the_shots():
    """Noise columns beside one signal and 2 x 32 shots: a weakly regularised head overfits;
    choosing C by folds of the shots (as EHRSHOT does) regularises more. k = 1 keeps the fixed C."""
    rng = np.random.default_rng(8)
    n, noise = 3000, 40
    signal = rng.standard_normal(n)
    x = np.column_stack([signal, rng.standard_normal((n, noise))])
    y = (signal + 0.7 * rng.standard_normal(n) > 1.2).astype(int)
    split = np.where(np.arange(n) % 2 == 0, "test", "train")
    fixed = FewShotConfig(shots=[32], replicates=3, threads=1, lr_c=100.0, lr_cv_folds=0)
    tuned = fixed.model_copy(update={"lr_cv_folds": 3})
    design = {FM_LR: fm_design(x, None, None)}
    mean_auc = {
        name: np.mean([r["auroc"] for r in run_few_shot(design, y, split, config)])
        for name, config in (("fixed", fixed), ("tuned", tuned))
    }
    assert mean_auc["tuned"] > mean_auc["fixed"] + 0.01  # 0.757 against 0.734
    shots = draw_shots(y, split, 32, 0, 0)
    chosen = logistic_head(y[shots], tuned).fit(x[shots], y[shots])
    assert float(np.ravel(chosen.C_)[0]) < tuned.lr_c
    assert type(logistic_head(np.array([0, 1]), tuned)).__name__ == "LogisticRegression"  # k = 1: no folds
    assert type(logistic_head(np.array([0, 1] * 3), tuned)).__name__ == "LogisticRegressionCV"
    with pytest.raises(ValueError, match="lr_cv_folds"):
        FewShotConfig(lr_cv_folds=1)


def test_scaling_on_the_train_rows_keeps_what_two_shots_would_erase():
    """Standardised on its own 2 rows, every column of a k = 1 draw becomes +-1 and the signal
    column weighs no more than noise; scaled on the train rows' features (no labels), it does."""
    x, y, split, prs, has_prs = synthetic_rows()
    design = {FM_LR: fm_design(x, prs, has_prs)}
    mean_auc = {}
    for scale_on in ("shots", "train"):
        config = FewShotConfig(shots=[1], replicates=10, threads=1, scale_on=scale_on)
        mean_auc[scale_on] = np.mean([r["auroc"] for r in run_few_shot(design, y, split, config)])
    assert mean_auc["train"] > mean_auc["shots"] + 0.05  # 0.62 against 0.51


def test_cross_fit_only_needs_no_test_events():
    """shots=[] scores no test rows, so a test split without events (a rare outcome) is no reason to stop."""
    _, y, split, _, _ = synthetic_rows(n=300)
    y = np.where(split == "test", False, y)
    config = FewShotConfig(shots=[], cross_fit_folds=3, threads=1)
    assert run_few_shot({FM_LR: fm_design(np.ones((300, 2)), None, None)}, y, split, config) == []
    with pytest.raises(ValueError, match="both classes"):
        run_few_shot({FM_LR: fm_design(np.ones((300, 2)), None, None)}, y, split, FewShotConfig(shots=[1]))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_a_head_that_cannot_be_fit_is_recorded_with_its_reason():
    _, y, split, _, _ = synthetic_rows(n=300)
    broken = Design("lr", np.full((300, 2), np.nan))  # scikit-learn refuses NaN input
    records = run_few_shot({"counts_lr": broken}, y, split, FewShotConfig(shots=[2], replicates=1, threads=1))
    assert math.isnan(records[0]["auroc"]) and "ValueError" in records[0]["reason"]


def test_config_rejects_unknown_models_and_non_positive_shots():
    with pytest.raises(ValueError):
        FewShotConfig(models=["nope"])
    with pytest.raises(ValueError):
        FewShotConfig(shots=[0, 1])
    assert FewShotConfig(shots=[4, 1, 4]).shots == [1, 4]


def test_paired_differences_take_the_same_draws_and_judge_the_target_by_the_mean():
    """The FM head is 0.02 better than counts_hgb on every draw while the draws' own AUROCs spread
    by 0.1: the paired SE is near 0 and every draw is a win; at k = 8 it loses on average."""
    rng = np.random.default_rng(3)
    records = []
    for k in (4, 8, 128):
        for replicate in range(6):
            base = 0.7 + 0.1 * rng.standard_normal()  # how easy this draw was, shared by both heads
            delta = -0.03 if k == 8 else 0.02
            records.append({"model": "counts_hgb", "k": k, "replicate": replicate, "auroc": base, "auprc": 0.1})
            records.append({"model": FM_LR, "k": k, "replicate": replicate, "auroc": base + delta, "auprc": 0.1})
    records.append({"model": FM_LR, "k": 4, "replicate": 6, "auroc": 0.99, "auprc": 0.1})  # no partner: left out
    records.append({"model": "counts_hgb", "k": 4, "replicate": 7, "auroc": math.nan, "auprc": math.nan})
    rows = {r["k"]: r for r in paired_differences(records)}
    assert set(rows) == {4, 8, 128} and all(r["baseline"] == "counts_hgb" and r["draws"] == 6 for r in rows.values())
    assert rows[4]["auroc_difference_mean"] == pytest.approx(0.02) and rows[4]["auroc_difference_se"] < 1e-9
    assert rows[4]["wins"] == 6 and rows[8]["wins"] == 0
    text = paired_markdown(paired_differences(records))
    assert "| counts_hgb | 8 | -0.030 ± 0.000 | 0/6 |" in text
    assert "above counts_hgb at every k <= 64 (mean over the draws): not met (k = 8)." in text  # k = 128 not judged


def test_value_bins_come_last_and_an_lr_head_reads_them_unscaled():
    rng = np.random.default_rng(5)
    n = 800
    hidden = rng.standard_normal((n, 4)) * 10.0  # states on a scale a head must standardise
    bins = (rng.random((n, 6)) < 0.05).astype(np.float32)  # rare 0/1 indicators
    y = ((hidden[:, 0] / 10.0 + 2.0 * bins[:, 0] + 0.3 * rng.standard_normal(n)) > 1.0).astype(int)
    design = fm_design(hidden, None, None, value_bins=bins)
    assert design.x.shape == (n, 10) and design.unscaled == 6
    np.testing.assert_array_equal(design.x[:, 4:], bins)
    assert fm_design(hidden, None, None, value_bins=np.zeros((n, 0))).unscaled == 0
    config = FewShotConfig(shots=[], cross_fit_folds=2, lr_cv_folds=0, lr_c=0.5, threads=1)
    fit, score = np.arange(0, n, 2), np.arange(1, n, 2)
    got = fit_and_score(design, y, fit, score, config)
    # the same fit by hand: the states standardised on the fit rows, the indicators as they are
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(hidden[fit])
    prepared = lambda rows: np.column_stack([scaler.transform(hidden[rows]), bins[rows]])  # noqa: E731
    by_hand = LogisticRegression(C=0.5, max_iter=config.lr_max_iter).fit(prepared(fit), y[fit])
    np.testing.assert_allclose(got, by_hand.predict_proba(prepared(score))[:, 1], rtol=1e-6)
    everything_scaled = fit_and_score(Design("lr", design.x), y, fit, score, config)
    assert np.abs(everything_scaled - got).max() > 1e-3  # standardising the indicators is a different head
    with pytest.raises(ValueError, match="dense design"):
        Design("lr", sp.csr_matrix(design.x), unscaled=2)
    with pytest.raises(ValueError, match="dense design"):
        Design("lr", design.x, unscaled=11)


def test_the_ensemble_averages_its_members_logits_and_beats_each_where_they_see_different_things():
    """One member sees a linear signal, the other an interaction it alone can use: the mean of
    their logits ranks better than either, and it is exactly that mean (no weight fit on labels)."""
    rng = np.random.default_rng(9)
    n = 6000
    linear, a, b = rng.standard_normal((3, n))
    y = (linear + 1.5 * (a > 0) * (b > 0) + 0.8 * rng.standard_normal(n) > 1.3).astype(int)
    lr = Design("lr", np.column_stack([linear, rng.standard_normal(n)]))
    hgb = Design("hgb", np.column_stack([a, b]))
    config = FewShotConfig(shots=[], cross_fit_folds=3, threads=1, models=[FM_LR, FM_HGB, FM_ENS])
    fit, score = np.arange(4000), np.arange(4000, n)
    members = [fit_and_score(d, y, fit, score, config) for d in (lr, hgb)]
    both = fit_and_score(Ensemble((lr, hgb)), y, fit, score, config)
    logits = [np.log(p / (1 - p)) for p in members]
    np.testing.assert_allclose(np.log(both / (1 - both)), (logits[0] + logits[1]) / 2, rtol=1e-9, atol=1e-9)
    auc = [auroc(y[score], r) for r in (*members, both)]
    assert auc[2] > max(auc[:2]) + 0.01
    report = cross_fit_report({FM_LR: lr, FM_HGB: hgb, FM_ENS: Ensemble((lr, hgb))}, y, np.arange(n), config, 100)
    assert report["models"][FM_ENS]["auroc"] > max(report["models"][m]["auroc"] for m in (FM_LR, FM_HGB))
    with pytest.raises(ValueError, match="at least two"):
        Ensemble((lr,))


def test_the_boosted_fm_head_reads_bin_numbers_in_place_of_the_value_columns():
    rng = np.random.default_rng(4)
    hidden, mean = rng.standard_normal((2, 6, 3))
    value_columns = (rng.random((6, 8)) < 0.3).astype(float)
    lr = fm_design(hidden, None, None, mean, value_bins=value_columns)
    numbers = np.where(rng.random((6, 2)) < 0.5, np.nan, rng.integers(0, 4, (6, 2)))
    boosted = fm_boosted_design(lr, numbers)
    assert boosted.kind == "hgb" and boosted.x.shape == (6, 3 + 3 + 2)
    np.testing.assert_array_equal(boosted.x[:, :6], np.column_stack([hidden, mean]))
    np.testing.assert_array_equal(boosted.x[:, 6:], numbers)  # NaN kept: the trees' missing branch
    assert fm_boosted_design(fm_design(hidden, None, None), None).x.shape == (6, 3)
    with pytest.raises(ValueError, match="bin numbers"):
        fm_boosted_design(lr, None)


def test_bagged_boosting_averages_fits_on_their_own_validation_draws_and_only_when_it_stops_early():
    rng = np.random.default_rng(12)
    x = rng.standard_normal((12_000, 10)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] * x[:, 2] + 2.0 * rng.standard_normal(12_000)) > 2.0
    fit, score = np.arange(11_000), np.arange(11_000, 12_000)
    design = Design("hgb", x)
    single = [fit_and_score(design, y, fit, score, FewShotConfig(threads=1, seed=s, hgb_bags=1)) for s in (3, 4, 5)]
    assert not np.allclose(single[0], single[1])  # each seed stops on its own validation tenth
    bagged = fit_and_score(design, y, fit, score, FewShotConfig(threads=1, seed=3, hgb_bags=3))
    logits = np.mean([np.log(p / (1 - p)) for p in single], axis=0)
    np.testing.assert_allclose(np.log(bagged / (1 - bagged)), logits, rtol=1e-9, atol=1e-9)
    few = np.arange(256)  # no early stopping on shots: one deterministic fit, bagged or not
    plain = FewShotConfig(threads=1, seed=3, hgb_bags=1)
    np.testing.assert_array_equal(
        fit_and_score(design, y, few, score, plain),
        fit_and_score(design, y, few, score, plain.model_copy(update={"hgb_bags": 3})),
    )
