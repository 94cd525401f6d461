"""The optional ``circuits`` build stage (analysis.runs.circuits) on the tiny folder set: the stored
edges and the run-mean circuit against head_paths(..., method="eap") per image, the threshold rule,
the agreement with exact path patching against a Spearman computed here, resuming after an
interrupt, adding the stage to an old run, backbones, and --all-stages."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from analysis import head_paths
from analysis.cli import build_main, build_parser, make_config
from analysis.datasets import open_image
from analysis.errors import CacheError, HeadScopeError
from analysis.metrics.paths import VIAS
from analysis.models.adapter import model_from_manifest
from analysis.runs import build, circuits
from analysis.runs.head_stages import ALL_STAGES
from analysis.runs.reader import open_run
from conftest import TINY_IMAGES, make_synthetic_run, save_tiny_vit

pytestmark = pytest.mark.usefixtures("one_thread")
KEYS = ["a_layer", "a_head", "b_layer", "b_head"]
SAMPLE = 3


@pytest.fixture(scope="module")
def circuit_run(tiny):
    manifest = build.build(tiny["config"]("circuits", stages=["circuits"], circuit_sample=SAMPLE))
    assert manifest["status"] == "complete"
    return open_run(tiny["root"] / "circuits")


@pytest.fixture(scope="module")
def references(circuit_run):
    """{via: [images, E] float64}: head_paths(method="eap") of every image of the run, all edges, and
    the model, the images [n, 3, H, W] and labels."""
    vit = model_from_manifest(circuit_run.model)
    images = circuit_run.images
    x = vit.preprocess([open_image(p) for p in images.path])
    refs = {via: np.stack([head_paths(vit, x[i], int(y), via=via, method="eap").path_logit_eap.to_numpy()
                           for i, y in enumerate(images.label)]) for via in VIAS}
    keys = head_paths(vit, x[0], int(images.label[0]), method="eap")[KEYS]
    return {"vit": vit, "x": x, "values": refs, "keys": keys}


def test_kept_edges_follow_the_relative_threshold():
    values = np.array([[2.0, -1.0, 0.099, -0.1, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    assert circuits.kept_edges(values).tolist() == [[True, True, False, True, False], [False] * 5]
    assert circuits.kept_edges(values, 0.01).tolist() == [[True] * 4 + [False], [False] * 5]
    assert circuits.EDGE_THRESHOLD == 0.05


def test_stored_edges_are_the_eap_edges_above_the_threshold(circuit_run, references):
    keys, rule = references["keys"], circuit_run.manifest["circuits"]["threshold"]
    assert rule == circuits.EDGE_THRESHOLD
    for via in VIAS:
        for row, image_id in enumerate(circuit_run.images.image_id):
            ref = keys.assign(path_logit_eap=references["values"][via][row])
            size, top = ref.path_logit_eap.abs(), ref.path_logit_eap.abs().max()
            clear_in, clear_out = size >= rule * top * (1 + 1e-4), size < rule * top * (1 - 1e-4)
            got = circuit_run.circuit_edges(image_id, via)
            assert list(got.columns) == KEYS + ["path_logit_eap"]
            assert (np.diff(got.path_logit_eap.abs()) <= 0).all()  # sorted by |value|, largest first
            merged = got.merge(ref, on=KEYS, how="left", suffixes=("", "_ref"), validate="1:1")
            np.testing.assert_allclose(merged.path_logit_eap, merged.path_logit_eap_ref, rtol=1e-4,
                                       atol=1e-6 * top)
            stored = set(map(tuple, got[KEYS].to_numpy()))
            assert set(map(tuple, ref[clear_in][KEYS].to_numpy())) <= stored, (via, image_id)
            assert not set(map(tuple, ref[clear_out][KEYS].to_numpy())) & stored, (via, image_id)
    assert circuit_run.circuit_edges(10 ** 6).empty  # an image the run lacks


def test_run_mean_circuit_is_the_mean_over_the_images(circuit_run, references):
    entry = circuit_run.manifest["circuits"]
    assert entry["images"] == TINY_IMAGES and entry["edges_per_image"] == len(references["keys"])
    for via in VIAS:
        mean = circuit_run.circuit_mean(via)
        assert len(mean) == len(references["keys"]) and list(mean.columns) == KEYS + ["path_logit_eap"]
        want = references["keys"].assign(want=references["values"][via].mean(0))
        merged = mean.merge(want, on=KEYS, validate="1:1")
        np.testing.assert_allclose(merged.path_logit_eap, merged.want, rtol=1e-4,
                                   atol=1e-6 * np.abs(merged.want).max())


def test_agreement_is_the_spearman_of_eap_with_exact_on_the_sample(circuit_run, references):
    a = circuit_run.circuit_agreement
    ids = circuit_run.images.image_id.tolist()
    assert a["via"] == "qkv" and a["images"] == SAMPLE and len(a["image_ids"]) == SAMPLE
    assert set(a["image_ids"]) <= set(ids) and a["image_ids"] == sorted(a["image_ids"])
    rhos = []
    for image_id in a["image_ids"]:
        row = ids.index(image_id)
        label = int(circuit_run.images.label[row])
        exact = head_paths(references["vit"], references["x"][row], label)
        rhos.append(spearmanr(exact.path_logit, references["values"]["qkv"][row]).statistic)
    np.testing.assert_allclose(a["per_image"], rhos, atol=1e-6)
    assert a["per_image_median"] == pytest.approx(np.median(rhos), abs=1e-6)
    assert [a["per_image_q25"], a["per_image_q75"]] == pytest.approx(np.percentile(rhos, [25, 75]), abs=1e-6)
    assert a["edges_per_image"] == len(references["keys"])


def test_an_interrupted_circuits_stage_resumes_to_the_same_tables(circuit_run, tiny, monkeypatch):
    run_dir = circuit_run.path
    tables = {f: pd.read_parquet(run_dir / f) for f in ("circuit_edges.parquet", "circuit_mean.parquet")}
    entry = circuit_run.manifest["circuits"]
    parts = sorted((run_dir / "parts").glob("circuits_*.npz"))
    exact = sorted((run_dir / "parts").glob("circuit_exact_*.json"))
    assert len(parts) == 3 and len(exact) == SAMPLE  # 12 images in batches of 5; one file per sampled image
    kept = parts[0].stat().st_mtime_ns, exact[0].stat().st_mtime_ns
    for p in parts[1:] + exact[1:] + [run_dir / f for f in tables]:
        p.unlink()
    ctx = build.prepare(tiny["config"]("circuits", stages=["circuits"], circuit_sample=SAMPLE))
    calls = []
    real = circuits.eap_scores

    def killed_on_the_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(circuits, "eap_scores", killed_on_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        circuits.circuits_stage(ctx, circuit_run.images.image_id.to_numpy(), build._Stages(False))
    assert parts[1].is_file() and not parts[2].is_file()  # the batch before the kill is kept
    monkeypatch.setattr(circuits, "eap_scores", real)
    again = circuits.circuits_stage(ctx, circuit_run.images.image_id.to_numpy(), build._Stages(False))
    assert (parts[0].stat().st_mtime_ns, exact[0].stat().st_mtime_ns) == kept  # reused, not recomputed
    assert again == entry
    for name, table in tables.items():
        pd.testing.assert_frame_equal(pd.read_parquet(run_dir / name), table)


def test_circuits_can_be_added_to_a_run_built_without_them(tiny, capsys):
    out = tiny["root"] / "old"
    build.build(tiny["config"]("old", limit=6))
    run = open_run(out)
    assert not run.has_circuits and "--add-circuits" in run.lacks_circuits()
    with pytest.raises(CacheError, match="--add-circuits"):
        run.circuit_edges(0)
    head_metrics = (out / "head_metrics.parquet").read_bytes()
    assert build_main(["--out", str(out), "--add-circuits", "--quiet", "--circuit-sample", "2"]) == 0
    assert "circuits" in capsys.readouterr().out
    run = open_run(out)
    assert run.has_circuits and run.lacks_circuits() is None
    assert run.manifest["params"]["stages"] == ["circuits"] and run.manifest["params"]["circuit_sample"] == 2
    assert run.circuit_agreement["images"] == 2 and len(run.circuit_mean("q")) == run.manifest["circuits"][
        "edges_per_image"]
    assert (out / "head_metrics.parquet").read_bytes() == head_metrics  # nothing else recomputed
    assert build_main(["--out", str(out), "--add-circuits", "--quiet"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    config = build.config_from_manifest(out, progress=False)  # the run resumes with its new stage list
    assert build.prepare(config).manifest["status"] == "complete"


def test_backbones_have_no_circuits_stage(tiny, tmp_path):
    weights = save_tiny_vit(tmp_path / "backbone.safetensors", num_classes=0)
    config = lambda name, **kw: tiny["config"](name, weights=str(weights), limit=4, **kw)
    with pytest.raises(HeadScopeError, match="classifier") as err:
        build.prepare(config("bb", stages=["circuits"]))
    assert "path_emb" in str(err.value)
    ctx = build.prepare(config("bb-all", all_stages=True))
    assert ctx.config.stages == ["curves", "mean_ablation"]
    assert set(ctx.manifest["stages_skipped"]) == {"circuits", "taylor"}
    assert ctx.manifest["params"]["stages"] == ["curves", "mean_ablation"]
    lines = "\n".join(build.summary_lines(ctx.manifest))
    assert "stage circuits skipped" in lines and "classifier" in lines
    path = make_synthetic_run(tmp_path / "synthetic", n_images=2, layers=2, heads=2, grid=2)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["model"]["num_classes"] = 0  # as a backbone run's manifest says
    (path / "manifest.json").write_text(json.dumps(manifest))
    run = open_run(path)
    assert "backbone" in run.lacks_circuits() and "--add-circuits" not in run.lacks_circuits()


def test_all_stages_turns_on_every_stage_through_shards_and_merge(tiny):
    args = build_parser().parse_args(["--all-stages", "--out", str(tiny["root"] / "x")])
    assert make_config(args).stages == sorted(ALL_STAGES)
    assert set(ALL_STAGES) == {"taylor", "mean_ablation", "curves", "circuits"}
    config = lambda: tiny["config"]("all", all_stages=True, limit=6, curve_images=3, circuit_sample=2)
    for shard in ((1, 2), (2, 2)):
        build.build(config(), shard=shard)
    manifest = build.build(config(), merge_only=True)
    assert manifest["status"] == "complete" and manifest["params"]["stages"] == sorted(ALL_STAGES)
    assert manifest["build_config"]["all_stages"] is True and "stages_skipped" not in manifest
    run = open_run(tiny["root"] / "all")
    assert {"taylor_prob_drop", "mean_prob_drop", "pattern"} <= set(run.metrics)
    assert manifest["pruning_curves"]["images"] == 3 and run.has_circuits
    assert manifest["circuits"]["images"] == 6 and manifest["circuits"]["agreement"]["images"] == 2
    assert len(run.circuit_edges(run.images.image_id[0])) > 0
    mf = json.loads((run.path / "manifest.json").read_text())
    assert {"circuits_eap", "circuits_exact", "pruning_curves"} <= set(mf["timings"])


def test_the_readme_run_and_the_browser_tests_run_ask_for_every_stage():
    from conftest import REAL_RUN_OPTIONS, ROOT

    build_line = next(line for line in (ROOT / "scripts/run_local.sh").read_text().splitlines()
                      if "build_cache.py" in line and "--resume" not in line)
    assert "--all-stages" in build_line and "--all-stages" in REAL_RUN_OPTIONS
    assert "--all-stages" in (ROOT / "README.md").read_text().split("## The embedded default")[0]
