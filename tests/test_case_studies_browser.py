"""What a researcher missed while doing the case studies (issue 25, item 5), in a real (headless
chromium) browser on runs the real build made of the real default model: Compare's URL keeps its
runs and metric (open, change, reload); a ticked B1 overlay that draws nothing says why; the pair
heatmap of the head set, every row labelled; the Heads class heatmap labels every head; D6's legend
beside its plot; the Curves page says what bounds its 1-point count. The real run has every
stage (the curves among them), as the README's default run."""
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from test_app_browser import (TIMEOUT, click, into_view, js, menu_open, no_console_errors, query, real_index,
                              record_server_errors, visit, wait_js)
from test_patterns_browser import choose_radio
from test_saliency_browser import show_saliency

from dash.testing.wait import until  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

from app import create_app  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def curves_cache(tmp_path_factory, real):
    """A cache with two copies of the real run (built with every stage, the curves among them, as
    the README's default run): ``real`` and ``curves``, two runs to compare."""
    cache = tmp_path_factory.mktemp("case-studies")
    for name in ("real", "curves"):
        shutil.copytree(Path(real[0]) / real[1], cache / name)
    return cache


def choose(dash_duo, dropdown, value):
    """Pick ``value`` in dcc.Dropdown ``dropdown`` as a user does (open, click the option)."""
    click(dash_duo, f"#{dropdown}")
    option = dash_duo.wait_for_element(f".dash-dropdown-content .dash-dropdown-option:has(input[value='{value}'])",
                                       timeout=TIMEOUT)
    # clicked where it is: a long menu scrolls under a pointer moved to an option below its fold
    dash_duo.driver.execute_script("arguments[0].click()", option)
    is_open = lambda: menu_open(dash_duo)
    if is_open():
        ActionChains(dash_duo.driver).send_keys(Keys.ESCAPE).perform()
    until(lambda: not is_open(), timeout=TIMEOUT, msg="menu closed")


def profiles(dash_duo):
    """(the runs' lines in the profile figure, its title)."""
    return (js(dash_duo, "compare-profiles", "gd.data.filter(t => t.mode === 'lines+markers').map(t => t.name)"),
            js(dash_duo, "compare-profiles", "(gd.layout.title || {}).text"))


def test_real_compare_url_keeps_its_runs_and_metric(dash_duo, curves_cache):
    from analysis.metrics import registry

    app = create_app(curves_cache, "real")
    server_errors = record_server_errors(app)
    dash_duo.start_server(app)
    dash_duo.wait_for_page(dash_duo.server_url + "/compare?runs=curves,real&metric=prob_drop", timeout=TIMEOUT)
    want = lambda metric: (["curves", "real"], f"{registry.get_metric(metric).title} per layer")
    shows = lambda metric: (lambda: (p := profiles(dash_duo))[0] == want(metric)[0]
                            and (p[1] or "").startswith(want(metric)[1]))
    until(shows("prob_drop"), timeout=TIMEOUT, msg="the URL's runs, in order, and its metric")
    until(lambda: (query(dash_duo).get("runs"), query(dash_duo).get("metric")) == ("curves,real", "prob_drop"),
          timeout=TIMEOUT, msg="the URL keeps them")
    # a metric chosen on the page goes to the URL (a new history entry), and a reload keeps it
    choose(dash_duo, "compare-metric", "mean_distance_px")
    until(lambda: query(dash_duo).get("metric") == "mean_distance_px", timeout=TIMEOUT, msg="the URL follows the menu")
    until(shows("mean_distance_px"), timeout=TIMEOUT, msg="the profiles follow the menu")
    assert query(dash_duo).get("runs") == "curves,real"
    dash_duo.driver.refresh()
    until(shows("mean_distance_px"), timeout=TIMEOUT, msg="a reload keeps the comparison")
    assert (query(dash_duo).get("runs"), query(dash_duo).get("metric")) == ("curves,real", "mean_distance_px")
    dash_duo.driver.back()  # Back: the metric before, the page not rendered anew
    until(shows("prob_drop"), timeout=TIMEOUT, msg="Back restores the metric")
    # bad values: dropped with a note naming them, the rest kept, the URL cleaned
    dash_duo.wait_for_page(dash_duo.server_url + "/compare?runs=real,nope,curves&metric=bogus", timeout=TIMEOUT)
    dash_duo.wait_for_contains_text("#state-notes", "runs=nope ignored", timeout=TIMEOUT)
    notes = dash_duo.find_element("#state-notes").text
    assert "metric=bogus ignored: none of the compared runs (real, curves)" in notes
    until(lambda: query(dash_duo).get("runs") == "real,curves" and "metric" not in query(dash_duo),
          timeout=TIMEOUT, msg="the URL without what was ignored")
    until(lambda: profiles(dash_duo)[0] == ["real", "curves"], timeout=TIMEOUT, msg="the runs kept")
    no_console_errors(dash_duo)
    assert server_errors == []


def test_real_b1_overlays_say_why_they_draw_nothing(dash_duo, real):
    index = real_index(real)
    image = int(index.image_ids[2])
    visit(dash_duo, create_app(*real), f"/?run={real[1]}&image={image}&layer=3&head=1&metric=prob")
    note = "(gd.layout.annotations || []).filter(a => a.name === 'overlay-note').map(a => a.text).join(' ')"
    wait_js(dash_duo, "b1-graph", "gd.data.length", lambda n: n == 4, "B1 with the image's curve", timeout=180)
    assert js(dash_duo, "b1-graph", note) == ""
    choose_radio(dash_duo, "b1-overlay", "taylor")
    wait_js(dash_duo, "b1-graph", note, lambda t: "estimates prob_drop only" in t and "now prob)" in t,
            "the Taylor box with prob says which metric it applies to")
    assert js(dash_duo, "b1-graph", "gd.data.filter(t => t.meta && t.meta.overlay).length") == 0
    choose_radio(dash_duo, "b1-overlay", "mean")
    if "mean_prob" in index.importance:  # built with --mean-ablation: drawn, nothing to say about it
        wait_js(dash_duo, "b1-graph", "gd.data.filter(t => t.meta && t.meta.overlay === 'mean').length",
                lambda n: n == 1, "the mean-ablated overlay")
    else:
        wait_js(dash_duo, "b1-graph", note, lambda t: "--mean-ablation" in t, "mean abl. says how to build it")
    until(lambda: dash_duo.find_element("#b1-graph .annotation-text").is_displayed(), timeout=TIMEOUT,
          msg="the note is drawn")
    no_console_errors(dash_duo)


def test_real_pair_heatmap_of_the_head_set_labels_every_row(dash_duo, real):
    from analysis import pair_interactions
    from analysis.serving.service import ModelService
    from app import config
    from app.panels.head_sets import pair_metric

    index = real_index(real)
    pos = 3
    image = int(index.image_ids[pos])
    heads = [(0, 1), (2, 3), (5, 0), (7, 4), (11, 5)]
    visit(dash_duo, create_app(*real),
          f"/?run={real[1]}&image={image}&metric=prob_drop&heads=" + ",".join(f"{l}:{h}" for l, h in heads))
    choose_radio(dash_duo, "hs-view", "pairs")
    choose_radio(dash_duo, "hs-pairs-from", "set")
    names = [f"L{l}H{h}" for l, h in heads]
    wait_js(dash_duo, "hs-pairs-graph", "gd.data.length && gd.data[0].y", lambda y: y == names, "the set's pairs",
            timeout=180)
    # its numbers are analysis.pair_interactions' of exactly these heads
    svc = ModelService(device="cpu")
    img, label = svc.image(config.run_dir(real[1]), image)
    df = pair_interactions(svc.vit(config.run_dir(real[1])), img, label, heads=heads,
                           metric=pair_metric(index, "prob_drop", pos))
    z = np.array(js(dash_duo, "hs-pairs-graph", "gd.data[0].z"), dtype=float)
    for r in df.itertuples():
        i, j = heads.index((r.a_layer, r.a_head)), heads.index((r.b_layer, r.b_head))
        assert z[i, j] == pytest.approx(r.interaction, abs=1e-6)
    ticks = "[...gd.querySelectorAll('.yaxislayer-above .ytick text')].map(t => t.textContent).sort()"
    assert js(dash_duo, "hs-pairs-graph", ticks) == sorted(names)
    # the image's top 16 (the most the panel compares): every row labelled, the graph grown for them
    choose_radio(dash_duo, "hs-pairs-from", "top")
    box = dash_duo.find_element("#hs-k")
    box.clear()
    box.send_keys("16", Keys.ENTER)
    wait_js(dash_duo, "hs-pairs-graph", "gd.data.length && gd.data[0].y.length", lambda n: n == 16, "16 heads",
            timeout=180)
    wait_js(dash_duo, "hs-pairs-graph", ticks, lambda t: t == sorted(js(dash_duo, "hs-pairs-graph", "gd.data[0].y")),
            "a label on every row")
    labels = sorted(dash_duo.driver.execute_script(
        "return [...document.querySelectorAll('#hs-pairs-graph .yaxislayer-above .ytick text')]"
        ".map(t => t.getBoundingClientRect()).map(r => [r.top, r.bottom]);"))
    height = js(dash_duo, "hs-pairs-graph", "gd.getBoundingClientRect().height")
    assert all(a[1] <= b[0] + 0.5 for a, b in zip(labels, labels[1:])), ("row labels overlap", height, labels)
    no_console_errors(dash_duo)


def test_real_class_heatmap_labels_every_head(dash_duo, real):
    index = real_index(real)
    visit(dash_duo, create_app(*real), f"/heads?run={real[1]}")
    wait_js(dash_duo, "heads-class-map", "gd.data.length", lambda n: bool(n), "class heatmap", timeout=TIMEOUT)
    ticks = "[...gd.querySelectorAll('.xaxislayer-above .xtick text')].map(t => t.textContent)"
    want = [f"L{l}H{h}" for l in range(index.L) for h in range(index.H)]
    wait_js(dash_duo, "heads-class-map", ticks, lambda t: t == want, f"all {len(want)} heads labelled")
    boxes = dash_duo.driver.execute_script(
        "return [...document.querySelectorAll('#heads-class-map .xaxislayer-above .xtick text')]"
        ".map(t => t.getBoundingClientRect()).map(r => [r.left, r.right]);")
    assert all(a[1] <= b[0] + 0.5 for a, b in zip(boxes, boxes[1:])), "head labels overlap"
    no_console_errors(dash_duo)


def test_real_d6_legend_beside_the_deletion_curves(dash_duo, real):
    index = real_index(real)
    image = int(index.image_ids[1])
    visit(dash_duo, create_app(*real), f"/?run={real[1]}&image={image}&layer=5&head=2")
    show_saliency(dash_duo)
    wait_js(dash_duo, "sal-deletion", "gd.data.length", lambda n: n >= 2, "deletion curves", timeout=300)
    into_view(dash_duo, dash_duo.find_element("#sal-deletion"))
    legend, plot = dash_duo.driver.execute_script(
        "const g = document.querySelector('#sal-deletion .js-plotly-plot');"
        "const box = el => { const r = el.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };"
        "return [box(g.querySelector('.legend')), box(g.querySelector('.nsewdrag'))];")
    apart = legend[0] >= plot[2] or legend[2] <= plot[0] or legend[1] >= plot[3] or legend[3] <= plot[1]
    assert apart, (legend, plot)
    no_console_errors(dash_duo)


def test_real_curves_say_what_bounds_the_1_point_count(dash_duo, curves_cache):
    from analysis.metrics.head_sets import heads_before_drop

    curve = pd.read_parquet(curves_cache / "curves" / "pruning_curves.parquet")
    exact = curve[curve.order == "exact"]
    k = heads_before_drop(exact)  # its own reference: the grid k after it, where accuracy has dropped
    grid = sorted(int(v) for v in exact.k)
    after = [g for g in grid if g > k]
    dash_duo.start_server(create_app(curves_cache, "curves"))
    dash_duo.wait_for_page(dash_duo.server_url + "/curves?run=curves", timeout=TIMEOUT)
    dash_duo.wait_for_element("#curves-limits", timeout=TIMEOUT)
    lines = [li.text for li in dash_duo.find_elements("#curves-limits li")]
    first = next(t for t in lines if t.startswith("exact (leave-one-out)"))
    if after:
        assert f"between k = {k} and {after[0]}" in first and f"at most {after[0] - 1} heads" in first
        acc = exact.set_index("k").accuracy
        assert acc[after[0]] < acc[0] - 0.01 <= acc[k]  # the bracket is where the drop is
    else:
        assert "no 1-point drop at any k of the grid" in first
    assert any(t.startswith("image-limited: accuracy is measured on 30 labelled images") and "3.33 points" in t
               for t in lines)
    no_console_errors(dash_duo)
