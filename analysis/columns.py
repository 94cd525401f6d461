"""The run tables' fixed column names (the lowest layer: no imports).

Both the metric registry (a metric may not take one of these names) and the run format
(``analysis.runs.schema``, which gives them their types) read them from here.
"""
HEAD_KEY_NAMES = ("image_id", "layer", "head")
LAYOUT_COLUMN_NAMES = ("cls_x", "cls_y", "patch_x", "patch_y")
# Names a metric may not take (they are fixed columns of head_metrics / head_summary).
RESERVED_COLUMNS = frozenset(HEAD_KEY_NAMES) | frozenset(LAYOUT_COLUMN_NAMES) | {"n_images"}
