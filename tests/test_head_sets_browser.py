"""The Explorer's head-set panels in a real browser on a run the real build made of the real
default model (cache/default when it exists, else the small run test_app_browser builds): pin and
shift-click two heads -> the set panel shows analysis.set_pruning's numbers; the pair heatmap holds
analysis.pair_interactions; a click on a cell makes that pair the set; the URL holds the set and a
reload restores it. HEADSCOPE_SCREENSHOT=1 writes assets/screenshot_head_sets.png and
assets/screenshot_head_pairs.png. Run under ``flock /tmp/hs-browser.lock``."""
import os
import shutil

import numpy as np
import pytest

from test_app_browser import (ROOT, TIMEOUT, click, into_view, js, no_console_errors, query, real_index,
                              record_server_errors, settle, visit, wait_js)

from dash.testing.wait import until  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.actions.action_builder import ActionBuilder  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

from app import create_app  # noqa: E402


def shown_heads(dash_duo):
    return sorted(tuple(int(v) for v in t.split(":")) for t in (query(dash_duo).get("heads") or "").split(",") if t)


def reference(real, image_id):
    """The run's model, the image [3, H, W] and its label, as the engine sees them."""
    from analysis.serving.service import ModelService

    from app import config

    svc = ModelService(device="cpu")
    run_dir = config.run_dir(real[1])
    image, label = svc.image(run_dir, image_id)
    return svc.vit(run_dir), image, label


def cell_text(dash_duo, col, metric):
    return dash_duo.find_element(f"#hs-val-{col}-{metric}").text


def test_real_head_set_and_pair_interactions(dash_duo, real, tmp_path):
    from analysis import pair_interactions, set_pruning
    from app.panels.head_sets import DEFAULT_K, pair_metric, top_heads

    run = real[1]
    index = real_index(real)
    metric = "prob_drop" if "prob_drop" in index.importance else index.importance[0]
    pos = min(3, index.n - 1)
    image = int(index.image_ids[pos])
    a, b = top_heads(index, metric, pos, 2)
    app = create_app(*real)
    server_errors = record_server_errors(app)
    visit(dash_duo, app, f"/?run={run}&image={image}&layer={a[0]}&head={a[1]}&metric={metric}")
    wait_js(dash_duo, "b1-graph", "gd.data.length", lambda n: n == 4, "B1 with the image's curve", timeout=180)

    # pin the selected head, shift-click a second one in B1's image curve
    dash_duo.wait_for_text_to_equal("#hs-pin", f"pin L{a[0]}H{a[1]}", timeout=TIMEOUT)
    click(dash_duo, "#hs-pin")
    until(lambda: shown_heads(dash_duo) == [a], timeout=TIMEOUT, msg="the pinned head in the URL")
    point = into_view(dash_duo, dash_duo.find_elements("#b1-graph .scatterlayer .trace:nth-of-type(4) .point")[b[0] * index.H + b[1]])
    ActionChains(dash_duo.driver).move_to_element(point).pause(0.3).key_down(Keys.SHIFT).click().key_up(Keys.SHIFT).perform()
    until(lambda: shown_heads(dash_duo) == sorted([a, b]), timeout=TIMEOUT, msg="both heads in the URL")
    until(lambda: (query(dash_duo).get("layer"), query(dash_duo).get("head")) == (str(b[0]), str(b[1])),
          timeout=TIMEOUT, msg="the shift-clicked head is selected too")
    wait_js(dash_duo, "b1-graph", "gd.layout.shapes.filter(s => s.line && s.line.color === '#009E73').length",
            lambda n: n == 2, "B1 marks the set")

    # the set panel: the set's numbers and the selected head's alone, as analysis.set_pruning gives them
    vit, img, label = reference(real, image)
    label = label if vit.has_head else None
    want_set = set_pruning(vit, img, label, [a, b])
    want_one = set_pruning(vit, img, label, [b])
    dash_duo.wait_for_element("#hs-val-set-emb_dist", timeout=180)
    for col, want in (("set", want_set), ("one", want_one)):
        for m in ("prob", "prob_drop", "jsd", "emb_dist"):
            if want[m] != want[m]:  # NaN (a backbone)
                continue
            until(lambda: cell_text(dash_duo, col, m) not in ("", "–"), timeout=TIMEOUT, msg=f"{col} {m}")
            assert float(cell_text(dash_duo, col, m)) == pytest.approx(want[m], rel=1e-3, abs=1e-6), (col, m)
    if vit.has_head:
        wait_js(dash_duo, "hs-top5", "gd.data.length", lambda n: n == 2, "two top-5 lists")
        assert np.allclose(js(dash_duo, "hs-top5", "gd.data[1].x"), want_set["top5_probs"][::-1], atol=1e-3)
    if os.environ.get("HEADSCOPE_SCREENSHOT"):
        if "taylor_prob_drop" in index.importance and metric == "prob_drop":
            click(dash_duo, "#b1-overlay input[value='taylor']")
            wait_js(dash_duo, "b1-graph", "gd.data.filter(t => t.meta && t.meta.overlay === 'taylor').length",
                    lambda n: n == 1, "Taylor overlay")
        shoot(dash_duo, tmp_path, "screenshot_head_sets.png")

    # pairs: the heatmap holds analysis.pair_interactions of the image's top-k heads
    click(dash_duo, "label[for='_dbcprivate_radioitems_hs-view_input_pairs']")
    wait_js(dash_duo, "hs-pairs-graph", "gd.data.length", lambda n: n == 2, "the pair heatmap", timeout=180)
    heads = top_heads(index, metric, pos, DEFAULT_K)
    df = pair_interactions(vit, img, label, heads=heads, metric=pair_metric(index, metric, pos))
    z = np.array(js(dash_duo, "hs-pairs-graph", "gd.data[0].z"), dtype=float)
    cd = js(dash_duo, "hs-pairs-graph", "gd.data[0].customdata")
    single = np.array(js(dash_duo, "hs-pairs-graph", "gd.data[1].z"), dtype=float)[:, 0]
    at = {h: i for i, h in enumerate(heads)}
    assert z.shape == (DEFAULT_K, DEFAULT_K)
    for r in df.itertuples():
        i, j = at[(r.a_layer, r.a_head)], at[(r.b_layer, r.b_head)]
        assert cd[i][j] == [r.a_layer, r.a_head, r.b_layer, r.b_head]
        # float32 round-off: the server's forwards batch the variants otherwise than this call does
        assert z[i, j] == pytest.approx(r.interaction, abs=1e-5) and z[j, i] == z[i, j]
        assert single[i] == pytest.approx(r.single_a, abs=1e-5) and single[j] == pytest.approx(r.single_b, abs=1e-5)

    # a click on a cell (row 1, column 2) makes that pair the set
    xy = js(dash_duo, "hs-pairs-graph", "[gd._fullLayout.xaxis.l2p(2), gd._fullLayout.yaxis.l2p(1)]")
    drag = into_view(dash_duo, dash_duo.find_element("#hs-pairs-graph .nsewdrag[data-subplot='xy']"))
    left, top = dash_duo.driver.execute_script("const r = arguments[0].getBoundingClientRect(); return [r.left, r.top]",
                                               drag)
    # viewport coordinates: chromedriver's offset from an SVG rect's centre misses the cell
    move = ActionBuilder(dash_duo.driver)
    move.pointer_action.move_to_location(int(left + xy[0]), int(top + xy[1])).pause(0.5).click()
    move.perform()
    pair = sorted([heads[1], heads[2]])
    until(lambda: shown_heads(dash_duo) == pair, timeout=TIMEOUT, msg="the clicked pair is the set")
    wait_js(dash_duo, "hs-pairs-graph", "gd.layout.shapes.length", lambda n: n == 2, "the pair outlined")
    if os.environ.get("HEADSCOPE_SCREENSHOT"):
        shoot(dash_duo, tmp_path, "screenshot_head_pairs.png")

    # the URL holds the set: a reload shows it again
    url = dash_duo.driver.current_url
    dash_duo.driver.get(url)
    dash_duo.wait_for_element("#hs-set-panel", timeout=TIMEOUT)
    until(lambda: dash_duo.find_element("#hs-set-panel").is_displayed(), timeout=TIMEOUT, msg="the set panel shows")
    until(lambda: all(f"L{l}H{h}" in dash_duo.find_element("#hs-set").text for l, h in pair), timeout=TIMEOUT,
          msg="the chips of the reloaded set")
    assert shown_heads(dash_duo) == pair
    dash_duo.wait_for_element("#hs-val-set-emb_dist", timeout=180)
    want = set_pruning(vit, img, label, pair)
    until(lambda: cell_text(dash_duo, "set", "emb_dist") not in ("", "–"), timeout=TIMEOUT, msg="reloaded numbers")
    assert float(cell_text(dash_duo, "set", "emb_dist")) == pytest.approx(want["emb_dist"], rel=1e-3, abs=1e-6)
    no_console_errors(dash_duo)
    assert server_errors == []


def shoot(dash_duo, tmp_path, name):
    dash_duo.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                    {"width": 1920, "height": 1080, "deviceScaleFactor": 1, "mobile": False})
    settle(dash_duo)
    import time

    time.sleep(1.5)
    out = tmp_path / name
    assert dash_duo.driver.save_screenshot(str(out))
    shutil.copy(out, ROOT / "assets" / name)


def test_the_chip_box_edits_the_set_in_the_browser(dash_duo, real):
    """The chip box's changes reach the state without a request (a clientside callback): unticking
    a head removes it, the clear button empties the set; the box filled from the URL changes nothing."""
    run = real[1]
    index = real_index(real)
    image = int(index.image_ids[0])
    visit(dash_duo, create_app(*real), f"/?run={run}&image={image}&layer=1&head=0&heads=0:1,2:3")
    dash_duo.driver.execute_script("document.getElementById('hs-set-panel').style.display = ''")
    until(lambda: "L0H1" in dash_duo.find_element("#hs-set").text and "L2H3" in dash_duo.find_element("#hs-set").text,
          timeout=TIMEOUT, msg="the chips from the URL")
    settle(dash_duo)
    assert shown_heads(dash_duo) == [(0, 1), (2, 3)]  # filling the box from the state kept it
    dash_duo.driver.execute_script("document.getElementById('hs-set').click()")
    option = dash_duo.find_element("#hs-set ~ * input[value='0:1'], [role=listbox] input[value='0:1']")
    dash_duo.driver.execute_script("arguments[0].closest('label').click()", option)
    until(lambda: shown_heads(dash_duo) == [(2, 3)], timeout=TIMEOUT, msg="L0H1 unticked")
    dash_duo.driver.execute_script("document.body.click()")
    dash_duo.driver.execute_script("document.querySelector('#hs-set .dash-dropdown-clear').click()")
    until(lambda: shown_heads(dash_duo) == [], timeout=TIMEOUT, msg="the set cleared")
    no_console_errors(dash_duo)
