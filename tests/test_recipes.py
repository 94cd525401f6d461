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


def test_a_vector_and_a_category_metric_are_one_file(tmp_path):
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
    finally:
        registry.unregister_metric("toy_cls_row")
        registry.unregister_metric("toy_cls_kind")
        sys.modules.pop("toy_metrics", None)


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
