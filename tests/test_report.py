"""Report text and HTML: caveats (one trigger each), the narrative's verdicts, styled tables, and an
end-to-end render of an executed notebook checked in headless Chromium (screenshot not blank, DOM holds the
table, page self-contained)."""

import re
import sys
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
from nbclient import NotebookClient
from PIL import Image

from proxygap_helpers import report, stats

sys.path.insert(0, str(Path(__file__).parent))
from test_plots import aggregates, synthetic_metrics  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def agg():
    return aggregates(mismatch=True)


@pytest.fixture(scope="module")
def agg_none():
    return aggregates(mismatch=False)


def one(items, word):
    hits = [c for c in items if word in c]
    assert len(hits) == 1, (word, items)
    return hits[0]


# ---------------------------------------------------------------- caveats


def test_caveats_n1_missing_cell_and_baseline(agg):
    out = report.caveats(agg["table"], agg["metrics"])
    assert "k=16, T=3M" in one(out, "pending")
    assert "k=16, T=10M" in one(out, "directional")
    assert one(out, "SWD")  # seed 0 has no SWD
    assert one(out, "at or below the study's lowest")
    assert one(out, "not the study's Pythia-70M vs Pythia-410M")
    for quiet in ("dead", "epochs_used", "L0 < k", "saturated", "no partner"):
        assert not [c for c in out if quiet in c], quiet


def test_caveats_each_trigger(agg):
    m = synthetic_metrics()
    lonely = m[(m.model_role == "small") & (m.k == 8) & (m.tokens == 1_000_000) & (m.seed == 0)].assign(seed=7)
    m = pd.concat([m, lonely], ignore_index=True)
    m.loc[:4, "dead_frac"] = 0.8  # 5 SAEs with > 50% dead latents
    m.loc[m.tokens == 10_000_000, "epochs_used"] = 2.5
    m.loc[0, "l0"] = 6.0  # k = 8
    out = report.caveats(agg["table"], m, extra=["dropped 2 duplicate runs"])
    dead = one(out, "dead_frac")
    assert dead.startswith(f"5 of {len(m)} SAEs") and "0.80" in dead
    assert "10M" in one(out, "epochs_used") and "2.50" in one(out, "epochs_used")
    assert "0.75" in one(out, "L0 < k")
    assert "seed 7 (only small)" in one(out, "no partner")
    assert out[-1] == "dropped 2 duplicate runs"


def test_caveats_saturated_duplicates_few_seeds_and_empty():
    m = synthetic_metrics(ce_rec=0.9995)
    m = pd.concat([m, m.iloc[[0]]], ignore_index=True)
    pairs = stats.pair(stats.dedupe(m)[0])
    table = stats.phase2_table(pairs[pairs.seed < 2])
    out = report.caveats(table, m, extra="custom note")
    assert one(out, "saturated")
    assert one(out, "share (model_role, k, T, seed)")
    assert one(out, "At most 2 seed(s)")
    assert out[-1] == "custom note"
    for empty in (report.caveats(None, None), report.caveats(pd.DataFrame(), pd.DataFrame())):
        assert len(empty) == 1 and "pending" in empty[0]


# ---------------------------------------------------------------- narrative


def test_narrative_reproduced(agg):
    text = report.narrative(agg["table"], agg["flip"], agg["board"], agg["claims"])
    assert text == report.narrative(agg["table"], agg["flip"], agg["board"], agg["claims"])  # deterministic
    assert "**reproduced**" in text and "not reproduced" not in text
    c = agg["table"].query("k == 8 and tokens == 1000000").iloc[0]
    assert "mismatch rate 1.00" in text
    assert report.fmt_ci(c.d_ce_rec_mean, c.d_ce_rec_lo, c.d_ce_rec_hi) in text
    t_star = agg["flip"].set_index("k").loc[8]
    assert f"T* ≈ {report.fmt_tokens(t_star.t_star)}" in text
    assert f"[{report.fmt_tokens(t_star.t_star_lo)}, {report.fmt_tokens(t_star.t_star_hi)}]" in text
    pooled = agg["board"].query("scheme == 'pooled'").sort_values(["mae", "proxy"]).iloc[0]
    assert f"MAE {pooled.mae:.4f}" in text
    assert "beat ΔR²" in text or "beats ΔR²" in text or "ΔR² itself" in text
    for claim in agg["claims"].itertuples():
        assert f"{claim.claim} ({claim.gate}): **{claim.status}**" in text
    assert re.search(r"\d+ supported, \d+ pending, \d+ rejected", text)
    assert not re.search(r"20\d\d-\d\d-\d\d", text)  # no timestamps


def test_narrative_not_reproduced_without_mismatch(agg_none):
    text = report.narrative(agg_none["table"], agg_none["flip"], agg_none["board"], agg_none["claims"])
    assert "**not reproduced**" in text
    assert "mismatch rate 0.00" in text
    assert "positive at every budget" in text
    assert "Bottom line:** the study's low-budget mismatch is **not reproduced**" in text


def test_narrative_pending_on_thin_or_empty_data(agg):
    thin = agg["table"].assign(n=1, d_ce_rec_lo=agg["table"].d_ce_rec_mean, d_ce_rec_hi=agg["table"].d_ce_rec_mean)
    text = report.narrative(thin, agg["flip"], agg["board"], agg["claims"])
    assert "directional" in text and "**pending**" in text and "Bottom line:** the study's headline is **pending**" in text
    empty = report.narrative(None, None, None, None)
    assert empty.count("Pending") >= 4 and "**pending**" in empty
    assert report.narrative(pd.DataFrame(), pd.DataFrame(), pd.DataFrame(), pd.DataFrame()) == empty


# ---------------------------------------------------------------- styled tables


def test_style_claims_colours(agg):
    cl = agg["claims"].copy()
    cl.loc[0, "status"], cl.loc[1, "status"], cl.loc[2, "status"] = "supported", "pending", "rejected"
    cl.loc[3, "status"] = "mixed"  # a ladder's summary row: the settings disagree
    html = report.style_claims(cl).to_html()
    for status, (bg, fg) in report.STATUS_COLORS.items():
        assert bg in html and fg in html, status
    assert "<table" in html and cl.loc[0, "statement"].split(":")[0] in html
    assert "<table" in report.style_claims(None).to_html()


def test_style_table_marks_n1_and_pending(agg):
    shown = report.table_frame(agg["table"])
    assert len(shown) == 6  # 5 cells + the missing (16, 3M) shown as pending
    row = shown[(shown.k == "16") & (shown.tokens == "3M")].iloc[0]
    assert row["n"] == "0" and row["ΔCE_rec mean [95% CI]"] == "pending"
    assert shown[(shown.k == "16") & (shown.tokens == "10M")]["n"].item() == "1 †"
    assert "ΔSWD" in shown.columns and "mismatch rate" in shown.columns
    html = report.style_table(agg["table"]).to_html()
    assert "1 †" in html and "directional" in html and "font-style: italic" in html
    assert "<table" in report.style_table(pd.DataFrame()).to_html()
    ref = report.table_frame(stats.reference_table())
    assert ref.iloc[0]["ΔCE_rec mean [95% CI]"] == "-0.099 [-0.117, -0.082]"


# ---------------------------------------------------------------- HTML export, offline, in Chromium


def build_notebook(with_error: bool = False) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    setup = ("import sys\nsys.path.insert(0, {tests!r})\nfrom test_plots import aggregates\n"
             "from proxygap_helpers import plots, report\nplots.set_theme()\na = aggregates()").format(
                 tests=str(REPO / "tests"))
    nb.cells = [
        nbformat.v4.new_markdown_cell("# Proxy gap report\n\nNarrative text: ΔR² vs ΔCE_rec."),
        nbformat.v4.new_code_cell(setup),
        nbformat.v4.new_code_cell("import pandas as pd\npd.DataFrame({'cell': ['alpha_cell_xyz', 'beta_cell_xyz'], "
                                  "'value': [1.5, 2.5]})"),
        nbformat.v4.new_code_cell("plots.sign_flip_figure(a['pairs'], a['table'], a['flip'])"),
        nbformat.v4.new_code_cell("report.style_claims(a['claims'])"),
        nbformat.v4.new_code_cell("print('REMOVED_CELL_MARKER')", metadata={"tags": ["remove"]}),
    ]
    if with_error:
        nb.cells.append(nbformat.v4.new_code_cell("1 / 0"))
    return nb


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    nb = build_notebook()
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    nbformat.write(nb, out / "report.ipynb")
    html = report.render_html(out / "report.ipynb", out / "site" / "report.html")
    return out, html


def require_chromium() -> None:
    try:
        report.chromium_path()
    except report.ChromiumNotFound as err:
        pytest.fail(f"{err}. The report check needs it: run `apt-get update && apt-get install -y chromium`.")


def test_render_html_is_self_contained(rendered):
    out, html = rendered
    assert html == out / "site" / "report.html" and html.is_file()
    assert [p.name for p in html.parent.iterdir()] == ["report.html"]  # written atomically: no temp file left
    text = html.read_text(encoding="utf-8")
    assert "<table" in text and "alpha_cell_xyz" in text
    assert re.search(r'<img[^>]+src="data:image/png;base64,[A-Za-z0-9+/=\s]{2000,}', text)
    assert "Proxy gap report" in text
    # code inputs hidden, removed cell gone, no error output
    assert "plots.set_theme" not in text and "sys.path.insert" not in text
    assert "REMOVED_CELL_MARKER" not in text
    assert "output_error" not in text and "Traceback" not in text
    # nothing fetched from the network: no script/stylesheet/image with an http(s) or protocol-relative URL
    assert report.external_resources(text) == []
    assert not re.search(r"<script[^>]+src=", text)
    assert not re.search(r"<link[^>]+href=\"?(https?:)?//", text)
    assert "cdnjs" not in text and "require.min.js" not in text and "mathjax" not in text.lower()
    # the claim table keeps its status colours
    assert report.STATUS_COLORS["supported"][0] in text


def test_render_html_in_headless_chromium(rendered):
    require_chromium()
    out, html = rendered
    png = report.screenshot(html, out / "report.png", width=1400)
    with Image.open(png) as img:
        assert img.size[0] == 1400 and 600 < img.size[1] < 12000
        pixels = np.asarray(img.convert("L"), dtype=float)
    assert pixels.var() > 0 and (pixels < 128).mean() > 0.005  # not blank: text and plots drawn
    with Image.open(png) as img:
        rgb = np.asarray(img.convert("RGB")).astype(np.int16)
    pink = (rgb[..., 0] > 200) & (rgb[..., 0] - rgb[..., 1] > 50) & (rgb[..., 0] - rgb[..., 2] > 50)
    assert pink.sum() > 2_000  # the figure's red mismatch bands were painted from the inline PNG
    dom = report.dump_dom(html)
    assert "alpha_cell_xyz" in dom and "<table" in dom and "data:image/png;base64" in dom
    assert "supported" in dom or "pending" in dom


def test_external_resources_detects_cdn_links():
    page = ('<script src="https://cdn.example/x.js"></script><link rel="stylesheet" href="//cdn.example/y.css">'
            '<style>@import url("https://fonts.example/f.css"); a {background: url(http://x.example/i.png)}</style>'
            '<a href="https://example.org">a link is fine</a><img src="data:image/png;base64,AAAA">')
    assert report.external_resources(page) == ["https://cdn.example/x.js", "//cdn.example/y.css",
                                                "https://fonts.example/f.css", "http://x.example/i.png"]


def test_render_html_refuses_errors_and_keeps_old_page(tmp_path):
    nb = build_notebook(with_error=True)
    nb.cells = [nb.cells[0], nb.cells[-1]]
    NotebookClient(nb, timeout=120, kernel_name="python3", allow_errors=True).execute()
    nbformat.write(nb, tmp_path / "bad.ipynb")
    target = tmp_path / "report.html"
    target.write_text("previous report")
    with pytest.raises(ValueError, match="ZeroDivisionError"):
        report.render_html(tmp_path / "bad.ipynb", target)
    assert target.read_text() == "previous report"
    report.render_html(tmp_path / "bad.ipynb", target, allow_errors=True)
    assert "ZeroDivisionError" in target.read_text()


def test_missing_chromium_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.delenv("PROXYGAP_CHROMIUM", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(report, "CHROMIUM_PATHS", (str(tmp_path / "no-such-browser"),))
    (tmp_path / "p.html").write_text("<p>x</p>")
    with pytest.raises(report.ChromiumNotFound, match=r"apt-get install -y chromium"):
        report.screenshot(tmp_path / "p.html", tmp_path / "p.png")
    with pytest.raises(report.ChromiumNotFound):
        report.dump_dom(tmp_path / "p.html")


def test_narrative_survives_nan_cells(agg):
    table = agg["table"].copy()
    table.loc[table.k == 16, ["d_ce_rec_mean", "d_ce_rec_lo", "d_ce_rec_hi", "mismatch_rate"]] = np.nan
    table.loc[table.index[-1], "n"] = np.nan
    text = report.narrative(table, None, agg["board"].query("scheme != 'pooled'"), None)
    assert "nan" not in text.lower() and "Scheme 'leave-one-budget-out'" in text


# ---------------------------------------------------------------- scale, D3 and the random-error baseline


def _with_model_stats(m: pd.DataFrame) -> pd.DataFrame:
    large = m["model_role"] == "large"
    return m.assign(sst_per_token=np.where(large, 4131.1, 226.7), act_norm_mean=np.where(large, 70.0, 16.0),
                    act_sq_norm_mean=np.where(large, 5000.0, 300.0), pr_act=np.where(large, 20.0, 8.0),
                    twonn_dim=np.where(large, 12.0, 6.0), twonn_points=2048.0,
                    pr_recon_frac=np.where(large, 0.5, 0.7), random_error_ratio=np.where(large, 3.0, 2.0),
                    nmse=np.where(large, 0.1, 0.2))


def test_model_frame_and_scale_section():
    from proxygap_helpers import summary

    m = _with_model_stats(synthetic_metrics())
    frame = summary.model_frame(m)
    assert list(frame.index) == ["small", "large", "large / small"]
    assert frame.loc["large", "SST per token"] == pytest.approx(4131.1)
    assert frame.loc["large / small", "SST per token"] == pytest.approx(round(4131.1 / 226.7, 3))
    assert frame.loc["large / small", "participation ratio"] == pytest.approx(2.5)
    pairs = stats.pair(m)
    text = summary.scale_section(m, pairs)
    assert text == summary.scale_section(m, pairs)
    assert "226.7 per token in the small model and 4131 in the large one (18.2×" in text
    assert f"mean ΔR² is {pairs['d_r2'].mean():+.3f}" in text and f"ΔNMSE (squared error" in text
    assert "8 (small) vs 20 (large)" in text and "TwoNN intrinsic dimension 6 vs 12" in text
    assert "2× (small) and 3× (large)" in text
    # without the statistics: pending, never an error
    assert summary.scale_section(synthetic_metrics(), pairs).startswith("Pending")
    assert "pending" in summary.model_frame(synthetic_metrics()).iloc[0, 0]


def test_proxy_glossary_names_every_proxy_and_the_references():
    from proxygap_helpers import leaderboard, summary

    text = summary.proxy_glossary()
    for proxy in leaderboard.DEFAULT_PROXIES:
        assert f"`{proxy}` ({leaderboard.PROXY_KINDS[proxy]})" in text
    assert "`d_kl` and `d_random_error_ratio` need the reconstruction patched into the model" in text


def test_narrative_treats_the_random_error_ratio_as_a_behavioural_reference():
    from proxygap_helpers import leaderboard

    m = synthetic_metrics()
    gap = m["ce_rec"] - 0.8
    m = m.assign(random_error_ratio=2.0 - 5 * gap)  # tracks CE_rec almost perfectly
    pairs = stats.pair(m)
    board = leaderboard.proxy_leaderboard(pairs, ["d_random_error_ratio", "d_cosine"], n_boot=200)
    best = board[board["scheme"] == "pooled"].sort_values("mae").iloc[0]
    assert best["proxy"] == "d_random_error_ratio" and best["beats_r2"]
    text = report.narrative(stats.phase2_table(pairs), stats.sign_flip(pairs, n_boot=0), board, None)
    assert "d_random_error_ratio is itself measured with the reconstruction patched in" in text
    assert "only a behavioural reference (d_random_error_ratio) beats ΔR²" in text  # names the one that does
