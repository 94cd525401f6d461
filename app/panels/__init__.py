"""Parts of pages kept in modules of their own (their layout and callbacks).

``D_PANELS``: what the right part of the Explorer's view D can show (key -> switch label). "pattern"
is the paper's D3-D5 (the Explorer's own); every other key is a module here whose ``panel()`` the
Explorer lays out in ``html.Div(id="d-<key>")``, shown while the switch ``d-panel`` names it. A
panel's callbacks take ``d-panel`` as State or Input so that a hidden panel costs no request.
"""
D_PANELS = {"pattern": "D3–D5 pattern", "saliency": "D6 saliency", "circuit": "circuit", "sinks": "sinks"}
