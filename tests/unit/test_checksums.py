"""Weight checksums (ehrfm.mlops.checksums): the manifest and digest of a risk-model directory and the
refusal that names the files that differ, never their contents."""

from __future__ import annotations

import hashlib

import pytest

from ehrfm.mlops import checksums


@pytest.fixture
def model_dir(tmp_path):
    directory = tmp_path / "risk_model"
    (directory / "sub").mkdir(parents=True)
    (directory / "model.pt").write_bytes(b"weights")
    (directory / "head.json").write_text('{"secret": "patient 123"}')
    (directory / "sub" / "tokenizer.json").write_text("{}")
    return directory


def test_manifest_and_digest_follow_sha256sum(model_dir):
    files = checksums.manifest(model_dir)
    assert files == {
        "head.json": hashlib.sha256(b'{"secret": "patient 123"}').hexdigest(),
        "model.pt": hashlib.sha256(b"weights").hexdigest(),
        "sub/tokenizer.json": hashlib.sha256(b"{}").hexdigest(),
    }
    lines = "".join(f"{files[n]}  {n}\n" for n in sorted(files))
    assert checksums.digest(files) == hashlib.sha256(lines.encode()).hexdigest()
    recorded = checksums.tags(files)
    assert checksums.verify(model_dir, recorded, "m version 1") == recorded[checksums.DIGEST_TAG]


def test_changed_missing_and_added_files_are_named_without_contents(model_dir):
    recorded = checksums.tags(checksums.manifest(model_dir))
    (model_dir / "head.json").write_text('{"secret": "patient 456"}')
    (model_dir / "sub" / "tokenizer.json").unlink()
    (model_dir / "extra.bin").write_bytes(b"x")
    with pytest.raises(checksums.WeightsChecksumError) as refused:
        checksums.verify(model_dir, recorded, "model m version 7")
    message = str(refused.value)
    assert message.startswith("model m version 7: ")
    assert "changed: head.json; missing: sub/tokenizer.json; unexpected: extra.bin" in message
    assert "model.pt" not in message and "patient" not in message


def test_no_recorded_digest_or_an_inconsistent_manifest(model_dir):
    with pytest.raises(checksums.WeightsChecksumError, match="m version 2 has no weights_sha256 tag"):
        checksums.verify(model_dir, {}, "m version 2")
    recorded = checksums.tags(checksums.manifest(model_dir))
    forged = {**recorded, checksums.MANIFEST_TAG: '{"model.pt": "00"}'}  # does not hash to the digest
    (model_dir / "model.pt").write_bytes(b"other weights")
    with pytest.raises(checksums.WeightsChecksumError, match="no consistent weights_manifest tag"):
        checksums.verify(model_dir, forged, "m version 3")
