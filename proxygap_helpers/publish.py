"""Stage 4: the executed report notebook -> the published report of a grid (``layout.report_dir``).

Writes ``report.html`` (code hidden, self-contained), ``sign_flip.png`` and copies of the aggregate tables
beside it. The ``report`` unit's executor calls :func:`publish` after ``05_report`` ran.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .aggregate import CURVE_TABLES, load_aggregate
from .layout import aggregate_dir, report_dir
from .params import Params

PUBLISHED = ("phase2_table.csv", "phase2_table.md", "pairs.csv", "sae_metrics.csv", "proxy_leaderboard.csv",
             "claims.csv", "sign_flip.csv", "heldout_predictions.csv", *(f"{t}.csv" for t in CURVE_TABLES))


def publish(p: Params, out_dir: Path, executed_report: Path) -> Path:
    """Render the executed report notebook to ``<report dir>/report.html`` and copy the aggregate tables
    beside it. Returns the HTML path."""
    from .report import render_html

    dest = report_dir(p.name, out_dir)
    dest.mkdir(parents=True, exist_ok=True)
    html = render_html(executed_report, dest / "report.html", title=p.report.title)
    _sign_flip_png(out_dir, dest / "sign_flip.png")
    for name in PUBLISHED:
        src = aggregate_dir(out_dir) / name
        if src.is_file():
            tmp = dest / (name + ".tmp")
            shutil.copyfile(src, tmp)
            tmp.replace(dest / name)
    return html


def _sign_flip_png(out_dir: Path, png: Path) -> None:
    """The report's sign-flip figure as a PNG beside it (for the README and slides)."""
    import matplotlib

    matplotlib.use("Agg")
    from . import plots

    agg = load_aggregate(out_dir)
    plots.set_theme()
    fig = plots.sign_flip_figure(agg["pairs"], agg["phase2_table"], agg["sign_flip"], curves=agg["budget_curves"],
                                 tstar=agg["tstar"])
    tmp = png.with_name(png.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(png)
