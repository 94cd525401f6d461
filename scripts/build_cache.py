"""Build (or resume) a HeadScope run: the cached tables the dashboard reads.

    python scripts/build_cache.py                                  # embedded default run -> cache/default
    python scripts/build_cache.py --dataset photos                 # default-backbone on photos -> cache/photos
    python scripts/build_cache.py --model vit_small_patch16_224 --weights vit_s.safetensors \\
        --images data/val --out cache/my-run --limit 1000
    python scripts/build_cache.py --dataset photos --patch-maps    # + the four patch maps per image
    python scripts/build_cache.py --out cache/my-run --resume      # continue after Ctrl-C / a crash
    python scripts/build_cache.py ... --shard 1/4   (one per GPU/machine), then ... --merge
    HEADSCOPE_BROKER_URL=redis://... python scripts/build_cache.py ... --worker-pool   # on the Celery workers

See cache/README.md for the run layout and analysis/build.py for the stages.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="build_cache.py",
        description="Analyse every attention head of a ViT on a set of images and write the run's cache "
                    "(Parquet tables, 2-D layouts, thumbnails) for the HeadScope dashboard. Without model or "
                    "data options it builds the embedded default run (model 'default' on 'fashion', "
                    "out cache/default).",
        epilog="Interrupted builds keep every finished batch: re-run the same command (or --out RUN --resume). "
               "Sharding: run --shard K/N for K=1..N (same options and --batch-size everywhere), then --merge.")
    m = p.add_argument_group("model")
    m.add_argument("--model", metavar="NAME",
                   help="timm ViT name (e.g. vit_small_patch16_224, deit_tiny_patch16_224), 'default' (DINOv2 "
                        "ViT-S/14 + Fashion-MNIST probe, 112 px) or 'default-backbone' (no head, 224 px). "
                        "Default: 'default', or 'default-backbone' with --dataset photos")
    w = m.add_mutually_exclusive_group()
    w.add_argument("--weights", metavar="PATH", help="state dict (.safetensors, .pth, .pt) for a timm model name")
    w.add_argument("--pretrained", action="store_true", default=None,
                   help="use timm's pretrained weights (downloads them; needs internet)")
    m.add_argument("--img-size", type=int, metavar="PX", help="model input size in px (timm models; default: the model's)")
    d = p.add_argument_group("images (one of)")
    g = d.add_mutually_exclusive_group()
    g.add_argument("--dataset", choices=["fashion", "photos"],
                   help="embedded set: 'fashion' (Fashion-MNIST test images, 200 by default) or 'photos' "
                        "(real ImageNet photos shipped with foolbox and scikit-image). Default: fashion")
    g.add_argument("--images", metavar="DIR", help="folder of class sub-folders of images (loose files = unlabelled)")
    g.add_argument("--manifest", metavar="CSV", help="CSV with columns path,label[,label_name] (paths relative to the CSV)")
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
    r.add_argument("--patch-maps", action="store_true", default=None,
                   help="also precompute the four patch maps of every image (occlusion, token_drop, rollout, "
                        "grad_rollout; ~2 x (patches + 1) forwards per image) and each head's alignment with the "
                        "occlusion map (metric saliency_alignment)")
    r.add_argument("--resume", action="store_true",
                   help="continue the run in --out with the settings it was started with (finished images are skipped)")
    s = r.add_mutually_exclusive_group()
    s.add_argument("--shard", metavar="K/N", help="only the per-image stage for slice K of N (1-based); merge later")
    s.add_argument("--merge", action="store_true", help="only the run-level stages (autoencoder, layouts, tables) "
                                                        "from the finished images of all shards")
    r.add_argument("--worker-pool", action="store_true",
                   help="send the per-image batches to the Celery model workers at $HEADSCOPE_BROKER_URL (they "
                        "must see --out and the images at the same paths, e.g. a shared volume), then merge here")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    from analysis.errors import InputError

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

    from analysis.runs.build import EMBEDDED_RUNS, BuildConfig, config_from_manifest, default_out
    from analysis.errors import CacheError

    if args.images:
        dataset, kind = str(Path(args.images).resolve()), "folder"
    elif args.manifest:
        dataset, kind = str(Path(args.manifest).resolve()), "manifest"
    else:
        dataset, kind = args.dataset, None
    given = {"model": args.model, "weights": str(Path(args.weights).resolve()) if args.weights else None,
             "pretrained": args.pretrained, "img_size": args.img_size, "dataset": dataset, "dataset_kind": kind,
             "limit": args.limit, "seed": args.seed, "q": args.q, "ae_epochs": args.ae_epochs,
             "ae_latent": args.ae_latent, "thumb_px": args.thumb_px,
             "stages": ["patch_maps"] if args.patch_maps else None}
    execution = {"batch_size": args.batch_size, "threads": args.threads, "progress": not args.quiet,
                 "device": args.device or ("cuda" if torch.cuda.is_available() else "cpu")}
    model = args.model or EMBEDDED_RUNS.get(dataset or "fashion", "default")
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
    from analysis.errors import InputError
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
    stats = build_on_pool(ctx.config.to_dict(), batches, url, progress=ctx.config.progress, workers=workers)
    print(f"  worker pool: {stats['images']} images ({stats['skipped']} unreadable) in {len(batches)} batches "
          f"on {stats['workers']} worker(s), {stats['seconds']:.1f} s of worker time", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    from analysis.runs import build as B
    from analysis.errors import HeadScopeError

    t0 = time.perf_counter()
    out = args.out
    try:
        shard = parse_shard(args.shard)
        config = make_config(args)
        out = config.out
        pool = worker_pool() if args.worker_pool and not args.merge else None  # fail before the long work
        what = "merging" if args.merge else (f"shard {shard[0]}/{shard[1]} of" if shard else "building")
        print(f"HeadScope: {what} run {config.out} (model {config.model}, images {config.dataset}, "
              f"device {config.device}, batch {config.batch_size})", flush=True)
        ctx = B.prepare(config)
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
    except KeyboardInterrupt:
        target = out or "RUN"
        print(f"\nInterrupted. Finished batches are kept; continue with: "
              f"python scripts/build_cache.py --out {target} --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
