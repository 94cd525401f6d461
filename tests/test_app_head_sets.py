"""The Explorer's head-set panels without a browser: figure builders, the URL form of the set,
the set editing logic and the top-k choice (app/panels/head_sets.py)."""
import json
import re

import numpy as np
import pytest
from plotly.io.json import to_json_plotly

from app import config, data, figures as F
from app.state import parse_selection, selection_query
from conftest import make_synthetic_run as make_run

L, H = 4, 3


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    root = tmp_path_factory.mktemp("hs")
    make_run(root / "syn", n_images=12, layers=L, heads=H, grid=4, n_classes=3, seed=4)
    config.configure(root, "syn")
    return data.get_index("syn")


def roundtrip(fig):
    return json.loads(to_json_plotly(fig))


def test_the_head_set_round_trips_through_the_url():
    q = selection_query({"run": "syn", "image": 2, "heads": [[0, 4], [11, 5]]})
    assert q == "?run=syn&image=2&heads=0:4,11:5"
    assert parse_selection(q, None)["heads"] == [[0, 4], [11, 5]]
    assert parse_selection("?heads=3:1,0:2,3:1", None)["heads"] == [[0, 2], [3, 1]]  # sorted, once each
    for bad in ("?heads=1:x", "?heads=1", "?heads=1:2:3:4", "?heads=-1:2"):
        assert parse_selection(bad, None)["heads"] is None, bad
    many = ",".join(f"{l}:{h}" for l in range(12) for h in range(12))
    assert len(parse_selection(f"?heads={many}", None)["heads"]) == 64


def test_b1_marks_the_set_and_draws_overlays():
    mean, std = np.zeros(L * H), np.ones(L * H)
    taylor = np.linspace(0, 1, L * H)
    fig = roundtrip(F.head_importance(L, H, "ΔP(true)", mean, std, image_values=mean + 0.5,
                                      overlays=[("taylor", "Taylor estimate (approx.)", taylor)], pinned=[(1, 2), (3, 0)]))
    over = [t for t in fig["data"] if (t.get("meta") or {}).get("overlay") == "taylor"]
    assert len(over) == 1 and over[0]["name"] == "Taylor estimate (approx.)"
    assert np.allclose(over[0]["y"], taylor) and over[0]["line"]["dash"] == "dash"
    green = [s["x0"] for s in fig["layout"]["shapes"] if s.get("line", {}).get("color") == F.SET_GREEN]
    assert sorted(green) == [1 * H + 2, 3 * H + 0]
    plain = F.head_importance(L, H, "x", mean, std)
    assert len(plain["data"]) == 3 and not [s for s in plain["layout"]["shapes"] if s["line"].get("color") == F.SET_GREEN]


def test_top5_pair_side_by_side_true_label_bold():
    fig = roundtrip(F.top5_pair([("L1H2 alone", ["cat", "dog"], [0.7, 0.2]), ("set of 2", ["dog", "cat"], [0.5, 0.4])],
                                "cat"))
    a, b = fig["data"]
    assert a["xaxis"] == "x" and b["xaxis"] == "x2"
    assert a["y"] == ["dog", "<b>cat</b>"] and a["x"] == [0.2, 0.7]  # highest on top
    assert b["y"] == ["<b>cat</b>", "dog"]
    assert fig["layout"]["xaxis"]["domain"][1] <= fig["layout"]["xaxis2"]["domain"][0]
    assert [x["text"] for x in fig["layout"]["annotations"]] == ["L1H2 alone", "set of 2"]


def test_pair_heatmap_is_symmetric_with_singles_on_the_margin():
    heads = [(0, 1), (2, 0), (3, 2)]
    M = np.array([[np.nan, 0.1, -0.3], [0.1, np.nan, 0.05], [-0.3, 0.05, np.nan]])
    fig = roundtrip(F.pair_heatmap(heads, M, [0.2, 0.4, 0.6], "ΔP(true)", current=[[2, 0], [0, 1]]))
    cells, strip = fig["data"]
    assert cells["x"] == cells["y"] == ["L0H1", "L2H0", "L3H2"]
    z = np.array([[np.nan if v is None else v for v in row] for row in cells["z"]])
    assert np.allclose(z, z.T, equal_nan=True) and np.isnan(np.diag(z)).all()
    assert cells["zmid"] == 0 and cells["zmax"] == pytest.approx(0.3) and cells["zmin"] == pytest.approx(-0.3)
    assert cells["customdata"][0][2] == [0, 1, 3, 2] and cells["customdata"][2][0] == [3, 2, 0, 1]
    assert [r[0] for r in strip["z"]] == [0.2, 0.4, 0.6] and strip["xaxis"] == "x2"
    assert strip["customdata"][1][0] == [2, 0, 2, 0]
    outlined = sorted((s["x0"] + 0.5, s["y0"] + 0.5) for s in fig["layout"]["shapes"])
    assert outlined == [(0, 1), (1, 0)]  # the current set is the pair (L0H1, L2H0)
    assert not F.pair_heatmap(heads, M, [0, 0, 0], "x", current=[[0, 1]])["layout"]["shapes"]


def test_top_heads_follow_the_metric_direction(index):
    from app.panels.head_sets import pair_metric, top_heads

    pos = 3
    for metric, high in (("prob_drop", True), ("prob", False)):
        v = index.values(metric)[pos]
        got = top_heads(index, metric, pos, 4)
        want = np.argsort(-v if high else v, kind="stable")[:4]
        assert got == [(int(i) // H, int(i) % H) for i in want], metric
    assert pair_metric(index, "jsd", pos) == "prob_drop" and pair_metric(index, "emb_dist", pos) == "emb_dist"


def test_b1_extras_only_for_metrics_the_run_has(index):
    from app.panels.head_sets import b1_extras

    out = b1_extras(index, "prob_drop", 2, ["taylor", "mean"], [[1, 1]])
    names = {name for _, name, _ in out["overlays"]}
    assert out["pinned"] == [(1, 1)]
    assert names == {"Taylor estimate (approx.)", "mean ablation"}  # the synthetic run has both
    got = {k: v for k, _, v in out["overlays"]}
    assert np.allclose(got["taylor"], index.values("taylor_prob_drop")[2], equal_nan=True)
    assert np.allclose(got["mean"], index.values("mean_prob_drop")[2], equal_nan=True)
    back = b1_extras(index, "mean_jsd", None, ["mean"], None)["overlays"]  # the mean-ablated metric: zero beside it
    assert [(k, n) for k, n, _ in back] == [("mean", "zero ablation")]
    assert np.allclose(back[0][2], index.summary("jsd")[0], equal_nan=True)
    none = b1_extras(index, "jsd", None, ["taylor"], None)  # Taylor estimates prob_drop only: nothing drawn, said why
    assert none["overlays"] == [] and none["pinned"] == [] and "prob_drop only" in none["overlay_notes"][0]


def test_a_pair_cell_click_names_its_two_heads():
    """Dash's Graph drops a heatmap point's customdata: the cell's axis labels name the heads."""
    from app.panels.head_sets import _pair_cell

    assert _pair_cell({"x": "L8H3", "y": "L9H3", "z": -0.4}) == [[9, 3], [8, 3]]
    assert _pair_cell({"x": "alone", "y": "L0H11"}) == [[0, 11], [0, 11]]  # the margin strip: that head alone
    assert _pair_cell({"customdata": [1, 2, 3, 0], "x": "L8H3", "y": "L9H3"}) == [[1, 2], [3, 0]]
    for bad in ({"x": "L8H3"}, {"x": "L8H3", "y": "layer 9"}, {"x": "L8", "y": "L9H3"}, {}):
        assert _pair_cell(bad) is None, bad


def test_heads_page_ranks_the_change_between_zero_and_mean_ablation(index):
    from app import create_app

    create_app(index.path.parent, "syn")  # the pages register with an app
    from app.pages.heads import shift_rows

    zero, rows = shift_rows(index, n=5)
    assert zero == "prob_drop"
    z, m = np.nanmean(index.values("prob_drop"), 0), np.nanmean(index.values("mean_prob_drop"), 0)
    shift = index.summary("ablation_shift")[0]
    want = np.argsort(-np.abs(shift), kind="stable")[:5]
    assert [(l, h) for l, h, *_ in rows] == [(int(i) // H, int(i) % H) for i in want]
    for (l, h, a, b, d, ra, rb), i in zip(rows, want):
        assert a == pytest.approx(z[i]) and b == pytest.approx(m[i]) and d == pytest.approx(shift[i])
        assert ra == 1 + int((z > z[i]).sum()) and rb == 1 + int((m > m[i]).sum())


def test_api_head_set_refuses_bad_sets_with_the_fix(tmp_path, monkeypatch):
    """/api/head_set: over 64 heads, a head outside the model, an empty set -> 400 naming the problem
    (tests/test_head_sets.py covers the Python API and the other /api cases)."""
    from analysis.runs.synthetic import make_run as make_model_run
    from app.server import create_app

    monkeypatch.delenv("HEADSCOPE_BROKER_URL", raising=False)
    make_model_run(tmp_path / "tiny", n_images=3, model="test_vit", img_size=32)  # 6 layers x 2 heads
    client = create_app(tmp_path, "tiny").server.test_client()
    many = ",".join(f"{i % 6}:{i % 2}" for i in range(65))
    for heads, text in ((many, "at most 64"), ("-1:0", "does not exist"), ("6:0", "layers 0-5"), ("", "empty")):
        r = client.get(f"/api/head_set?run=tiny&image=1&heads={heads}")
        assert r.status_code == 400 and text in r.json["error"], (heads, r.json)


def test_api_warm_fills_the_online_cache_the_views_read(tmp_path, monkeypatch):
    """api/warm (asked while a head click is held) computes the head's partial pruning and attention
    into the online cache: the views' own queries are then answered from it, with the same numbers
    as a fresh computation; bad input is refused with a message, never computed."""
    from analysis.runs.synthetic import make_run as make_model_run
    from analysis.serving import transport
    from analysis.serving.service import ResultCache
    from app.server import create_app

    monkeypatch.delenv("HEADSCOPE_BROKER_URL", raising=False)
    make_model_run(tmp_path / "tiny", n_images=3, model="test_vit", img_size=32)
    client = create_app(tmp_path, "tiny").server.test_client()
    monkeypatch.setattr(transport, "results", ResultCache())
    calls = []
    real = transport._compute
    monkeypatch.setattr(transport, "_compute", lambda name, *a: calls.append(name) or real(name, *a))
    r = client.get("/api/warm?run=tiny&image=1&layer=2&head=1")
    assert r.status_code == 200 and r.json == {"warmed": True}
    assert sorted(calls) == ["attention", "partial_pruning"]
    warmed = transport.partial_pruning(tmp_path / "tiny", 1, 2, 1)
    transport.attention(tmp_path / "tiny", 1, 2, 1)
    assert len(calls) == 2  # both answered from the cache
    monkeypatch.setattr(transport, "results", ResultCache())
    assert transport.partial_pruning(tmp_path / "tiny", 1, 2, 1)["rows"] == warmed["rows"]
    r = client.get("/api/warm?run=tiny&image=77&layer=0&head=0")
    assert r.json["warmed"] is False and "77" in r.json["error"]
    assert client.get("/api/warm?run=../x&image=1&layer=0&head=0").status_code == 400


def test_an_app_served_under_a_path_prefix_answers_its_api_where_the_page_asks(tmp_path, monkeypatch):
    """DASH_URL_BASE_PATHNAME=/x/: the page's requests prefix is /x/, and the page asks for
    /x/api/warm (assets/explorer.js: hsUrl.base() + 'api/warm'): the queries answer there as at
    /api/, beside /x/thumbs/; an unknown query is still refused with the list of queries."""
    from analysis.runs.synthetic import make_run as make_model_run
    from app.server import create_app

    monkeypatch.delenv("HEADSCOPE_BROKER_URL", raising=False)
    monkeypatch.setenv("DASH_URL_BASE_PATHNAME", "/x/")
    make_model_run(tmp_path / "tiny", n_images=3, model="test_vit", img_size=32)
    client = create_app(tmp_path, "tiny").server.test_client()
    page = client.get("/x/")
    dash_config = re.search(r'<script id="_dash-config" type="application/json">(.*?)</script>', page.text)
    assert page.status_code == 200 and json.loads(dash_config.group(1))["requests_pathname_prefix"] == "/x/"
    assert client.get("/x/thumbs/tiny/1.png").status_code == 200
    for base in ("/x/", "/"):
        r = client.get(base + "api/warm?run=tiny&image=1&layer=2&head=1")
        assert r.status_code == 200 and r.json == {"warmed": True}, (base, r.data[:200])
        r = client.get(base + "api/attention?run=tiny&image=1&layer=2&head=1")
        assert r.status_code == 200 and len(r.json["attention"]) == len(r.json["attention"][0])
    r = client.get("/x/api/nothing?run=tiny")
    assert r.status_code == 404 and "warm" in r.json["error"]
