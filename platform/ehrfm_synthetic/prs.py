"""Polygenic scores for the genotyped persons, and the three file formats they are written in.

Each of the K scores is either a noisy proxy of one trait's liability (accuracy falls outside
the reference ancestry: the portability problem) or unrelated to every trait; all carry an
ancestry-dependent mean shift that lies along the genetic PCs (so PC adjustment removes it).
Values are rounded to 6 significant digits, as plink2 prints them, so the pgsc_calc long file,
the plink2 .sscore and the wide parquet hold the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ehrfm_synthetic.params import N_PCS, TRAITS, PRSParams
from ehrfm_synthetic.population import PC_SCALE, Population

SAMPLESET = "synthetic"
PC_NAMES = [f"PC{i + 1}" for i in range(N_PCS)]


@dataclass(frozen=True)
class PGSCatalog:
    """The K scores: ids in PGS Catalog style and what each one measures (same for every chunk)."""

    pgs_ids: list[str]
    trait: list[str]  # trait name, or "" for scores unrelated to any simulated trait
    accuracy: np.ndarray  # correlation with the liability in the reference ancestry
    mean: np.ndarray  # population mean of SUM
    sd: np.ndarray  # population SD of SUM
    shift: np.ndarray  # [K, 3] weights of the ancestry shift on PC1..PC3 (in SD units)
    variants: np.ndarray  # number of variants in each score

    def to_table(self) -> pa.Table:
        return pa.table({
            "pgs_id": self.pgs_ids, "trait": self.trait, "accuracy_reference": self.accuracy,
            "sum_mean": self.mean, "sum_sd": self.sd, "variants": self.variants,
        })  # fmt: skip


def pgs_catalog(num_pgs: int, seed: int, params: PRSParams) -> PGSCatalog:
    rng = np.random.default_rng(np.random.SeedSequence([seed, 4049]))
    numbers = np.sort(rng.choice(np.arange(1, max(5200, 2 * num_pgs) + 1), size=num_pgs, replace=False))
    ranked = [  # best score of each trait first, then the second best of each, ...
        (trait, accs[rank])
        for rank in range(max(len(a) for a in params.accuracy_by_trait.values()))
        for trait, accs in params.accuracy_by_trait.items()
        if rank < len(accs)
    ]
    related = ranked[:num_pgs]
    slots = rng.permutation(num_pgs)[: len(related)]
    trait = [""] * num_pgs
    accuracy = np.zeros(num_pgs)
    for slot, (name, acc) in zip(slots, related):
        if name not in TRAITS:
            raise ValueError(f"prs.accuracy_by_trait: unknown trait {name!r}; known: {TRAITS}")
        trait[slot], accuracy[slot] = name, acc
    variants = np.round(np.exp(rng.uniform(np.log(50), np.log(1.5e6), num_pgs))).astype(np.int64)
    return PGSCatalog(
        pgs_ids=[f"PGS{int(k):06d}" for k in numbers],
        trait=trait,
        accuracy=accuracy,
        mean=np.round(rng.normal(0.0, 0.5, num_pgs), 4),
        sd=np.round(np.exp(rng.uniform(np.log(0.01), np.log(2.0), num_pgs)), 5),
        shift=rng.normal(0.0, params.ancestry_shift_sd, size=(num_pgs, 3)),
        variants=variants,
    )


def round_significant(values: np.ndarray, digits: int = 6) -> np.ndarray:
    """Round to `digits` significant digits, landing on the double nearest the decimal (as %g prints)."""
    values = np.asarray(values, dtype=np.float64)
    safe = np.where((values == 0) | ~np.isfinite(values), 1.0, np.abs(values))
    exponent = (digits - 1 - np.floor(np.log10(safe))).astype(np.int64)
    up = exponent >= 0
    scale_up = 10.0 ** np.clip(exponent, 0, 300)
    scale_down = 10.0 ** np.clip(-exponent, 0, 300)
    out = np.where(up, np.round(values * scale_up) / scale_up, np.round(values / scale_down) * scale_down)
    return np.where(np.isfinite(values), out, values)


def chunk_scores(pop: Population, catalog: PGSCatalog, params: PRSParams, rng: np.random.Generator) -> pa.Table:
    """One row per genotyped person: ids, plink2 counts, PCs and the K score SUMs."""
    rows = np.flatnonzero(pop.genotyped)
    n, k = len(rows), len(catalog.pgs_ids)
    ancestry = pop.ancestry[rows]
    portability = np.asarray(params.portability)[ancestry]
    shared = rng.standard_normal((n, len(TRAITS)))
    noise = rng.standard_normal((n, k))
    z = noise.copy()
    for j in np.flatnonzero(catalog.accuracy > 0):
        t = TRAITS.index(catalog.trait[j])
        r = catalog.accuracy[j] * portability
        own = np.sqrt(params.shared_noise) * shared[:, t] + np.sqrt(1.0 - params.shared_noise) * noise[:, j]
        z[:, j] = r * pop.liability[rows, t] + np.sqrt(1.0 - r**2) * own
    pcs = pop.pcs[rows]
    z += (pcs[:, :3] / PC_SCALE) @ catalog.shift.T
    sums = round_significant(catalog.mean[None, :] + catalog.sd[None, :] * z)

    total = int(catalog.variants.sum() * 0.7) + 1
    missing = rng.binomial(total, 5e-4, n)
    allele_ct = 2 * (total - missing)
    dosage = np.round(allele_ct * 0.37 + rng.normal(0.0, 1.0, n) * np.sqrt(allele_ct) * 0.5).astype(np.int64)
    columns: dict[str, pa.Array | np.ndarray] = {
        "sample_id": pa.array(pop.sample_id[rows], pa.string()),
        "person_id": pop.person_id[rows],
        "allele_ct": allele_ct.astype(np.int64),
        "named_allele_dosage_sum": dosage,
    }
    columns.update({name: np.round(pcs[:, i], 6) for i, name in enumerate(PC_NAMES)})
    columns.update({pgs: sums[:, j] for j, pgs in enumerate(catalog.pgs_ids)})
    return pa.table(columns)


class PRSWriters:
    """Streams per-chunk score parts into the final files, in chunk order (bounded memory)."""

    def __init__(self, prs_dir: Path, pgs_ids: list[str]):
        self.pgs_ids = list(pgs_ids)
        prs_dir.mkdir(parents=True, exist_ok=True)
        wide_schema = pa.schema([pa.field("sample_id", pa.string())] + [pa.field(p, pa.float64()) for p in pgs_ids])
        self._wide = pq.ParquetWriter(prs_dir / "scores_wide.parquet", wide_schema, compression="zstd")
        self._sscore = open(prs_dir / "scores.sscore", "wb")
        header = ["#IID", "ALLELE_CT", "DENOM", "NAMED_ALLELE_DOSAGE_SUM"]
        header += [f"{p}_AVG" for p in pgs_ids] + [f"{p}_SUM" for p in pgs_ids]
        self._sscore.write(("\t".join(header) + "\n").encode())
        self._long_raw = pa.OSFile(str(prs_dir / "aggregated_scores.txt.gz"), "wb")
        self._long = pa.CompressedOutputStream(self._long_raw, "gzip")
        self._long.write(b"sampleset\tIID\tPGS\tSUM\tDENOM\tAVG\n")
        self._map = open(prs_dir / "sample_map.tsv", "wb")
        self._map.write(b"sample_id\tperson_id\n")
        self._pcs = open(prs_dir / "pcs.tsv", "wb")
        self._pcs.write(("\t".join(["sample_id", *PC_NAMES]) + "\n").encode())
        self.samples = 0

    def add(self, part: pa.Table) -> None:
        n, k = part.num_rows, len(self.pgs_ids)
        self.samples += n
        sums = np.column_stack([part.column(p).to_numpy() for p in self.pgs_ids]) if n else np.zeros((0, k))
        denom = part.column("allele_ct").to_numpy().astype(np.int64)
        avgs = round_significant(sums / denom[:, None]) if n else sums
        sample = part.column("sample_id")
        self._wide.write_table(part.select(["sample_id", *self.pgs_ids]))
        sscore = {"#IID": sample, "ALLELE_CT": denom, "DENOM": denom,
                  "NAMED_ALLELE_DOSAGE_SUM": part.column("named_allele_dosage_sum")}  # fmt: skip
        sscore.update({f"{p}_AVG": avgs[:, j] for j, p in enumerate(self.pgs_ids)})
        sscore.update({f"{p}_SUM": sums[:, j] for j, p in enumerate(self.pgs_ids)})
        _write_tsv(self._sscore, pa.table(sscore), header=False)
        taken = np.repeat(np.arange(n), k)
        long = pa.table({
            "sampleset": pa.array([SAMPLESET]).take(pa.array(np.zeros(n * k, np.int64))),
            "IID": sample.take(pa.array(taken)),
            "PGS": pa.array(self.pgs_ids).take(pa.array(np.tile(np.arange(k), n))),
            "SUM": sums.reshape(-1),
            "DENOM": denom[taken],
            "AVG": avgs.reshape(-1),
        })  # fmt: skip
        _write_tsv(self._long, long, header=False)
        _write_tsv(self._map, part.select(["sample_id", "person_id"]), header=False)
        _write_tsv(self._pcs, part.select(["sample_id", *PC_NAMES]), header=False)

    def close(self) -> None:
        self._wide.close()
        for stream in (self._sscore, self._long, self._map, self._pcs):
            stream.close()
        if not self._long_raw.closed:
            self._long_raw.close()


def _write_tsv(sink, table: pa.Table, header: bool) -> None:
    options = pacsv.WriteOptions(include_header=header, delimiter="\t", quoting_style="none")
    pacsv.write_csv(table, sink, write_options=options)
