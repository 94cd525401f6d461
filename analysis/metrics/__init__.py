"""Per-image x head metrics: importance, strength, patterns, semantic concentration."""
