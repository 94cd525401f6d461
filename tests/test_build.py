"""The scripted cache build: tables and types, equality with the engine, resume, shards + merge,
skipped images, refusal of mismatched run directories, and one build of the real default run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from analysis import METRICS, attention_strength, head_importance
from analysis.metrics import registry
from analysis.runs import build
from analysis.runs.reader import list_runs, open_run
from analysis.runs.schema import IMAGE_COLUMNS, SCHEMA_VERSION, SKIPPED_COLUMNS, head_columns, summary_columns
from analysis.runs.autoencoder import PatternAutoencoder, train_autoencoder
from analysis.datasets import open_image
from analysis.metrics.engine import analyse_batch
from analysis.errors import CacheError
from analysis.runs.layouts import tsne_2d
from analysis.metrics.patterns import pack_bits
from analysis.models.adapter import model_from_manifest
from conftest import TINY_IMAGES as N_IMAGES, embedded_default_missing, save_tiny_vit


ROOT = Path(__file__).resolve().parent.parent
TABLES = ("images.parquet", "head_metrics.parquet", "head_summary.parquet", "skipped.parquet")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def full_run(tiny):
    """One uninterrupted single-process build."""
    manifest = build.build(tiny["config"]("full"))
    assert manifest["status"] == "complete"
    return open_run(tiny["root"] / "full")


def tables(run_dir) -> dict[str, pd.DataFrame]:
    return {name: pd.read_parquet(run_dir / name) for name in TABLES}


def assert_same_tables(a, b):
    for name in TABLES:
        pd.testing.assert_frame_equal(tables(a)[name], tables(b)[name], check_exact=True, obj=name)


# ---- tables ---------------------------------------------------------------------------------

def test_tables_have_the_contract_columns_and_types(full_run):
    default = [m.name for m in registry.metrics() if m.stage is None]  # no optional stage asked for
    for name, columns in (("images.parquet", IMAGE_COLUMNS), ("head_metrics.parquet", head_columns(default)),
                          ("skipped.parquet", SKIPPED_COLUMNS)):
        schema = pq.read_schema(full_run.path / name)
        for col, typ in columns.items():
            assert schema.field(col).type == typ, (name, col)
    L, H = 12, 3
    images, hm, hs = full_run.images, full_run.head_metrics, full_run.head_summary
    assert len(images) == N_IMAGES and images.image_id.is_unique
    assert len(hm) == N_IMAGES * L * H and len(hs) == L * H
    assert hm[["image_id", "layer", "head"]].equals(hm.sort_values(["image_id", "layer", "head"])[["image_id", "layer", "head"]])
    assert list(hs.columns) == list(summary_columns(default))
    assert hs.n_images.eq(N_IMAGES).all() and all(len(s) == 4 for s in hs.strength_mean)
    assert all(len(s) == 4 for s in hm.strength)  # K = max(gh, gw) = 4
    assert all(len(c) == 3 and len(p) == 3 for c, p in zip(images.top5_classes, images.top5_probs))
    for col in ("overview_x", "overview_y"):
        assert images[col].notna().all()
    for col in ("cls_x", "cls_y", "patch_x", "patch_y"):
        assert hm[col].notna().all() and hm[col].std() > 0
    # a classifier run has every metric of the default stages that applies to classifiers (direct_emb: backbones)
    assert full_run.metrics == [m for m in default if "classifier" in registry.get_metric(m).applies_to]
    assert full_run.manifest["metrics"] == full_run.metrics


def test_manifest_and_thumbnails(full_run):
    mf = full_run.manifest
    assert mf["status"] == "complete" and mf["schema_version"] == SCHEMA_VERSION
    model = mf["model"]
    for key in ("name", "weights", "pretrained", "img_size", "num_classes", "class_names", "weights_sha256",
                "depth", "heads", "prefix_tokens", "grid", "patch_size"):
        assert key in model, key
    assert (model["depth"], model["heads"], model["grid"], model["img_size"]) == (12, 3, [4, 4], 64)
    assert model["class_names"] == ["a", "b", "c"]
    assert mf["dataset"]["n_images"] == N_IMAGES and mf["dataset"]["fingerprint"]
    assert mf["params"]["q"] == 0.01 and mf["params"]["seed"] == 0 and mf["params"]["batch_size"] == 5
    assert {"torch", "timm", "openTSNE"} <= set(mf["versions"])
    assert {"images", "autoencoder", "layout_cls", "layout_patch", "layout_overview"} <= set(mf["timings"])
    assert mf["sizes"]["raw_attention_bytes"] == N_IMAGES * 12 * 3 * 17 * 17 * 4
    assert 0 < mf["sizes"]["cache_bytes"] == sum(p.stat().st_size for p in full_run.path.rglob("*") if p.is_file())
    assert len(mf["ae_loss"]) > 1 and all(np.isfinite(d["loss"]) for d in mf["ae_loss"])
    for image_id in full_run.images.image_id:
        with Image.open(full_run.thumbnail(image_id)) as im:
            assert im.mode == "RGB" and im.size == (112, 112)
    assert list_runs(full_run.path.parent)[0]["status"] == "complete"


def test_metrics_equal_the_engine(full_run):
    vit = model_from_manifest(full_run.model)  # the run's model reloads from its manifest
    images = full_run.images
    x = vit.preprocess([open_image(p) for p in images.path])
    labels = torch.tensor(images.label.to_numpy())
    hm = full_run.head_metrics
    ref = head_importance(vit, x, labels).merge(attention_strength(vit, x), on=["image", "layer", "head"])
    ref["image_id"] = images.image_id.to_numpy()[ref.image]
    ref = ref.sort_values(["image_id", "layer", "head"]).reset_index(drop=True)
    for m in METRICS + ("strength_entropy", "mean_distance_px"):
        np.testing.assert_allclose(hm[m].to_numpy(np.float64), ref[m].to_numpy(np.float64), rtol=1e-4, atol=1e-6,
                                   err_msg=m)
    np.testing.assert_allclose(np.stack(hm.strength), np.stack(ref.strength), rtol=1e-4, atol=1e-7)
    batch = analyse_batch(vit, x, labels)
    for m in ("semantic_concentration", "cls_semantic_concentration"):
        expected = batch[m][np.argsort(images.image_id.to_numpy())].reshape(-1)
        assert np.isfinite(expected).any(), m
        np.testing.assert_allclose(hm[m].to_numpy(np.float64), expected, rtol=1e-4, atol=1e-6, equal_nan=True,
                                   err_msg=m)
    # peak attention: a plain loop over every captured head's matrix, the CLS->CLS cell left out
    attention = vit.capture_attention(x)  # [B, L, H, N, N]
    T, peak = vit.num_prefix_tokens, np.zeros(attention.shape[:3])
    for b, layer, head in np.ndindex(*peak.shape):
        A = attention[b, layer, head].double().numpy()
        peak[b, layer, head] = max(A[T:, :].max(), A[:T, T:].max())
    expected = peak[np.argsort(images.image_id.to_numpy())].reshape(-1)
    np.testing.assert_allclose(hm["peak_attention"].to_numpy(np.float64), expected, rtol=1e-5, err_msg="peak_attention")
    with torch.no_grad():
        probs = torch.softmax(vit(x).double(), -1).numpy()
    np.testing.assert_allclose(images.prob, probs[np.arange(len(images)), images.label], rtol=1e-4)
    assert (images.pred.to_numpy() == probs.argmax(1)).all()


def test_corrupt_image_is_skipped_and_reported(full_run, tiny):
    skipped = full_run.skipped
    assert len(skipped) == 1 and skipped.path[0].endswith("broken.png")
    assert "Cannot read" in skipped.reason[0]
    # An image that breaks during the build (after the set was listed) is skipped too.
    cfg = tiny["config"]("late-corrupt", limit=6)
    ctx = build.prepare(cfg)
    victim = ctx.image_set.items[2].ref
    saved = open(victim, "rb").read()
    try:
        open(victim, "wb").write(b"garbage")
        build.build(cfg, context=ctx)
    finally:
        open(victim, "wb").write(saved)
    run = open_run(cfg.out)
    assert victim in set(run.skipped.path) and len(run.images) == 5 and 2 not in set(run.images.image_id)


# ---- robustness -------------------------------------------------------------------------------

def test_resume_after_interrupt_equals_one_build(full_run, tiny, monkeypatch):
    import analysis.metrics.engine as engine
    from analysis.cli import build_main as main

    real, calls = engine.analyse_batch, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C during the second batch
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "analyse_batch", interrupted)
    cfg = tiny["config"]("resumed")
    with pytest.raises(KeyboardInterrupt):
        build.build(cfg)
    monkeypatch.setattr(engine, "analyse_batch", real)
    run_dir = tiny["root"] / "resumed"
    assert [p.name for p in (run_dir / "parts").glob("*.npz")] == ["part_000000.npz"]  # first batch kept
    assert build.finished_images(run_dir) == set(range(5))
    with pytest.raises(CacheError, match="has not finished"):
        open_run(run_dir)
    assert main(["--out", str(run_dir), "--resume", "--quiet", "--threads", "1"]) == 0
    assert_same_tables(full_run.path, run_dir)


def test_shards_then_merge_equal_one_build(full_run, tiny):
    cfg = tiny["config"]("sharded")
    build.build(cfg, shard=(2, 2))  # batches [10, 11]
    with pytest.raises(CacheError, match="no results yet"):
        build.build(cfg, merge_only=True)
    # A worker pool hands out image ids: the JSON-able config and the ids of one batch.
    stats = build.run_image_stage(tiny["config"]("sharded").to_dict(), range(0, 5))
    assert stats["images"] == 5 and build.pending_batches(cfg, shard=(1, 2)) == [list(range(5, 10))]
    build.build(tiny["config"]("sharded"), shard=(1, 2))
    build.build(tiny["config"]("sharded"), merge_only=True)
    assert_same_tables(full_run.path, tiny["root"] / "sharded")


def test_mismatched_run_directory_is_refused(full_run, tiny, capsys):
    from analysis.cli import build_main as main

    with pytest.raises(CacheError, match=r"params\.q: run has 0\.01, this build has 0\.05"):
        build.prepare(tiny["config"]("full", q=0.05))
    other = save_tiny_vit(tiny["root"] / "other.safetensors", seed=1)
    with pytest.raises(CacheError, match=r"(?s)model\.weights_sha256.*another --out"):
        build.prepare(tiny["config"]("full", weights=str(other)))
    (tiny["root"] / "not-a-run").mkdir()
    (tiny["root"] / "not-a-run" / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="not a HeadScope run"):
        build.prepare(tiny["config"]("not-a-run"))
    # The command line reports the problem and the fix, without a traceback.
    assert main(["--model", "vit_tiny_patch16_224", "--weights", str(other), "--img-size", "64",
                 "--images", str(tiny["root"] / "images"), "--out", str(full_run.path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "weights_sha256" in err and "Traceback" not in err
    assert main(["--out", str(tiny["root"] / "nothing"), "--resume"]) == 2
    assert "Nothing to resume" in capsys.readouterr().err
    assert main(["--out", str(full_run.path), "--resume", "--q", "0.5"]) == 2
    assert "--q: run has 0.01, you gave 0.5" in capsys.readouterr().err
    assert main(["--model", "vit_tiny_patch16_224", "--images", str(tiny["root"] / "images"),
                 "--out", str(tiny["root"] / "no-weights")]) == 2
    assert "needs weights" in capsys.readouterr().err


# ---- autoencoder and layouts --------------------------------------------------------------------

def test_autoencoder_learns_binary_patterns():
    """Shifted-diagonal patterns (attend to a neighbour): loss falls below the constant baseline
    and the latents keep the pattern classes apart."""
    P, g = 16, 4
    rng = np.random.default_rng(0)
    rc = np.stack(np.divmod(np.arange(P), g), 1)
    offsets = [(0, 0), (0, 1), (1, 0), (-1, 0)]
    labels = rng.integers(0, len(offsets), 600)
    mats = np.zeros((600, P, P), bool)
    for i, lab in enumerate(labels):
        tgt = np.clip(rc + offsets[lab], 0, g - 1)
        mats[i, np.arange(P), tgt[:, 0] * g + tgt[:, 1]] = True
    res = train_autoencoder(pack_bits(mats), P, latent_dim=8, epochs=30, batch_size=64, seed=0)
    assert res.latents.shape == (600, 8)
    assert res.loss_curve[-1]["loss"] < 0.5 * res.baseline_loss
    centres = np.stack([res.latents[labels == k].mean(0) for k in range(len(offsets))])
    nearest = np.linalg.norm(res.latents[:, None] - centres[None], axis=-1).argmin(1)
    assert (nearest == labels).mean() > 0.9
    again = train_autoencoder(pack_bits(mats), P, latent_dim=8, epochs=30, batch_size=64, seed=0)
    np.testing.assert_array_equal(res.latents, again.latents)  # seeded
    assert PatternAutoencoder(196).prepare(torch.zeros(2, 196, 196)).shape == (2, 1, 128, 128)


def test_layouts_are_seeded_and_handle_tiny_sets():
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(0, 1, (60, 20)), rng.normal(8, 1, (60, 20))]).astype(np.float32)
    a, b = tsne_2d(X, seed=3), tsne_2d(X, seed=3)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (120, 2) and a.dtype == np.float32
    dist = np.linalg.norm(a[:60].mean(0) - a[60:].mean(0))
    assert dist > 3 * max(a[:60].std(), a[60:].std())  # the two clusters stay apart
    for n in (0, 1, 3):
        assert tsne_2d(X[:n]).shape == (n, 2)
    assert not np.isnan(tsne_2d(np.ones((20, 5)))).any()


# ---- the command line on the real default model ---------------------------------------------------

def test_help_explains_every_option():
    out = subprocess.run([sys.executable, "scripts/build_cache.py", "--help"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    for opt in ("--model", "--weights", "--pretrained", "--dataset", "--images", "--manifest", "--out", "--limit",
                "--batch-size", "--device", "--seed", "--resume", "--shard", "--merge"):
        assert opt in out


def test_default_run_builds_on_the_real_model(tmp_path):
    if missing := embedded_default_missing():
        pytest.skip(f"embedded default not installed here: {missing}")
    out = tmp_path / "default20"
    proc = subprocess.run([sys.executable, "scripts/build_cache.py", "--limit", "20", "--batch-size", "10",
                           "--out", str(out), "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Run complete: 20 images analysed" in proc.stdout and "images/s" in proc.stdout
    run = open_run(out)
    assert run.model["name"] == "default" and run.model["grid"] == [8, 8]
    assert run.manifest["dataset"]["name"] == "fashion" and len(run.images) == 20
    assert len(run.head_metrics) == 20 * 72 and run.images.label_name.notna().all()
    vit = model_from_manifest(run.model)
    two = run.images.iloc[:2]
    x = vit.preprocess([open_image(p) for p in two.path])
    ref = head_importance(vit, x, torch.tensor(two.label.to_numpy()))
    got = run.head_metrics[run.head_metrics.image_id.isin(two.image_id)]
    for m in ("prob", "jsd", "cls_dist", "patch_dist", "emb_dist"):
        np.testing.assert_allclose(got[m].to_numpy(np.float64), ref[m].to_numpy(), rtol=1e-4, atol=1e-6, err_msg=m)
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"


def test_class_mapping_by_sorted_order_is_printed_and_stored(full_run, tiny, capsys):
    """A model without class names maps the folders a, b, c in sorted order: the run's manifest
    keeps that mapping and the build says so, with how to change it."""
    from analysis.cli import build_main as main

    assert full_run.manifest["dataset"]["label_mapping"] == {
        "rule": "sorted order (the model has no class names)", "folders": {"a": 0, "b": 1, "c": 2}}
    assert main(["--out", str(full_run.path), "--resume", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "mapped to classes by sorted order (the model has no class names), not by name" in out
    assert "  a -> class 0\n  b -> class 1\n  c -> class 2\n" in out and "--labels MAP.json" in out
