"""Data is shown as data (issue 23, "escaping by construction"): class names that are HTML or
script, CSV cells that a spreadsheet would run as formulas, and the Content-Security-Policy of
the app and of the exported report.

The hostile run is a synthetic run (random timm ``test_vit``, so the report's online views compute)
whose class names are the payloads of the issue; each payload sets ``window.__pwned`` when it
runs. Browser tests use headless chromium (dash[testing]); they skip without it.
"""
import base64
import hashlib
import io
import json
import re
from pathlib import Path
import shutil
from contextvars import copy_context
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest

from conftest import make_synthetic_run

from analysis.notebook import run_html, vit_html
from analysis.runs.reader import open_run
from analysis.safe_text import csv_cell, plotly_text, script_json, write_csv
from app import create_app, figures as F

PAYLOADS = ['<img src=x onerror="window.__pwned=1">', '</script><script>window.__pwned=2</script>',
            '<a href="javascript:window.__pwned=3">x</a>', '<svg onload="window.__pwned=4">']
TIMEOUT = 60


class Tags(HTMLParser):
    """Every start tag (name, attrs), every script's text and the page's text, as a browser parses them."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags, self.scripts, self.text, self._in = [], [], [], None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "script":
            self._in = (dict(attrs), [])

    def handle_endtag(self, tag):
        if tag == "script" and self._in is not None:
            self.scripts.append((self._in[0], "".join(self._in[1])))
            self._in = None

    def handle_data(self, data):
        (self._in[1] if self._in is not None else self.text).append(data)


def sha256_source(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """(cache dir, run name) of a run whose four classes are named by PAYLOADS."""
    root = tmp_path_factory.mktemp("hostile-cache")
    run = make_synthetic_run(root / "hostile", n_images=12, n_classes=4, model="test_vit", img_size=64, seed=1)
    mf = json.loads((run / "manifest.json").read_text())
    mf["model"]["class_names"] = PAYLOADS
    if isinstance(mf.get("dataset"), dict) and "class_names" in mf["dataset"]:
        mf["dataset"]["class_names"] = PAYLOADS
    (run / "manifest.json").write_text(json.dumps(mf))
    images = pd.read_parquet(run / "images.parquet")
    images["label_name"] = [PAYLOADS[int(c)] for c in images["label"]]
    images.to_parquet(run / "images.parquet")
    return root, "hostile"


def _explorer(hostile):
    import sys

    create_app(*hostile)
    return sys.modules["app.explorer.exports"]  # the Explorer's report and export callback


def _index(hostile):
    from app import data

    return data.get_index("hostile")


# ---- the report of a head ------------------------------------------------------------------------
def _first_of_class_0(index) -> int:
    """The id of an image of class 0 (its label's payload runs by itself when written unescaped)."""
    return int(index.images["image_id"][index.images["label"] == 0].iat[0])


def _report(hostile, url="http://host/?run=hostile&image=0&layer=0&head=1"):
    explorer = _explorer(hostile)
    index = _index(hostile)
    image = _first_of_class_0(index)
    sel = {"run": "hostile", "image": image, "layer": 0, "head": 1}
    return explorer.report_html(index, sel, url), index, image


def test_report_writes_class_names_as_text_and_runs_only_its_two_hashed_scripts(hostile):
    text, index, image = _report(hostile)
    page = Tags(text)
    # no tag, attribute or script came from a class name: the names are the page's text
    assert not [t for t, a in page.tags if t in ("img", "a") and any(k.startswith("on") or "javascript:" in (v or "")
                                                                       for k, v in a.items())]
    shown = "".join(page.text)
    row = index.images.set_index("image_id").loc[image]
    assert f"label {PAYLOADS[int(row.label)]}" in shown and f"predicted {PAYLOADS[int(row.pred)]}" in shown
    # two executable scripts (plotly.js, the loader), each allowed by its hash in the page's CSP;
    # the figures are JSON blocks that never run, whose strings cannot close their element
    run = [s for a, s in page.scripts if "type" not in a]
    data = [s for a, s in page.scripts if a.get("type") == "application/json"]
    assert len(run) == 2 and len(data) == 6 and len(page.scripts) == 8
    csp = [a["content"] for t, a in page.tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    assert len(csp) == 1
    script_src = re.search(r"script-src ([^;]*)", csp[0]).group(1).split()
    assert sorted(script_src) == sorted(sha256_source(s) for s in run)  # no 'unsafe-inline', no other script
    assert "default-src 'none'" in csp[0]
    figures = [json.loads(s) for s in data]
    b3 = figures[1]
    assert all(name.startswith(("&lt;", "<b>&lt;")) for name in b3["data"][0]["y"])  # shown as text by plotly
    # the link that reproduces the view, escaped in its attribute and its text
    assert ("a", {"href": "http://host/?run=hostile&image=0&layer=0&head=1"}) in page.tags


def test_report_link_is_only_an_http_link(hostile):
    text, _, _ = _report(hostile, url="javascript:window.__pwned=5")
    assert not [a for t, a in Tags(text).tags if t == "a"] and "javascript:window.__pwned=5" in "".join(Tags(text).text)


# ---- CSV exports ---------------------------------------------------------------------------------
def test_csv_text_cells_are_neutralised_and_numbers_kept():
    df = pd.DataFrame({"name": ["=1+2", "+cmd", "-x", "@SUM(A1)", "\tTAB", "\rCR", "plain", None],
                       "value": [-1.5, 2.0, -3.0, 0.0, np.nan, 1e-9, -7.25, 4.0],
                       "count": [-1, 2, -3, 4, 5, 6, 7, 8],
                       "mixed": [-2, "-2", 3.5, "=A", "ok", None, "@x", "+1"]},
                      index=pd.Index(["=row", "b", "c", "d", "e", "f", "g", "h"], name="-id"))
    text = write_csv(df)
    back = pd.read_csv(io.StringIO(text), index_col=0, keep_default_na=False)
    assert back.index.name == "'-id" and back.index[0] == "'=row"
    assert back["name"].tolist() == ["'=1+2", "'+cmd", "'-x", "'@SUM(A1)", "'\tTAB", "'\rCR", "plain", ""]
    assert text.splitlines()[1].split(",")[2:4] == ["-1.5", "-1"]  # numbers exactly as before
    assert back["count"].tolist() == [-1, 2, -3, 4, 5, 6, 7, 8]
    assert pd.to_numeric(back["value"].replace("", np.nan)).tolist()[:4] == [-1.5, 2.0, -3.0, 0.0]
    assert back["mixed"].tolist() == ["-2", "'-2", "3.5", "'=A", "ok", "", "'@x", "'+1"]
    assert write_csv(pd.DataFrame({"=c": [1]}), index=False).splitlines()[0] == "'=c"
    assert [csv_cell(v) for v in (-1, -1.5, "a-b", "")] == [-1, -1.5, "a-b", ""]


def _export(explorer, sel, button):
    """Run the Explorer's export callback as a click on ``button`` would."""
    from dash._callback_context import context_value
    from dash._utils import AttributeDict

    def click():
        context_value.set(AttributeDict(triggered_inputs=[{"prop_id": f"{button}.n_clicks", "value": 1}]))
        return explorer.export(1, None, None, None, None, None, sel)
    return copy_context().run(click)


def test_explorer_csv_exports_neutralise_formulas_and_parquet_keeps_raw_values(hostile, monkeypatch):
    explorer = _explorer(hostile)
    index = _index(hostile)
    rows = [{"mode": 0, "regions": "=HYPERLINK(\"http://evil\",\"x\")", "prob": 0.5, "prob_drop": -0.25},
            {"mode": 1, "regions": "R1+R2+R3", "prob": 0.25, "prob_drop": 0.25}]
    monkeypatch.setattr(explorer, "pruning_rows", lambda *_: rows)
    sel = {"run": "hostile", "image": int(index.image_ids[0]), "layer": 0, "head": 1}
    out = _export(explorer, sel, "dl-prune-csv")
    back = pd.read_csv(io.StringIO(out["content"]))
    assert back["regions"].tolist() == ["'=HYPERLINK(\"http://evil\",\"x\")", "R1+R2+R3"]
    assert back["prob_drop"].tolist() == [-0.25, 0.25]
    # the same table as Parquet: the raw values (data for programs, no formula surface)
    monkeypatch.setattr(explorer, "head_table", lambda *_: pd.DataFrame(rows))
    out = _export(explorer, sel, "dl-heads-parquet")
    raw = pd.read_parquet(io.BytesIO(base64.b64decode(out["content"])))
    assert raw["regions"].iloc[0] == rows[0]["regions"]
    out = _export(explorer, sel, "dl-heads-csv")
    assert pd.read_csv(io.StringIO(out["content"]))["regions"].iloc[0].startswith("'=")


# ---- plotly label strings, the notebook's HTML -------------------------------------------------
def test_plotly_labels_show_class_names_as_text():
    fig = F.top5(PAYLOADS, [0.4, 0.3, 0.2, 0.1], PAYLOADS[1], "unpruned")
    ticks = fig["data"][0]["y"][::-1]
    assert ticks == [plotly_text(PAYLOADS[0]), f"<b>{plotly_text(PAYLOADS[1])}</b>", plotly_text(PAYLOADS[2]),
                     plotly_text(PAYLOADS[3])]
    assert all("<img" not in t and "<a " not in t and "</script" not in t for t in ticks)
    # a figure's JSON inside <script type="application/json"> cannot end its element, and reads back the same
    raw = json.dumps({"y": PAYLOADS + ["<!--", "a\u2028b"]}, ensure_ascii=False)
    assert "</" not in script_json(raw) and "<!--" not in script_json(raw) and json.loads(script_json(raw)) == json.loads(raw)
    pair = F.top5_pair([("one", PAYLOADS, [0.4, 0.3, 0.2, 0.1])], PAYLOADS[0])
    assert pair["data"][0]["y"][-1] == f"<b>{plotly_text(PAYLOADS[0])}</b>"
    c3 = F.distribution(np.linspace(0, 1, 10), subset=[0, 1], subset_label=f"class {PAYLOADS[0]}")
    assert c3["data"][1]["name"] == f"class {plotly_text(PAYLOADS[0])} (2)"
    assert all(PAYLOADS[0] not in t["hovertemplate"] for t in c3["data"])  # a name is never part of a template
    b1 = F.head_importance(2, 2, "prob", np.zeros(4), np.zeros(4), image_values=np.zeros(4),
                           image_label=f"image 0 ({PAYLOADS[2]})", band_label=f"mean over class {PAYLOADS[0]} (3)",
                           overlays=[("taylor", "<b>x</b>", np.zeros(4))])
    assert [t["name"] for t in b1["data"][2:]] == [f"mean over class {plotly_text(PAYLOADS[0])} (3)",
                                                   f"image 0 ({plotly_text(PAYLOADS[2])})", "&lt;b&gt;x&lt;/b&gt;"]


def test_notebook_html_escapes_names(hostile):
    run = open_run(hostile[0] / "hostile")
    page = Tags(run_html(run))
    assert {t for t, _ in page.tags} <= {"div", "b", "table", "tr", "th", "td"}
    assert PAYLOADS[0] in "".join(page.text)

    class Facts:  # the attributes vit_html reads
        name, depth, num_heads, head_dim, num_prefix_tokens, grid, patch_size, num_tokens = (
            "<i>vit</i>", 2, 3, 4, 1, (2, 2), 16, 5)
        img_size, data_config, num_classes, class_names, has_head, weights_sha256 = (
            (32, 32), {}, 3, PAYLOADS, True, None)
        family = type("Family", (), {"family": "timm-vit"})()
    page = Tags(vit_html(Facts()))
    assert {t for t, _ in page.tags} <= {"div", "b", "table", "tr", "th", "td"}
    assert "ViT <i>vit</i>" in "".join(page.text) and PAYLOADS[1] in "".join(page.text)


# ---- the app's Content-Security-Policy -----------------------------------------------------------
def test_app_pages_carry_a_csp_that_allows_exactly_their_inline_scripts(hostile):
    app = create_app(*hostile)
    client = app.server.test_client()
    for path in ("/", "/heads?run=hostile"):
        resp = client.get(path)
        assert resp.status_code == 200 and resp.mimetype == "text/html"
        csp = resp.headers.get("Content-Security-Policy")
        assert csp, f"{path}: no Content-Security-Policy header"
        script_src = re.search(r"script-src ([^;]*)", csp).group(1).split()
        assert "'unsafe-inline'" not in script_src and "'unsafe-eval'" not in script_src and "*" not in script_src
        assert "object-src 'none'" in csp
        page = Tags(resp.get_data(as_text=True))
        inline = [s for a, s in page.scripts if "src" not in a and a.get("type") != "application/json"]
        assert inline and all(sha256_source(s) in script_src for s in inline)
    assert "Content-Security-Policy" not in client.get("/_dash-layout").headers  # JSON, not a page


def test_the_strict_plotly_bundle_is_the_version_dash_would_serve():
    """WebGL traces draw without eval only with plotly.js's strict bundle (app/security.py): the one in
    assets/vendor must be the plotly.js of the installed plotly, and the page must load it."""
    import plotly.offline

    vendor = Path(__file__).resolve().parent.parent / "assets" / "vendor" / "plotly-strict.min.js"
    head = vendor.read_text(encoding="utf-8")[:200]
    assert f"plotly.js (strict - minified) v{plotly.offline.get_plotlyjs_version()}" in head, head
    page = create_app().server.test_client().get("/").get_data(as_text=True)
    assert "/assets/vendor/plotly-strict.min.js" in page


# ---- in a real browser ---------------------------------------------------------------------------
def _browser():
    pytest.importorskip("selenium")
    if not (shutil.which("chromedriver") and (shutil.which("chromium") or shutil.which("google-chrome"))):
        pytest.skip("browser tests need chromium and chromedriver")


def _csp_errors(dash_duo) -> list:
    return [e for e in dash_duo.get_logs() or [] if e.get("level") == "SEVERE"
            and "content security policy" in e.get("message", "").lower()]


def test_report_opened_in_a_browser_runs_no_payload_and_draws_its_figures(hostile, dash_duo, tmp_path):
    _browser()
    from dash.testing.wait import until

    text, _, _ = _report(hostile)
    path = tmp_path / "report.html"
    path.write_text(text, encoding="utf-8")
    dash_duo.driver.get(path.as_uri())
    drawn = "return [...document.querySelectorAll('.js-plotly-plot')].filter(d => d._fullData && d.querySelector('.main-svg')).length"
    until(lambda: dash_duo.driver.execute_script(drawn) == 6, timeout=TIMEOUT, msg="the 6 figures drawn")
    assert dash_duo.driver.execute_script("return window.__pwned === undefined")
    assert dash_duo.driver.execute_script("return document.querySelectorAll('figure img').length") >= 1
    ticks = dash_duo.driver.execute_script(
        "return [...document.querySelectorAll('.js-plotly-plot')[1].querySelectorAll('.ytick text')].map(t => t.textContent)")
    assert ticks and all(t in PAYLOADS for t in ticks)  # B3's class names as they are
    assert _csp_errors(dash_duo) == []


def test_explorer_and_heads_pages_work_under_their_csp(hostile, dash_duo):
    _browser()
    from dash.testing.wait import until

    app = create_app(*hostile)
    dash_duo.start_server(app)
    index = _index(hostile)
    image = _first_of_class_0(index)
    dash_duo.wait_for_page(f"{dash_duo.server_url}/?run=hostile&image={image}&layer=0&head=1", timeout=TIMEOUT)
    ticks = ("const gd = document.querySelector('#b3-graph .js-plotly-plot');"
             "return gd && gd._fullData ? [...gd.querySelectorAll('.ytick text')].map(t => t.textContent) : null")
    until(lambda: dash_duo.driver.execute_script(ticks), timeout=TIMEOUT, msg="B3 drawn")
    assert all(t in PAYLOADS for t in dash_duo.driver.execute_script(ticks))
    for graph in ("b1-graph", "c1-graph", "d4-graph"):
        until(lambda: dash_duo.driver.execute_script(
            f"const gd = document.querySelector('#{graph} .js-plotly-plot'); return !!(gd && gd._fullData)"),
            timeout=TIMEOUT, msg=f"{graph} drawn")
    label = PAYLOADS[0]
    until(lambda: f"label {label}" in dash_duo.find_element("#sel-summary").text, timeout=TIMEOUT,
          msg="the selection summary names the class as it is")
    dash_duo.wait_for_page(f"{dash_duo.server_url}/heads?run=hostile", timeout=TIMEOUT)
    dash_duo.wait_for_element("#heads-map", timeout=TIMEOUT)
    until(lambda: dash_duo.driver.execute_script(
        "const gd = document.querySelector('#heads-map .js-plotly-plot'); return !!(gd && gd._fullData)"),
        timeout=TIMEOUT, msg="the heads map drawn")
    classes = ("const gd = document.querySelector('#heads-class-map .js-plotly-plot');"
               "return gd && gd._fullData ? [...gd.querySelectorAll('.ytick text')].map(t => t.textContent) : null")
    until(lambda: dash_duo.driver.execute_script(classes), timeout=TIMEOUT, msg="the class map drawn")
    assert sorted(t.rsplit(" (n=", 1)[0] for t in dash_duo.driver.execute_script(classes)) == sorted(PAYLOADS)
    assert dash_duo.driver.execute_script("return window.__pwned === undefined")
    assert _csp_errors(dash_duo) == []
