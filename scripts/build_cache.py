"""Build (or resume) a HeadScope run: the cached tables the dashboard reads (= `headscope build`).

    python scripts/build_cache.py --all-stages                     # embedded default run with every optional
                                                                   # stage (what scripts/run_local.sh builds)
    python scripts/build_cache.py --dataset photos                 # default-backbone on photos -> cache/photos
    python scripts/build_cache.py --model vit_small_patch16_224 --weights vit_s.safetensors \\
        --images data/val --out cache/my-run --limit 1000
    python scripts/build_cache.py --model path/to/hf_folder --images data/val   # a HuggingFace checkpoint
    python scripts/build_cache.py --dataset photos --patch-maps    # + the four patch maps per image
    python scripts/build_cache.py --out cache/my-run --resume      # continue after Ctrl-C / a crash
    python scripts/build_cache.py --out cache/my-run --add-circuits  # add the circuits stage to an old run
    python scripts/build_cache.py ... --shard 1/4   (one per GPU/machine), then ... --merge
    HEADSCOPE_BROKER_URL=redis://... python scripts/build_cache.py ... --worker-pool   # on the Celery workers

The options are defined in analysis/cli.py; see cache/README.md for the run layout and
analysis/runs/build.py for the stages.
"""
import sys

from analysis.cli import build_main

if __name__ == "__main__":
    sys.exit(build_main())
