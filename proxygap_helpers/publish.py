"""Stage 4: the executed report notebook(s) -> the published report of a grid (``layout.report_dir``).

Writes ``report.html`` (code hidden, self-contained), the sign-flip and decomposition figures as PNGs and copies
of the aggregate tables beside it. The ``report`` unit's executor calls :func:`publish` after its notebooks ran: ``05_report``
for a grid with one setting; for several (pairs of models x hooks), ``06_ladder`` (the summary across them)
first and then each setting's ``05_report``, as one page (``sign_flip_<setting>.png`` and
``decomposition_<setting>.png`` per setting, ``ladder.png``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .aggregate import ANALYSIS_TABLES, CURVE_TABLES, FAMILY_TABLES, LADDER_TABLES, load_aggregate
from .layout import aggregate_dir, report_dir
from .params import Params

PUBLISHED = ("phase2_table.csv", "phase2_table.md", "pairs.csv", "sae_metrics.csv", "proxy_leaderboard.csv",
             "claims.csv", "sign_flip.csv", "heldout_predictions.csv", *(f"{t}.csv" for t in CURVE_TABLES),
             *(f"{t}.csv" for t in (*ANALYSIS_TABLES, *LADDER_TABLES, *FAMILY_TABLES)))


def publish(p: Params, out_dir: Path, executed: list[Path]) -> Path:
    """Render the executed report notebook(s) to ``<report dir>/report.html`` (several: the ``06_ladder`` summary
    first, then the settings in order, as one page) and copy the aggregate tables beside it. Returns the HTML
    path."""
    from .report import render_html

    dest = report_dir(p.name, out_dir)
    dest.mkdir(parents=True, exist_ok=True)
    summary = [nb for nb in executed if Path(nb).stem == "06_ladder"]
    source = Path(executed[0]) if len(executed) == 1 else _merged(summary + [nb for nb in executed
                                                                            if nb not in summary])
    html = render_html(source, dest / "report.html", title=p.report.title)
    settings = [s.label for s in p.settings()]
    for label in settings:
        for name in ("sign_flip", "decomposition"):
            _setting_png(p, out_dir, label, name, dest / (f"{name}.png" if len(settings) == 1 else f"{name}_{label}.png"))
    if len(settings) > 1:
        _ladder_png(out_dir, dest / "ladder.png")
    for name in PUBLISHED:
        src = aggregate_dir(out_dir) / name
        if src.is_file():
            tmp = dest / (name + ".tmp")
            shutil.copyfile(src, tmp)
            tmp.replace(dest / name)
    return html


def _merged(notebooks: list[Path]) -> Path:
    """One notebook of the cells of ``notebooks`` in order (metadata of the first), written beside them."""
    import nbformat

    nbs = [nbformat.read(Path(nb), as_version=4) for nb in notebooks]
    merged = nbs[0]
    for i, nb in enumerate(nbs[1:], 1):
        for cell in nb.cells:  # the same notebook run per setting: cell ids must stay unique in the page
            cell["id"] = f"n{i}-{cell.get('id', '')}"[:64]
        merged.cells += nb.cells
    path = Path(notebooks[0]).with_name("report.ipynb")
    nbformat.write(merged, path)
    return path


def _save(fig, png: Path) -> None:
    tmp = png.with_name(png.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(png)


def _setting_png(p: Params, out_dir: Path, setting: str, name: str, png: Path) -> None:
    """A setting's sign-flip or decomposition figure as a PNG beside the report (for the README and slides)."""
    import matplotlib

    matplotlib.use("Agg")
    from . import plots

    agg = load_aggregate(out_dir, p, setting)
    plots.set_theme()
    fig = (plots.sign_flip_figure(agg["pairs"], agg["phase2_table"], agg["sign_flip"], curves=agg["budget_curves"],
                                  tstar=agg["tstar"]) if name == "sign_flip"
           else plots.decomposition_figure(agg["decomposition"]))
    _save(fig, png)


def _ladder_png(out_dir: Path, png: Path) -> None:
    """The ladder figure (the paired gaps against the size ratio) as a PNG beside the report."""
    import matplotlib

    matplotlib.use("Agg")
    from . import plots

    plots.set_theme()
    _save(plots.ladder_figure(load_aggregate(out_dir)["ladder"]), png)
