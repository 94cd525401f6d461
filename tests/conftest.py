"""Shared fixtures: the repo root on sys.path and small random-initialised timm ViTs."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
