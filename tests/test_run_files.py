"""Files stay in their run; ill-typed and non-finite values in a run's tables (issue 23, items 2-5).

Thumbnails are sent only as resolved files inside the resolved run directory; an image the images
table names but that cannot be loaded gives one message whatever the cause, naming no path; the
reader refuses wrong column types and repeated ids when a run is opened (naming table, column and
fix); ±inf / NaN never rank first and are shown as n/a with a count."""
from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from analysis.errors import CacheError
from analysis.runs.reader import open_run
from analysis.runs.synthetic import make_run
from app import figures as F

L, H = 3, 4


def _rewrite(path, column: str, values, type_=None) -> None:
    """Replace one column of a Parquet table (keeping its place), as a hand edit or another program would."""
    table = pq.read_table(path)
    i = table.schema.get_field_index(column)
    array = pa.array(values, type=type_ or table.schema.field(i).type)
    pq.write_table(table.set_column(i, pa.field(column, array.type), array), path)


def _app(cache, run):
    from app.server import create_app

    app = create_app(cache_dir=cache, run=run)
    client = app.server.test_client()
    assert client.get("/").status_code == 200  # Dash registers the pages' callbacks on the first request
    return app, client


@pytest.fixture
def syn(tmp_path):
    return make_run(tmp_path / "cache" / "syn", n_images=6, layers=L, heads=H, grid=3, n_classes=3)


# ---- High 2: files stay in their run -----------------------------------------------------------
def test_thumbnails_never_leave_the_run(syn, tmp_path):
    outside = tmp_path / "secret-outside.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(outside)
    (tmp_path / "secret-dir").mkdir()
    thumbs = syn / "thumbs"
    links = {0: "/etc/passwd", 1: str(outside), 2: str(tmp_path / "secret-dir"), 3: str(tmp_path / "secret-missing")}
    for i, target in links.items():
        (thumbs / f"{i}.png").unlink()
        os.symlink(target, thumbs / f"{i}.png")
    (thumbs / "4.png").unlink()
    (thumbs / "4.png").mkdir()  # a directory where a thumbnail belongs
    os.symlink("5.png", thumbs / "6.png")  # a link that stays inside the run is fine (image 6 does not exist)
    os.symlink(syn, syn.parent / "alias")  # so is a run directory that is itself a link
    _, c = _app(syn.parent, "syn")
    for i in (0, 1, 2, 3, 4):
        r = c.get(f"/thumbs/syn/{i}.png")
        body = r.get_data(as_text=True)
        assert r.status_code == 404, (i, r.status_code)
        assert not any(s in body for s in ("root:", "passwd", "secret", str(tmp_path))), body
    assert c.get("/thumbs/syn/5.png").status_code == 200
    ok = c.get("/thumbs/alias/5.png")
    assert ok.status_code == 200 and ok.data == (thumbs / "5.png").read_bytes()
    for url in ("/thumbs/..%2Fsyn/5.png", "/thumbs/syn/..%2F..%2Fmanifest.png", "/thumbs/../syn/thumbs/5.png",
                "/thumbs/syn/-1.png", "/thumbs/syn/5.png%2F..%2F..%2Fmanifest.json", "/thumbs/%2Fetc/passwd"):
        r = c.get(url)  # refused, or a path the page router answers with the app's HTML: never a file
        assert r.status_code in (400, 404) or r.mimetype == "text/html", url
        assert r.mimetype != "image/png" and "root:" not in r.get_data(as_text=True), url
    run = open_run(syn)
    assert run.thumbnail_file(0) is None and run.thumbnail_file(4) is None
    assert run.thumbnail_file(5) == (thumbs / "5.png").resolve()
    with pytest.raises(CacheError, match="thumbnail of image 0 is missing"):
        run.open_thumbnail(0)


def test_a_file_the_manifest_names_outside_the_run_is_not_read(syn):
    """The Curves page reads pruning_curves.parquet where the manifest says: only inside the run."""
    from app import data

    mf = json.loads((syn / "manifest.json").read_text())
    _app(syn.parent, "syn")
    curves = _page("curves")
    for target in ("/etc/passwd", "../../../../etc/passwd", "thumbs"):
        (syn / "manifest.json").write_text(json.dumps({**mf, "pruning_curves": {"file": target}}))
        table, entry, msg = curves.read_curves(data.get_index("syn"))
        assert table is None and "has no pruning curves" in msg and "passwd" not in msg, target


def test_an_image_that_cannot_be_loaded_gives_one_message_without_its_path(tmp_path):
    run = make_run(tmp_path / "cache" / "tiny", n_images=4, model="test_vit", img_size=32)
    link = tmp_path / "secret-link.png"
    os.symlink(tmp_path / "secret-gone.png", link)  # a broken link: the old message named its target
    paths = ["/etc/passwd", str(tmp_path / "secret-missing.png"), str(link), str(tmp_path)]
    images = pq.read_table(run / "images.parquet").column("path").to_pylist()
    _rewrite(run / "images.parquet", "path", paths + images[len(paths):])
    _, c = _app(run.parent, "tiny")
    messages = []
    for i in range(len(paths)):
        r = c.get(f"/api/attention?run=tiny&image={i}&layer=0&head=0")
        error = r.get_json()["error"]
        assert r.status_code == 400 and not any(s in error for s in ("/etc", "passwd", "secret", str(tmp_path))), error
        messages.append(error.replace(f"Image {i} ", "Image N "))
    assert len(set(messages)) == 1, messages  # the cause (missing, not an image, a link, a folder) is not told
    assert "cannot be loaded" in messages[0] and "rebuild the run" in messages[0]


# ---- Medium 4 and 5: the reader checks types and ids when a run is opened -------------------------
def _page(name: str):
    return sys.modules[f"app.pages.{name}"]


def test_a_string_metric_column_is_named_with_its_fix_when_the_run_opens(syn):
    hm = pq.read_table(syn / "head_metrics.parquet")
    _rewrite(syn / "head_metrics.parquet", "prob_drop", [str(v) for v in hm.column("prob_drop").to_pylist()],
             pa.string())
    with pytest.raises(CacheError, match=r"head_metrics.parquet of run syn: column prob_drop holds string values "
                                         r"where number values belong .*Restore the table .*rebuild the run"):
        open_run(syn)
    make_run(syn.parent / "ok", n_images=4, layers=2, heads=2, grid=3, n_classes=3)
    _, c = _app(syn.parent, "ok")
    for url in ("/heads", "/?run=syn", "/heads?run=syn"):
        assert c.get(url).status_code == 200
    assert c.get("/thumbs/syn/0.png").status_code == 404
    fig, table, msg = _page("heads").heads_view({"run": "syn"}, "prob_drop")
    text = json.dumps(msg.to_plotly_json(), default=lambda o: o.to_plotly_json())
    assert table is None and "column prob_drop holds string values" in text and "Restore the table" in text
    runs = json.dumps(_page("runs").runs_table({"run": "ok"}), default=lambda o: o.to_plotly_json())
    assert runs.count("unreadable") == 1 and "?run=syn" not in runs
    _rewrite(syn / "head_metrics.parquet", "prob_drop", hm.column("prob_drop").to_pylist(), pa.float32())  # restored
    summary = pq.read_table(syn / "head_summary.parquet").column("jsd_mean").to_pylist()
    _rewrite(syn / "head_summary.parquet", "jsd_mean", [str(v) for v in summary], pa.string())
    with pytest.raises(CacheError, match=r"head_summary.parquet of run syn: column jsd_mean holds string values"):
        open_run(syn)
    _rewrite(syn / "head_summary.parquet", "jsd_mean", summary, pa.float64())
    labels = pq.read_table(syn / "images.parquet").column("label").to_pylist()
    _rewrite(syn / "images.parquet", "label", [float(v) for v in labels], pa.float64())
    with pytest.raises(CacheError, match=r"images.parquet of run syn: column label holds double values where "
                                         r"integer values belong"):
        open_run(syn)


def test_repeated_ids_are_named_when_the_run_opens(syn):
    ids = pq.read_table(syn / "images.parquet").column("image_id").to_pylist()
    _rewrite(syn / "images.parquet", "image_id", [ids[0], ids[0], *ids[2:]])
    with pytest.raises(CacheError, match=r"images.parquet of run syn: column image_id repeats ids \(0\); each image "
                                         r"must appear once\. Restore the table"):
        open_run(syn)
    _, c = _app(syn.parent, "syn")
    for i in (0, 1, 2):
        r = c.get(f"/thumbs/syn/{i}.png")
        assert r.status_code == 404 and "Traceback" not in r.get_data(as_text=True)
    fig, _, msg = _page("heads").heads_view({"run": "syn"}, "prob_drop")
    text = json.dumps(msg.to_plotly_json(), default=lambda o: o.to_plotly_json())
    assert "repeats ids" in text and "ValueError" not in text and "reindex" not in text
    _rewrite(syn / "images.parquet", "image_id", ids)
    layers = pq.read_table(syn / "head_summary.parquet").column("layer").to_pylist()
    _rewrite(syn / "head_summary.parquet", "layer", [0] + layers[1:] if layers[0] else [1] + layers[1:])
    with pytest.raises(CacheError, match=r"head_summary.parquet of run syn: columns layer / head repeat heads"):
        open_run(syn)
    _rewrite(syn / "head_summary.parquet", "layer", [L] + layers[1:])
    with pytest.raises(CacheError, match=r"name heads outside the model's 3 layers x 4 heads"):
        open_run(syn)


def test_the_fix_named_for_a_built_run_rewrites_its_tables(tiny):
    """A run built by build_cache.py keeps its parts: the message names ``--resume --merge``, which
    writes the tables again, and the run opens after it."""
    from analysis.cli import build_main
    from analysis.runs import build

    cfg = tiny["config"]("fix", ae_epochs=1)
    build.build(cfg)
    ids = pq.read_table(cfg.run_dir / "images.parquet").column("image_id").to_pylist()
    _rewrite(cfg.run_dir / "images.parquet", "image_id", [ids[0]] * len(ids))
    with pytest.raises(CacheError, match=r"column image_id repeats ids .*--resume --merge") as err:
        open_run(cfg.run_dir)
    command = str(err.value).split("`")[1].split()
    assert command[:2] == ["python", "scripts/build_cache.py"]
    assert build_main([*command[2:], "--quiet"]) == 0
    assert open_run(cfg.run_dir).images.image_id.tolist() == ids


# ---- High 3: non-finite values are not ranked; shown as n/a with a count --------------------------
@pytest.fixture
def spoiled(syn):
    """syn with prob_drop's run mean +inf at L0H1 and NaN at L1H0 (head_summary), and +inf for image 0
    at L2H3 (head_metrics): a hand-edited or corrupt run."""
    hs = pq.read_table(syn / "head_summary.parquet").to_pandas()
    mean = hs["prob_drop_mean"].to_numpy().copy()
    mean[((hs["layer"] == 0) & (hs["head"] == 1)).to_numpy()] = np.inf
    mean[((hs["layer"] == 1) & (hs["head"] == 0)).to_numpy()] = np.nan
    _rewrite(syn / "head_summary.parquet", "prob_drop_mean", mean.tolist())
    hm = pq.read_table(syn / "head_metrics.parquet").to_pandas()
    values = hm["prob_drop"].to_numpy().copy()
    values[((hm["image_id"] == 0) & (hm["layer"] == 2) & (hm["head"] == 3)).to_numpy()] = np.inf
    _rewrite(syn / "head_metrics.parquet", "prob_drop", values.tolist())
    return syn


def test_non_finite_heads_are_not_ranked_and_are_shown_as_na(spoiled):
    _app(spoiled.parent, "syn")
    fig, (note, table), msg = _page("heads").heads_view({"run": "syn"}, "prob_drop")
    rows = [[c.children for c in tr.children] for tr in table.children[1].children]
    ranked = [(r[1], r[2]) for r in rows]
    assert (0, 1) not in ranked and (1, 0) not in ranked and len(ranked) == L * H - 2
    assert [r[0] for r in rows] == list(range(1, L * H - 1))
    heat = fig["data"][0]
    assert heat["z"][0][1] is None and heat["z"][1][0] is None and heat["text"][0][1] == heat["text"][1][0] == "n/a"
    assert "%{text}" in heat["hovertemplate"] and heat["text"][0][0] == format(heat["z"][0][0], ".4g")
    text = json.dumps(msg.to_plotly_json(), default=lambda o: o.to_plotly_json())
    assert "2 heads have no finite mean of prob_drop (L0H1, L1H0)" in text and "n/a" in text
    _, _, clean = _page("heads").heads_view({"run": "syn"}, "jsd")  # other metrics: no note
    assert clean is None
    # B1: the mean and the image's curve leave the heads out (gaps) and say so
    from app.explorer import importance

    b1 = importance.view_b1(None, None, None, None, None, [], {"run": "syn", "image": 0, "layer": 0, "head": 0,
                                                       "metric": "prob_drop"})
    mean_trace = next(t for t in b1["data"] if t.get("name") == "mean over images")
    assert mean_trace["y"][1] is None and mean_trace["y"][H] is None
    note = b1["layout"]["annotations"][0]["text"]
    assert "2 heads have no finite mean (L0H1, L1H0)" in note
    assert "1 head has no finite value on this image (L2H3)" in note
    assert "n/a" in note


def test_an_all_nan_metric_is_not_a_fault():
    """NaN everywhere (a metric that does not apply, e.g. prob_drop of an unlabelled image) gets no note;
    ±inf always does; NaN beside finite values does."""
    assert F.unusable_note(np.full(L * H, np.nan), H, "value") is None
    assert not F.unusable(np.full(5, np.nan)).any()
    assert F.unusable(np.array([np.inf, np.nan, np.nan])).tolist() == [True, False, False]
    assert F.unusable(np.array([0.5, np.nan, -np.inf])).tolist() == [False, True, True]
    fig = F.head_importance(L, H, "P(true)", np.linspace(0, 1, L * H), np.zeros(L * H),
                            image_values=np.full(L * H, np.nan))
    assert "annotations" not in fig["layout"]


def test_compare_leaves_non_finite_heads_out_of_its_ranks(spoiled):
    from app import data
    from analysis.metrics import registry

    make_run(spoiled.parent / "other", n_images=6, layers=L, heads=H, grid=3, n_classes=3, seed=1)
    _app(spoiled.parent, "syn")
    compare = _page("compare")
    a, b = data.get_index("syn"), data.get_index("other")
    fig, table = compare.difference_views(a, b, registry.get_metric("prob_drop"))
    heads = [(tr.children[0].children, tr.children[1].children) for tr in table[1].children[1].children]
    assert (0, 1) not in heads and (1, 0) not in heads and len(heads) == min(15, L * H - 2)
    assert all(v is None or np.isfinite(v) for row in fig["data"][0]["z"] for v in row)
    assert np.isfinite(fig["data"][0]["zmax"])
    *_, msg = compare.compare_view(["syn", "other"], "prob_drop")
    text = json.dumps([m.to_plotly_json() for m in msg], default=lambda o: o.to_plotly_json())
    assert "Run syn: 2 heads have no finite prob_drop (L0H1, L1H0)" in text and "n/a" in text


def test_heads_page_in_a_browser_leaves_a_non_finite_head_out(dash_duo, real, tmp_path):
    """The real default run with +inf as L0H0's run mean of prob_drop: in the browser the ranking
    starts elsewhere and the page says which head is n/a."""
    if not (shutil.which("chromedriver") and (shutil.which("chromium") or shutil.which("google-chrome"))):
        pytest.skip("browser tests need chromium and chromedriver")
    from app.server import create_app

    cache, run = real
    shutil.copytree(cache / run, tmp_path / "cache" / "spoiled", ignore=shutil.ignore_patterns("parts", "stages"))
    path = tmp_path / "cache" / "spoiled" / "head_summary.parquet"
    hs = pq.read_table(path).to_pandas()
    mean = hs["prob_drop_mean"].to_numpy().copy()
    mean[((hs["layer"] == 0) & (hs["head"] == 0)).to_numpy()] = np.inf
    _rewrite(path, "prob_drop_mean", mean.tolist())
    dash_duo.start_server(create_app(tmp_path / "cache", "spoiled"))
    dash_duo.wait_for_page(dash_duo.server_url + "/heads?run=spoiled", timeout=60)
    dash_duo.wait_for_contains_text("#heads-table", "rank", timeout=60)
    first = [td.text for td in dash_duo.find_elements("#heads-table tbody tr:first-child td")]
    best = hs[np.isfinite(mean)].sort_values("prob_drop_mean", ascending=False, kind="stable").iloc[0]
    assert first[:3] == ["1", str(int(best["layer"])), str(int(best["head"]))]
    dash_duo.wait_for_contains_text("#heads-msg", "1 head has no finite mean of prob_drop (L0H0)", timeout=60)
    assert "n/a" in dash_duo.find_element("#heads-msg").text
    assert not [e for e in dash_duo.get_logs() or [] if e.get("level") == "SEVERE"]
