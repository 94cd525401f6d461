"""The Content-Security-Policy of the app's HTML responses (installed once by app.server.create_app).

Scripts: the app's own files ('self': Dash's bundles, /assets) and Dash's inline scripts by their
sha256 hashes (``dash.Dash.csp_hashes``: the renderer bootstrap and the clientside callbacks given
as strings); no other inline script, no ``eval``, no remote script. plotly.js's WebGL traces
(scattergl: D1, A) compile their shaders' code with ``new Function`` in the bundle Dash serves, so
the app serves plotly.js's "strict" bundle of the same version instead (assets/vendor/
plotly-strict.min.js, MIT, from npm's plotly.js-strict-dist-min; dcc.Graph uses a ``window.Plotly``
that is already there), which draws every trace without ``eval``. Update it with plotly: its
version must be plotly.offline.get_plotlyjs_version() (tests/test_escaping.py checks). Styles: 'self' plus inline (plotly.js and React set style
attributes). Images: 'self' (thumbnails), data: (D2's masks, inlined figures) and blob: (plotly's
PNG export). No plugins, no foreign forms, no <base>. The app may be framed (the notebook shows it
in an iframe of Jupyter's origin), so there is no frame-ancestors.
"""
from __future__ import annotations

import dash

POLICY = ("default-src 'self'; script-src 'self' {hashes}; style-src 'self' 'unsafe-inline'; "
          "img-src 'self' data: blob:; font-src 'self' data:; connect-src 'self'; object-src 'none'; "
          "base-uri 'self'; form-action 'self'")


def content_security_policy(app: dash.Dash) -> str:
    """The policy for ``app``'s pages now (its inline scripts' hashes included)."""
    return POLICY.format(hashes=" ".join(app.csp_hashes()))


def install_csp(app: dash.Dash) -> None:
    """Send ``content_security_policy(app)`` with every HTML response of ``app`` (the hashes are taken
    per response: a clientside callback registered late is still allowed) and ``nosniff`` with all."""

    @app.server.after_request
    def _csp(response):
        if response.mimetype == "text/html":
            response.headers["Content-Security-Policy"] = content_security_policy(app)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response
