"""ARCHITECTURE.md's recipes, each one file: a toy of each is declared in a file of its own (written
here to a temporary folder, as a contributor would add it to the package) and shows up everywhere it
should. The metric recipe's way through the build, the reader, the Explorer, Heads and Help is
tests/test_registry.py; here: that the declaration needs no other file."""
from __future__ import annotations

import importlib.util
import pathlib
import pkgutil
import sys

import grimp
import numpy as np
import pytest
import torch

import analysis.metrics
import analysis.models
from analysis.metrics import registry
from analysis.metrics.engine import analyse_batch
from analysis.models.adapter import brings_weights, load_vit, model_reference
from analysis.models.registry import families, family_for_name, unregister_family
from analysis.runs import schema

pytestmark = pytest.mark.usefixtures("one_thread")


def import_file(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("analysis", cache_dir=None)


def test_the_metric_registry_imports_no_metric_module_and_the_package_imports_them_all(graph):
    assert {m for m in graph.find_modules_directly_imported_by("analysis.metrics.registry")
            if m.startswith("analysis.metrics")} == set()
    folder = pathlib.Path(analysis.metrics.__path__[0])
    declaring = {f"analysis.metrics.{m.name}" for m in pkgutil.iter_modules([str(folder)])
                 if m.name != "registry" and "register_metric(" in (folder / f"{m.name}.py").read_text()}
    assert declaring and declaring <= graph.find_modules_directly_imported_by("analysis.metrics")


TOY_METRICS = '''
import numpy as np

from analysis.metrics.registry import Metric, OnAttention, register_metric


def cls_row(vit, layer, A, batch):          # a vector metric: the CLS row's first 3 patch weights [B, H, 3]
    return A[:, :, 0, vit.num_prefix_tokens:vit.num_prefix_tokens + 3]


def cls_kind(vit, layer, A, batch):         # a category metric: [B, H] of str
    return np.where((A[:, :, 0, 0] > 0.5).cpu().numpy(), "self", "spread")


register_metric(Metric("toy_cls_row", "CLS row", value="vector", group="strength", compute=OnAttention(cls_row),
                       meaning="the CLS row's first patch weights", formula="$A[0, T:T+3]$ (toy)"))
register_metric(Metric("toy_cls_kind", "CLS kind", value="category", summary=False, group="pattern",
                       compute=OnAttention(cls_kind), meaning="self or spread", formula="toy"))
'''


def test_a_vector_and_a_category_metric_are_one_file(tmp_path, tiny):
    path = tmp_path / "toy_metrics.py"
    path.write_text(TOY_METRICS)
    import_file(path, "toy_metrics")
    try:
        vec, cat = registry.get_metric("toy_cls_row"), registry.get_metric("toy_cls_kind")
        assert vec in registry.metrics(value="vector") and cat in registry.metrics(value="category")
        cols = schema.head_columns()
        assert "toy_cls_row" in cols and "toy_cls_kind" in cols
        assert "toy_cls_row_mean" in schema.summary_columns() and "toy_cls_kind_mean" not in schema.summary_columns()
        vit = load_vit(make_timm())
        torch.manual_seed(0)
        res = analyse_batch(vit, torch.randn(2, 3, 32, 32), metrics=["toy_cls_row", "toy_cls_kind"],
                            patterns=False, semantic=False)
        assert res["toy_cls_row"].shape == (2, vit.depth, vit.num_heads, 3)
        assert res["toy_cls_kind"].shape == (2, vit.depth, vit.num_heads)
        assert set(np.unique(res["toy_cls_kind"])) <= {"self", "spread"}
        toy_metrics_reach_the_app(tiny)
    finally:
        registry.unregister_metric("toy_cls_row")
        registry.unregister_metric("toy_cls_kind")
        sys.modules.pop("toy_metrics", None)


def find(component, id_):
    """The component of a Dash layout with this id (None: none)."""
    if getattr(component, "id", None) == id_:
        return component
    children = getattr(component, "children", None)
    for child in children if isinstance(children, (list, tuple)) else [children]:
        if child is not None and not isinstance(child, (str, int, float)):
            found = find(child, id_)
            if found is not None:
                return found
    return None


def toy_metrics_reach_the_app(tiny):
    """A run built with the toy metrics: the vector one is a choice of C2 and drawn there, the category
    one colours D1 and has its share table on the Heads page; no app file names them."""
    from analysis.metrics.patterns import modal_labels
    from analysis.runs import build
    from analysis.runs.reader import open_run
    from app import create_app
    from app.callbacks import RULES

    build.build(tiny["config"]("toy_recipe"))
    run = open_run(tiny["root"] / "toy_recipe")
    create_app(tiny["root"], "toy_recipe")
    from app.explorer import patterns, selection, strength

    ex, heads = sys.modules["app.pages.explorer"], sys.modules["app.pages.heads"]
    pos, layer, head = 2, 1, 0
    sel = {"run": run.name, "image": int(run.images.image_id[pos]), "layer": layer, "head": head}
    # C2: the run's vector metrics are its choices (shown: more than one), strength first; it draws the toy
    options, value, style = strength.c2_choices(sel)
    assert [o["value"] for o in options] == ["strength", "toy_cls_row"] and value == "strength" and style == {}
    assert options[1]["label"] == "CLS row"
    c2 = strength.view_c(None, None, None, "strength_entropy", sel, "toy_cls_row")[1]
    assert [v.fn for v in selection.cached.views if "c2-metric.value" in v.inputs] == [strength.view_c]  # the choice redraws C
    np.testing.assert_allclose(c2["data"][0]["y"], run.dense("toy_cls_row")[pos, layer, head], rtol=1e-6)
    assert c2["layout"]["yaxis"]["title"]["text"] == "CLS row" and strength.c2_title("toy_cls_row", sel) == "C2 · CLS row of the head"
    # D1: coloured by layer or by any category metric, one legend entry per label
    d1_options = find(ex.layout(), "d1-color").options
    assert {"label": "by pattern", "value": "pattern"} in d1_options
    assert {"label": "by CLS kind", "value": "toy_cls_kind"} in d1_options
    assert RULES[("d1-color", "value")]("toy_cls_kind") is None  # the request guard lets the choice through
    kinds = run.dense("toy_cls_kind")
    d1 = patterns.view_d1(None, None, None, None, "toy_cls_kind", sel, None)[0]
    drawn = {t["name"]: len(t["customdata"]) for t in d1["data"] if t.get("legendgroup") == "patterns"}
    assert drawn == {f"CLS kind: {k}": int((kinds == k).sum()) for k in np.unique(kinds)}
    # Heads: a share table per category metric, pattern's first (with its consistency)
    parts = heads.heads_patterns(sel)
    tables = {getattr(p, "id", None): p for p in parts}
    assert parts[1].id == "heads-pattern-table" and "consistency" in [c["id"] for c in parts[1].columns]
    table = tables["heads-toy_cls_kind-table"]
    modal, share = modal_labels(kinds)
    assert [r["label"] for r in table.data] == modal.ravel().tolist()
    np.testing.assert_allclose([r["share"] for r in table.data], share.ravel(), atol=1e-4)


def make_timm():
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=3)


TOY_FAMILY = '''
from analysis.models.registry import register_family
from analysis.models.timm_vit import TimmViT


class ToyViT(TimmViT):
    family = "toy"


def load_toy(name, weights=None, pretrained=False, img_size=None, num_classes=None):
    import timm
    import torch

    torch.manual_seed(0)
    return ToyViT(timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=3)), None, ["a", "b", "c"]


register_family("toy", family=ToyViT, accepts_module=lambda module: False, accepts_name=lambda name: name == "toy-vit",
                load=load_toy, priority=10, brings_weights=lambda name: True)
'''


def test_a_model_family_is_one_file(tmp_path):
    path = tmp_path / "toy_family.py"
    path.write_text(TOY_FAMILY)
    import_file(path, "toy_family")
    try:
        assert "toy" in [e.name for e in families()] and family_for_name("toy-vit").name == "toy"
        vit = load_vit("toy-vit")
        assert vit.family.family == "toy" and vit.class_names == ["a", "b", "c"] and vit.depth == 12
        assert brings_weights("toy-vit") and model_reference("toy-vit") == "toy-vit"
        assert vit(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    finally:
        unregister_family("toy")
        sys.modules.pop("toy_family", None)


def test_every_file_of_the_models_folder_is_imported_by_the_package():
    # so a family file dropped into analysis/models/ registers itself: no list to edit
    for m in pkgutil.iter_modules(analysis.models.__path__):
        assert f"analysis.models.{m.name}" in sys.modules
    assert [e.name for e in families()][:3] == ["default", "timm-vit", "hf"]


def test_a_page_is_one_file(tmp_path):
    # Dash's use_pages imports every module of app/pages/ (each calls dash.register_page itself)
    import dash

    from app import create_app

    create_app(tmp_path)
    folder = pathlib.Path(__file__).resolve().parent.parent / "app" / "pages"
    files = {m.name for m in pkgutil.iter_modules([str(folder)])}
    registered = {p["module"].rsplit(".", 1)[-1] for p in dash.page_registry.values()}
    assert files and files <= registered
