"""The engine's side of ARCHITECTURE.md's recipes (issue 24): a newly registered metric reaches synthetic
runs with no edit of analysis/runs/synthetic.py, a family decides its own default run folder name, and
the ImageNet / Fashion-MNIST class names come from the models layer (datasets imports no timm)."""
from __future__ import annotations

import ast
import pathlib

import grimp
import numpy as np
import pytest

import analysis.datasets as datasets
from analysis.metrics import registry
from analysis.metrics.registry import Metric, OnAttention, OnRun
from analysis.models import labels
from analysis.models.registry import register_family, unregister_family
from analysis.models.timm_vit import TimmViT
from analysis.runs.build import default_out
from analysis.runs.reader import open_run
from analysis.runs.synthetic import make_run

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _never(*args):
    raise AssertionError("a synthetic run computes nothing")


TOYS = [
    Metric("toy_ranged", "ranged", meaning="toy", formula="toy", compute=OnAttention(_never), range=(5, 6)),
    Metric("toy_profile", "profile", meaning="toy", formula="toy", compute=OnAttention(_never), value="vector",
           range=(0, 1)),
    Metric("toy_kind", "kind", meaning="toy", formula="toy", compute=OnAttention(_never), value="category",
           summary=False),
    Metric("toy_backbone_only", "backbone only", meaning="toy", formula="toy", compute=OnAttention(_never),
           applies_to={"backbone"}),
    Metric("toy_head_max", "head max", meaning="toy", formula="toy", level="head",
           compute=OnRun(lambda arrays: np.nanmax(arrays["toy_ranged"], axis=0))),
]


@pytest.fixture
def toy_metrics():
    for m in TOYS:
        registry.register_metric(m)
    try:
        yield
    finally:
        for m in TOYS:
            registry.unregister_metric(m.name)


def test_a_new_metric_of_each_kind_appears_in_synthetic_runs(tmp_path, toy_metrics):
    run = open_run(make_run(tmp_path / "run", n_images=6, layers=2, heads=3, grid=4, n_classes=3))
    for name in ("toy_ranged", "toy_profile", "toy_kind", "toy_head_max"):
        assert name in run.metrics
    assert "toy_backbone_only" not in run.metrics  # a synthetic run's model is a classifier: NaN there
    ranged = run.dense("toy_ranged")
    assert ranged.shape == (6, 2, 3) and np.all((ranged >= 5) & (ranged <= 6))
    profile = run.dense("toy_profile")
    assert profile.shape == (6, 2, 3, 4) and np.all((profile >= 0) & (profile <= 1))
    kinds = run.dense("toy_kind")
    assert kinds.shape == (6, 2, 3) and set(np.unique(kinds)) <= {"toy_kind a", "toy_kind b", "toy_kind c"}
    assert np.isnan(run.dense("toy_backbone_only")).all()
    assert np.allclose(run.summary("toy_head_max"), ranged.max(axis=0))
    assert {"toy_ranged_mean", "toy_ranged_std", "toy_profile_mean"} <= set(run.head_summary.columns)


def test_synthetic_runs_have_every_registered_image_head_metric(tmp_path):
    run = open_run(make_run(tmp_path / "run", n_images=4, layers=2, heads=2, grid=3, n_classes=3))
    expected = {m.name for m in registry.metrics("image_head") if "classifier" in m.applies_to}
    assert expected <= set(run.metrics)


def test_the_default_run_folder_takes_the_family_short_name(tmp_path):
    register_family("toy-short", family=TimmViT, accepts_module=lambda module: False,
                    accepts_name=lambda name: name.startswith("toy:"), load=_never, priority=5,
                    short_name=lambda name: name.split(":", 1)[1])
    try:
        assert default_out("toy:abc", "fashion").name == "abc-fashion"
        assert default_out("toy:abc", str(tmp_path / "shop.csv")).name == "abc-shop"
    finally:
        unregister_family("toy-short")
    folder = tmp_path / "my-checkpoint"
    folder.mkdir()
    assert default_out(str(folder), "photos").name == "my-checkpoint-photos"  # an HF checkpoint folder
    assert default_out("vit_tiny_patch16_224", "photos").name == "vit_tiny_patch16_224-photos"


def test_class_names_come_from_the_models_layer_and_datasets_imports_no_timm():
    tree = ast.parse((ROOT / "analysis" / "datasets.py").read_text(encoding="utf-8"))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in imported if m.split(".")[0] == "timm"}
    assert datasets.imagenet_names is labels.imagenet_names
    assert datasets.FASHION_MNIST_CLASSES is labels.FASHION_MNIST_CLASSES
    graph = grimp.build_graph("analysis", cache_dir=None)
    models = [m for m in graph.modules if m == "analysis.models" or m.startswith("analysis.models.")]
    assert not [m for m in models if graph.direct_import_exists(importer=m, imported="analysis.datasets")]
