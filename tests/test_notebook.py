"""HeadScope in a notebook: HTML summaries, a head's figures from the app's builders, and the
case-study notebook executed top to bottom (nbclient) with the Explorer served inline."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from analysis import partial_pruning
from analysis.datasets import open_image
from analysis.errors import InputError
from analysis.notebook import head_figures, open_run
from analysis.models.adapter import model_from_manifest

ROOT = Path(__file__).resolve().parent.parent
from analysis.runs.synthetic import make_run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A synthetic run whose model is a real (random) vit_tiny at 32 px, so online views work."""
    return open_run(make_run(tmp_path_factory.mktemp("nb") / "tiny", n_images=12, model="vit_tiny_patch16_224",
                             img_size=32, grid=2))


def test_vit_and_run_show_themselves_in_jupyter(tiny_run):
    page = tiny_run._repr_html_()
    assert tiny_run.name in page and "vit_tiny_patch16_224" in page and "12 analysed" in page
    top = tiny_run.head_summary.sort_values("prob_drop_mean", ascending=False).iloc[0]
    assert "top heads by mean prob_drop" in page and f"L{int(top.layer)}H{int(top['head'])}" in page
    vit = model_from_manifest(tiny_run.model)
    facts = vit._repr_html_()
    assert "12 x 3 (head dim 64)" in facts and "timm-vit" in facts and "2 x 2 of 16 px (5 tokens)" in facts


def test_head_figures_are_the_app_figures_of_the_run(tiny_run):
    from app import data, figures as F

    vit = model_from_manifest(tiny_run.model)
    image_id, layer, head = int(tiny_run.images.image_id.iloc[3]), 1, 2
    figs = head_figures(tiny_run, layer, head, image_id=image_id, vit=vit)
    assert set(figs) == {"importance", "entropy", "strength_overview", "strength", "pruning", "top5", "attention"}
    pos = int(np.flatnonzero(tiny_run.images.image_id.to_numpy() == image_id)[0])
    dense = tiny_run.dense("prob_drop")                                               # [n, L, H], the reader's
    b1 = figs["importance"].to_dict()["data"]
    y = lambda trace: F.untyped(trace["y"])
    np.testing.assert_allclose(y(b1[2]), np.nanmean(dense, axis=0).ravel(), rtol=1e-5)   # mean over images
    np.testing.assert_allclose(y(b1[3]), dense[pos].ravel(), rtol=1e-6)                  # the image's curve
    np.testing.assert_allclose(y(figs["strength"].to_dict()["data"][0]), tiny_run.dense("strength")[pos, layer, head],
                               rtol=1e-6)
    # the online views equal the engine's own answers
    row = tiny_run.images.iloc[pos]
    x = vit.preprocess([open_image(row.path)])
    pp = partial_pruning(vit, x[0], int(row.label), layer, head)
    np.testing.assert_allclose(y(figs["pruning"].to_dict()["data"][0]), pp.prob_drop, rtol=1e-6, atol=1e-9)
    A = vit.capture_attention(x, layers=[layer])[0, 0, head].numpy()
    shown = np.fmax(*(np.nan_to_num(F.untyped(t["z"]), nan=-1) for t in figs["attention"].to_dict()["data"]))
    kept = shown >= 0
    assert kept.any() and np.allclose(shown[kept], A[kept])
    with pytest.raises(InputError, match="does not exist"):
        head_figures(tiny_run, 12, 0)
    with pytest.raises(InputError, match="is not in run"):
        head_figures(tiny_run, 0, 0, image_id=10_000)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """$HEADSCOPE_RUN, else cache/default when built, else a 12-image default run built here."""
    from conftest import embedded_default_missing

    given = os.environ.get("HEADSCOPE_RUN") or (ROOT / "cache" / "default")
    try:
        return open_run(given)
    except Exception:
        pass
    if missing := embedded_default_missing():
        pytest.skip(f"embedded default not installed here: {missing}")
    out = tmp_path_factory.mktemp("nb-default") / "default12"
    proc = subprocess.run([sys.executable, "scripts/build_cache.py", "--limit", "12", "--batch-size", "12",
                           "--out", str(out), "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return open_run(out)


def test_case_study_notebook_runs_top_to_bottom(default_run, monkeypatch):
    """examples/case_study.ipynb on the default run; the inline Explorer answers from the kernel, last
    for the notebook's in-memory result (its run "notebook", a temporary folder)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    port = free_port()
    monkeypatch.setenv("HEADSCOPE_RUN", str(default_run.path))
    monkeypatch.setenv("HEADSCOPE_NOTEBOOK_PORT", str(port))
    # the kernel imports this checkout's code (not an installed copy)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    nb = nbformat.read(ROOT / "examples" / "case_study.ipynb", as_version=4)
    n_cells = len(nb.cells)
    nb.cells.append(nbformat.v4.new_code_cell(  # the test's own probe, not part of the notebook
        "import requests\n"
        f"page = requests.get('http://127.0.0.1:{port}/', timeout=60)\n"
        f"layout = requests.get('http://127.0.0.1:{port}/_dash-layout', timeout=60)\n"
        f"thumb = requests.get('http://127.0.0.1:{port}/thumbs/notebook/0.png', timeout=60)\n"
        f"pp = requests.get('http://127.0.0.1:{port}/api/partial_pruning?run=notebook&image=1&layer=0&head=2', timeout=60)\n"
        "stored = result[0].query('image == 1 and layer == 0 and head == 2').prob_drop.iloc[0]\n"
        "print(page.status_code, '<title>HeadScope</title>' in page.text, layout.status_code, thumb.status_code,\n"
        "      thumb.headers.get('content-type'), abs(pp.json()['rows'][1]['prob_drop'] - stored) < 1e-6)"))
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "examples")}}).execute()
    outputs = [o for cell in nb.cells[:n_cells] if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    html = [o.data["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any(f"HeadScope run {default_run.name}" in h for h in html)  # Run._repr_html_
    assert any("ViT default" in h for h in html)                        # ViT._repr_html_
    plots = [o for o in outputs if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert len(plots) >= 7  # B1, B2, B3, C1, C2, C3, D
    assert any(f"127.0.0.1:{port}" in h and "iframe" in h.lower() for h in html)  # the inline Explorer
    last = [o.data.get("text/html", "") for o in nb.cells[n_cells - 1].outputs if "data" in o]
    assert any(f"127.0.0.1:{port}" in h for h in last)  # the in-memory result's Explorer, served last
    # ... whose online views run on the kernel's model and tensors: mode 1 of B2 = the result's leave-one-out
    assert nb.cells[-1].outputs[0].text.split() == ["200", "True", "200", "200", "image/png", "True"]


# ---- an in-memory result served like a run ----------------------------------------------------
@pytest.fixture(scope="module")
def result(tiny, tmp_path_factory):
    """A tiny random ViT's head importance and attention strength on 6 images, written as a run."""
    import torch

    from analysis import attention_strength, head_importance, load_vit
    from analysis.notebook import save_result

    vit = load_vit("vit_tiny_patch16_224", weights=str(tiny["weights"]), img_size=64)
    paths = sorted(p for p in (tiny["root"] / "images").rglob("*.png") if p.name != "broken.png")[::2]
    x = vit.preprocess([open_image(p) for p in paths])
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    df, strength = head_importance(vit, x, labels), attention_strength(vit, x)
    run = save_result([df, strength], vit, x, labels, out=tmp_path_factory.mktemp("nb-result") / "nb-result")
    return {"vit": vit, "x": x, "labels": labels, "df": df, "strength": strength, "run": run}


def test_in_memory_result_becomes_a_run_with_its_numbers(result):
    import torch

    from analysis.runs import reader

    vit, x, labels, df = result["vit"], result["x"], result["labels"], result["df"]
    run = reader.open_run(result["run"].path)  # the run format's own reader
    n, L, H = len(x), vit.depth, vit.num_heads
    assert run.manifest["source"] == "notebook" and run.manifest["model"]["in_memory"] is True
    assert (run.L, run.H, len(run.images)) == (L, H, n) and run.manifest["status"] == "complete"
    for m in ("prob", "prob_drop", "jsd", "cls_dist", "patch_dist", "emb_dist"):
        np.testing.assert_allclose(run.dense(m), df[m].to_numpy().reshape(n, L, H), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(run.dense("strength"), np.stack(result["strength"].strength).reshape(n, L, H, -1),
                               rtol=1e-6)
    np.testing.assert_allclose(run.summary("prob_drop_mean"),
                               df.groupby(["layer", "head"]).prob_drop.mean().to_numpy().reshape(L, H), rtol=1e-6)
    assert set(run.metrics) == {"prob", "prob_drop", "jsd", "cls_dist", "patch_dist", "emb_dist", "strength",
                                "strength_entropy", "mean_distance_px"}
    assert run.lacks("pattern") and run.lacks("semantic_concentration")  # what the result lacks: not in the run
    with torch.inference_mode():  # the images table: the unpruned prediction of each tensor
        probs = vit(x).double().softmax(-1).numpy()
    assert (run.images.pred.to_numpy() == probs.argmax(1)).all()
    np.testing.assert_allclose(run.images.prob, probs[np.arange(n), labels.numpy()], rtol=1e-5)
    assert all(run.thumbnail(i).is_file() for i in run.images.image_id)
    assert f"HeadScope run {run.name}" in run._repr_html_() and "in-memory result" in run._repr_html_()


def test_analyse_batch_arrays_become_a_run_with_pattern_labels(result, tmp_path):
    from analysis import analyse_batch
    from analysis.metrics.patterns import consistency
    from analysis.notebook import save_result

    vit, x, labels = result["vit"], result["x"], result["labels"]
    arrays = analyse_batch(vit, x, labels, semantic=False)  # every metric plus probs and patch bits
    run = save_result(arrays, vit, x, labels, out=tmp_path / "batch")
    for name in ("prob_drop", "strength_entropy", "diagonal", "vertical"):
        np.testing.assert_allclose(run.dense(name), arrays[name], rtol=1e-6, atol=1e-9)
    assert (run.dense("pattern") == arrays["pattern"]).all()
    np.testing.assert_allclose(run.summary("consistency"), consistency(arrays["patch_bits"]), rtol=1e-6)
    np.testing.assert_allclose(run.images.prob, arrays["probs"][np.arange(len(x)), labels.numpy()], rtol=1e-6)
    assert "pattern" in run.metrics and "semantic_concentration" not in run.metrics


def test_bad_results_and_folders_are_refused(result, tmp_path):
    from analysis.errors import LabelError
    from analysis.notebook import save_result

    vit, x, df = result["vit"], result["x"], result["df"]
    with pytest.raises(InputError, match="not registered image_head metrics: bogus"):
        save_result(df.assign(bogus=1.0), vit, x, out=tmp_path / "a")
    with pytest.raises(InputError, match="prob_drop twice"):
        save_result([df, df[["image", "layer", "head", "prob_drop"]]], vit, x, out=tmp_path / "b")
    with pytest.raises(InputError, match="image column runs 0-5"):
        save_result(df, vit, x[:3], out=tmp_path / "c")
    with pytest.raises(LabelError, match="outside the model's 3 classes"):
        save_result(df, vit, x, labels=[0, 1, 2, 3, 0, 1], out=tmp_path / "d")
    with pytest.raises(InputError, match=r"labels: '0', '1', 'cat' are not class names of the model \(it has no class"):
        save_result(df, vit, x, labels=["cat", "cat", "0", "0", "1", "1"], out=tmp_path / "e")
    with pytest.raises(InputError, match=r"whole class indices .* rows \[1\] hold \[0\.5\]"):
        save_result(df, vit, x, labels=[0.0, 0.5, 1.0, 1.0, 2.0, 2.0], out=tmp_path / "f")
    with pytest.raises(InputError, match="got 2 labels for 6 images"):
        save_result(df, vit, x, labels=[0, 1], out=tmp_path / "g")
    (tmp_path / "a-file").write_text("mine")
    with pytest.raises(InputError, match="a-file is a file; give a new or empty folder"):
        save_result(df, vit, x, out=tmp_path / "a-file")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a run")
    with pytest.raises(InputError, match="holds no notebook result"):
        save_result(df, vit, x, out=tmp_path / "mine")
    assert not (tmp_path / "a").exists() and (tmp_path / "mine" / "notes.txt").read_text() == "not a run"
    vit.class_names = ["cat", "dog", "fox"]
    try:
        with pytest.raises(InputError, match=r"'cow' are not class names of the model \(its class names are 'cat'"):
            save_result(df, vit, x, labels=["cat", "cow", "cat", "dog", "fox", "fox"], out=tmp_path / "e")
        named = save_result(df, vit, x, labels=["cat", "dog", "fox"] * 2, out=tmp_path / "named")
    finally:
        vit.class_names = None
    assert named.images.label.tolist() == [0, 1, 2, 0, 1, 2]  # class names are taken by the model's names
    whole = save_result(df, vit, x, labels=np.array([0.0, 0, 1, 1, 2, 2]), out=tmp_path / "whole")
    assert whole.images.label.tolist() == [0, 0, 1, 1, 2, 2]  # whole floats are class indices
    again = save_result(df, vit, x, out=result["run"].path.parent / "again")  # an earlier notebook run is replaced
    assert save_result(df[df.layer < 12], vit, x, out=again.path).metrics == again.metrics


def _explorer_initial_callbacks(run, sel_query: str) -> dict:
    """The Explorer's server callbacks as the browser fires them on load: each one's Inputs and
    States from the page layout (or from the callbacks before it: two rounds, so chained ones see
    their inputs), the view state from ``sel_query``. {function name: its outputs}."""
    from dash import Patch, _callback, no_update
    from dash._callback_context import context_value
    from dash._utils import AttributeDict

    from app import create_app
    from app.explorer import selection
    from app.state import parse_selection

    create_app(run.path.parent, run.name)
    ex = sys.modules["app.pages.explorer"]
    values = {}

    def walk(node):
        if isinstance(getattr(node, "id", None), str):
            values.update({(node.id, k): v for k, v in node.to_plotly_json()["props"].items()})
        children = getattr(node, "children", None)
        for child in children if isinstance(children, (list, tuple)) else [children]:
            if hasattr(child, "to_plotly_json"):
                walk(child)

    walk(ex.layout(run=run.name))
    ids = {i for i, _ in values}
    values[("d-panel", "value")] = "saliency"  # the saliency panel shown: its callbacks compute
    values[("sel", "data")] = parse_selection(sel_query, run.name)
    initial = {c["output"] for c in _callback.GLOBAL_CALLBACK_LIST if not c["prevent_initial_call"]}
    outputs = {}
    token = context_value.set(AttributeDict(triggered_inputs=[], updated_props={}))  # "on load": nothing triggered
    try:
        for _round in range(2):
            for key, entry in list(_callback.GLOBAL_CALLBACK_MAP.items()):
                fn = getattr(entry.get("callback"), "__wrapped__", None)  # None: a clientside callback
                if fn is None or key not in initial or not (fn.__module__.startswith("app.explorer.") or fn.__module__ in (
                        "app.panels.saliency", "app.panels.head_sets")):
                    continue
                specs = entry["inputs"] + entry["state"]
                if any(s["id"] not in ids and s["id"] != "sel" for s in specs):
                    continue  # fed by another page's components
                out = fn(*[values.get((s["id"], s["property"])) for s in specs])
                outputs[fn.__name__] = out
                targets = [t.rpartition(".") for t in key.strip(".").split("...")]
                for (i, _, prop), v in zip(targets, out if len(targets) > 1 else [out]):
                    if i != "sel" and v is not no_update and not isinstance(v, Patch):
                        values[(i, prop)] = v
            for view in selection.cached.views + selection.online.views:  # the views' one callback per model
                specs = [(d.component_id, d.component_property) for d in view.args]
                if any(i not in ids and i != "sel" for i, _ in specs):
                    continue
                out = outputs[view.fn.__name__] = view.fn(*[values.get(s) for s in specs])
                for o, v in zip(view.outputs, out if len(view.outputs) > 1 else [out]):
                    if v is not no_update and not isinstance(v, Patch):
                        values[(o.component_id, o.component_property)] = v
    finally:
        context_value.reset(token)
    return outputs


def _texts(outputs) -> str:
    return json.dumps(outputs, default=lambda o: o.to_plotly_json() if hasattr(o, "to_plotly_json") else str(o))


def test_explorer_draws_the_in_memory_run_with_its_model(result):
    from app import figures as F

    run, vit, x, df = result["run"], result["vit"], result["x"], result["df"]
    pos, layer, head = 2, 1, 0
    out = _explorer_initial_callbacks(run, f"?run={run.name}&image={pos}&layer={layer}&head={head}&metric=prob_drop")
    assert {"view_a", "view_b1", "view_b2_b3", "view_c", "view_d1", "view_d3_d5", "view_d2"} <= set(out)
    y = lambda fig: F.untyped(fig["data"][0]["y"])
    b1 = out["view_b1"]
    np.testing.assert_allclose(F.untyped(b1["data"][3]["y"]), df[df.image == pos].prob_drop, rtol=1e-6)
    b2, b3, b2_msg = out["view_b2_b3"]
    pp = partial_pruning(vit, x[pos], int(result["labels"][pos]), layer, head)  # the kernel's own tensor
    np.testing.assert_allclose(y(b2), pp.prob_drop, rtol=1e-6, atol=1e-9)
    row = df[(df.image == pos) & (df.layer == layer) & (df["head"] == head)]
    assert y(b2)[1] == pytest.approx(float(row.prob_drop.iloc[0]), rel=1e-5, abs=1e-8)  # mode 1 = the stored value
    assert b2_msg is None and b3["data"]
    d3, d4, d5, _count, d_msg, _thr = out["view_d3_d5"]
    A = vit.capture_attention(x[pos:pos + 1], layers=[layer])[0, 0, head].numpy()
    shown = np.fmax(*(np.nan_to_num(F.untyped(t["z"]), nan=-1) for t in d4["data"][:2]))
    assert d_msg is None and np.allclose(shown[shown >= 0], A[shown >= 0], atol=1e-3)  # float16 transport
    text = _texts(out)
    assert "Traceback" not in text and "query failed" not in text and "in-memory model" not in text
    assert "computed now" in _texts(out["view_saliency"])  # patch maps: online, on the kernel's model
    assert "This run has no cls pattern layout" in _texts(out["view_d1"])  # the view's own "not in this run"


def test_online_views_elsewhere_say_they_need_the_model(result, tmp_path):
    import shutil

    from analysis.errors import ModelLoadError
    from analysis.runs.reader import open_run
    from analysis.runs.tables import write_json
    from analysis.serving.service import ModelService

    with pytest.raises(ModelLoadError, match="in-memory model"):  # never a silently re-initialised model
        ModelService(device="cpu").partial_pruning(result["run"].path, 0, 0, 0)
    service = ModelService(device="cpu")  # attached: answers; the run replaced at its path: no longer
    copy = Path(shutil.copytree(result["run"].path, tmp_path / "copy"))
    service.attach(copy, result["vit"], result["x"])
    assert service.partial_pruning(copy, 1, 0, 2)["rows"][1]["prob_drop"] == pytest.approx(
        float(result["df"].query("image == 1 and layer == 0 and head == 2").prob_drop.iloc[0]), rel=1e-5, abs=1e-8)
    manifest = open_run(copy).manifest
    write_json(copy / "manifest.json", {**manifest, "created": "later"})
    assert not service.attached(copy)
    with pytest.raises(ModelLoadError, match="in-memory model"):
        service.partial_pruning(copy, 1, 0, 2)


def test_head_figures_of_an_in_memory_run_use_its_tensors(result):
    run, vit, x = result["run"], result["vit"], result["x"]
    figs = head_figures(run, 0, 1, image_id=3, vit=vit)
    pp = partial_pruning(vit, x[3], int(result["labels"][3]), 0, 1)
    from app import figures as F

    np.testing.assert_allclose(F.untyped(figs["pruning"].to_dict()["data"][0]["y"]), pp.prob_drop, rtol=1e-6, atol=1e-9)
