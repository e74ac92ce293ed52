"""Frozen foundation-model features for label rows: the decoder's final-normed hidden state at
the last real token of each prediction window (`last`) and the mean over the real tokens of every
window read (`mean`, over the whole bounded history with `history_windows` > 1), what the linear
probe's head reads (`model.risk.pooled_states`).

Used by the few-shot protocol (`ehrfm few_shot`), which fits its own heads outside the model on
these features. The windows are cut by `build_examples` (the code the fine-tune uses), the decoder
is loaded as the fine-tune builds it (modality dropout and adapter mode off) and runs in eval mode
under torch.no_grad on CPU, batch by batch. Windows are right-padded to a fixed width and attention
is causal, so a row's features do not depend on which rows share its batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import torch

from ehrfm.model.io import load_model_config, load_state_dict
from ehrfm.model.risk import pooled_states
from ehrfm.model.transformer import EHRDecoder
from ehrfm.model.value_bins import ValueBinReadout
from ehrfm.prs.person import stored_width, vectors_to_numpy
from ehrfm.transfer.examples import build_examples, example_tensors


@dataclass
class LabelRowFeatures:
    """Per label row, in the labels' order: hidden [n, H] float32 (last state), mean [n, H] float32,
    prs [n, K] float32, has_prs [n], split [n] (the timelines' split, the one the fine-tune trains
    and tests on); with `prs_summary_too`, prs_summary [n, H], the decoder's PRS summary (None
    without PRS fusion); with `prs_masked_too`, the two states again with every PRS masked; with a
    value readout, value_bins [n, readout.width], the window's recent lab-value bins one-hot."""

    hidden: np.ndarray
    mean: np.ndarray
    prs: np.ndarray
    has_prs: np.ndarray
    split: np.ndarray
    prs_summary: np.ndarray | None = None
    hidden_prs_masked: np.ndarray | None = None
    mean_prs_masked: np.ndarray | None = None
    value_bins: np.ndarray | None = None


def load_frozen_decoder(checkpoint_dir: str | Path) -> EHRDecoder:
    """The pretrained decoder as the linear probe sees it: no modality dropout, no adapter, eval, fp32, CPU."""
    cfg = dataclasses.replace(load_model_config(checkpoint_dir), modality_dropout=0.0, adapter=False)
    decoder = EHRDecoder(cfg)
    decoder.load_state_dict(load_state_dict(checkpoint_dir))
    return decoder.float().eval()


@torch.no_grad()
def prs_summaries(decoder: EHRDecoder, examples: pa.Table, batch_size: int = 256) -> np.ndarray | None:
    """[n, H] the decoder's PRS summary (mean PRS soft token) per example; None without PRS fusion."""
    if decoder.prs_encoder is None:
        return None
    out = [np.zeros((0, decoder.cfg.hidden), np.float32)]
    for start in range(0, examples.num_rows, batch_size):
        batch = example_tensors(examples.slice(start, batch_size))
        out.append(decoder.prs_summary(batch["prs"], batch["has_prs"]).float().numpy())
    return np.concatenate(out)


@torch.no_grad()
def pooled_features(
    decoder: EHRDecoder, examples: pa.Table, batch_size: int = 256, mask_prs: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """([n, H] hidden state at each example's last real token, [n, H] mean over the real tokens of
    all its windows), the PRS given to the decoder as recorded, or masked for everyone (`mask_prs`:
    the decoder's learned missing-PRS path, as for a person without genotypes)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    lasts, means = [], []
    for start in range(0, examples.num_rows, batch_size):
        batch = example_tensors(examples.slice(start, batch_size))
        prs = batch["prs"] if decoder.prs_encoder is not None else None
        has_prs = batch["has_prs"] if prs is not None else None
        if mask_prs and has_prs is not None:
            has_prs = torch.zeros_like(has_prs)
        last, mean = pooled_states(decoder, batch["tokens"], batch["ages"], batch["length"], prs, has_prs)
        lasts.append(last.float().numpy())
        means.append(mean.float().numpy())
    if not lasts:
        empty = np.zeros((0, decoder.cfg.hidden), np.float32)
        return empty, empty
    return np.concatenate(lasts), np.concatenate(means)


def window_value_bins(readout: ValueBinReadout, examples: pa.Table, batch_size: int = 256) -> np.ndarray:
    """[n, readout.width] recent value bins of each example's (newest) window, batch by batch."""
    parts = [np.zeros((0, readout.width), np.float32)]
    for start in range(0, examples.num_rows, batch_size):
        batch = example_tensors(examples.slice(start, batch_size))
        parts.append(readout.features(batch["tokens"].numpy(), batch["ages"].numpy(), batch["length"].numpy()))
    return np.concatenate(parts)


def label_order(labels: pa.Table, examples: pa.Table) -> np.ndarray:
    """For each label row, the index of its example (build_examples returns them shard by shard).

    Rows are matched on (subject_id, prediction_time, occurrence), so repeated label rows each get
    their own (identical) window."""

    def keyed(table: pa.Table) -> pl.DataFrame:
        frame = pl.from_arrow(table.select(["subject_id", "prediction_time"])).with_row_index("index")
        return frame.with_columns(pl.int_range(pl.len()).over("subject_id", "prediction_time").alias("occurrence"))

    joined = keyed(labels).join(
        keyed(examples), on=["subject_id", "prediction_time", "occurrence"], how="left", maintain_order="left"
    )
    missing = joined["index_right"].null_count()
    if missing:
        raise ValueError(f"{missing} of {labels.num_rows} label rows have no prediction window")
    return joined["index_right"].to_numpy()


def label_row_features(
    checkpoint_dir: str | Path,
    data_dir: str | Path,
    labels: pa.Table,
    context: int | None = None,
    batch_size: int = 256,
    history_windows: int = 1,
    prs_masked_too: bool = False,
    prs_summary_too: bool = False,
    value_readout: ValueBinReadout | None = None,
) -> LabelRowFeatures:
    """Frozen features, PRS and has-PRS for every label row (labels' order), from a checkpoint dir.

    `context` None: the pretrained model's window length (as the fine-tune's default);
    `history_windows`: windows of history read per row (examples.cut_history_at); `prs_masked_too`:
    a second pass with every PRS masked (a decoder without PRS fusion gives the same states);
    `value_readout`: also each window's recent lab-value bins (model/value_bins.py)."""
    decoder = load_frozen_decoder(checkpoint_dir)
    context = context or decoder.cfg.context
    if context > decoder.cfg.context:
        raise ValueError(f"context={context} exceeds the {decoder.cfg.context} tokens the model was pretrained on")
    examples = build_examples(data_dir, labels, context, history_windows)
    examples = examples.take(pa.array(label_order(labels, examples), pa.int64()))
    prs = vectors_to_numpy(examples["prs"], stored_width(examples.schema.field("prs").type))
    last, mean = pooled_features(decoder, examples, batch_size)
    masked_last = masked_mean = None
    if prs_masked_too:
        masked_last, masked_mean = pooled_features(decoder, examples, batch_size, mask_prs=True)
    return LabelRowFeatures(
        hidden=last,
        mean=mean,
        prs_summary=prs_summaries(decoder, examples, batch_size) if prs_summary_too else None,
        hidden_prs_masked=masked_last,
        mean_prs_masked=masked_mean,
        value_bins=None if value_readout is None else window_value_bins(value_readout, examples, batch_size),
        prs=prs,
        has_prs=examples["has_prs"].to_numpy(zero_copy_only=False).astype(bool),
        split=examples["split"].to_numpy(zero_copy_only=False).astype(str),
    )
