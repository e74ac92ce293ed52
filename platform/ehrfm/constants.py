"""Constants every layer shares, the model included: split names and reserved token ids.

Kept free of pyarrow (unlike `ehrfm.schemas`) so that importing the model needs torch only.
"""

from __future__ import annotations

SPLITS = ("train", "val", "test")

# Reserved token ids; the tokenizer assigns codes from FIRST_CODE_ID upwards.
PAD_ID = 0
UNK_ID = 1
BOS_ID = 2  # start of a timeline (before the demographic prefix)
EOS_ID = 3  # end of the record (death, or end of observation)
FIRST_CODE_ID = 4
SPECIAL_TOKENS = {"[PAD]": PAD_ID, "[UNK]": UNK_ID, "[BOS]": BOS_ID, "[EOS]": EOS_ID}
