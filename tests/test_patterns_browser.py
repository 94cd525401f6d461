"""Pattern labels, class level and mispredicted images (issue 15) in a real (headless chromium)
browser on a run of the REAL default model (HEADSCOPE_REAL_RUN=/work/runs/default reuses a built
one; see conftest.real_default). Expected values come from the run's tables through pandas.
"""
import shutil

import numpy as np
import pytest

pytest.importorskip("selenium")
if not (shutil.which("chromedriver") and (shutil.which("chromium") or shutil.which("google-chrome"))):
    pytest.skip("browser tests need chromium and chromedriver", allow_module_level=True)

from dash.testing.wait import until  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402

from app import create_app  # noqa: E402
from test_app_browser import TIMEOUT, click, into_view, js, no_console_errors, settle, visit, wait_js  # noqa: E402


@pytest.fixture(scope="module")
def tables(real):
    """The real run's images and head_metrics tables (pandas), and its layer x head sizes."""
    from analysis.runs.reader import open_run

    r = open_run(real[0] / real[1])
    if "pattern" not in r.head_metrics.columns:
        pytest.skip(f"run {real[1]} has no pattern labels (build --add-pattern-labels)")
    return {"images": r.images, "heads": r.head_metrics, "summary": r.head_summary, "L": r.L, "H": r.H}


def choose_radio(dash_duo, radio_id, value, tries=3):
    """Click the label of option ``value`` of the dbc.RadioItems / Checklist ``radio_id`` (what a user
    clicks: the toggles' inputs are styled out of reach). A click that the Explorer's state sync
    undoes while the page is still settling (issue 12, open) is repeated, up to ``tries`` times."""
    selected = lambda: dash_duo.find_element(f"#{radio_id} input[value={value}]").is_selected()
    for _ in range(tries):
        settle(dash_duo)
        el = dash_duo.find_element(f"#{radio_id} input[value={value}]")
        click(dash_duo, f"label[for='{el.get_attribute('id')}']")
        try:
            until(selected, timeout=10, msg=f"{radio_id} = {value}")
            return
        except Exception:
            continue
    assert selected(), f"{radio_id} = {value} after {tries} clicks"


def trace(dash_duo, graph_id, prefix):
    """[name, y] of the first trace of ``graph_id`` whose name starts with ``prefix`` (None: none)."""
    return js(dash_duo, graph_id, f"(gd.data.filter(t => (t.name || '').startsWith({prefix!r}))"
                                  ".map(t => [t.name, t.y ? Array.from(t.y) : null, t.x ? Array.from(t.x) : null])[0] || null)")


def test_d1_coloured_by_pattern_label_shows_the_pattern_legend(dash_duo, real, tables):
    hm = tables["heads"]
    run = real[1]
    visit(dash_duo, create_app(*real), f"/?run={run}&image=3&layer=2&head=1")
    wait_js(dash_duo, "d1-graph", "gd.data.length", lambda n: bool(n), "D1 drawn", timeout=180)
    assert not js(dash_duo, "d1-graph", "gd.data.filter(t => (t.name || '').startsWith('pattern: ')).length")
    choose_radio(dash_duo, "d1-color", "pattern")
    families = {p.split(":")[0] for p in hm["pattern"].dropna()}
    wait_js(dash_duo, "d1-graph", "gd.data.map(t => t.name).filter(n => (n || '').startsWith('pattern: '))",
            lambda names: names is not None and set(names) == {f"pattern: {f}" for f in families}, "pattern legend")
    legend = dash_duo.find_element("#d1-graph .legend").text
    for f in families:
        assert f"pattern: {f}" in legend
    # every head with a position is drawn, in the trace of its label's family
    n_points = js(dash_duo, "d1-graph", "gd._fullData.filter(t => t.name.startsWith('pattern: '))"
                                        ".reduce((n, t) => n + t._length, 0)")
    assert n_points == int(hm[["cls_x", "cls_y"]].notna().all(axis=1).sum())
    for f in families:
        names = js(dash_duo, "d1-graph", f"gd.data.find(t => t.name === 'pattern: {f}').text")
        assert {v.split(":")[0] for v in names} == {f}
    no_console_errors(dash_duo)


def test_heads_page_pattern_table_is_sortable_and_matches_the_run(dash_duo, real, tables):
    hm, summary = tables["heads"], tables["summary"]
    visit(dash_duo, create_app(*real), f"/heads?run={real[1]}")
    dash_duo.wait_for_contains_text("#heads-pattern-table", "modal label", timeout=TIMEOUT)

    def rows():
        out = []
        for tr in dash_duo.find_elements("#heads-pattern-table tbody tr"):
            cells = [td.text for td in tr.find_elements("css selector", "td")]
            if cells:
                out.append(cells)
        return out

    header = [th.text.strip() for th in dash_duo.find_elements("#heads-pattern-table thead th, "
                                                                "#heads-pattern-table tr:first-child th")]
    assert any("modal label" in h for h in header) and any("consistency" in h for h in header)
    first = rows()
    assert first, "no rows"
    cons = [float(r[-1]) for r in first]
    assert cons == sorted(cons, reverse=True)  # sorted by consistency, highest first
    assert cons[0] == pytest.approx(float(summary["consistency"].max()), abs=1e-4)
    # modal label and its share against pandas
    for layer, head, label, share, _ in (r[:5] for r in first[:5]):
        labels = hm[(hm.layer == int(layer)) & (hm["head"] == int(head))]["pattern"]
        counts = labels.value_counts()
        assert counts.iloc[0] == counts.get(label, 0), (layer, head, label)  # the modal label (ties: any mode)
        assert float(share) == pytest.approx(counts.iloc[0] / len(labels), abs=1e-4)
    # sort by share: a click on its header's sort arrow
    share_col = [i for i, h in enumerate(header) if "share" in h][0]
    arrows = dash_duo.find_elements("#heads-pattern-table .column-header--sort")
    into_view(dash_duo, arrows[share_col]).click()
    until(lambda: rows() != first, timeout=TIMEOUT, msg="table re-sorted")
    shares = [float(r[3]) for r in rows()]
    assert shares == sorted(shares) or shares == sorted(shares, reverse=True)
    no_console_errors(dash_duo)


def test_help_draws_the_pattern_examples(dash_duo, real):
    visit(dash_duo, create_app(*real), "/help")
    dash_duo.wait_for_contains_text(".help-page", "The four basic patterns", timeout=TIMEOUT)
    examples = dash_duo.find_elements(".pattern-example")
    assert len(examples) >= 4
    titles = []
    for i in range(len(examples)):
        wait_js(dash_duo, f"pattern-example-{i}", "gd.data.length", lambda n: n == 1, f"example {i} drawn")
        titles.append(js(dash_duo, f"pattern-example-{i}", "gd.layout.title.text"))
    for label in ("diagonal", "horizontal", "vertical", "block"):
        assert any(f"label {label}" in t for t in titles), (label, titles)
    no_console_errors(dash_duo)


def test_band_scope_restricts_b1_band_and_c3_to_the_class_or_the_mispredicted(dash_duo, real, tables):
    from app import config, data

    images, hm = tables["images"], tables["heads"]
    config.configure(*real)
    index = data.get_index(real[1])
    image, layer, head = int(images.image_id.iloc[3]), 2, 1
    visit(dash_duo, create_app(*real), f"/?run={real[1]}&image={image}&layer={layer}&head={head}")
    wait_js(dash_duo, "b1-graph", "gd.data.length", lambda n: bool(n), "B1 drawn", timeout=180)
    wait_js(dash_duo, "c3-graph", "gd.data.length", lambda n: bool(n), "C3 drawn", timeout=180)
    prop = js(dash_duo, "c3-graph", "gd.layout.xaxis.title.text")
    metric = "prob"  # B1's default on a classifier run
    label = int(images.label.iloc[3])
    scopes = {"class": (images.label == label, f"class {index.class_name(label)}"),
              "wrong": (images.pred != images.label, "mispredicted")}
    select = Select(dash_duo.find_element("#band-scope"))
    assert {o.get_attribute("value") for o in select.options} >= {"set", "class", "wrong"}
    for scope, (mask, name) in scopes.items():
        ids = set(images.image_id[mask])
        assert len(ids) >= 2
        select.select_by_value(scope)
        band = f"mean over {name} ({len(ids)})"
        wait_js(dash_duo, "b1-graph", "gd.data.map(t => t.name)", lambda names, b=band: b in (names or []), f"B1 {scope}")
        _, y, _ = trace(dash_duo, "b1-graph", band)
        sub = hm[hm.image_id.isin(ids)].groupby(["layer", "head"])[metric].mean()
        np.testing.assert_allclose(y, sub.to_numpy(), rtol=1e-5, atol=1e-6)
        wait_js(dash_duo, "c3-graph", "gd.data.map(t => t.name)",
                lambda names, n=f"{name} ({len(ids)})": n in (names or []), f"C3 {scope}")
        settle(dash_duo)
        _, share, centres = trace(dash_duo, "c3-graph", f"{name} ({len(ids)})")
        m = registry_metric(prop)
        v = hm[hm.image_id.isin(ids) & (hm.layer == layer) & (hm["head"] == head)][m.name].dropna().to_numpy(float)
        counts, edges = np.histogram(v, bins=len(centres), range=m.range)  # C3: share of the scope's images per bin
        np.testing.assert_allclose(centres, (edges[:-1] + edges[1:]) / 2, atol=1e-9)
        np.testing.assert_allclose(share, counts / len(v), atol=1e-9)
        no_console_errors(dash_duo)


def registry_metric(title: str):
    """The registry metric whose title is ``title`` (C3's x axis)."""
    from analysis.metrics import registry

    return next(m for m in registry.metrics() if m.title == title)


def test_heads_class_heatmap_over_the_correct_or_the_mispredicted_images(dash_duo, real, tables):
    images, hm = tables["images"], tables["heads"]
    visit(dash_duo, create_app(*real), f"/heads?run={real[1]}")
    wait_js(dash_duo, "heads-class-map", "gd.data.length", lambda n: bool(n), "class heatmap", timeout=TIMEOUT)
    counts = lambda df: sorted(int(v) for v in df.groupby("label").size())
    shown = lambda: sorted(int(y.split("(n=")[1].rstrip(")")) for y in js(dash_duo, "heads-class-map", "gd.data[0].y"))
    assert shown() == counts(images)
    for choice, subset in (("correct", images[images.pred == images.label]),
                           ("wrong", images[images.pred != images.label])):
        assert len(subset), choice
        choose_radio(dash_duo, "heads-class-images", choice)
        until(lambda s=subset: shown() == counts(s), timeout=TIMEOUT, msg=f"{choice} images only")
        metric = js(dash_duo, "heads-class-map", "gd.layout.title.text")
        m = registry_metric(metric.split("class mean of ")[1].split(" · ")[0])
        z = np.array(js(dash_duo, "heads-class-map", "gd.data[0].z"), dtype=float)
        joined = hm.merge(subset[["image_id", "label"]], on="image_id")  # only the subset's images
        want = joined.groupby(["label", "layer", "head"])[m.name].mean().unstack(["layer", "head"]).sort_index()
        np.testing.assert_allclose(z, want.to_numpy(float), rtol=1e-5, atol=1e-7)  # the class means of exactly those images
    no_console_errors(dash_duo)


def test_d1_draws_only_the_mispredicted_images_and_the_url_keeps_the_scope(dash_duo, real, tables):
    from app import config, data

    images = tables["images"]
    config.configure(*real)
    index = data.get_index(real[1])
    wrong = images[images.pred != images.label]
    assert len(wrong)
    drawn = lambda ids: int((~np.isnan(index.layouts["cls"][[index.pos(i) for i in ids]]).any(-1)).sum())
    assert drawn(wrong.image_id) < drawn(images.image_id)
    visit(dash_duo, create_app(*real), f"/?run={real[1]}&image={int(images.image_id.iloc[0])}&layer=3&head=2")
    count = "gd._fullData.filter(t => t.type === 'scattergl').reduce((n, t) => n + t._length, 0)"
    wait_js(dash_duo, "d1-graph", count, lambda n: n == drawn(images.image_id), "D1: every image", timeout=TIMEOUT)
    Select(dash_duo.find_element("#band-scope")).select_by_value("wrong")
    wait_js(dash_duo, "d1-graph", count, lambda n: n == drawn(wrong.image_id), "D1: mispredicted only",
            timeout=TIMEOUT)
    until(lambda: "scope=wrong" in dash_duo.driver.current_url, timeout=TIMEOUT, msg="scope in the URL")
    dash_duo.wait_for_contains_text("#d1-msg", f"{len(wrong)} image", timeout=TIMEOUT)
    dash_duo.driver.refresh()  # the URL alone restores the scope
    until(lambda: dash_duo.find_element("#band-scope").get_attribute("value") == "wrong", timeout=TIMEOUT,
          msg="scope from the URL")
    wait_js(dash_duo, "d1-graph", count, lambda n: n == drawn(wrong.image_id), "D1 after reload",
            timeout=TIMEOUT)
    # a click on a point of the filtered background selects that head of that (mispredicted) image
    image = int(wrong.image_id.iloc[-1])
    xy = index.layouts["cls"][index.pos(image), 5 * index.H + 1]
    dash_duo.driver.execute_script(
        "const gd = document.querySelector('#d1-graph .js-plotly-plot');"
        f"Plotly.relayout(gd, {{'xaxis.range': [{xy[0]} - 0.02, {xy[0]} + 0.02], 'yaxis.range': [{xy[1]} - 0.02, {xy[1]} + 0.02]}});")
    settle(dash_duo)
    plot = into_view(dash_duo, dash_duo.find_element("#d1-graph .nsewdrag"))
    ActionChains(dash_duo.driver).move_to_element(plot).pause(0.6).click().perform()
    until(lambda: f"image={image}&" in dash_duo.driver.current_url, timeout=TIMEOUT, msg="the clicked image")
    assert "layer=5&head=1" in dash_duo.driver.current_url
    no_console_errors(dash_duo)
