"""`ehrfm preprocess`: the Ray Data job (ingest, PRS, tokenizer, timelines) and its stages."""
