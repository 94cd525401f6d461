"""The run format's public names in one import (``from analysis.runs import store``).

schema.py  file names, fixed columns, the columns derived from the metric registry;
tables.py  the one writer (write_run) and its atomic file helpers;
reader.py  Run / open_run / list_runs (tables, dense metric arrays, thumbnails).
"""
from analysis.paths import default_cache_dir  # noqa: F401
from analysis.runs import schema
from analysis.runs.reader import Run, list_runs, open_run  # noqa: F401
from analysis.runs.schema import (IMAGE_COLUMNS, SCHEMA_VERSION, SKIPPED_COLUMNS, head_columns,  # noqa: F401
                                  summary_columns)
from analysis.runs.tables import atomic_write_bytes, write_json, write_run, write_table  # noqa: F401


def __getattr__(name):
    return getattr(schema, name)  # HEAD_COLUMNS, SUMMARY_COLUMNS (computed from the registry on use)
