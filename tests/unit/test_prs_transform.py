"""PRS z-scoring on the train split and ancestry adjustment (mean and variance regressed on PCs)."""

from __future__ import annotations

import numpy as np
import pytest

from ehrfm.prs.transform import PrsTransform, fit_prs_transform


def test_plain_z_scores_use_train_persons_only() -> None:
    rng = np.random.default_rng(0)
    values = rng.normal(10.0, 2.0, size=(2000, 3))
    train = rng.random(2000) < 0.7
    transform = fit_prs_transform(values, train, ["A", "B", "C"])
    z = transform.apply(values)
    assert np.allclose(z[train].mean(axis=0), 0.0, atol=1e-5) and np.allclose(z[train].std(axis=0), 1.0, atol=1e-5)
    shifted = values.copy()
    shifted[~train] += 100.0  # what val/test persons hold must not change the fit
    again = fit_prs_transform(shifted, train, ["A", "B", "C"])
    assert np.array_equal(again.mean, transform.mean) and np.array_equal(again.sd, transform.sd)
    assert z.dtype == np.float32


def test_missing_values_stay_missing_and_constant_scores_do_not_divide_by_zero() -> None:
    values = np.array([[1.0, 5.0], [2.0, 5.0], [np.nan, 5.0], [4.0, 5.0]])
    transform = fit_prs_transform(values, np.ones(4, bool), ["A", "B"])
    z = transform.apply(values)
    assert np.isnan(z[2, 0]) and np.all(z[:, 1] == 0.0) and transform.summary["constant_pgs"] == 1


def test_ancestry_adjustment_removes_pc_driven_mean_and_variance() -> None:
    rng = np.random.default_rng(1)
    n = 20_000
    pcs = rng.normal(size=(n, 2))
    sd = np.exp(0.4 * pcs[:, 0])  # the spread grows with PC1
    values = (3.0 + 2.0 * pcs[:, 0] - 1.0 * pcs[:, 1] + sd * rng.normal(size=n))[:, None]
    train = rng.random(n) < 0.8
    transform = fit_prs_transform(values, train, ["PGS1"], pcs)
    z = transform.apply(values, pcs)[:, 0].astype(np.float64)
    plain = (values[:, 0] - values[train, 0].mean()) / values[train, 0].std()
    assert abs(np.corrcoef(plain, pcs[:, 0])[0, 1]) > 0.5  # the raw score carries ancestry
    assert abs(np.corrcoef(z, pcs[:, 0])[0, 1]) < 0.02 and abs(np.corrcoef(z, pcs[:, 1])[0, 1]) < 0.02
    low, high = pcs[:, 0] < -1, pcs[:, 0] > 1
    assert z[low].std() == pytest.approx(1.0, abs=0.06) and z[high].std() == pytest.approx(1.0, abs=0.06)
    assert transform.log_var_coef[0, 1] == pytest.approx(0.8 * pcs[train, 0].std(), abs=0.05)  # log var = 0.8 * PC1
    # persons with scores but no PCs fall back to the plain transform
    no_pcs = pcs.copy()
    no_pcs[:5] = np.nan
    fallback = transform.apply(values[:5], no_pcs[:5])
    assert np.allclose(fallback, (values[:5] - transform.mean) / transform.sd, atol=1e-5)


def test_round_trip_through_json(tmp_path) -> None:
    rng = np.random.default_rng(2)
    pcs = rng.normal(size=(300, 3))
    values = rng.normal(size=(300, 2)) + pcs[:, :1]
    transform = fit_prs_transform(values, np.ones(300, bool), ["A", "B"], pcs)
    transform.save(tmp_path / "t.json")
    loaded = PrsTransform.from_dict(__import__("json").loads((tmp_path / "t.json").read_text()))
    assert np.array_equal(loaded.apply(values, pcs), transform.apply(values, pcs))


def test_too_few_reference_persons_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="at least 3 train persons"):
        fit_prs_transform(np.ones((5, 1)), np.array([True, True, False, False, False]), ["A"])


def test_prs_tables_round_trip_through_parquet_with_and_without_scores(tmp_path) -> None:
    import pyarrow.parquet as pq

    from ehrfm.prs.person import prs_arrow, vectors_to_numpy

    ids = np.array([3, 7], dtype=np.int64)
    for k in (2, 0):  # k = 0: no PRS given; parquet cannot hold zero-width fixed-size lists
        values = np.arange(2 * k, dtype=np.float32).reshape(2, k)
        pq.write_table(prs_arrow(ids, values, np.array([True, False])), tmp_path / f"k{k}.parquet")
        back = pq.read_table(tmp_path / f"k{k}.parquet")
        assert np.array_equal(vectors_to_numpy(back["prs"], k), values)
        assert back["has_prs"].to_pylist() == [True, False] and back["subject_id"].to_pylist() == [3, 7]
