"""Made-up persons for smoke runs and benchmarks, and a small stdlib HTTP client for the API.

The persons are drawn from the model's own vocabulary (codes seen in training, measurement values
inside the fitted bins, every PGS id for about half of them), so they exercise the real scoring
path; none of them is, or is derived from, a real patient.
"""

from __future__ import annotations

import datetime as dt
import json
import urllib.error
import urllib.request
from typing import Any

import numpy as np

from ehrfm.preprocess.tokenizer import Tokenizer
from ehrfm.transfer.predictor import RESERVED_CODE_PREFIXES


def clinical_codes(tokenizer: Tokenizer) -> list[str]:
    """Vocabulary codes a request may carry (no demographic or birth codes)."""
    return sorted(c for c in tokenizer.code_counts if "/" in c and not c.startswith(RESERVED_CODE_PREFIXES))


def synthetic_persons(
    tokenizer: Tokenizer, pgs_ids: list[str], n: int, seed: int = 0, events_per_person: tuple[int, int] = (3, 40)
) -> list[dict[str, Any]]:
    """`n` PersonRecord bodies (JSON-ready dicts) with events from the tokenizer's vocabulary."""
    rng = np.random.default_rng(seed)
    codes = clinical_codes(tokenizer)
    if not codes:
        raise ValueError("the tokenizer has no clinical codes to draw events from")
    persons = []
    for _ in range(n):
        birth = dt.date(1935, 1, 1) + dt.timedelta(days=int(rng.integers(0, 45 * 365)))
        day = dt.datetime(2008, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365)))
        events = []
        for _ in range(int(rng.integers(*events_per_person))):
            code = codes[int(rng.integers(len(codes)))]
            event: dict[str, Any] = {"code": code, "time": day.isoformat()}
            edges = tokenizer.value_edges.get(code)
            if edges:
                event["numeric_value"] = round(float(rng.uniform(edges[0], edges[-1])), 3)
            events.append(event)
            day += dt.timedelta(days=int(rng.integers(0, 90)))
        person: dict[str, Any] = {
            "birth_date": birth.isoformat(),
            "sex": ["female", "male"][int(rng.integers(2))],
            "events": events,
            "prediction_time": (day + dt.timedelta(days=1)).isoformat(),
        }
        if pgs_ids and rng.random() < 0.5:
            person["prs"] = {pgs: round(float(rng.normal()), 4) for pgs in pgs_ids}
        persons.append(person)
    return persons


def request_json(
    url: str, body: Any = None, token: str | None = None, timeout: float = 30.0, method: str | None = None
) -> tuple[int, Any]:
    """(status, decoded JSON body or text) of one request; HTTP errors are returned, not raised."""
    data = None if body is None else json.dumps(body).encode("utf-8")
    request = urllib.request.Request(url, data=data, method=method or ("GET" if body is None else "POST"))
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode("utf-8", "replace")
