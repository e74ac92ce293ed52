"""Packed windows: the bin packer, and packed batches that hold exactly the unpacked batch's
(input, target, age) pairs per person, at the positions the unpacked model gives them."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from ehrfm.constants import PAD_ID
from ehrfm.training.packing import first_fit_decreasing, pack_windows
from ehrfm.training.windows import WindowCollate
from tests.support.timeline_factory import write_timelines


def test_first_fit_decreasing_places_largest_first_ties_by_order():
    rows, offsets, count = first_fit_decreasing(np.array([3, 6, 4, 4, 0, 2]), capacity=10)
    # order: 6 (item 1), 4 (item 2), 4 (item 3), 3 (item 0), 2 (item 5); item 4 is empty
    assert count == 2
    assert rows.tolist() == [1, 0, 0, 1, -1, 1]
    assert offsets.tolist() == [4, 0, 6, 0, 0, 7]
    with pytest.raises(ValueError, match=r"item sizes must be in \[0, 10\]"):
        first_fit_decreasing(np.array([11]), capacity=10)


def test_first_fit_decreasing_never_overlaps_or_overflows():
    sizes = np.random.default_rng(0).integers(0, 50, size=200)
    rows, offsets, count = first_fit_decreasing(sizes, capacity=50)
    used = np.zeros((count, 50), dtype=int)
    for row, offset, size in zip(rows, offsets, sizes, strict=True):
        if size:
            used[row, offset : offset + size] += 1
    assert used.max() == 1 and used.sum() == sizes.sum()
    assert count == int(np.ceil(sizes.sum() / 50)) or count <= 11 / 9 * sizes.sum() / 50 + 1


def _pairs_by_person(packed: dict, prefix: int) -> dict[int, list[tuple[int, int, int, int]]]:
    """(position, input, target, age) of every input position, per person, read from packed rows."""
    found: dict[int, list] = {}
    for r, c in zip(*np.nonzero(packed["segment"] >= 0), strict=True):
        person = int(packed["segment"][r, c])
        if packed["prefix_slot"][r, c] >= 0:
            assert packed["positions"][r, c] == packed["prefix_slot"][r, c] < prefix
            assert packed["tokens"][r, c] == PAD_ID and packed["targets"][r, c] == PAD_ID
            continue
        entry = tuple(int(packed[k][r, c]) for k in ("positions", "tokens", "targets", "ages"))
        found.setdefault(person, []).append(entry)
    return found


@pytest.mark.parametrize("prefix", [0, 4])
def test_packed_rows_hold_the_unpacked_pairs(tmp_path, prefix):
    info = write_timelines(tmp_path, persons=60, num_pgs=8, vocab_size=40, files=1, max_events=60)
    table = pq.read_table(next((info.root / "timelines").glob("*.parquet")))
    context = 128
    plain = WindowCollate(context, 8, seed=3, epoch=1)(table)
    packed = WindowCollate(context, 8, seed=3, epoch=1, pack_prefix=prefix)(table)
    rows = packed["tokens"].shape[0]
    assert packed["tokens"].shape == (rows, prefix + context)
    for key in ("prs", "has_prs", "subject_id"):
        assert packed[key].equal(plain[key])
    # same (input, target) pairs: every real target of the unpacked batch, at the unpacked position
    assert int((packed["targets"] != PAD_ID).sum()) == int((plain["targets"] != PAD_ID).sum())
    arrays = {k: v.numpy() for k, v in packed.items()}
    found = _pairs_by_person(arrays, prefix)
    for person in range(len(plain["tokens"])):
        real = (plain["targets"][person] != PAD_ID).numpy()
        expected = [
            (
                prefix + t,
                int(plain["tokens"][person, t]),
                int(plain["targets"][person, t]),
                int(plain["ages"][person, t]),
            )
            for t in np.flatnonzero(real)
        ]
        assert sorted(found.get(person, [])) == expected
    # padding is padding everywhere; packing fills rows far better than one window per row
    pad = arrays["segment"] < 0
    assert (arrays["tokens"][pad] == PAD_ID).all() and (arrays["positions"][pad] == 0).all()
    assert (arrays["prefix_slot"][pad] == -1).all() and (arrays["ages"][pad] == 0).all()
    assert rows < len(plain["tokens"]) / 2
    # a pure function of the batch: the same table packs to the same tensors
    again = WindowCollate(context, 8, seed=3, epoch=1, pack_prefix=prefix)(table)
    assert all(again[k].equal(packed[k]) for k in packed)


def test_segments_are_contiguous_and_start_with_their_prefix():
    token_rows = np.arange(3 * 9).reshape(3, 9) + 10
    age_rows = token_rows * 2
    packed = pack_windows(token_rows, age_rows, np.array([9, 3, 1]), prefix_length=2, context=8)
    # person 0: 2 + 8 = 10 positions (a full row); person 1: 2 + 2; person 2 has no target: not placed
    assert packed["tokens"].shape == (2, 10)
    assert packed["segment"].tolist() == [[0] * 10, [1] * 4 + [-1] * 6]
    assert packed["positions"][1].tolist() == [0, 1, 2, 3] + [0] * 6
    assert packed["prefix_slot"][1].tolist() == [0, 1] + [-1] * 8
    assert packed["tokens"][1, :4].tolist() == [PAD_ID, PAD_ID, 19, 20]
    assert packed["targets"][1, :4].tolist() == [PAD_ID, PAD_ID, 20, 21]
    assert packed["ages"][1, :4].tolist() == [0, 0, 38, 40]


def test_performance_section_defaults_and_switches():
    from pydantic import ValidationError

    from ehrfm.training.config import PretrainConfig

    perf = PretrainConfig().performance
    assert perf.packing and perf.fused_loss and perf.loss_chunk() == 4096
    assert perf.compiled(use_gpu=True) and not perf.compiled(use_gpu=False)  # None: on with GPUs only
    off = PretrainConfig.model_validate({"performance": {"fused_loss": False, "compile": False}}).performance
    assert off.loss_chunk() == 0 and not off.compiled(use_gpu=True)
    with pytest.raises(ValidationError, match="pack_rows"):
        PretrainConfig.model_validate({"performance": {"pack_rows": 8}})
