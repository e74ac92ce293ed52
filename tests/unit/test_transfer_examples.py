"""Prediction windows cut from timelines at label times, and the risk model's directory round trip."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pytest
import torch

from ehrfm.constants import BOS_ID, EOS_ID, PAD_ID
from ehrfm.model.config import ModelConfig
from ehrfm.model.risk import HeadSpec, RiskModel, load_risk_model, predict_logits, save_risk_model
from ehrfm.model.transformer import EHRDecoder
from ehrfm.transfer.examples import example_tensors, prediction_windows

BIRTH = dt.date(2000, 1, 1)
K = 3


def timelines() -> pa.Table:
    # subject 7: BOS a GAP b GAP c EOS at ages 0 0 100 100 200 200 200; subject 9: BOS a EOS at 0 0 50
    a, gap, b, c = 10, 11, 12, 13
    return pa.table(
        {
            "subject_id": pa.array([9, 7], pa.int64()),
            "split": ["val", "train"],
            "birth_date": pa.array([BIRTH, BIRTH], pa.date32()),
            "tokens": pa.array([[BOS_ID, a, EOS_ID], [BOS_ID, a, gap, b, gap, c, EOS_ID]], pa.list_(pa.int32())),
            "ages": pa.array([[0, 0, 50], [0, 0, 100, 100, 200, 200, 200]], pa.list_(pa.int32())),
            "prs": pa.FixedSizeListArray.from_arrays(pa.array([0.0] * K + [1.0, -1.0, 2.0], pa.float32()), K),
            "has_prs": [False, True],
        }
    )


def labels(rows: list[tuple[int, int, bool]]) -> pa.Table:
    base = dt.datetime(2000, 1, 1)
    return pa.table(
        {
            "subject_id": pa.array([r[0] for r in rows], pa.int64()),
            "prediction_time": pa.array([base + dt.timedelta(days=r[1], hours=13) for r in rows], pa.timestamp("us")),
            "boolean_value": [r[2] for r in rows],
        }
    )


def test_window_holds_the_last_tokens_at_or_before_the_prediction_day():
    out = prediction_windows(timelines(), labels([(7, 150, True), (7, 100, False), (9, 60, False)]), context=3)
    assert out["subject_id"].to_pylist() == [7, 7, 9]
    assert out["split"].to_pylist() == ["train", "train", "val"]
    assert out["label"].to_pylist() == [True, False, False]
    # day 150: BOS a GAP b are visible (ages <= 150); context 3 keeps the last three, one dropped
    # subject 9 on day 60, after its last event: the record's closing EOS (age 50) is future
    # information at a prediction time (the record is still open), so no window shows it
    assert out["tokens"].to_pylist() == [[10, 11, 12], [10, 11, 12], [BOS_ID, 10, PAD_ID]]
    assert out["ages"].to_pylist()[0] == [0, 100, 100]
    assert out["length"].to_pylist() == [3, 3, 2]
    assert out["dropped"].to_pylist() == [1, 1, 0]
    assert out["prs"].to_pylist()[0] == [1.0, -1.0, 2.0] and out["has_prs"].to_pylist() == [True, True, False]


def test_short_history_is_right_padded_and_later_events_stay_hidden():
    out = prediction_windows(timelines(), labels([(7, 99, True)]), context=5)
    assert out["tokens"].to_pylist() == [[BOS_ID, 10, PAD_ID, PAD_ID, PAD_ID]]
    assert out["length"].to_pylist() == [2]
    batch = example_tensors(out)
    assert batch["tokens"].shape == (1, 5) and batch["length"].tolist() == [2]
    assert batch["label"].tolist() == [1.0]


def test_labels_of_other_shards_are_skipped_and_times_before_birth_refused():
    assert prediction_windows(timelines(), labels([(8, 10, True)]), context=3).num_rows == 0
    with pytest.raises(ValueError, match="1 of 1 prediction times fall before"):
        prediction_windows(timelines(), labels([(7, -3, True)]), context=3)


def small_decoder(fusion: str = "prefix") -> EHRDecoder:
    torch.manual_seed(0)
    return EHRDecoder(
        ModelConfig(
            vocab_size=16,
            num_pgs=K,
            hidden=16,
            layers=2,
            heads=2,
            context=8,
            fusion=fusion,
            prs_tokens=2,
            prs_hidden=8,
            cross_every=1,
        )
    )


def test_masking_the_prs_changes_only_genotyped_people(tmp_path):
    model = RiskModel(small_decoder()).eval()
    batch = example_tensors(prediction_windows(timelines(), labels([(7, 150, True), (9, 60, False)]), context=4))
    shown, masked = predict_logits(model, batch), predict_logits(model, batch, mask_prs=True)
    assert not torch.allclose(shown[0], masked[0])  # subject 7 has a PRS
    assert torch.equal(shown[1], masked[1])  # subject 9 has none: masking is a no-op


def test_linear_probe_freezes_the_decoder_and_partial_opens_the_top_block():
    model = RiskModel(small_decoder())
    model.freeze_decoder(0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.linear.weight", "head.linear.bias"}
    model.freeze_decoder(1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("decoder.blocks.1.") for n in trainable)
    assert not any(n.startswith("decoder.blocks.0.") for n in trainable)
    assert "decoder.tok_emb.weight" not in trainable


def test_risk_model_directory_round_trips_to_identical_logits(tmp_path):
    model = RiskModel(small_decoder("cross"), head_inputs="last+prs").eval()
    tokenizer = tmp_path / "tok.json"
    tokenizer.write_text("{}")
    spec = HeadSpec(
        task="t2d",
        horizon_days=730,
        context=4,
        pgs_ids=["A", "B", "C"],
        platt=(2.0, -1.0),
        reference_quantiles=list(np.linspace(0.0, 0.5, 101)),
    )
    save_risk_model(tmp_path / "m", model, spec, tokenizer)
    loaded, loaded_spec = load_risk_model(tmp_path / "m")
    batch = example_tensors(prediction_windows(timelines(), labels([(7, 150, True), (9, 60, False)]), context=4))
    assert torch.equal(predict_logits(model, batch), predict_logits(loaded, batch))
    assert loaded_spec == spec
    assert loaded_spec.calibrate(np.array([0.5])) == pytest.approx(0.5)  # sigmoid(2*0.5-1)
    assert loaded_spec.percentile(np.array([0.25])) == pytest.approx(50.0)


def test_last_plus_prs_needs_a_prs_modality():
    with pytest.raises(ValueError, match="needs a decoder with PRS fusion"):
        RiskModel(small_decoder("none"), head_inputs="last+prs")


def test_mean_pooled_head_reads_only_real_tokens_and_round_trips(tmp_path):
    model = RiskModel(small_decoder(), head_inputs="last+mean+prs").eval()
    assert model.head.linear.in_features == 3 * 16  # last, window mean, PRS summary
    batch = example_tensors(prediction_windows(timelines(), labels([(7, 150, True), (9, 60, False)]), context=4))
    padded = dict(batch)  # three more padding positions change nothing: the mean covers real tokens only
    padded["tokens"] = torch.nn.functional.pad(batch["tokens"], (0, 3), value=int(batch["tokens"].max()) + 1)
    padded["ages"] = torch.nn.functional.pad(batch["ages"], (0, 3), value=7)
    torch.testing.assert_close(predict_logits(model, padded), predict_logits(model, batch))
    hidden = model.decoder.encode(batch["tokens"], batch["ages"], batch["prs"], batch["has_prs"])
    n = int(batch["length"][1])
    assert n < batch["tokens"].shape[1]  # this row is right-padded already
    head_in = torch.cat(
        [
            hidden[1, n - 1],
            hidden[1, :n].mean(0),
            model.decoder.prs_summary(batch["prs"][1:2], batch["has_prs"][1:2])[0],
        ]
    )
    torch.testing.assert_close(predict_logits(model, batch)[1], model.head(head_in[None]).squeeze())
    tokenizer = tmp_path / "tok.json"
    tokenizer.write_text("{}")
    save_risk_model(
        tmp_path / "m", model, HeadSpec(task="t2d", horizon_days=730, context=4, head_inputs="last+mean+prs"), tokenizer
    )
    loaded, _ = load_risk_model(tmp_path / "m")
    assert torch.equal(predict_logits(model, batch), predict_logits(loaded, batch))


def test_whole_history_windows_tile_the_record_backwards_from_the_prediction_day():
    # day 150: BOS a GAP b visible; newest window of 3 = a GAP b, the one before = BOS, then nothing
    out = prediction_windows(timelines(), labels([(7, 150, True), (9, 60, False)]), context=3, windows=3)
    assert out["tokens"].to_pylist()[0] == [PAD_ID] * 3 + [BOS_ID, PAD_ID, PAD_ID] + [10, 11, 12]
    assert out["ages"].to_pylist()[0][3:] == [0, 0, 0, 0, 100, 100]
    assert out["window_lengths"].to_pylist() == [[0, 1, 3], [0, 0, 2]]
    assert out["length"].to_pylist() == [3, 2] and out["dropped"].to_pylist() == [0, 0]
    # the newest window is the one-window example's, whatever the count
    single = prediction_windows(timelines(), labels([(7, 150, True), (9, 60, False)]), context=3)
    assert [t[6:] for t in out["tokens"].to_pylist()] == single["tokens"].to_pylist()
    two = prediction_windows(timelines(), labels([(7, 250, True)]), context=2, windows=2)
    # day 250: all 6 tokens before the closing EOS; the last 4 in two windows, 2 dropped
    assert two["tokens"].to_pylist() == [[11, 12, 11, 13]]
    assert two["window_lengths"].to_pylist() == [[2, 2]] and two["dropped"].to_pylist() == [2]
    batch = example_tensors(out)
    assert batch["tokens"].shape == (2, 3, 3) and batch["length"].tolist() == [[0, 1, 3], [0, 0, 2]]


def test_whole_history_mean_pools_every_window_and_an_empty_window_costs_nothing():
    model = RiskModel(small_decoder(), head_inputs="last+mean+prs").eval()
    rows = labels([(7, 150, True), (9, 60, False)])
    many = example_tensors(prediction_windows(timelines(), rows, context=3, windows=3))
    one = example_tensors(prediction_windows(timelines(), rows, context=3))
    logits = predict_logits(model, many)
    # subject 9's history fits its newest window: the same logit as the one-window model, bit for bit
    assert torch.equal(logits[1], predict_logits(model, one)[1])
    # subject 7: last state of the newest window, mean over the 4 real tokens of both non-empty windows
    prs, has_prs = many["prs"][:1], many["has_prs"][:1]
    older = model.decoder.encode(many["tokens"][:1, 1, :1], many["ages"][:1, 1, :1], prs, has_prs)[0]
    newest = model.decoder.encode(many["tokens"][:1, 2], many["ages"][:1, 2], prs, has_prs)[0]
    head_in = torch.cat([newest[2], torch.cat([older, newest]).mean(0), model.decoder.prs_summary(prs, has_prs)[0]])
    torch.testing.assert_close(logits[0], model.head(head_in[None]).squeeze())
    assert not torch.allclose(logits[0], predict_logits(model, one)[0])  # the older window is read
