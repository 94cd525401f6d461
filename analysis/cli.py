"""The ``headscope`` command (installed by ``pip install -e .``): one entry point for every job.

    headscope build  [options]   build or resume a run        (= python scripts/build_cache.py)
    headscope serve  [options]   serve the dashboard           (= python -m app)
    headscope worker [options]   start the Celery model worker (= celery -A worker.celery_app worker ...)
    headscope runs   [options]   list the runs under the cache directory with their state

Each subcommand's options are defined once here; scripts/build_cache.py and app/__main__.py
only call ``build_main`` / ``serve_main``. Errors with a known cause print one line and exit 2.
"""
from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import os
import sys
import time
from pathlib import Path

from analysis.errors import HeadScopeError, InputError

BUILD_DESCRIPTION = ("Analyse every attention head of a ViT on a set of images and write the run's cache "
                     "(Parquet tables, 2-D layouts, thumbnails) for the HeadScope dashboard. Without model or "
                     "data options it builds the embedded default run (model 'default' on 'fashion', "
                     "out cache/default).")
BUILD_EPILOG = ("Interrupted builds keep every finished batch: re-run the same command (or --out RUN --resume). "
                "Sharding: run --shard K/N for K=1..N (same options and --batch-size everywhere), then --merge.")
SERVE_DESCRIPTION = ("Serve the HeadScope dashboard: the four linked views of Li et al. (2023) over the runs "
                     "built with `headscope build` (scripts/build_cache.py).")
SERVE_EPILOG = ("Online views (partial pruning, attention details) run in this process unless "
                "HEADSCOPE_BROKER_URL points at a Celery worker. HEADSCOPE_BASIC_AUTH / HEADSCOPE_BASIC_AUTH_FILE "
                "turn the login on (as with gunicorn). For production use gunicorn app.wsgi:server.")
WORKER_DESCRIPTION = ("Start the Celery model worker: it keeps each run's model in memory and answers the "
                      "dashboard's online queries and --worker-pool build batches through Redis.")
WORKER_EPILOG = ("Redis is a trust boundary: anyone who can write to it can make the worker compute. Give it a "
                 "password (redis://:PASSWORD@host:6379/0) and do not expose it. Extra arguments after `--` go "
                 "to `celery worker` unchanged.")
RUNS_DESCRIPTION = "List the runs under the cache directory: name, status, model, images, size and what is wrong."


# ---- the options, defined once ----------------------------------------------------------------
def add_build_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `headscope build` and scripts/build_cache.py."""
    m = p.add_argument_group("model")
    m.add_argument("--model", metavar="NAME",
                   help="timm ViT name (e.g. vit_small_patch16_224, deit_tiny_patch16_224), a HuggingFace checkpoint "
                        "folder (config.json + model.safetensors of ViT, DeiT or DINOv2), 'default' (DINOv2 "
                        "ViT-S/14 + Fashion-MNIST probe, 112 px) or 'default-backbone' (no head, 224 px). "
                        "Default: 'default', or 'default-backbone' with --dataset photos")
    w = m.add_mutually_exclusive_group()
    w.add_argument("--weights", metavar="PATH", help="state dict (.safetensors, .pth, .pt) for a timm model name")
    w.add_argument("--pretrained", action="store_true", default=None,
                   help="use timm's pretrained weights (downloads them; needs internet)")
    m.add_argument("--img-size", type=int, metavar="PX", help="model input size in px (default: the model's)")
    d = p.add_argument_group("images (one of)")
    g = d.add_mutually_exclusive_group()
    g.add_argument("--dataset", choices=["fashion", "photos"],
                   help="embedded set: 'fashion' (Fashion-MNIST test images, 200 by default) or 'photos' "
                        "(real ImageNet photos shipped with foolbox and scikit-image). Default: fashion")
    g.add_argument("--images", metavar="DIR", help="folder of class sub-folders of images (loose files = unlabelled)")
    g.add_argument("--manifest", metavar="CSV", help="CSV with columns path,label[,label_name] (paths relative to the CSV)")
    d.add_argument("--labels", metavar="sorted|MAP",
                   help="how the class folders of --images map to the model's classes. Default: by name (case- "
                        "and punctuation-insensitive; ImageNet synset ids; id2label-style names), refusing folders "
                        "that match no class. 'sorted': the i-th folder in sorted order is class i. MAP: a JSON "
                        "file {\"folder\": class index or name} or a CSV with columns folder,label")
    d.add_argument("--limit", type=int, metavar="N", help="analyse a seeded sample of N images (default: all; fashion: 200)")
    r = p.add_argument_group("run")
    r.add_argument("--out", metavar="DIR", help="run directory (default: cache/default, cache/photos or cache/MODEL-SET)")
    r.add_argument("--batch-size", type=int, metavar="B", help="images per batch and per part file (default 16)")
    r.add_argument("--device", choices=["cpu", "cuda"], help="where the model runs (default: cuda when available)")
    r.add_argument("--seed", type=int, metavar="S", help="seed for sampling, the autoencoder and the layouts (default 0)")
    r.add_argument("--q", type=float, metavar="Q", help="top fraction of patch attention kept when binarising (default 0.01)")
    r.add_argument("--ae-epochs", type=int, metavar="E", help="pattern autoencoder epochs (default 2; small runs "
                                                                    "train more, at least 300 steps)")
    r.add_argument("--ae-latent", type=int, metavar="D", help="pattern autoencoder latent size (default 32)")
    r.add_argument("--thumb-px", type=int, metavar="PX", help="thumbnail side (default: model input size within 112-224)")
    r.add_argument("--threads", type=int, metavar="T", help="CPU threads for torch and the t-SNE layouts "
                                                            "(default: the cores other processes leave idle)")
    x = p.add_argument_group("beyond the paper (optional stages, SPEC v2)")
    x.add_argument("--taylor", action="store_true", help="add the approximate Taylor (gradient) importance: "
                   "taylor_prob_drop and grad_score, one backward per batch (classifiers)")
    x.add_argument("--taylor-only", action="store_true", help="the Taylor metrics instead of the exact "
                   "leave-one-out (for models / data sets where it is too slow); the run says so")
    x.add_argument("--mean-ablation", action="store_true", help="add the mean-ablated whole-head metrics "
                   "(mean_prob, mean_prob_drop, mean_jsd, mean_emb_dist); head means from a first pass")
    x.add_argument("--curves", action="store_true", help="cumulative pruning curves (exact, taylor, 3 random "
                   "orders) with their areas -> pruning_curves.parquet")
    x.add_argument("--curve-images", type=int, metavar="N", help="labelled images the curves use (default 32)")
    x.add_argument("--circuits", action="store_true", help="head-to-head circuits (SPEC v3): every image's "
                   "APPROXIMATE edge attribution patching scores of every edge a -> b via q, k, v and qkv (those above "
                   "5%% of the image's largest) -> circuit_edges.parquet, the run-mean circuit -> circuit_mean.parquet, "
                   "and the Spearman agreement with exact path patching on a sample (manifest); classifiers")
    x.add_argument("--circuit-sample", type=int, metavar="N", help="images whose EAP edges are checked against "
                   "exact path patching (default 3; ~6 s each on the default model, 2 cores)")
    x.add_argument("--all-stages", action="store_true", help="every stage a page of the dashboard shows: --taylor "
                   "--mean-ablation --curves --circuits (less those the model or data cannot support, named in the "
                   "summary); --patch-maps stays separate (the Saliency view computes an image's maps online)")
    x.add_argument("--patch-maps", action="store_true",
                   help="also precompute the four patch maps of every image (occlusion, token_drop, rollout, "
                        "grad_rollout; ~2 x (patches + 1) forwards per image) and each head's alignment with the "
                        "occlusion map (metric saliency_alignment)")
    r.add_argument("--resume", action="store_true",
                   help="continue the run in --out with the settings it was started with (finished images are skipped)")
    s = r.add_mutually_exclusive_group()
    s.add_argument("--shard", metavar="K/N", help="only the per-image stage for slice K of N (1-based); merge later")
    s.add_argument("--merge", action="store_true", help="only the run-level stages (autoencoder, layouts, tables) "
                                                        "from the finished images of all shards")
    s.add_argument("--add-pattern-labels", action="store_true",
                   help="add the pattern labels (diagonal ... pattern, consistency) to the complete run in --out, "
                        "built before they existed, from its stored patch bits; nothing else is recomputed")
    s.add_argument("--add-circuits", action="store_true",
                   help="add the circuits stage (see --circuits) to the complete classifier run in --out, built "
                        "without it; nothing else is recomputed")
    r.add_argument("--worker-pool", action="store_true",
                   help="send the per-image batches to the Celery model workers at $HEADSCOPE_BROKER_URL (--out "
                        "must be inside the workers' cache directory and the images at the same paths, e.g. a "
                        "shared volume), then merge here")
    r.add_argument("--quiet", action="store_true", help="no progress bars")


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `headscope serve` and `python -m app`."""
    p.add_argument("--cache-dir", default=None,
                   help="directory holding the runs (default: $HEADSCOPE_CACHE or <repo>/cache)")
    p.add_argument("--run", default=None,
                   help="run to open first: a name under the cache directory or a run directory "
                        "(default: 'default' if it exists, else the first run that opens)")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default 127.0.0.1; 0.0.0.0 serves your network: turn the "
                        "login on with HEADSCOPE_BASIC_AUTH)")
    p.add_argument("--port", type=int, default=8050, help="port to listen on (default 8050)")
    p.add_argument("--torch-threads", type=int, default=int(os.environ.get("HEADSCOPE_TORCH_THREADS") or 1),
                   help="CPU threads per in-process online query (default 1, or $HEADSCOPE_TORCH_THREADS): "
                        "one thread per request keeps a shared CPU responsive; raise it on a dedicated machine")
    p.add_argument("--debug", action="store_true", help="Dash debug mode: reload on code changes, dev tools")


WORKER_DEFAULTS = {"pool": "threads", "concurrency": 4, "queues": "online,build"}  # = transport.WORKER_COMMAND


def add_worker_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `headscope worker`."""
    p.add_argument("--broker-url", default=None, metavar="URL",
                   help="Redis URL of the broker, e.g. redis://:PASSWORD@localhost:6379/0 "
                        "(default: $HEADSCOPE_BROKER_URL, else redis://localhost:6379/0)")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="the only directory whose runs this worker serves and builds into "
                        "(default: $HEADSCOPE_CACHE or <repo>/cache); the app must use the same one")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="torch device of the models (default: $HEADSCOPE_DEVICE, else cuda when available)")
    p.add_argument("--pool", choices=["threads", "prefork"], default=WORKER_DEFAULTS["pool"],
                   help="Celery pool (default threads; not solo: a solo worker cannot answer liveness pings "
                        "while it computes)")
    p.add_argument("--concurrency", type=int, default=WORKER_DEFAULTS["concurrency"], metavar="N",
                   help="tasks at once (default 4)")
    p.add_argument("--queues", default=WORKER_DEFAULTS["queues"], metavar="Q1,Q2",
                   help="queues to consume: online (dashboard queries), build (--worker-pool batches); default both")
    p.add_argument("--loglevel", default="INFO", help="Celery log level (default INFO)")
    p.add_argument("celery_args", nargs=argparse.REMAINDER, metavar="-- CELERY_ARGS",
                   help="further `celery worker` options after `--`, e.g. -- --without-gossip")


def add_runs_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `headscope runs`."""
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="directory holding the runs (default: $HEADSCOPE_CACHE or <repo>/cache)")
    p.add_argument("--json", action="store_true", help="print the list as JSON (one object per run)")


def build_parser(prog: str = "build_cache.py") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=BUILD_DESCRIPTION, epilog=BUILD_EPILOG)
    add_build_arguments(p)
    return p


def serve_parser(prog: str = "python -m app") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=SERVE_DESCRIPTION, epilog=SERVE_EPILOG)
    add_serve_arguments(p)
    return p


def parser() -> argparse.ArgumentParser:
    """`headscope` with its four subcommands."""
    p = argparse.ArgumentParser(prog="headscope", description="HeadScope: which attention heads of a Vision "
                                "Transformer matter, why, and what patterns they learned.",
                                epilog="`headscope COMMAND --help` lists the options of a command.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, add, description, epilog, help_ in (
            ("build", add_build_arguments, BUILD_DESCRIPTION, BUILD_EPILOG, "build or resume a run (the cached tables)"),
            ("serve", add_serve_arguments, SERVE_DESCRIPTION, SERVE_EPILOG, "serve the dashboard"),
            ("worker", add_worker_arguments, WORKER_DESCRIPTION, WORKER_EPILOG, "start the Celery model worker"),
            ("runs", add_runs_arguments, RUNS_DESCRIPTION, None, "list the runs and their state")):
        add(sub.add_parser(name, help=help_, description=description, epilog=epilog))
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    return {"build": build, "serve": serve, "worker": worker, "runs": runs}[args.command](args)


def build_main(argv=None, prog: str = "build_cache.py") -> int:
    """scripts/build_cache.py: `headscope build` under its old name."""
    return build(build_parser(prog).parse_args(argv))


def serve_main(argv=None, prog: str = "python -m app") -> int:
    """python -m app: `headscope serve` under its old name."""
    return serve(serve_parser(prog).parse_args(argv))


# ---- build ------------------------------------------------------------------------------------
def parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise InputError(f"--shard takes K/N (e.g. 2/4), got '{text}'.") from None
    if not 1 <= k <= n:
        raise InputError(f"--shard {text}: K must be between 1 and N.")
    return k, n


def make_config(args: argparse.Namespace):
    """BuildConfig from the command line (from the run's manifest with --resume)."""
    import torch

    from analysis.errors import CacheError
    from analysis.models.adapter import model_reference
    from analysis.runs.build import EMBEDDED_RUNS, BuildConfig, config_from_manifest, default_out

    if args.images:
        dataset, kind = str(Path(args.images).resolve()), "folder"
    elif args.manifest:
        dataset, kind = str(Path(args.manifest).resolve()), "manifest"
    else:
        dataset, kind = args.dataset, None
    given = {"model": model_reference(args.model) if args.model else None,
             "weights": str(Path(args.weights).resolve()) if args.weights else None, "pretrained": args.pretrained,
             "img_size": args.img_size, "dataset": dataset, "dataset_kind": kind,
             "labels": args.labels if args.labels in (None, "sorted") else str(Path(args.labels).resolve()),
             "limit": args.limit, "seed": args.seed, "q": args.q, "ae_epochs": args.ae_epochs,
             "ae_latent": args.ae_latent, "thumb_px": args.thumb_px, "curve_images": args.curve_images,
             "circuit_sample": args.circuit_sample, "all_stages": args.all_stages or None}
    stages = [name for name, on in (("taylor", args.taylor), ("taylor_only", args.taylor_only),
                                    ("mean_ablation", args.mean_ablation), ("curves", args.curves),
                                    ("circuits", args.circuits), ("patch_maps", args.patch_maps)) if on]
    if stages:
        from analysis.runs.head_stages import check_stages

        given["stages"] = check_stages(stages)
    execution = {"batch_size": args.batch_size, "threads": args.threads, "progress": not args.quiet,
                 "device": args.device or ("cuda" if torch.cuda.is_available() else "cpu")}
    model = given["model"] or EMBEDDED_RUNS.get(dataset or "fashion", "default")
    out = Path(args.out) if args.out else default_out(model, dataset or "fashion")
    if args.resume:
        config = config_from_manifest(out, **execution)
        stored = config.to_dict()
        clash = [f"--{k.replace('_', '-')}: run has {stored.get(k)!r}, you gave {v!r}"
                 for k, v in given.items() if v is not None and v != stored.get(k)]
        if clash:
            raise CacheError(f"--resume continues {out} with its own settings, which differ from yours:\n  "
                             + "\n  ".join(clash) + "\nDrop those options, or start a new run with another --out.")
        return config
    settings = {k: v for k, v in {**given, **execution}.items() if v is not None}
    settings.update(model=model, dataset=dataset or "fashion", out=str(out))
    return BuildConfig.from_dict(settings).validate()


def worker_pool() -> tuple[str, int]:
    """($HEADSCOPE_BROKER_URL, number of workers answering), or a clear error when Redis or every
    worker is away."""
    from worker.pool import check_pool

    url = os.environ.get("HEADSCOPE_BROKER_URL")
    if not url:
        raise InputError("--worker-pool needs HEADSCOPE_BROKER_URL (the Redis URL of the workers' broker, "
                         "e.g. redis://localhost:6379/0).")
    return url, check_pool(url)


def run_on_worker_pool(ctx, shard, pool: tuple[str, int]) -> None:
    """The per-image stage on the Celery workers (worker/pool.py); parts land in the run directory."""
    from analysis.runs import build as B
    from worker.pool import build_on_pool

    batches = B.pending_batches(ctx, shard=shard)
    url, workers = pool
    config = {**ctx.config.to_dict(), "out": str(Path(ctx.config.out).absolute())}  # the workers' path too
    stats = build_on_pool(config, batches, url, progress=ctx.config.progress, workers=workers)
    print(f"  worker pool: {stats['images']} images ({stats['skipped']} unreadable) in {len(batches)} batches "
          f"on {stats['workers']} worker(s), {stats['seconds']:.1f} s of worker time", flush=True)


def add_pattern_labels(out: str | None) -> int:
    from analysis.runs import build as B

    if not out:
        raise InputError("--add-pattern-labels needs --out RUN, the run directory to add the labels to.")
    manifest = B.add_pattern_labels(out)
    print(f"Added the pattern labels to {out} in {manifest['timings']['pattern_labels']:.1f} s: head_metrics has "
          "diagonal, diagonal_offset, horizontal, vertical, block, pattern; head_summary has consistency.")
    return 0


def add_circuits(args: argparse.Namespace) -> int:
    from analysis.runs import build as B
    from analysis.runs.circuits import summary_lines
    from analysis.runs.reader import open_run

    if not args.out:
        raise InputError("--add-circuits needs --out RUN, the run directory to add the circuits to.")
    if open_run(args.out).has_circuits:
        print(f"Run {args.out} already has its circuits; nothing to do.")
        return 0
    manifest = B.add_circuits(args.out, threads=args.threads, progress=not args.quiet, batch_size=args.batch_size,
                              device=args.device, circuit_sample=args.circuit_sample)
    seconds = sum(manifest["timings"].get(k, 0) for k in ("circuits_eap", "circuits_exact"))
    print(f"Run {args.out} has its circuits ({seconds:.1f} s): circuit_edges.parquet, circuit_mean.parquet and "
          "manifest['circuits'].")
    print("\n".join(summary_lines(manifest)))
    return 0


def build(args: argparse.Namespace) -> int:
    """Build, resume, shard or merge a run; 0 when done, 2 on a HeadScopeError, 130 on Ctrl-C."""
    from analysis.runs import build as B

    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")  # non-UTF-8 file names print as \xNN
    t0 = time.perf_counter()
    out = args.out
    try:
        if args.add_pattern_labels:
            return add_pattern_labels(args.out)
        if args.add_circuits:
            return add_circuits(args)
        shard = parse_shard(args.shard)
        config = make_config(args)
        out = config.out
        pool = worker_pool() if args.worker_pool and not args.merge else None  # fail before the long work
        what = "merging" if args.merge else (f"shard {shard[0]}/{shard[1]} of" if shard else "building")
        print(f"HeadScope: {what} run {config.out} (model {config.model}, images {config.dataset}, "
              f"device {config.device}, batch {config.batch_size})", flush=True)
        ctx = B.prepare(config)
        for line in ctx.image_set.label_mapping_lines():
            print(line, flush=True)
        if ctx.manifest.get("status") == "complete" and not args.merge:
            print(f"Run {config.out} is already complete ({ctx.manifest['dataset'].get('n_analysed')} images); "
                  f"nothing to do. Delete it or choose another --out to rebuild; --merge redoes the layouts.")
            return 0
        print(f"  {ctx.vit!r}; {len(ctx.image_set.items)} images, {len(ctx.image_set.skipped)} unreadable; "
              f"{config.threads} CPU thread(s) (model {ctx.timings['load_model']:.1f} s, images "
              f"{ctx.timings['load_images']:.1f} s)", flush=True)
        merge_only = args.merge
        if pool:
            run_on_worker_pool(ctx, shard, pool)
            merge_only = True
        manifest = B.build(config, shard=shard, merge_only=merge_only, context=ctx)
        if shard is not None:
            left = len(ctx.image_set.items) - len(B.finished_images(ctx.run_dir))
            print(f"Shard {shard[0]}/{shard[1]} done; {left} images of the run still to do. When every shard has "
                  f"finished: python scripts/build_cache.py --out {config.out} --resume --merge")
            return 0
        print("\n".join(B.summary_lines(manifest, time.perf_counter() - t0)))
        return 0
    except HeadScopeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"error: the disk is full ({err.strerror}: {err.filename or out}). Finished batches are kept: free "
              f"some space, then resume with: python scripts/build_cache.py --out {out or 'RUN'} --resume",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nInterrupted. Finished batches are kept; continue with: "
              f"python scripts/build_cache.py --out {out or 'RUN'} --resume", file=sys.stderr)
        return 130


# ---- serve ------------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    """Does ``host`` listen on this machine only (127.x, ::1, localhost)?"""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: may resolve to a public interface


def serve(args: argparse.Namespace) -> int:
    """The Dash server (werkzeug, threaded) with the same login as gunicorn's app.wsgi."""
    import torch

    torch.set_num_threads(max(1, args.torch_threads))

    from analysis.runs.reader import list_runs
    from app import config, create_app

    try:
        app = create_app(args.cache_dir, args.run)
    except HeadScopeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not list_runs(config.cache_dir()):
        print(f"Note: no runs under {config.cache_dir()}. Build one with "
              "`headscope build --out cache/default`; the dashboard will say so too.", file=sys.stderr)
    login = app.server.config["HEADSCOPE_LOGIN"]
    if not is_loopback(args.host) and not login:
        print(f"Warning: --host {args.host} serves the dashboard to your network without a login. Set "
              "HEADSCOPE_BASIC_AUTH=user:password (or HEADSCOPE_BASIC_AUTH_FILE) and put it behind HTTPS, "
              "or use the Docker stack.", file=sys.stderr)
    print(f"HeadScope: http://{args.host}:{args.port}/  (runs in {config.cache_dir()}, "
          f"opening {config.default_run() or 'none'}; login {'on' if login else 'off'})", file=sys.stderr)
    app.run(host=args.host, port=args.port, debug=args.debug)
    return 0


# ---- worker -----------------------------------------------------------------------------------
def worker_argv(args: argparse.Namespace) -> list[str]:
    """The `celery worker` arguments for these options (what WORKER_COMMAND spells out)."""
    extra = args.celery_args[1:] if args.celery_args[:1] == ["--"] else args.celery_args
    return ["worker", f"--pool={args.pool}", f"--concurrency={args.concurrency}", "-Q", args.queues,
            f"--loglevel={args.loglevel}", *extra]


def worker(args: argparse.Namespace) -> int:
    """Run the Celery worker in this process (until Ctrl-C / SIGTERM)."""
    for var, value in (("HEADSCOPE_BROKER_URL", args.broker_url), ("HEADSCOPE_CACHE", args.cache_dir),
                       ("HEADSCOPE_DEVICE", args.device)):
        if value:
            os.environ[var] = str(Path(value).resolve()) if var == "HEADSCOPE_CACHE" else value
    from worker.celery_app import app  # reads the environment above

    app.worker_main(argv=worker_argv(args))
    return 0


# ---- runs -------------------------------------------------------------------------------------
def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return "-"


def runs(args: argparse.Namespace) -> int:
    """Print every run under the cache directory with its state; 0 even when some cannot open."""
    from analysis.paths import default_cache_dir
    from analysis.runs.reader import list_runs

    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    found = list_runs(cache_dir)
    if args.json:
        print(json.dumps(found, indent=2, default=str))
        return 0
    if not found:
        print(f"No runs under {cache_dir}. Build one with `headscope build` (the default run) or "
              "`headscope build --help`.")
        return 0
    rows = [("NAME", "STATUS", "MODEL", "IMAGES", "SIZE", "ERROR")]
    for r in found:
        status = "unreadable" if r["error"] and r["status"] == "complete" else (r["status"] or "unknown")
        rows.append((r["name"], status, str(r["model"] or "-"), str(r["images"] if r["images"] is not None else "-"),
                     human_size(r["size_bytes"]), r["error"] or ""))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    print(f"Runs in {cache_dir}:")
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[5])
    return 0


if __name__ == "__main__":
    sys.exit(main())
