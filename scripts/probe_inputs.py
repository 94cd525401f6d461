"""Probe HeadScope with bad inputs and faults, as a careless or hostile user would (issue 11).

    python scripts/probe_inputs.py [--keep DIR]

Builds a small run (a random-initialised timm ViT-Tiny at 64 px, a few generated images, one file
with a non-UTF-8 name and one broken symbolic link) in a temporary folder, then tries every case of
the catalogue against the build, the run loader, the app's routes and its callback endpoint, and
prints one line per case (``ok`` when it was handled: refused with a clear message, or survived with
the right result) and a final ``N tried, N handled, N failed``. Exit status 1 when any case failed.
Needs no network, GPU or Redis server (Redis "down" is a closed local port).
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

CASES: list = []


def case(name: str):
    def register(fn):
        CASES.append((name, fn))
        return fn
    return register


class Env:
    """The probe's workspace: weights, images, the reference run and an app test client."""

    def __init__(self, base: Path):
        self.weights = base / "tiny.safetensors"
        self.images = base / "images"
        self.reference = base / "ref"
        self.root = Path(tempfile.mkdtemp(prefix="cases-", dir=base))  # this probe's own files
        self.cache = self.root / "cache"
        self.run = self.cache / "ref"
        self._client = None

    def cli(self, out: Path, *extra: str) -> list[str]:
        return [sys.executable, str(ROOT / "scripts" / "build_cache.py"), "--model", "vit_tiny_patch16_224",
                "--weights", str(self.weights), "--img-size", "64", "--images", str(self.images), "--out", str(out),
                "--batch-size", "2", "--threads", "1", "--device", "cpu", "--quiet", *extra]

    def client(self):
        if self._client is None:
            from app.server import create_app

            self.app = create_app(cache_dir=self.cache, run="ref")
            self._client = self.app.server.test_client()
            self._client.get("/")  # registers the pages' callbacks
        return self._client


def setup(base: Path) -> Env:
    """The weights, images and reference run in ``base`` (built once, reused by later probes with
    --keep), and a fresh folder for this probe's cases with a copy of the run."""
    env = Env(base)
    if not (env.reference / "manifest.json").is_file():
        build_reference(env)
    shutil.copytree(env.reference, env.run)
    return env


def build_reference(env: Env) -> None:
    import timm
    import torch
    from safetensors.torch import save_file

    shutil.rmtree(env.images, ignore_errors=True)
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=3)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(env.weights))
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (env.images / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(env.images / c / f"{i}.png")
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(
        os.fsdecode(os.fsencode(str(env.images / "b")) + b"/caf\xe9.png"))  # not UTF-8
    os.symlink(env.images / "a" / "gone.png", env.images / "a" / "link.png")  # dangling
    t = time.perf_counter()
    done = subprocess.run(env.cli(env.reference), capture_output=True, text=True, errors="replace")
    if done.returncode != 0:
        raise SystemExit(f"The reference build failed:\n{done.stderr[-3000:]}")
    print(f"reference run built in {time.perf_counter() - t:.0f} s: {env.reference}", flush=True)


def expect(cond: bool, detail: str) -> str:
    if not cond:
        raise AssertionError(detail)
    return detail


def refused(fn, error, *words) -> str:
    """fn() must raise ``error`` whose message holds every word."""
    try:
        fn()
    except error as err:
        text = str(err)
        missing = [w for w in words if w.lower() not in text.lower()]
        expect(not missing, f"message lacks {missing}: {text[:200]}")
        return text.splitlines()[0][:110]
    raise AssertionError(f"no {error.__name__} raised")


def copy_run(env: Env, name: str) -> Path:
    dst = env.cache / name
    shutil.copytree(env.run, dst)
    return dst


# ---- images ------------------------------------------------------------------------------------
@case("16-bit PNG (I;16) scaled, not white")
def _(env):
    from analysis.datasets import open_image

    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(env.root / "g16.png")
    mean = np.asarray(open_image(str(env.root / "g16.png"))).mean()
    return expect(abs(mean - 127.5) < 3, f"mean grey {mean:.1f} (white would be 255)")


@case("32-bit int TIFF (I) scaled")
def _(env):
    from analysis.datasets import open_image

    Image.fromarray(np.linspace(0, 2 ** 30, 4096).reshape(64, 64).astype(np.int32)).save(env.root / "i32.tif")
    mean = np.asarray(open_image(str(env.root / "i32.tif"))).mean()
    return expect(abs(mean - 127.5) < 3, f"mean grey {mean:.1f}")


@case("float TIFF (F, 0..1) scaled")
def _(env):
    from analysis.datasets import open_image

    Image.fromarray(np.linspace(0, 1, 4096).reshape(64, 64).astype(np.float32)).save(env.root / "f.tif")
    mean = np.asarray(open_image(str(env.root / "f.tif"))).mean()
    return expect(abs(mean - 127.5) < 3, f"mean grey {mean:.1f} (clipping gives ~1)")


@case("121-megapixel PNG skipped with a reason")
def _(env):
    from analysis.datasets import load_image_set

    folder = env.root / "huge" / "a"
    folder.mkdir(parents=True)
    Image.new("L", (11000, 11000)).save(folder / "huge.png")
    Image.new("RGB", (32, 32)).save(folder / "small.png")
    s = load_image_set(env.root / "huge")
    reason = dict(s.skipped).get(str(folder / "huge.png"), "")
    expect(len(s) == 1 and "megapixels" in reason, f"skipped: {s.skipped}")
    return reason[:110]


@case("truncated JPEG skipped with a reason")
def _(env):
    from analysis.datasets import load_image_set

    (env.root / "trunc" / "a").mkdir(parents=True)
    Image.new("RGB", (64, 64), (9, 9, 9)).save(env.root / "trunc" / "a" / "ok.jpg")
    (env.root / "trunc" / "a" / "cut.jpg").write_bytes((env.root / "trunc" / "a" / "ok.jpg").read_bytes()[:200])
    s = load_image_set(env.root / "trunc")
    return expect(len(s) == 1 and len(s.skipped) == 1, dict(s.skipped).popitem()[1][:110])


# ---- labels ------------------------------------------------------------------------------------
def _folders(env, name, names):
    for n in names:
        (env.root / name / n).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32)).save(env.root / name / n / "x.png")
    return env.root / name


@case("cat/, dog/ with a 1000-class model refused (closest names listed)")
def _(env):
    from analysis.datasets import imagenet_names, load_image_set
    from analysis.errors import LabelError

    root = _folders(env, "pets", ["cat", "dog"])
    return refused(lambda: load_image_set(root, class_names=imagenet_names()[1]), LabelError,
                   "cat/", "dog/", "closest", "--labels sorted")


@case("a/..d/ with the Fashion-MNIST classes refused")
def _(env):
    from analysis.datasets import FASHION_MNIST_CLASSES, load_image_set
    from analysis.errors import LabelError

    root = _folders(env, "abcd", list("abcd"))
    return refused(lambda: load_image_set(root, class_names=FASHION_MNIST_CLASSES), LabelError, "a/", "d/", "--labels")


@case("--labels sorted and a mapping file accepted")
def _(env):
    from analysis.datasets import FASHION_MNIST_CLASSES, load_image_set

    root = env.root / "abcd"
    s = load_image_set(root, class_names=FASHION_MNIST_CLASSES, labels="sorted")
    (env.root / "map.json").write_text(json.dumps({"a": "Bag", "b": 0, "c": "ankle boot", "d": "coat"}))
    m = load_image_set(root, class_names=FASHION_MNIST_CLASSES, labels=str(env.root / "map.json"))
    expect(s.labels == [0, 1, 2, 3] and m.labels == [8, 0, 9, 4], f"{s.labels} / {m.labels}")
    return "sorted -> 0..3; map.json -> Bag, T-shirt/top, Ankle boot, Coat"


@case("folder names matched case/punctuation-insensitively and by synset")
def _(env):
    from analysis.datasets import FASHION_MNIST_CLASSES, imagenet_names, load_image_set

    s = load_image_set(_folders(env, "shop", ["ankle_BOOT", "t-shirt top"]), class_names=FASHION_MNIST_CLASSES)
    i = load_image_set(_folders(env, "inet", ["n01440764", "Tabby Cat"]), class_names=imagenet_names()[1])
    expect(sorted(s.labels) == [0, 9] and sorted(i.labels) == [0, 281], f"{s.labels} {i.labels}")
    return "ankle_BOOT -> 9, 't-shirt top' -> 0, n01440764 -> 0, 'Tabby Cat' -> 281"


# ---- names and files ---------------------------------------------------------------------------------
@case("non-UTF-8 file name analysed, reported escaped")
def _(env):
    from analysis.runs.reader import open_run

    paths = list(open_run(env.run).images.path)
    return expect(any(p.endswith("caf\\xe9.png") for p in paths), f"{len(paths)} images, e.g. {paths[-1][-40:]}")


@case("dangling symlink listed in skipped.parquet")
def _(env):
    from analysis.runs.reader import open_run

    sk = open_run(env.run).skipped
    rows = [r for p, r in zip(sk.path, sk.reason) if p.endswith("link.png")]
    return expect(bool(rows) and "broken symbolic link" in rows[0], rows[0][:110] if rows else str(list(sk.path)))


@case("manifest whose paths are all missing names them")
def _(env):
    from analysis.datasets import load_image_set
    from analysis.errors import InputError

    (env.root / "m.csv").write_text("path,label\nmissing_1.png,0\nsub/missing_2.png,1\n")
    return refused(lambda: load_image_set(env.root / "m.csv"), InputError, "missing_1.png", "missing_2.png")


@case("--images pointing at a file says it is a file")
def _(env):
    from analysis.cli import build_main as main

    (env.root / "notes.txt").write_text("x")
    return _cli_refused(env, main, ["--model", "vit_tiny_patch16_224", "--weights", str(env.weights), "--images",
                                    str(env.root / "notes.txt"), "--out", str(env.root / "o1"), "--quiet"], "is a file")


def _cli_refused(env, main, argv, *words) -> str:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    text = err.getvalue()
    expect(code == 2 and "Traceback" not in text and all(w in text for w in words), f"exit {code}: {text[:200]}")
    return text.strip().splitlines()[0][:110]


# ---- weights -------------------------------------------------------------------------------------------
@case("malicious pickle refused (HeadScope never unpickles code)")
def _(env):
    import torch

    from analysis.errors import ModelLoadError
    from analysis.models.weights import read_state_dict

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {env.root / 'pwned'}",))
    torch.save({"w": torch.zeros(1), "evil": Evil()}, env.root / "evil.pth")
    text = refused(lambda: read_state_dict(env.root / "evil.pth"), ModelLoadError, "never unpickles", "safetensors")
    expect(not (env.root / "pwned").exists(), "the pickle ran")
    return text


@case("malicious pickle as --weights: exit 2, no traceback")
def _(env):
    from analysis.cli import build_main as main

    return _cli_refused(env, main, ["--model", "vit_tiny_patch16_224", "--weights", str(env.root / "evil.pth"),
                                    "--images", str(env.images), "--out", str(env.root / "o2"), "--quiet"],
                        "never unpickles")


@case("empty .pth gives a reason")
def _(env):
    from analysis.errors import ModelLoadError
    from analysis.models.weights import read_state_dict

    (env.root / "empty.pth").write_bytes(b"")
    return refused(lambda: read_state_dict(env.root / "empty.pth"), ModelLoadError, "empty")


@case("--pretrained offline fails fast with its message")
def _(env):
    from analysis.errors import ModelLoadError
    from analysis.models.adapter import load_vit

    t = time.perf_counter()
    text = refused(lambda: load_vit("vit_tiny_patch16_224", pretrained=True), ModelLoadError, "offline")
    seconds = time.perf_counter() - t
    return expect(seconds < 15, f"{seconds:.1f} s: {text[:80]}")


# ---- the run's files -------------------------------------------------------------------------------------
@case("images.parquet reduced to two columns: open_run names the missing columns")
def _(env):
    import pandas as pd

    from analysis.errors import CacheError
    from analysis.runs.reader import open_run

    run = copy_run(env, "two-cols")
    pd.read_parquet(run / "images.parquet")[["image_id", "path"]].to_parquet(run / "images.parquet")
    return refused(lambda: open_run(run), CacheError, "lacks the columns", "label", "Rebuild")


@case("corrupt Parquet: CacheError saying rebuild; Runs page marks it unreadable")
def _(env):
    from analysis.errors import CacheError
    from analysis.runs.reader import list_runs, open_run

    run = copy_run(env, "corrupt")
    (run / "head_metrics.parquet").write_bytes(b"PAR1 not really parquet PAR1")
    text = refused(lambda: open_run(run), CacheError, "corrupt", "Rebuild")
    info = {r["name"]: r for r in list_runs(env.cache)}
    expect(info["corrupt"]["error"] and info["ref"]["error"] is None, "list_runs does not mark it")
    return text


@case("run from a newer schema: upgrade HeadScope; older: rebuild")
def _(env):
    from analysis.errors import CacheError
    from analysis.runs.reader import open_run
    from analysis.runs.schema import SCHEMA_VERSION
    from analysis.runs.tables import write_json

    run = copy_run(env, "newer")
    mf = json.loads((run / "manifest.json").read_text())
    write_json(run / "manifest.json", {**mf, "schema_version": SCHEMA_VERSION + 1})
    text = refused(lambda: open_run(run), CacheError, "Upgrade HeadScope")
    write_json(run / "manifest.json", {**mf, "schema_version": SCHEMA_VERSION - 1})
    refused(lambda: open_run(run), CacheError, "Rebuild")
    shutil.rmtree(run)
    return text


# ---- faults during a build --------------------------------------------------------------------------------
@case("disk full while writing the tables: message + resume hint, no temporaries")
def _(env):
    from analysis.errors import CacheError
    from analysis.runs import build, tables

    cfg = build.config_from_manifest(env.run, progress=False)
    cfg.out = str(env.root / "full-disk")
    ctx = build.prepare(cfg)
    build.run_image_stage(ctx)
    real = tables.os.fdopen

    class Full:
        def __init__(self, fd):
            self.fd = fd

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            os.close(self.fd)

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")
    tables.os.fdopen = lambda fd, *a, **k: Full(fd)
    try:
        text = refused(lambda: build.merge_run(ctx), CacheError, "disk is full", "--resume")
    finally:
        tables.os.fdopen = real
    left = [p.name for p in Path(cfg.out).rglob(".*") if p.is_file()]
    expect(not left, f"temporaries left: {left}")
    manifest = build.merge_run(build.prepare(cfg))
    expect(manifest["status"] == "complete", "resume did not complete")
    return text


@case("temporaries of a killed build removed on the next start")
def _(env):
    from analysis.runs import build

    run = Path(env.root / "full-disk")
    stale = [run / "parts" / ".part_000000.npz.x1y2z3", run / ".head_metrics.parquet.a1b2c3"]
    for p in stale:
        p.write_bytes(b"left over")
        os.utime(p, (1, 1))
    build.prepare(build.config_from_manifest(run, progress=False))
    return expect(not any(p.exists() for p in stale), "2 stale temporaries removed")


@case("kill -9 mid-build, then --resume: tables equal an uninterrupted build")
def _(env):
    import pandas as pd

    from analysis.runs.reader import open_run

    out = env.root / "killed"
    proc = subprocess.Popen(env.cli(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list((out / "parts").glob("part_*.npz")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    parts = len(list((out / "parts").glob("part_*.npz")))
    done = subprocess.run(env.cli(out, "--resume"), capture_output=True, text=True, errors="replace")
    expect(done.returncode == 0, done.stderr[-300:])
    a, b = open_run(out), open_run(env.run)
    pd.testing.assert_frame_equal(a.head_metrics, b.head_metrics)
    pd.testing.assert_frame_equal(a.images, b.images)
    return f"killed with {parts} part(s) written; resumed tables identical"


@case("kill during the autoencoder: resumes from its last epoch, same result")
def _(env):
    from analysis.runs.autoencoder import train_autoencoder

    rng = np.random.default_rng(0)
    packed = np.packbits(rng.random((128, 256)) < 0.05, axis=-1)
    kw = dict(latent_dim=4, epochs=4, batch_size=32, min_steps=1)
    plain = train_autoencoder(packed, 16, **kw)

    def kill(done, total):
        if done == 10:
            raise KeyboardInterrupt
    try:
        train_autoencoder(packed, 16, checkpoint=env.root / "ae.pt", progress=kill, **kw)
    except KeyboardInterrupt:
        pass
    steps = []
    again = train_autoencoder(packed, 16, checkpoint=env.root / "ae.pt", progress=lambda d, t: steps.append(d), **kw)
    expect(steps[0] == 9 and np.array_equal(again.latents, plain.latents), f"restarted at step {steps[0]}")
    return "killed in epoch 3; resumed at step 9 of 16, latents identical"


@case("kill during the layouts: finished layouts reused")
def _(env):
    from analysis.runs import build, layouts

    cfg = build.config_from_manifest(env.run, progress=False)
    cfg.out = str(env.root / "layout-kill")
    ctx = build.prepare(cfg)
    build.run_image_stage(ctx)
    real, calls = layouts.tsne_2d, []

    def tsne(X, **kw):
        calls.append(len(X))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(X, **kw)
    layouts.tsne_2d = tsne
    try:
        build.merge_run(ctx)
    except KeyboardInterrupt:
        pass
    finally:
        layouts.tsne_2d = real
    manifest = build.merge_run(build.prepare(cfg))
    return expect(manifest["timings"]["layout_patch"] == 0.0, "patch layout reused after a kill in the cls layout")


# ---- the app: routes --------------------------------------------------------------------------------------
def _status(env, url, want, word=""):
    r = env.client().get(url)
    body = r.get_data(as_text=True)
    expect(r.status_code in want and word.lower() in body.lower(), f"{url[:60]} -> {r.status_code} {body[:120]}")
    return f"{r.status_code}: {body.strip()[:90]}"


@case("/api with a 300-character run name: 400")
def _(env):
    return _status(env, f"/api/attention?run={'r' * 300}&image=0&layer=0&head=0", {400}, "too long")


@case("/thumbs with a 300-character run name: 400")
def _(env):
    return _status(env, f"/thumbs/{'r' * 300}/0.png", {400}, "too long")


def _no_file_served(env, url):
    """Refused (400/404), or answered with the dashboard's page (the router's "page not found"), never
    with a file from outside the run's thumbnails."""
    r = env.client().get(url)
    body = r.get_data()
    page = r.status_code == 200 and r.mimetype == "text/html" and b"_dash-config" in body
    expect(r.status_code in (400, 404) or page, f"{r.status_code} {r.mimetype} {body[:80]!r}")
    return f"{r.status_code} {r.mimetype}" + (" (the dashboard page, no file)" if page else "")


for _url in ("/api/attention?run=../ref&image=0&layer=0&head=0", "/api/attention?run=%2Fetc&image=0&layer=0&head=0",
             "/api/partial_pruning?run=..&image=0&layer=0&head=0", "/thumbs/..%2Fref/0.png",
             "/thumbs/ref/..%2F..%2Fmanifest.png", "/thumbs/.../0.png", "/thumbs/../ref/thumbs/0.png"):
    case(f"path traversal refused: {_url}")(lambda env, u=_url: _no_file_served(env, u))


@case("?image=1_0 does not select image 10 (URL and /api)")
def _(env):
    from app.state import parse_selection

    sel = parse_selection("?run=ref&image=1_0&layer=0&head=0", None)
    expect(sel["image"] is None, f"selection {sel}")
    return _status(env, "/api/attention?run=ref&image=1_0&layer=0&head=0", {400}, "integers")


@case("/api answers a good query")
def _(env):
    return _status(env, "/api/attention?run=ref&image=0&layer=0&head=0", {200}, "attention")[:40]


# ---- issue 23: data is never code, files stay in their run, no silent value -------------------------------
@case("thumbnail linked to /etc/passwd: 404 naming nothing")
def _(env):
    run = copy_run(env, "linked")
    (run / "thumbs" / "0.png").unlink()
    (run / "thumbs" / "0.png").symlink_to("/etc/passwd")
    r = env.client().get("/thumbs/linked/0.png")
    body = r.get_data(as_text=True)
    expect(r.status_code == 404 and "root:" not in body and "passwd" not in body, f"{r.status_code} {body[:80]}")
    shutil.rmtree(run)
    return f"{r.status_code}"


@case("class name <img onerror> in the run: report escapes it, runs no payload")
def _(env):
    import json as _json

    env.client()  # the app first: its pages register with it
    from app import config, data
    from app.explorer import exports

    run = copy_run(env, "hostile")
    manifest = _json.loads((run / "manifest.json").read_text())
    manifest["model"]["class_names"] = ["<img src=x onerror=alert(1)>", "</script><script>alert(9)</script>", "c"]
    (run / "manifest.json").write_text(_json.dumps(manifest))
    env.client()
    config.configure(env.cache, "hostile")
    index = data.get_index("hostile")
    page = exports.report_html(index, {"run": "hostile", "image": int(index.image_ids[0]), "layer": 0, "head": 0},
                               "http://x/")
    expect("<img src=x" not in page and "<script>alert" not in page and "&lt;img src=x" in page, "unescaped name")
    expect("Content-Security-Policy" in page, "no CSP in the report")
    shutil.rmtree(run)
    return "escaped, CSP meta tag"


@case("app pages carry a Content-Security-Policy without unsafe-inline/eval scripts")
def _(env):
    csp = env.client().get("/").headers.get("Content-Security-Policy", "")
    script_src = csp.split("script-src", 1)[-1].split(";", 1)[0]
    expect(csp and "'unsafe-inline'" not in script_src and "'unsafe-eval'" not in script_src, csp[:120])
    return script_src.strip()[:60] + " ..."


@case("head_summary with +inf: not ranked, n/a noted")
def _(env):
    import numpy as _np
    import pandas as _pd

    env.client()  # the app first: its pages register with it
    from app import config
    from app.pages import heads

    run = copy_run(env, "spoiled")
    summary = _pd.read_parquet(run / "head_summary.parquet")
    summary.loc[0, "prob_drop_mean"] = _np.inf
    summary.to_parquet(run / "head_summary.parquet")
    env.client()
    config.configure(env.cache, "spoiled")
    _, table, msg = heads.heads_view({"run": "spoiled"}, "prob_drop")
    text = str(msg) + str(table)
    expect("n/a" in text or "1 head" in text, text[:200])
    shutil.rmtree(run)
    return "noted"


@case("a string metric column: the run refuses to open, naming table, column and fix")
def _(env):
    import pandas as _pd

    from analysis.errors import CacheError
    from analysis.runs.reader import open_run

    run = copy_run(env, "typed")
    hm = _pd.read_parquet(run / "head_metrics.parquet")
    hm["jsd"] = hm["jsd"].astype(str)
    hm.to_parquet(run / "head_metrics.parquet")
    text = refused(lambda: open_run(run), CacheError, "head_metrics", "jsd")
    shutil.rmtree(run)
    return text


for _q in ("?image=999999999999999999", "?set=99999999999999999999999", "?heads=0:99999999999", "?thr=qNaN",
           "?image=" + "7" * 5000, "?set=1_0,%207%20,%D9%A3", "?mode=99&d1=nope"):
    def _url_case(env, q=_q):
        from app.state import check_state, parse_query

        state, notes = parse_query(q, "ref")
        check_state(state)  # the guard's rule accepts what the parser gives
        expect(notes, "no note")
        return f"{len(notes)} note(s): {notes[0][:70]}"
    case(f"URL {_q[:40]}: parsed with a note, state passes the guard")(_url_case)


# ---- the app: callback payloads ---------------------------------------------------------------------------
def _callback(env, start: str, values, states=()):
    """A callback request body for the callback whose output key starts with ``start`` (or that
    has the input ``start`` = "id.property")."""
    env.client()
    key = next(k for k, spec in env.app.callback_map.items() if k.startswith(start)
               or start in [f"{d['id']}.{d['property']}" for d in spec["inputs"]])
    spec = env.app.callback_map[key]
    outs = [dict(zip(("id", "property"), o.rsplit(".", 1))) for o in key.strip(".").split("...")]
    return {"output": key, "outputs": outs if key.startswith("..") else outs[0],
            "inputs": [{**d, "value": v} for d, v in zip(spec["inputs"], values)],
            "state": [{**d, "value": v} for d, v in zip(spec["state"], states)],
            "changedPropIds": [f"{spec['inputs'][0]['id']}.{spec['inputs'][0]['property']}"]}


SEL = {"run": "ref", "image": 0, "layer": 0, "head": 1}
PARTS = {"k-image": {"run": "ref", "image": 0}, "k-head": {"run": "ref", "layer": 0, "head": 1},
         "k-metric": {"run": "ref", "metric": "jsd"}, "k-set": {"set": None}, "k-heads": {"heads": None},
         "b1-overlay": [], "k-thr": {"thr": None, "bins": None}, "k-scale": {"scale": None}, "sel": SEL}


def _view_model(env, model: str, drop=None, **values):
    """A request of the Explorer's view model ``model`` ("cached" or "online", app/views.py) with
    every input and state by its id (``PARTS``, overridden by ``values``; ``drop``: one left out)."""
    env.client()
    key = next(k for k in env.app.callback_map if f"vm-{model}.data" in k)
    spec, values = env.app.callback_map[key], {**PARTS, **values}
    item = lambda d: {**d, "value": values.get(d["id"])}
    return {"output": key, "outputs": [dict(zip(("id", "property"), o.rsplit(".", 1))) for o in key.strip(".").split("...")],
            "inputs": [item(d) for d in spec["inputs"] if d["id"] != drop],
            "state": [item(d) for d in spec["state"] if d["id"] != drop],
            "changedPropIds": [f"{spec['inputs'][0]['id']}.{spec['inputs'][0]['property']}"]}


FORGED = {
    "empty list body": lambda env: [],
    "empty object body": lambda env: {},
    "unknown output": lambda env: {"output": "nope.children", "outputs": {}, "inputs": [], "state": []},
    "selection with type-confused values": lambda env: _view_model(env, "cached", sel={"run": "ref", "image": "0", "layer": [0], "head": {}}),
    "selection with a traversal run": lambda env: _view_model(env, "cached", sel={"run": "../ref"}),
    "missing input": lambda env: _view_model(env, "cached", drop="k-metric"),
    "metric as a list": lambda env: _view_model(env, "cached", **{"k-metric": {"run": "ref", "metric": ["jsd"]}}),
    "prune mode as a string": lambda env: _callback(env, "b2-graph.clickData", [{"points": [{"customdata": "x"}]}]),
    "prune mode out of range": lambda env: _callback(env, "b2-graph.clickData", [{"points": [{"customdata": 99}]}]),
    "threshold as a string": lambda env: _view_model(env, "online", **{"k-thr": "lots"}),
    "threshold out of range": lambda env: _view_model(env, "online", **{"k-thr": {"thr": "q1e9"}}),
    "hover data without points": lambda env: _callback(env, "..a-tooltip", [{"points": "all"}], [SEL]),
    "hover data without bbox": lambda env: _callback(env, "..a-tooltip", [{"points": [{"customdata": 0}]}], [SEL]),
    "click data with an object as customdata": lambda env: _callback(env, "a-graph.clickData", [{"points": [{"customdata": {}}]}, None, None, None], [None]),
    "D3 hover token as text": lambda env: _view_model(env, "online", **{"d3-graph": {"points": [{"customdata": [0, "x"]}]}}),
    "changedPropIds naming a non-input": lambda env: {**_view_model(env, "cached"), "changedPropIds": ["x.y"]},
}
for _name, _make in FORGED.items():
    def _probe(env, make=_make):
        r = env.client().post("/_dash-update-component", json=make(env))
        body = r.get_json(silent=True) or {}
        expect(r.status_code == 400 and "Malformed" in body.get("error", ""), f"{r.status_code} {r.get_data(as_text=True)[:120]}")
        return body["error"][:110]
    case(f"forged callback: {_name} -> 400")(_probe)


@case("genuine callback request still answered")
def _(env):
    for model in ("cached", "online"):
        r = env.client().post("/_dash-update-component", json=_view_model(env, model))
        expect(r.status_code == 200, f"{model}: {r.status_code} {r.get_data(as_text=True)[:120]}")
    return "both view models answered"


@case("20 MB callback body refused before parsing (413)")
def _(env):
    r = env.client().post("/_dash-update-component", data=b"[" + b"0," * (10 << 20) + b"0]",
                          content_type="application/json")
    return expect(r.status_code == 413, f"{r.status_code}")


@case("Redis down reported at once")
def _(env):
    from analysis.serving import transport

    before = os.environ.get("HEADSCOPE_BROKER_URL")
    os.environ["HEADSCOPE_BROKER_URL"] = "redis://127.0.0.1:1/0"
    try:
        t = time.perf_counter()
        st = transport.status()
        seconds = time.perf_counter() - t
    finally:
        if before is None:
            os.environ.pop("HEADSCOPE_BROKER_URL")
        else:
            os.environ["HEADSCOPE_BROKER_URL"] = before
    return expect(st["ok"] is False and seconds < 10, f"{seconds:.1f} s: {st['message'][:90]}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (the reference run built there is reused "
                                                  "by later probes) instead of a temporary folder")
    ap.add_argument("-k", metavar="TEXT", help="only the cases whose name contains TEXT")
    args = ap.parse_args(argv)
    import logging

    import torch

    torch.set_num_threads(1)
    logging.getLogger("headscope.callbacks").setLevel(logging.WARNING)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="headscope-probe-"))
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HEADSCOPE_CACHE", str(root / "cache"))
    try:
        env = setup(root)
        tried = handled = 0
        for name, fn in CASES:
            if args.k and args.k not in name:
                continue
            tried += 1
            try:
                detail = fn(env)
                handled += 1
                print(f"ok    {name}: {detail}", flush=True)
            except Exception as err:  # a case that was not handled
                print(f"FAIL  {name}: {type(err).__name__}: {str(err)[:300]}", flush=True)
        print(f"{tried} tried, {handled} handled, {tried - handled} failed")
        return 0 if handled == tried else 1
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
