"""Frozen last-token features of label rows from a tiny random decoder (tests/support/finetune_factory.py)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from ehrfm.small_counts import is_small
from ehrfm.transfer.frozen_features import label_row_features
from tests.support.finetune_factory import make_labels, write_finetune_data, write_pretrained


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("frozen")
    info = write_finetune_data(root, persons=150)
    labels = make_labels(info, root / "labels.parquet", "token")
    return info, labels, write_pretrained(info, root), root / "labels.parquet"


def test_features_are_per_label_row_in_label_order(tiny):
    info, labels, checkpoint, labels_path = tiny
    features = label_row_features(checkpoint, info.root, labels, batch_size=64)
    n = labels.num_rows
    assert features.hidden.shape == (n, 32) and features.hidden.dtype == np.float32
    assert features.prs.shape == (n, info.num_pgs) and features.has_prs.shape == (n,)
    assert np.isfinite(features.hidden).all()
    # a shuffled label table gives the same rows, shuffled: features follow the labels' order
    order = np.random.default_rng(0).permutation(n)
    shuffled = label_row_features(checkpoint, info.root, labels.take(pa.array(order)), batch_size=64)
    np.testing.assert_allclose(shuffled.hidden, features.hidden[order], atol=1e-5)
    np.testing.assert_array_equal(shuffled.has_prs, features.has_prs[order])


def test_whole_history_features_add_the_older_windows_to_the_mean_only(tiny):
    info, labels, checkpoint, labels_path = tiny
    one = label_row_features(checkpoint, info.root, labels, context=8, batch_size=64)
    three = label_row_features(checkpoint, info.root, labels, context=8, batch_size=64, history_windows=3)
    np.testing.assert_allclose(three.hidden, one.hidden, atol=1e-5)  # the newest window's last state
    moved = np.abs(three.mean - one.mean).max(axis=1) > 1e-4
    assert 0.2 < moved.mean() < 1.0  # rows with history before their newest window, not the others


def test_prs_masked_states_are_those_of_the_missing_prs_path(tiny):
    """The second pass masks every PRS: persons without one keep their states, genotyped persons'
    states move (the tiny decoder has PRS prefix fusion)."""
    info, labels, checkpoint, labels_path = tiny
    features = label_row_features(
        checkpoint, info.root, labels, batch_size=64, prs_masked_too=True, prs_summary_too=True
    )
    plain = label_row_features(checkpoint, info.root, labels, batch_size=64)
    assert plain.hidden_prs_masked is None and plain.prs_summary is None  # only what was asked for
    genotyped = features.has_prs
    assert 0 < genotyped.sum() < len(genotyped)
    np.testing.assert_allclose(features.hidden_prs_masked[~genotyped], features.hidden[~genotyped], atol=1e-5)
    np.testing.assert_allclose(features.mean_prs_masked[~genotyped], features.mean[~genotyped], atol=1e-5)
    moved = np.abs(features.hidden_prs_masked[genotyped] - features.hidden[genotyped]).max(axis=1) > 1e-4
    assert moved.all()
    # the PRS summary: one learned vector for everyone without a PRS, each genotyped person's own
    summary = features.prs_summary
    assert summary.shape == (labels.num_rows, 32)
    np.testing.assert_allclose(summary[~genotyped], np.broadcast_to(summary[~genotyped][0], summary[~genotyped].shape))
    assert np.abs(summary[genotyped] - summary[~genotyped][0]).max(axis=1).min() > 1e-4


def test_a_rows_features_do_not_depend_on_its_batch(tiny):
    info, labels, checkpoint, labels_path = tiny
    whole = label_row_features(checkpoint, info.root, labels, batch_size=64).hidden
    small = label_row_features(checkpoint, info.root, labels, batch_size=3).hidden
    np.testing.assert_allclose(small, whole, atol=1e-5)
    alone = label_row_features(checkpoint, info.root, labels.slice(5, 1), batch_size=1).hidden
    np.testing.assert_allclose(alone[0], whole[5], atol=1e-5)


def test_few_shot_command_writes_aggregates_table_and_plot(tiny, tmp_path, capsys, monkeypatch):
    from ehrfm.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    info, labels, checkpoint, labels_path = tiny
    out = tmp_path / "few"
    argv = ["few_shot", "--pretrained", str(checkpoint.parent), "--data", str(info.root), "--labels"]
    argv += [str(labels_path), "--out", str(out)]
    argv += ["models=[fm_lr,fm_lr_no_prs]", "shots=[1,2,1000]", "replicates=2", "threads=1", "cross_fit_folds=3"]
    argv += ["fm_prs=summary"]
    assert main(argv) == 0
    result = json.loads((out / "few_shot.json").read_text())
    summary = {row["k"]: row for row in result["summary"]}
    assert result["config"]["fm_prs"] == "summary"
    assert set(summary) == {1, 2, 1000} and summary[1]["replicates_fit"] == 2
    assert summary[1000]["replicates_fit"] == 0 and "fewer than k=1000" in summary[1000]["reason"]
    assert summary[1000]["auroc_mean"] is None  # NaN written as null
    assert all(set(r) == {"model", "k", "replicate", "auroc", "auprc", "reason"} for r in result["records"])
    assert all(not is_small(v) or v.startswith("<=") for v in result["counts"].values())
    assert (out / "few_shot_auroc.png").stat().st_size > 1000
    assert (out / "few_shot.csv").read_text().startswith("model,k,")
    printed = capsys.readouterr().out
    assert "| fm_lr | 1 |" in printed and "Cross-fitted heads on all label rows (3 person folds)" in printed
    cross = result["cross_fit"]
    assert set(cross["models"]) == {"fm_lr", "fm_lr_no_prs"} and cross["comparisons"] == {}  # no count heads
    assert set(cross["prs_gains"]["gains"]) == {"fm_lr"} and "targets" not in cross["prs_gains"]  # no boosting pair
    assert 0.0 <= cross["models"]["fm_lr"]["auroc_ci"][0] <= cross["models"]["fm_lr"]["auroc"] <= 1.0
    assert "rows" not in cross and cross["published"]["rows"] == str(labels.num_rows)  # published form only


def test_cross_fit_only_command_reads_zero_shot_scores_of_every_label_row(tiny, tmp_path, capsys, monkeypatch):
    """`shots=[] zero_shot=[...]`: the scores join the cross-fit as a head of their own; a file that
    leaves label rows unscored is refused before the decoder runs."""
    import pyarrow.parquet as pq

    from ehrfm.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    info, labels, checkpoint, labels_path = tiny
    rng = np.random.default_rng(0)
    scores = pa.table(
        {
            "subject_id": labels["subject_id"],
            "prediction_time": labels["prediction_time"],
            "zs_path_probability": rng.uniform(0.01, 0.2, labels.num_rows),
        }
    )
    half = labels.num_rows // 2
    (tmp_path / "a").mkdir()
    pq.write_table(scores.slice(0, half), tmp_path / "a" / "zero_shot.parquet")  # a run directory
    pq.write_table(scores.slice(half), tmp_path / "b.parquet")  # or the file itself
    argv = ["few_shot", "--pretrained", str(checkpoint.parent), "--data", str(info.root), "--labels"]
    argv += [str(labels_path), "--out", str(tmp_path / "out"), "models=[fm_lr]", "shots=[]", "threads=1"]
    argv += ["cross_fit_folds=3", f"zero_shot=[{tmp_path / 'a'},{tmp_path / 'b.parquet'}]"]
    assert main(argv) == 0
    result = json.loads((tmp_path / "out" / "few_shot.json").read_text())
    cross = result["cross_fit"]
    assert set(cross["models"]) == {"fm_lr", "zero_shot"} and cross["zero_shot"]["head"] == "fm_lr"
    assert cross["zero_shot"]["met"] is False  # far fewer than 300 events: never judged met
    printed = capsys.readouterr().out
    assert printed.startswith("# Cross-fit only") and "fm_lr - zero_shot:" in printed and "not judged" in printed
    import ehrfm.evaluate.few_shot_job as job

    def decoder_must_not_run(*args, **kwargs):
        raise AssertionError("the decoder ran before the zero-shot files were checked")

    monkeypatch.setattr(job, "label_row_features", decoder_must_not_run)
    with pytest.raises(ValueError, match=rf"zero_shot.parquet: scores {half} of {labels.num_rows} label rows"):
        main(argv[:-1] + [f"zero_shot=[{tmp_path / 'a'}]"])


def test_few_shot_value_bins_reach_the_fm_head_from_the_datasets_tokenizer(tiny, tmp_path, monkeypatch):
    """`fm_value_codes=N`: the job reads the data directory's tokenizer, and the FM head's fit changes."""
    from ehrfm.cli import main
    from ehrfm.preprocess.tokenizer import Tokenizer
    from ehrfm.transfer.value_bins import readout_from_tokenizer

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    info, labels, checkpoint, labels_path = tiny
    readout = readout_from_tokenizer(Tokenizer.load(info.root / "tokenizer.json"), 5)
    features = label_row_features(checkpoint, info.root, labels, batch_size=64, value_readout=readout)
    assert features.value_bins.shape == (labels.num_rows, readout.width)
    assert 0 < features.value_bins.any(axis=1).mean() < 1  # the factory's tokens hold some code-then-bin pairs

    def cross_fitted_auroc(out, *extra, models="models=[fm_lr]"):
        argv = ["few_shot", "--pretrained", str(checkpoint.parent), "--data", str(info.root), "--labels"]
        argv += [str(labels_path), "--out", str(out), models, "shots=[]", "threads=1", "cross_fit_folds=3"]
        assert main(argv + list(extra)) == 0
        result = json.loads((out / "few_shot.json").read_text())
        return result["config"]["fm_value_codes"], result["cross_fit"]["models"]["fm_lr"]["auroc"]

    plain = cross_fitted_auroc(tmp_path / "a", "fm_value_codes=0")
    with_values = cross_fitted_auroc(tmp_path / "b", "fm_value_codes=5")
    assert plain[0] == 0 and with_values[0] == 5
    assert plain[1] != with_values[1]
    assert json.loads((tmp_path / "b" / "few_shot.json").read_text())["value_readout_codes"] == 5
    # the encoding setting reaches the readout the job builds, and the job runs with it
    from ehrfm.evaluate.few_shot import FewShotConfig
    from ehrfm.evaluate.few_shot_job import value_readout

    cumulative = value_readout(info.root, FewShotConfig(fm_value_codes=5, fm_value_encoding="cumulative"))
    assert cumulative.encoding == "cumulative" and cumulative.codes == readout.codes
    assert value_readout(info.root, FewShotConfig(fm_value_codes=5)).encoding == "one_hot"  # the default
    heads = "models=[fm_lr,fm_hgb,fm_ens,fm_lr_no_prs,fm_ens_no_prs]"  # the boosted head and ensembles ride along
    assert cross_fitted_auroc(tmp_path / "c", "fm_value_codes=5", "fm_value_encoding=cumulative", models=heads)[0] == 5
    result = json.loads((tmp_path / "c" / "few_shot.json").read_text())
    assert result["config"]["fm_value_encoding"] == "cumulative" and result["value_readout_codes"] == 5
    fitted = result["cross_fit"]["models"]
    assert set(fitted) == {"fm_lr", "fm_hgb", "fm_ens", "fm_lr_no_prs", "fm_ens_no_prs"}
    assert all(0 < fitted[m]["auroc"] < 1 for m in fitted)
    assert len({fitted[m]["auroc"] for m in ("fm_lr", "fm_hgb", "fm_ens")}) == 3  # three different heads
    assert set(result["cross_fit"]["prs_gains"]["gains"]) == {"fm_lr", "fm_ens"}


def test_few_shot_reads_the_states_alone_when_the_tokenizer_binned_no_values(tiny, tmp_path, capsys, monkeypatch):
    import shutil

    from ehrfm.cli import main
    from ehrfm.preprocess.tokenizer import Tokenizer, build_tokenizer

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    info, labels, checkpoint, labels_path = tiny
    data = tmp_path / "data"
    shutil.copytree(info.root, data)
    binned = Tokenizer.load(info.root / "tokenizer.json")
    unbinned = build_tokenizer(
        binned.code_counts, {}, min_count=1, n_bins=10, min_values_for_bins=20, gap_edges_days=[1]
    )
    assert unbinned.tokens == binned.tokens and not unbinned.value_edges  # the same ids, no code with bins
    unbinned.save(data / "tokenizer.json")
    argv = ["few_shot", "--pretrained", str(checkpoint.parent), "--data", str(data), "--labels", str(labels_path)]
    argv += ["--out", str(tmp_path / "out"), "models=[fm_lr]", "shots=[2]", "replicates=1", "threads=1"]
    assert main(argv) == 0  # the default asks for 40 codes
    result = json.loads((tmp_path / "out" / "few_shot.json").read_text())
    assert result["config"]["fm_value_codes"] == 40 and result["value_readout_codes"] == 0
    assert "no code has value bins, so the head reads the states alone" in capsys.readouterr().out
