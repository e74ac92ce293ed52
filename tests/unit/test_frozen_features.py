"""Frozen last-token features of label rows from a tiny random decoder (tests/support/finetune_factory.py)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from ehrfm.transfer.frozen_features import label_row_features
from tests.support.finetune_factory import make_labels, write_finetune_data, write_pretrained


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("frozen")
    info = write_finetune_data(root, persons=40)
    labels = make_labels(info, root / "labels.parquet", "token")
    return info, labels, write_pretrained(info, root)


def test_features_are_per_label_row_in_label_order(tiny):
    info, labels, checkpoint = tiny
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


def test_a_rows_features_do_not_depend_on_its_batch(tiny):
    info, labels, checkpoint = tiny
    whole = label_row_features(checkpoint, info.root, labels, batch_size=64).hidden
    small = label_row_features(checkpoint, info.root, labels, batch_size=3).hidden
    np.testing.assert_allclose(small, whole, atol=1e-5)
    alone = label_row_features(checkpoint, info.root, labels.slice(5, 1), batch_size=1).hidden
    np.testing.assert_allclose(alone[0], whole[5], atol=1e-5)
