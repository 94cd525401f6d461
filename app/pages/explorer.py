"""Explorer: the paper's four linked views on one screen (Fig. 1).

A image overview · B head importance (B1 all heads, B2 pruning modes, B3 top-5) ·
C attention strength (C1 all heads, C2 k-hop vector, C3 entropy over images) ·
D attention pattern (D1 layout of all heads, D2 image masks, D3 two-axis view, D4 heatmap,
D5 histogram + threshold).

The page composes the view components of app/explorer/ (each one a ``layout()`` and its
callbacks); the state: the shell's store ``sel`` (app/state.py), split into the ``k-*`` parts each
view listens to (app/explorer/sync.py). The views answer a state change in two requests, one per
view model (app/explorer/selection.py: ``cached``, the run's tables; ``online``, B2/B3 and D2-D5,
which ask the online service, computing each (image, head) once for all of them).
"""
from __future__ import annotations

import dash
from dash import html

from app.explorer import exports, head_click, header, importance, overview, patterns, selection, strength, sync
from app.panels import D_PANELS, circuit, head_sets, saliency, sinks

dash.register_page(__name__, path="/", name="Explorer", title="HeadScope · Explorer", order=0)
head_sets.register()
# the right part of view D: the paper's D3-D5 ("pattern") or a panel module (app/panels/__init__.py)
PANEL_LAYOUTS = {"saliency": saliency.panel, "circuit": circuit.panel, "sinks": sinks.panel}
COMPONENTS = (patterns, sync, header, strength, overview, head_click, importance, exports)
for component in COMPONENTS:  # Dash executes this page once per app: each app gets the callbacks
    component.callbacks.register()
selection.cached.register()
selection.online.register()


def layout(**query):
    panels = {key: PANEL_LAYOUTS[key] for key in D_PANELS if key != "pattern"}
    return html.Div([
        html.Div(id="run-alert"),
        header.layout(),
        html.Div([overview.layout(), importance.layout(query), strength.layout(), patterns.layout(panels)],
                 className="explorer-grid"),
        *sync.stores(), *head_click.stores(), selection.cached.store(), selection.online.store(),
    ], className="explorer", id="explorer-root")
