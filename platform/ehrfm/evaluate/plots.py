"""Evaluation figures as PNG: ROC, precision-recall, reliability, observed risk by PRS decile.

Figures are built on `matplotlib.figure.Figure` with the Agg canvas directly, never pyplot, so no
display or global backend state is touched (safe in Ray workers and tests). Every curve gets its own
colour (two qualitative palettes, 18 colours) and a line style cycling with it, legends sit outside
the axes, and the reliability axes span the predictions (risks are often all below 0.1).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import polars as pl
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import precision_recall_curve, roc_curve

from ehrfm.evaluate.calibration import ECE_BINS, ECE_STRATEGY, reliability_curve
from ehrfm.evaluate.stratify import risk_by_prs_decile

Risks = Mapping[str, np.ndarray]
COLOURS = (*colormaps["tab10"].colors, *colormaps["Dark2"].colors)
LINE_STYLES = ("-", "--", "-.", ":")


def curve_style(index: int) -> dict:
    """Colour and line style of the index-th curve: no two of the first len(COLOURS) share a colour."""
    return {"color": COLOURS[index % len(COLOURS)], "linestyle": LINE_STYLES[index % len(LINE_STYLES)]}


def _legend_outside(ax) -> None:
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=7)


def _figure(title: str) -> tuple[Figure, object]:
    figure = Figure(figsize=(5.5, 4.5), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    axes.set_title(title)
    return figure, axes


def roc_figure(y_true, risks: Risks) -> Figure:
    figure, ax = _figure("ROC")
    for index, (name, risk) in enumerate(risks.items()):
        fpr, tpr, _ = roc_curve(y_true, risk)
        ax.plot(fpr, tpr, label=name, **curve_style(index))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1))
    _legend_outside(ax)
    return figure


def pr_figure(y_true, risks: Risks) -> Figure:
    figure, ax = _figure("Precision-recall")
    for index, (name, risk) in enumerate(risks.items()):
        precision, recall, _ = precision_recall_curve(y_true, risk)
        ax.step(recall, precision, where="post", label=name, **curve_style(index))
    ax.axhline(float(np.mean(y_true)), color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
    _legend_outside(ax)
    return figure


def calibration_figure(y_true, risks: Risks) -> Figure:
    """Reliability curves on the report's own bins (`ehrfm.evaluate.calibration`), ECE in the legend;
    both axes from 0 to 1.1 x the largest binned prediction or observed rate (at most 1)."""
    figure, ax = _figure(f"Reliability ({ECE_BINS} {ECE_STRATEGY} bins)")
    top = 0.0
    for index, (name, risk) in enumerate(risks.items()):
        curve = reliability_curve(y_true, risk)
        ax.plot(
            curve.mean_predicted,
            curve.observed,
            marker="o",
            markersize=3,
            label=f"{name} (ECE {curve.ece:.3f})",
            **curve_style(index),
        )
        values = np.concatenate([np.ravel(curve.mean_predicted), np.ravel(curve.observed)])
        values = values[np.isfinite(values)]
        top = max(top, float(values.max()) if values.size else 0.0)
    limit = min(1.0, 1.1 * top) if top > 0 else 1.0
    ax.plot([0, limit], [0, limit], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="mean predicted risk", ylabel="observed rate", xlim=(0, limit), ylim=(0, limit))
    _legend_outside(ax)
    return figure


def prs_decile_figure(table: pl.DataFrame) -> Figure:
    """Observed rate with Wilson CI per PRS decile (and the no-PRS group), mean predicted if present."""
    figure, ax = _figure("Observed risk by PRS decile")
    x = np.arange(table.height)
    rate = table["observed_rate"].to_numpy()
    # clipped: at a rate of 0 or 1 the Wilson bound can miss the rate by a rounding error, and
    # matplotlib refuses negative error bars
    errors = np.clip(np.vstack([rate - table["ci_low"].to_numpy(), table["ci_high"].to_numpy() - rate]), 0.0, None)
    ax.errorbar(x, rate, yerr=errors, fmt="o", capsize=3, label="observed")
    if "mean_predicted" in table.columns:
        ax.plot(x, table["mean_predicted"].to_numpy(), marker="x", linestyle="--", label="mean predicted")
    ax.set_xticks(x, table["group"].to_list(), rotation=45, fontsize=7)
    ax.set(xlabel="PRS group", ylabel="event rate")
    _legend_outside(ax)
    return figure


def save_figures(out_dir: Path, y_true, risks: Risks, prs=None, decile_model: str | None = None) -> list[Path]:
    """Write roc.png, pr.png, calibration.png (and prs_deciles.png when PRS is given)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = {
        "roc": roc_figure(y_true, risks),
        "pr": pr_figure(y_true, risks),
        "calibration": calibration_figure(y_true, risks),
    }
    if prs is not None:
        model = decile_model or next(iter(risks), None)
        table = risk_by_prs_decile(y_true, prs, risks[model] if model else None)
        figures["prs_deciles"] = prs_decile_figure(table)
    paths = []
    for name, figure in figures.items():
        path = out_dir / f"{name}.png"
        figure.savefig(path, bbox_inches="tight")
        paths.append(path)
    return paths
