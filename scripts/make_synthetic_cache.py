"""Write a synthetic HeadScope run (random but plausible values) for tests and benchmarks.

    python scripts/make_synthetic_cache.py --out cache/synthetic --images 1000 --layers 12 --heads 12
    python scripts/make_synthetic_cache.py --out /tmp/tiny --images 40 --model test_vit --img-size 96

The code is analysis/runs/synthetic.py (importable as ``analysis.runs.synthetic.make_run``).
"""
import sys

from analysis.runs.synthetic import main

if __name__ == "__main__":
    sys.exit(main())
