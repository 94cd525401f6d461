"""Per-image x head metrics: importance, strength, patterns, semantic concentration, ...

``registry`` holds the Metric type and the lookup (it imports no metric module). Each metric module
declares the metrics it computes beside their code (``register_metric(Metric(...))`` at module
level); the package imports them here, once, in the order the registry lists them (timm's
pattern), so they exist wherever anything of ``analysis.metrics`` is imported.
"""
from analysis.metrics import importance, strength, semantic, patch_maps, taylor, ablation, patterns, direct, sinks  # noqa: F401
