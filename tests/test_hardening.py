"""Bad inputs and faults (issue 11): high-bit-depth images, folder names that are not classes,
non-UTF-8 names, broken links, a full disk, tables that break the contract, interrupted
autoencoder and layouts, over-long run names, forged callback payloads, and the clearer messages."""
from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from analysis import datasets
from analysis.datasets import FASHION_MNIST_CLASSES, load_image_set, open_image, printable
from analysis.errors import CacheError, ImageReadError, InputError, LabelError, ModelLoadError
from analysis.runs import build, tables
from analysis.runs.reader import list_runs, open_run
from analysis.runs.schema import SCHEMA_VERSION
from analysis.runs.tables import write_json
from analysis.values import strict_int


from analysis.runs.synthetic import make_run
from tests.test_build import save_tiny_vit  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _png(path, color=(200, 30, 30), size=(40, 32)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


# ---- 3: high bit depth ------------------------------------------------------------------------
def test_16_bit_png_is_scaled_not_clipped_to_white(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    rgb = np.asarray(open_image(str(tmp_path / "g16.png")))
    assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8
    expected = np.rint(ramp / 257.0)
    assert np.abs(rgb[..., 0].astype(int) - expected).max() <= 1
    assert abs(rgb.mean() - 127.5) < 2  # PIL's convert("RGB") makes it nearly all 255


def test_32_bit_int_and_float_images_are_scaled(tmp_path):
    ramp = np.linspace(0, 1, 32 * 32).reshape(32, 32)
    Image.fromarray((ramp * 65535).astype(np.int32)).save(tmp_path / "i32.tif")  # mode I, 16-bit values
    Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "f01.tif")          # mode F in 0..1
    Image.fromarray((ramp * 4000 - 1000).astype(np.float32)).save(tmp_path / "fwide.tif")  # F, any range
    Image.fromarray((ramp * 2 ** 30).astype(np.int32)).save(tmp_path / "iwide.tif")  # I, beyond 16 bits
    for name in ("i32.tif", "f01.tif", "fwide.tif", "iwide.tif"):
        assert Image.open(tmp_path / name).mode in ("I", "F")
        grey = np.asarray(open_image(str(tmp_path / name)))[..., 0].astype(int)
        assert np.abs(grey - np.rint(ramp * 255)).max() <= 1, name
    Image.fromarray(np.full((8, 8), 200, np.int32)).save(tmp_path / "i8.tif")  # 8-bit values in mode I
    assert (np.asarray(open_image(str(tmp_path / "i8.tif"))) == 200).all()


def test_image_pixel_cap_is_configurable_and_skips_with_a_reason(tmp_path, monkeypatch):
    _png(tmp_path / "set" / "Coat" / "big.png", size=(50, 40))
    _png(tmp_path / "set" / "Coat" / "small.png", size=(20, 20))
    monkeypatch.setenv("HEADSCOPE_MAX_IMAGE_PIXELS", "1000")
    with pytest.raises(ImageReadError, match=r"50 x 40 .*HEADSCOPE_MAX_IMAGE_PIXELS"):
        open_image(str(tmp_path / "set" / "Coat" / "big.png"))
    s = load_image_set(tmp_path / "set", class_names=FASHION_MNIST_CLASSES)
    assert [Path(it.ref).name for it in s] == ["small.png"]
    assert "megapixels" in dict(s.skipped)[str(tmp_path / "set" / "Coat" / "big.png")]
    monkeypatch.setenv("HEADSCOPE_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(InputError, match="HEADSCOPE_MAX_IMAGE_PIXELS"):
        open_image(str(tmp_path / "set" / "Coat" / "small.png"))
    monkeypatch.delenv("HEADSCOPE_MAX_IMAGE_PIXELS")
    assert datasets.max_image_pixels() == 40_000_000


# ---- 4: folder names vs the model's classes --------------------------------------------------
def test_folders_that_are_not_classes_are_refused_with_the_closest_names(tmp_path):
    for c in ("cat", "dog"):
        _png(tmp_path / "pets" / c / "x.png")
    with pytest.raises(LabelError) as err:
        load_image_set(tmp_path / "pets", class_names=FASHION_MNIST_CLASSES)
    text = str(err.value)
    assert "cat/" in text and "dog/" in text and "--labels sorted" in text and "T-shirt/top" in text
    for c in ("a", "b", "c", "d"):
        _png(tmp_path / "abcd" / c / "x.png")
    with pytest.raises(LabelError, match="4 of 4 class folder"):
        load_image_set(tmp_path / "abcd", class_names=FASHION_MNIST_CLASSES)
    # an explicit choice: sorted order, or a mapping file (JSON or CSV; index or class name)
    s = load_image_set(tmp_path / "abcd", class_names=FASHION_MNIST_CLASSES, labels="sorted")
    assert [(it.label, it.label_name) for it in s] == [(0, "T-shirt/top"), (1, "Trouser"), (2, "Pullover"), (3, "Dress")]
    (tmp_path / "map.json").write_text(json.dumps({"cat": "coat", "dog": 7}))
    s = load_image_set(tmp_path / "pets", class_names=FASHION_MNIST_CLASSES, labels=str(tmp_path / "map.json"))
    assert [(it.label, it.label_name) for it in s] == [(4, "Coat"), (7, "Sneaker")]
    (tmp_path / "map.csv").write_text("folder,label\ncat,Bag\n")
    with pytest.raises(LabelError, match="dog: not in the mapping"):
        load_image_set(tmp_path / "pets", class_names=FASHION_MNIST_CLASSES, labels=str(tmp_path / "map.csv"))
    with pytest.raises(InputError, match="not a folder"):
        load_image_set("fashion", labels="sorted")


def test_folder_names_match_case_punctuation_and_id2label_synonyms(tmp_path):
    _, names = datasets.imagenet_names()
    for c in ("Tabby Cat", "tench", "ANKLE-boot"):
        _png(tmp_path / "mixed" / c / "x.png")
    with pytest.raises(LabelError, match="ANKLE-boot/"):  # not an ImageNet class
        load_image_set(tmp_path / "mixed", class_names=names)
    (tmp_path / "mixed" / "ANKLE-boot" / "x.png").unlink()
    (tmp_path / "mixed" / "ANKLE-boot").rmdir()
    s = load_image_set(tmp_path / "mixed", class_names=names)
    assert sorted(it.label for it in s) == [0, 281]  # tench; "tabby, tabby cat"
    _png(tmp_path / "shop" / "ankle_boot" / "x.png")
    assert load_image_set(tmp_path / "shop", class_names=FASHION_MNIST_CLASSES).items[0].label == 9


def test_build_has_one_labels_flag():
    from analysis.cli import build_parser

    assert build_parser().parse_args(["--images", "x", "--labels", "sorted"]).labels == "sorted"
    assert "labels" in {f for f in build.BuildConfig.__dataclass_fields__}


# ---- 6 and 11: non-UTF-8 names, broken links ---------------------------------------------------
def test_non_utf8_names_and_broken_links(tmp_path):
    root = tmp_path / "odd"
    folder = os.fsdecode(os.fsencode(str(root)) + b"/caf\xe9")
    _png(Path(folder) / "a.png")
    _png(Path(os.fsdecode(os.fsencode(folder) + b"/\xff.png")))
    _png(root / "ok" / "b.png")
    os.symlink(root / "ok" / "gone.png", root / "ok" / "dangling.png")
    s = load_image_set(root)
    assert len(s) == 3 and len(s.fingerprint) == 64
    shown = [printable(it.ref) for it in s]
    assert any(r.endswith("caf\\xe9/\\xff.png") for r in shown)
    shown[0].encode("utf-8")  # valid text for Parquet and JSON
    assert all(open_image(r).size == (40, 32) for r in shown)  # the escaped name reopens the file
    reasons = dict(s.skipped)
    assert "broken symbolic link" in reasons[str(root / "ok" / "dangling.png")]


# ---- weak messages: data ----------------------------------------------------------------------
def test_clear_messages_for_bad_image_sources(tmp_path):
    (tmp_path / "m.csv").write_text("path,label\nnope1.png,0\nsub/nope2.png,1\n")
    with pytest.raises(InputError) as err:
        load_image_set(tmp_path / "m.csv", class_names=FASHION_MNIST_CLASSES)
    assert "nope1.png" in str(err.value) and "nope2.png" in str(err.value) and "not found" in str(err.value)
    (tmp_path / "list.txt").write_text("hello")
    with pytest.raises(InputError, match="is a file, not a folder"):
        load_image_set(tmp_path / "list.txt", kind="folder")


def test_strict_int():
    assert [strict_int(v) for v in ("12", "-3", 7, 4.0)] == [12, -3, 7, 4]
    for bad in ("1_0", " 7", "٣", "1e3", "", True, 1.5, None, [1]):
        with pytest.raises(ValueError):
            strict_int(bad)
    from app.state import parse_selection

    sel = parse_selection("?run=r&image=1_0&layer=2&head=٣", None)
    assert {k: sel[k] for k in ("run", "image", "layer", "head")} == {"run": "r", "image": None, "layer": 2, "head": None}


# ---- weak messages: weights ---------------------------------------------------------------------
def test_malicious_pickle_and_empty_checkpoint(tmp_path):
    from analysis.models.weights import read_state_dict

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"w": torch.zeros(1), "x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ModelLoadError) as err:
        read_state_dict(tmp_path / "evil.pth")
    assert "never unpickles code" in str(err.value) and "safetensors" in str(err.value)
    assert "weights_only=False" not in str(err.value) and not (tmp_path / "pwned").exists()
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="is empty"):
        read_state_dict(tmp_path / "empty.pth")
    (tmp_path / "junk.pth").write_bytes(b"\x00junk")
    with pytest.raises(ModelLoadError, match=r"Could not read weights .*: \S"):
        read_state_dict(tmp_path / "junk.pth")


def test_pretrained_offline_switches_the_hub_offline(monkeypatch):
    import timm
    from huggingface_hub import constants

    from analysis.models import timm_vit

    seen = []

    def create_model(*args, **kwargs):
        seen.append(constants.HF_HUB_OFFLINE)
        raise OSError("not in the local cache")

    monkeypatch.setattr(timm_vit, "_reachable", lambda url: False)
    monkeypatch.setattr(timm, "create_model", create_model)
    with pytest.raises(ModelLoadError, match="Are you offline"):
        timm_vit.load_timm("vit_tiny_patch16_224", pretrained=True)
    assert seen == [True] and constants.HF_HUB_OFFLINE is False


# ---- 10 and schema messages: open_run ------------------------------------------------------------
@pytest.fixture
def syn(tmp_path):
    return make_run(tmp_path / "cache" / "syn", n_images=6, layers=2, heads=2, grid=3, n_classes=3)


def test_tables_that_break_the_contract_are_named(syn):
    images = pd.read_parquet(syn / "images.parquet")[["image_id", "path"]]
    pq.write_table(pa.Table.from_pandas(images), syn / "images.parquet")
    with pytest.raises(CacheError, match=r"images.parquet of run syn lacks the columns label, .*Rebuild"):
        open_run(syn)
    (syn / "head_metrics.parquet").write_bytes(b"PAR1 garbage")
    make_run(syn.parent / "ok", n_images=4, layers=2, heads=2, grid=3, n_classes=3)
    runs = {r["name"]: r for r in list_runs(syn.parent)}
    assert runs["ok"]["error"] is None and "lacks the columns" in runs["syn"]["error"]


def test_corrupt_parquet_and_schema_versions_say_what_to_do(syn):
    (syn / "head_metrics.parquet").write_bytes(b"PAR1 this is not parquet PAR1")
    with pytest.raises(CacheError, match=r"head_metrics.parquet of run syn is corrupt.*Rebuild"):
        open_run(syn)
    mf = json.loads((syn / "manifest.json").read_text())
    write_json(syn / "manifest.json", {**mf, "schema_version": SCHEMA_VERSION + 1})
    with pytest.raises(CacheError, match="Upgrade HeadScope"):
        open_run(syn)
    write_json(syn / "manifest.json", {**mf, "schema_version": 0})
    with pytest.raises(CacheError, match="Rebuild"):
        open_run(syn)


def test_runs_page_marks_unreadable_runs(syn):
    from app import config
    from app.server import create_app

    make_run(syn.parent / "ok", n_images=4, layers=2, heads=2, grid=3, n_classes=3)
    (syn / "images.parquet").write_bytes(b"garbage")
    create_app(cache_dir=syn.parent)
    from app.pages import runs

    table = json.dumps(runs.runs_table({"run": "ok"}), default=lambda o: o.to_plotly_json())
    assert table.count("unreadable") == 1 and "?run=ok" in table and "?run=syn" not in table
    assert config.default_run() == "ok"


# ---- 8 and 9: the app's routes and callback gate ---------------------------------------------------
@pytest.fixture
def client(syn, monkeypatch):
    monkeypatch.setenv("HEADSCOPE_MAX_REQUEST_BYTES", str(1 << 20))
    from app.server import create_app

    app = create_app(cache_dir=syn.parent, run="syn")
    c = app.server.test_client()
    assert c.get("/").status_code == 200  # Dash registers the pages' callbacks on the first request
    return app, c


def test_over_long_run_names_are_400(client):
    _, c = client
    long = "r" * 300
    for url in (f"/api/attention?run={long}&image=0&layer=0&head=0", f"/thumbs/{long}/0.png"):
        r = c.get(url)
        assert r.status_code == 400 and "too long" in r.get_json()["error"]
    r = c.get("/api/attention?run=syn&image=1_0&layer=0&head=0")
    assert r.status_code == 400 and "integers" in r.get_json()["error"]
    assert c.get("/thumbs/syn/0.png").status_code == 200


def _payload(app, output, values, state_values=()):
    spec = app.callback_map[output]
    outs = [dict(zip(("id", "property"), o.rsplit(".", 1))) for o in output.strip(".").split("...")]
    return {"output": output, "outputs": outs if output.startswith("..") else outs[0],
            "inputs": [{"id": d["id"], "property": d["property"], "value": v} for d, v in zip(spec["inputs"], values)],
            "state": [{"id": d["id"], "property": d["property"], "value": v} for d, v in zip(spec["state"], state_values)],
            "changedPropIds": [f"{spec['inputs'][0]['id']}.{spec['inputs'][0]['property']}"]}


def test_a_second_app_in_the_process_has_every_callback(client, syn):
    """A notebook's second explorer() (or a later test) builds another app: the panels' callbacks
    (app/panels/*, imported by the Explorer page, not executed again by Dash) must be there too."""
    from app.server import create_app

    first, _ = client
    second = create_app(cache_dir=syn.parent, run="syn")
    assert second.server.test_client().get("/").status_code == 200
    assert set(second.callback_map) == set(first.callback_map)
    assert any("sal-map" in k for k in second.callback_map) and any("hs-pairs-graph" in k for k in second.callback_map)


def test_forged_callback_payloads_are_400_without_traceback(client, caplog):
    app, c = client
    post = lambda body: c.post("/_dash-update-component", json=body)
    every = {(d["id"], d["property"]) for spec in app.callback_map.values() for d in spec["inputs"] + spec["state"]}
    from app.callbacks import RULES

    assert every <= set(RULES), every - set(RULES)  # every callback input has its rule
    sel = {"run": "syn", "image": 1, "layer": 0, "head": 1}
    genuine = {"k-image": {"run": "syn", "image": 1}, "k-head": {"run": "syn", "layer": 0, "head": 1},
               "k-metric": {"run": "syn", "metric": "jsd"}, "k-set": {"set": None}, "k-heads": {"heads": None},
               "b1-overlay": [], "k-thr": {"thr": None, "bins": None}, "k-scale": {"scale": None}, "sel": sel}

    def vm(model, drop=None, **changed):
        """A request of view model ``model`` (app/views.py): every input and state by its id."""
        key = next(k for k in app.callback_map if f"vm-{model}.data" in k)
        spec, values = app.callback_map[key], {**genuine, **changed}
        deps = [d for d in spec["inputs"] + spec["state"] if d["id"] != drop]
        return {"output": key, "outputs": [dict(zip(("id", "property"), o.rsplit(".", 1))) for o in key.strip(".").split("...")],
                "inputs": [{**d, "value": values.get(d["id"])} for d in deps if d in spec["inputs"]],
                "state": [{**d, "value": values.get(d["id"])} for d in deps if d in spec["state"]],
                "changedPropIds": [f"{spec['inputs'][0]['id']}.{spec['inputs'][0]['property']}"]}
    mode = next(k for k, v in app.callback_map.items() if [i["id"] for i in v["inputs"]] == ["b2-graph"])
    assert post(vm("cached")).status_code == 200 and post(vm("online")).status_code == 200  # genuine requests
    caplog.set_level(logging.INFO)
    forged = [
        [], {}, "x", {"output": "nope.children", "outputs": {}, "inputs": [], "state": []},
        vm("cached", sel={"run": "syn", "image": "1", "layer": [0], "head": {}}),
        vm("cached", sel={"run": "../../etc", "image": 1}),
        vm("cached", drop="k-metric"),  # one input missing
        vm("cached", **{"k-set": {"set": "1,2"}}),
        vm("cached", **{"k-set": {"set": [1], "evil": 1}}),
        vm("cached", **{"k-set": {"set": None, "scope": "every thing"}}),
        vm("cached", **{"k-heads": {"heads": [[0, 1, 2, 3]]}}),
        vm("cached", **{"b1-overlay": ["everything"]}),
        vm("cached", sel={**sel, "metric": "<script>"}),
        vm("cached", **{"vm-cached": {"view_b1": {"k-image.data": ["not a fingerprint"]}}}),
        vm("cached", **{"vm-cached": "x" * 100}),
        _payload(app, mode, [{"points": [{"customdata": "x"}]}]),
        _payload(app, mode, [{"points": []}]),
        vm("online", **{"k-thr": {"thr": "a 0.5;"}}),
        vm("online", **{"k-thr": 1e9}),
    ]
    hover = next(k for k in app.callback_map if "a-tooltip" in k)
    forged += [_payload(app, hover, [{"points": [{"customdata": 1}]}], [sel]),
               _payload(app, hover, [{"points": "all"}], [sel])]
    for body in forged:
        r = post(body)
        assert r.status_code == 400, body
        assert r.get_json()["error"].startswith("Malformed callback request")
    big = c.post("/_dash-update-component", data=b"[" + b"0," * (10 << 20) + b"0]",
                 content_type="application/json")
    assert big.status_code == 413
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


# ---- 7, 14 and 6/11 in a build ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory):
    """Like conftest's ``tiny``, but the folder also holds an undecodable file name and a dangling link."""
    root = tmp_path_factory.mktemp("tinyh")
    weights = save_tiny_vit(root / "tiny.safetensors")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / "images" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / "images" / c / f"{i}.png")
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(
        os.fsdecode(os.fsencode(str(root / "images" / "b")) + b"/\xff\xfe.png"))
    os.symlink(root / "images" / "a" / "missing.png", root / "images" / "a" / "link.png")

    def config(out, **kw):
        return build.BuildConfig(**{**dict(out=str(root / out), model="vit_tiny_patch16_224", weights=str(weights),
                                           img_size=64, dataset=str(root / "images"), dataset_kind="folder",
                                           batch_size=4, threads=1, progress=False, ae_epochs=1), **kw})
    return {"root": root, "config": config}


def _full_disk(monkeypatch, when):
    """Make the next write of an atomic write whose temporary's prefix satisfies ``when`` fail
    with ENOSPC (after the temporary file was created)."""
    last = {}
    real_mkstemp, real_fdopen = tables.tempfile.mkstemp, os.fdopen

    def mkstemp(dir=None, prefix=""):
        last["prefix"] = prefix
        return real_mkstemp(dir=dir, prefix=prefix)

    def fdopen(fd, *args, **kwargs):
        full = when(last.pop("prefix", ""))
        return _Full(fd) if full else real_fdopen(fd, *args, **kwargs)
    monkeypatch.setattr(tables.tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(tables.os, "fdopen", fdopen)


class _Full:
    def __init__(self, fd):
        self.fd = fd

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        os.close(self.fd)

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")


def _temporaries(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.rglob(".*") if p.is_file()]


def test_build_odd_names_full_disk_and_resume(odd_folder, monkeypatch, capsys):
    from analysis.cli import build_main as main

    cfg = odd_folder["config"]("run")
    ctx = build.prepare(cfg)
    build.run_image_stage(ctx)
    _full_disk(monkeypatch, lambda prefix: prefix.endswith(".parquet."))
    with pytest.raises(CacheError, match=r"disk is full .*--resume"):
        build.merge_run(ctx)
    assert _temporaries(cfg.run_dir) == []
    assert main(["--out", str(cfg.run_dir), "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "disk is full" in err and "--resume" in err and "Traceback" not in err
    monkeypatch.undo()
    stale = cfg.run_dir / "parts" / ".part_000000.npz.abcd1234"
    stale.write_bytes(b"left by a kill -9")
    os.utime(stale, (1, 1))
    fresh = cfg.run_dir / ".images.parquet.inflight"
    fresh.write_bytes(b"another shard writing now")
    ctx = build.prepare(cfg)
    assert not stale.exists() and fresh.exists()  # a recent one may be another process's write
    manifest = build.merge_run(ctx)
    assert manifest["status"] == "complete" and _temporaries(cfg.run_dir) == []
    run = open_run(cfg.run_dir)
    assert len(run.images) == 7 and any("\\xff\\xfe.png" in p for p in run.images.path)
    assert any("link.png" in p and "broken symbolic link" in r for p, r in zip(run.skipped.path, run.skipped.reason))
    assert not (cfg.run_dir / "stages").exists()


def test_interrupted_autoencoder_resumes_from_its_last_epoch(tmp_path):
    from analysis.runs.autoencoder import train_autoencoder

    rng = np.random.default_rng(0)
    packed = np.packbits(rng.random((96, 16 * 16)) < 0.05, axis=-1)
    kw = dict(latent_dim=4, epochs=3, batch_size=32, min_steps=1, seed=0)
    plain = train_autoencoder(packed, 16, **kw)
    ckpt = tmp_path / "ae.pt"

    def stop_in_epoch_3(done, total):
        if done == 7:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train_autoencoder(packed, 16, checkpoint=ckpt, progress=stop_in_epoch_3, **kw)
    assert torch.load(ckpt, weights_only=True)["epoch"] == 2
    steps = []
    resumed = train_autoencoder(packed, 16, checkpoint=ckpt, progress=lambda d, t: steps.append(d), **kw)
    assert steps[0] == 7  # epochs 1-2 (6 steps) were not redone
    assert np.array_equal(resumed.latents, plain.latents) and resumed.loss_curve == plain.loss_curve
    other = train_autoencoder(packed[::-1].copy(), 16, checkpoint=ckpt, **kw)  # other inputs: not reused
    assert not np.array_equal(other.latents, plain.latents)


def test_interrupted_layouts_are_reused(odd_folder, monkeypatch):
    from analysis.runs import layouts

    full = build.build(odd_folder["config"]("whole"))
    cfg = odd_folder["config"]("killed")
    ctx = build.prepare(cfg)
    build.run_image_stage(ctx)
    real, calls, kill = layouts.tsne_2d, [], [True]

    def tsne(X, **kw):
        calls.append(len(X))
        if len(calls) == 2 and kill and kill.pop():
            raise KeyboardInterrupt  # killed during the second layout
        return real(X, **kw)
    monkeypatch.setattr(layouts, "tsne_2d", tsne)
    with pytest.raises(KeyboardInterrupt):
        build.merge_run(ctx)
    assert (cfg.run_dir / "stages" / "layout_patch.npz").is_file()
    assert (cfg.run_dir / "stages" / "autoencoder.pt").is_file()
    calls.clear()
    manifest = build.merge_run(build.prepare(cfg))
    assert len(calls) == 2 and manifest["timings"]["layout_patch"] == 0.0  # only cls and overview ran
    a, b = open_run(cfg.run_dir), open_run(full["build_config"]["out"])
    pd.testing.assert_frame_equal(a.head_metrics, b.head_metrics)
    pd.testing.assert_frame_equal(a.images.drop(columns="path"), b.images.drop(columns="path"))
