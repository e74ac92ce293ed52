"""What the first bytes of a csv file say about its encoding, before any parser sees it.

A UTF-16 export parsed as UTF-8 reads as one garbled column and used to be reported as "lacks
required columns"; a binary file named .csv failed deep inside a Ray task. Both are named here as
what they are. A UTF-8 byte-order mark is fine (the header reader strips it). Messages hold byte
counts and offsets only, never file content.
"""

from __future__ import annotations

import codecs

_BOMS = (  # longest first: the UTF-32 LE mark starts with the UTF-16 LE one
    (codecs.BOM_UTF32_LE, "UTF-32 (little-endian)"),
    (codecs.BOM_UTF32_BE, "UTF-32 (big-endian)"),
    (codecs.BOM_UTF16_LE, "UTF-16 (little-endian)"),
    (codecs.BOM_UTF16_BE, "UTF-16 (big-endian)"),
)
_GZIP_MAGIC = b"\x1f\x8b"
_FIX = "save it as UTF-8 (a UTF-8 byte-order mark is fine)"


def encoding_problem(head: bytes, complete: bool) -> str | None:
    """Why `head` (a file's first bytes; `complete` when it is the whole file) is not UTF-8 csv
    text, or None when it is. Pure: used by the header reader and the pre-flight check."""
    for bom, name in _BOMS:
        if head.startswith(bom):
            return f"encoding: {name} text (byte-order mark); {_FIX}"
    if head.startswith(_GZIP_MAGIC):
        return "binary content: gzip-compressed data in a file not named .gz"
    nuls = head.count(0)
    if nuls:
        even, odd = head[0::2], head[1::2]
        if odd and odd.count(0) >= 0.4 * len(odd) and even.count(0) <= 0.05 * len(even):
            return f"encoding: UTF-16 (little-endian) text without a byte-order mark; {_FIX}"
        if even and even.count(0) >= 0.4 * len(even) and odd.count(0) <= 0.05 * len(odd):
            return f"encoding: UTF-16 (big-endian) text without a byte-order mark; {_FIX}"
        return f"binary content, not csv text ({nuls} NUL bytes in the first {len(head)} bytes)"
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        decoder.decode(head, final=complete)
    except UnicodeDecodeError as exc:
        return f"encoding: not UTF-8 text (first invalid byte at offset {exc.start}); {_FIX}"
    return None


def strip_utf8_bom(head: bytes) -> bytes:
    return head[len(codecs.BOM_UTF8) :] if head.startswith(codecs.BOM_UTF8) else head
