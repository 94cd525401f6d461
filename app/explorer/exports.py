"""The Explorer's exports: the data behind the views (the head table, the head's attention matrix,
B2/B3's pruning modes) as CSV or Parquet, and a self-contained HTML report of the selected head on
the selected image with the link that reproduces the view."""
from __future__ import annotations

import io
import string

import dash
import dash_bootstrap_components as dbc
import flask
import numpy as np
import pandas as pd
from dash import Input, Output, State, ctx, dcc, html, no_update

from analysis.metrics import registry
from analysis.safe_text import render_html, write_csv

from app import data, figures as F, report
from app.explorer.importance import view_b2_b3
from app.explorer.patterns import view_d2, view_d3_d5
from app.explorer.selection import attention, chosen_metric, pruning_rows, selection
from app.explorer.strength import vector_metric, view_c
from app.state import selection_query
from app.views import Callbacks, load

callbacks = Callbacks()
REPORT_HEADER = string.Template("<p>label $label · predicted $pred · metric $metric · $count</p>"
                                "<p>Reproduce: $link</p><h3>D2 · image and attention masks</h3>")


def menu() -> list:
    """The toolbar's export menu and its download target."""
    return [dbc.DropdownMenu([
        dbc.DropdownMenuItem("head table · CSV", id="dl-heads-csv"),
        dbc.DropdownMenuItem("head table · Parquet", id="dl-heads-parquet"),
        dbc.DropdownMenuItem("attention matrix · CSV", id="dl-att-csv"),
        dbc.DropdownMenuItem("attention matrix · Parquet", id="dl-att-parquet"),
        dbc.DropdownMenuItem("B2/B3 pruning modes · CSV", id="dl-prune-csv"),
        dbc.DropdownMenuItem(divider=True),
        dbc.DropdownMenuItem("report of this head · HTML", id="dl-report"),
    ], label="Export", size="sm", color="secondary", id="export-menu"),
        dcc.Download(id="download")]


def head_table(index: data.RunIndex, sel: dict) -> pd.DataFrame:
    """The run's head table (head_metrics), of the selected image when one is selected."""
    hm = index.run.head_metrics
    pos, _ = selection(index, sel)
    if pos is not None:
        hm = hm[hm["image_id"] == int(index.image_ids[pos])]
    return hm.drop(columns=[c for c in ("strength",) if c in hm.columns]).reset_index(drop=True)


def attention_table(index: data.RunIndex, pos: int, head) -> pd.DataFrame:
    """The head's attention matrix on the image at ``pos``, rows and columns named by token."""
    att = attention(index, pos, head)
    A = att["attention"].astype(np.float32)
    names = F.token_names(A.shape[0], int(att["num_prefix_tokens"]), att["grid"])
    return pd.DataFrame(A, index=pd.Index(names, name="source \\ target"), columns=names)


def report_html(index: data.RunIndex, sel: dict, url: str) -> str:
    """A self-contained HTML page about the selected head on the selected image: its B2, B3, C2,
    C3, D2-D4 and the URL that reproduces the view (app.report: plotly.js inlined once, names
    escaped, a CSP that runs only plotly.js and the figure loader)."""
    pos, head = selection(index, sel)
    b2, b3, _ = view_b2_b3(None, None, None, None, sel)
    _, c2, c3, _ = view_c(None, None, None, "strength_entropy", sel)
    vector = vector_metric(index.vectors)
    d3, d4, _, count, _, _ = view_d3_d5(None, None, None, None, sel)
    d2, _ = view_d2(None, None, None, None, None, sel)
    figures = [(title, dict(fig, layout=dict(fig["layout"], height=360, width=720))) for title, fig in (
        ("B2 · metric under each pruning mode", b2), ("B3 · top-5 classes", b3),
        (f"C2 · {registry.get_metric(vector).label if vector else 'vector metric'}", c2),
        ("C3 · strength entropy over images", c3), ("D3 · two-axis view", d3), ("D4 · attention matrix", d4))]
    images = [(t.children[0].src, t.children[1].children) for t in (d2 or []) if isinstance(t, html.Figure)]
    row = index.images.iloc[pos]
    header = render_html(REPORT_HEADER, label=index.class_name(row.label), pred=index.class_name(row.pred),
                         metric=chosen_metric(index, sel), count=count, link=report.link(url))
    title = f"HeadScope · {F.head_name(*head)} on image {int(row.image_id)} of run {index.name}"
    return report.figure_page(title, header, figures, images)


def view_url(sel: dict) -> str:
    """The link that opens the Explorer in state ``sel`` on this server (inside a request)."""
    return flask.request.host_url.rstrip("/") + dash.get_relative_path("/") + selection_query(sel)


@callbacks.server(Output("download", "data"),
                  Input("dl-heads-csv", "n_clicks"), Input("dl-heads-parquet", "n_clicks"), Input("dl-att-csv", "n_clicks"),
                  Input("dl-att-parquet", "n_clicks"), Input("dl-prune-csv", "n_clicks"), Input("dl-report", "n_clicks"),
                  State("sel", "data"), prevent_initial_call=True)
def export(_a, _b, _c, _d, _e, _f, sel):
    """The data behind the views as CSV / Parquet, and the report of this head (with the link to
    this view: the state's URL on this server)."""
    index, _ = load(sel)
    if index is None or not ctx.triggered_id:
        return no_update
    pos, head = selection(index, sel)
    what = ctx.triggered_id
    stem = f"headscope-{index.name}" + ("" if pos is None else f"-image{int(index.image_ids[pos])}") + \
        ("" if head is None else f"-L{head[0]}H{head[1]}")
    if what.startswith("dl-heads"):
        df = head_table(index, sel)
    elif pos is None or head is None:
        return no_update
    elif what.startswith("dl-att"):
        df = attention_table(index, pos, head)
    elif what == "dl-prune-csv":
        df = pd.DataFrame(pruning_rows(index, pos, head))
    else:
        return dcc.send_string(report_html(index, sel, view_url(sel)), f"{stem}-report.html", type="text/html")
    if what.endswith("parquet"):  # the raw values: Parquet is data for programs, not a spreadsheet
        buf = io.BytesIO()
        df.to_parquet(buf)
        return dcc.send_bytes(buf.getvalue(), f"{stem}-{what.split('-')[1]}.parquet")
    # a CSV opens in spreadsheets: text cells that would run as formulas are neutralised (safe_text)
    return dcc.send_string(write_csv(df, index=what.startswith("dl-att")), f"{stem}-{what.split('-')[1]}.csv")
