"""Self-contained HTML pages of plotly figures (the Explorer's "report of this head").

The page opens offline and runs no script it was not built with: every text from data goes
through ``analysis.safe_text.render_html`` (escaped), each figure travels as JSON in a
``<script type="application/json">`` block (data, never executed), and exactly two scripts run,
plotly.js and ``LOADER`` (which draws each JSON block into the ``<div>`` it names). The page's
``Content-Security-Policy`` meta tag allows those two by their sha256 hashes and nothing else:
no inline handler, no other inline or remote script, no plugin, no network access.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import string
from urllib.parse import urlsplit

import plotly.io as pio
import plotly.offline

from analysis.errors import ConfigError
from analysis.safe_text import Markup, join_markup, render_html, script_json

LOADER = ("(function () {\n"
          "  var blocks = document.querySelectorAll('script[type=\"application/json\"][data-figure]');\n"
          "  for (var i = 0; i < blocks.length; i++) {\n"
          "    var fig = JSON.parse(blocks[i].textContent);\n"
          "    Plotly.newPlot(document.getElementById(blocks[i].getAttribute('data-figure')), fig.data, fig.layout,\n"
          "                   {displaylogo: false});\n"
          "  }\n"
          "})();\n")

PAGE = string.Template("""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="$csp">
<title>$title</title>
<style>body{font-family:system-ui;max-width:1000px;margin:1rem auto} figure{display:inline-block;margin:4px}</style>
</head><body>
<h1>$title</h1>
$body
<script>$plotlyjs</script>
<script>$loader</script>
</body></html>
""")
FIGURE = string.Template('<h3>$title</h3><div id="$id" class="report-figure"></div>'
                         '<script type="application/json" data-figure="$id">$json</script>\n')
IMAGE = string.Template('<figure><img src="$src" width="200" alt="$caption"><figcaption>$caption</figcaption></figure>')
LINK = string.Template('<a href="$url">$url</a>')


def script_hash(source: str) -> str:
    """The CSP source that allows the inline script ``source`` (the text between its tags):
    "'sha256-<base64>'"; line ends as the HTML parser gives them to the browser (CR LF -> LF)."""
    text = source.replace("\r\n", "\n").replace("\r", "\n")
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


@functools.lru_cache(maxsize=1)
def _plotlyjs() -> tuple[Markup, str]:
    """(plotly.js of the installed plotly, its CSP hash); it must not contain "</script" (it would end
    its element early)."""
    source = plotly.offline.get_plotlyjs()
    if "</script" in source.lower():
        raise ConfigError("The installed plotly.js contains '</script' and cannot be inlined in a report; "
                          "install another plotly version (pip install -U plotly).")
    return Markup(source), script_hash(source)


def csp(script_hashes) -> str:
    """The report's policy: only the given inline scripts; inline styles (plotly sets them), images
    from data:/blob: URLs (the inlined thumbnails, plotly's PNG export); nothing else, no network."""
    return ("default-src 'none'; script-src " + " ".join(script_hashes) + "; style-src 'unsafe-inline'; "
            "img-src data: blob:; font-src data:; base-uri 'none'; form-action 'none'")


def link(url: str) -> Markup:
    """``url`` as a link when it is an http(s) URL, else as plain text (no javascript: or data: link)."""
    if urlsplit(url).scheme in ("http", "https"):
        return render_html(LINK, url=url)
    return join_markup([url])


def figure_page(title: str, body: Markup, figures, images=()) -> str:
    """A self-contained HTML page: ``title``, ``body`` (Markup made with render_html), the
    ``images`` [(data-URL, caption)] and the plotly ``figures`` [(heading, figure dict)], drawn by
    the inlined plotly.js under the page's CSP."""
    plotlyjs, plotly_hash = _plotlyjs()
    tiles = join_markup(render_html(IMAGE, src=src, caption=cap) for src, cap in images)
    blocks = join_markup(render_html(FIGURE, title=heading, id=f"figure-{i}",
                                     json=script_json(pio.to_json(fig, validate=False)))
                         for i, (heading, fig) in enumerate(figures))
    return render_html(PAGE, csp=csp([plotly_hash, script_hash(LOADER)]), title=title,
                       body=join_markup([body, tiles, blocks]), plotlyjs=plotlyjs, loader=Markup(LOADER))
