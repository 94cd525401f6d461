"""Text from data, written as data: the one place that escapes it for each output.

Class names, run names, image paths, URLs and head-set names come from folders, manifests and
model configs, so any of them may hold ``<img src=x onerror=...>`` or ``=HYPERLINK(...)``:

- HTML the project writes itself (the Explorer's report, the notebook's tables) goes through
  ``render_html``: a ``string.Template`` whose every substitution is ``html.escape``d, quotes
  included; only ``Markup`` (HTML the project built itself, by ``render_html``) is inserted as it is.
  JSON inside ``<script type="application/json">`` goes through ``script_json``.
- plotly.js reads titles, tick labels, legend entries and hover text as a small HTML subset
  (``<b>``, ``<br>``, ``<a href>``, ...): a name goes in through ``plotly_text``, which shows it as
  it is.
- CSV files for people (spreadsheets) go through ``write_csv``: a text cell that starts with
  ``=``, ``+``, ``-``, ``@``, a tab or a carriage return (OWASP's CSV-injection rule) gets a
  leading ``'`` so a spreadsheet shows it instead of running it as a formula; numbers, negative
  ones included, are written unchanged. Parquet files keep the raw values: they are data for
  programs, not a formula surface.
"""
from __future__ import annotations

import html
import string

import pandas as pd

CSV_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


class Markup(str):
    """HTML the project built itself (``render_html``'s result): substituted without escaping."""


def render_html(template: string.Template | str, **values) -> Markup:
    """``template`` with each ``$name`` replaced by ``html.escape(str(value))`` (quotes too), or by
    ``value`` itself when it is ``Markup``. A missing name raises KeyError (no half-filled page)."""
    template = template if isinstance(template, string.Template) else string.Template(template)
    safe = {k: v if isinstance(v, Markup) else html.escape(str(v), quote=True) for k, v in values.items()}
    return Markup(template.substitute(safe))


def join_markup(parts) -> Markup:
    """Several ``Markup`` pieces as one (plain strings are escaped)."""
    return Markup("".join(p if isinstance(p, Markup) else html.escape(str(p), quote=True) for p in parts))


def script_json(json_text: str) -> Markup:
    """JSON text made safe inside ``<script type="application/json">``: ``<``, ``>``, ``&`` and the
    JS line separators U+2028/U+2029 as ``\\uXXXX`` escapes (still the same JSON), so no
    ``</script>`` or ``<!--`` in a string can end the element."""
    for ch, esc in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        json_text = json_text.replace(ch, esc)
    return Markup(json_text)


def plotly_text(text) -> str:
    """``text`` for a plotly label string (title, tick, legend, hover, annotation): ``&``, ``<``, ``>``
    as the entities plotly.js decodes, so a name shows as it is and never becomes markup or a link."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def csv_cell(value):
    """One CSV cell a spreadsheet shows as text: a str starting with one of CSV_FORMULA_STARTS gets a
    leading ``'``; anything else (numbers, negative ones included; None; NaN) is returned unchanged."""
    if isinstance(value, str) and value.startswith(CSV_FORMULA_STARTS):
        return "'" + value
    return value


def _safe_labels(index: pd.Index) -> pd.Index:
    if isinstance(index, pd.MultiIndex):
        return index.set_levels([_safe_labels(level) for level in index.levels]).set_names(
            [csv_cell(n) for n in index.names])
    return pd.Index([csv_cell(v) for v in index], name=csv_cell(index.name), dtype=object) \
        if index.dtype == object or isinstance(index.dtype, (pd.StringDtype, pd.CategoricalDtype)) \
        else index.rename(csv_cell(index.name))


def csv_safe(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``df`` with ``csv_cell`` applied to every text cell, column name and index label;
    numeric columns are not touched."""
    out = df.copy()
    for i, col in enumerate(df.columns):
        series = df.iloc[:, i]
        if series.dtype == object or isinstance(series.dtype, (pd.StringDtype, pd.CategoricalDtype)):
            out.isetitem(i, series.astype(object).map(csv_cell))
    out.columns = _safe_labels(df.columns)
    out.index = _safe_labels(df.index)
    return out


def write_csv(df: pd.DataFrame, path_or_buf=None, **to_csv_kw):
    """``df.to_csv(path_or_buf, **to_csv_kw)`` with its text neutralised (``csv_safe``): the one way
    the project writes a CSV for people. Rows end in CR LF (RFC 4180), so a cell holding a carriage
    return is quoted and stays one cell. Returns what ``to_csv`` returns (the text when no target)."""
    return csv_safe(df).to_csv(path_or_buf, **{"lineterminator": "\r\n", **to_csv_kw})
