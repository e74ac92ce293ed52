"""The MEDS dataset ehrfm writes: code form (`codes`), on-disk layout and split names (`layout`)."""
