"""The Explorer's view components (app/pages/explorer.py composes them): each module is one view or
part of the page, its ``layout()`` beside its callbacks (``callbacks``, app/views.py Callbacks).

selection (what the state selects in a run; shared) · sync (controls <-> ``sel``, ``sel`` -> the
``k-*`` parts) · header (toolbar and selection summary) · overview (A) · head_click (a click on a
head in B1 / C1 / D1) · importance (B1-B3) · strength (C1-C3) · patterns (D1-D5 and the D panels) ·
exports (CSV / Parquet / the report).
"""
