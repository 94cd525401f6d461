"""HeadScope in a notebook: HTML summaries, a head's figures from the app's builders, and the
case-study notebook executed top to bottom (nbclient) with the Explorer served inline."""
from __future__ import annotations

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
from analysis.serving.service import model_from_manifest

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
    """examples/case_study.ipynb on the default run; the inline Explorer answers from the kernel."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    port = free_port()
    monkeypatch.setenv("HEADSCOPE_RUN", str(default_run.path))
    monkeypatch.setenv("HEADSCOPE_NOTEBOOK_PORT", str(port))
    nb = nbformat.read(ROOT / "examples" / "case_study.ipynb", as_version=4)
    n_cells = len(nb.cells)
    nb.cells.append(nbformat.v4.new_code_cell(  # the test's own probe, not part of the notebook
        "import requests\n"
        f"page = requests.get('http://127.0.0.1:{port}/', timeout=60)\n"
        f"layout = requests.get('http://127.0.0.1:{port}/_dash-layout', timeout=60)\n"
        "print(page.status_code, '<title>HeadScope</title>' in page.text, layout.status_code)"))
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
    assert nb.cells[-1].outputs[0].text.split() == ["200", "True", "200"]
