"""Screenshots of the Explorer, its circuit and sinks panels, the Heads page's direct vs total scatter and the
Curves page's drop limits, at 1920x1080 in headless chromium (assets/screenshot_*.png).

    python scripts/screenshot_views.py --cache /path/to/runs --run default [--image 136 --layer 11 --head 4]

The run is best built with --all-stages (circuits, curves, mean ablation, Taylor), e.g.
``python scripts/build_cache.py --all-stages --out RUNS/default``; a view the run lacks shows what to build
instead. The app is served on a free port in this process; each shot waits until its figures are drawn and
no callback is pending, and prints what the view shows (its messages and the numbers named in the README).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from headless import chromium, serve

WIDTH, HEIGHT = 1920, 1080
TIMEOUT = 600  # s a view may take to draw (the circuit is computed online on a busy CPU)

# true once the named graphs hold data, no callback is pending and no output is marked loading
DRAWN = """
const ids = arguments[0];
const drawn = ids.every(id => { const g = document.querySelector('#' + id + ' .js-plotly-plot');
                                 return !!(g && g.data && g.data.length); });
const s = window.store && window.store.getState();
const pending = s && s.callbacks ? ['requested', 'prioritized', 'blocked', 'executing', 'watched', 'executed']
    .reduce((n, k) => n + ((s.callbacks[k] || []).length), 0) : 1;
return drawn && pending === 0 && !document.querySelector('[data-dash-is-loading="true"]');
"""
ALERTS = ("return [...document.querySelectorAll('.alert')].filter(a => a.offsetParent)"  # the shown ones
          ".map(a => a.innerText.trim()).filter(t => t);")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True, help="folder holding the run")
    ap.add_argument("--run", required=True, help="run name under --cache")
    ap.add_argument("--image", type=int, default=136, help="image id (default 136, issue 26's case study)")
    ap.add_argument("--layer", type=int, default=11)
    ap.add_argument("--head", type=int, default=4)
    ap.add_argument("--out-dir", default="assets", help="folder of the PNGs (default assets)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)  # as `python -m app` serves: one torch thread per online query
    base, server = serve(Path(args.cache), args.run)
    driver = chromium(WIDTH, HEIGHT, console=True)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    explorer = f"{base}/?run={args.run}&image={args.image}&layer={args.layer}&head={args.head}"

    def js(script, *a):
        return driver.execute_script(script, *a)

    def wait(graphs, what):
        t0 = time.time()
        while not js(DRAWN, graphs):
            if time.time() - t0 > TIMEOUT:
                raise SystemExit(f"{what} was not drawn within {TIMEOUT} s; alerts: {js(ALERTS)}")
            time.sleep(1)
        time.sleep(2)  # plotly's transitions and the fonts
        if not js(DRAWN, graphs):
            wait(graphs, what)
        return time.time() - t0

    def save(name, graphs, what, element=None):
        took = wait(graphs, what)
        path = out / name
        if not (driver.find_element("css selector", element).screenshot if element else driver.save_screenshot)(str(path)):
            raise SystemExit(f"could not write {path}")
        print(f"wrote {path}: {what} (drawn after {took:.0f} s)")
        for text in js(ALERTS):
            print("  alert:", text.replace("\n", " "))
        for entry in driver.get_log("browser"):
            print("  console:", entry.get("message"))

    def show_panel(key):
        for _ in range(240):
            switch = driver.find_elements("css selector", f"#d-panel input[value={key}]")
            if switch:
                js("arguments[0].click();", switch[0])
                return
            time.sleep(0.5)
        raise SystemExit(f"no switch to the {key} panel in view D")

    try:
        driver.get(explorer)
        save("screenshot_explorer_1920.png", ["a-graph", "b1-graph", "b2-graph", "c1-graph", "d1-graph", "d3-graph",
                                              "d4-graph", "d5-graph"], "the Explorer")

        show_panel("circuit")
        save("screenshot_circuit.png", ["circ-graph"], "view D's circuit panel")
        print("  title:", js("return document.querySelector('#circ-graph .js-plotly-plot').layout.title.text"))
        print("  note:", js("return document.getElementById('circ-msg').innerText").replace("\n", " "))
        edges, node = js("const d = document.querySelector('#circ-graph .js-plotly-plot').data,"
                         " e = d.find(t => t.name === 'edges'), h = d.find(t => t.name === 'heads');"
                         f" return [e ? e.text.slice(0, 5) : [], h.text[{args.layer} * h.text.length / "
                         f"(Math.max(...h.x) + 1) + {args.head}]];")
        print("  strongest edges:", "; ".join(t.replace("<br>", " ") for t in edges))
        print("  selected node:", node.replace("<br>", " "))

        show_panel("sinks")
        save("screenshot_sinks.png", ["sink-norms", "sink-image"], "view D's sinks panel")
        print("  head:", js("return document.getElementById('sink-head').innerText").replace("\n", " "))

        driver.get(f"{base}/heads?run={args.run}&layer={args.layer}&head={args.head}")
        wait(["heads-effects"], "the Heads page's direct vs total scatter")
        heading = driver.find_element("xpath", "//h5[normalize-space()='Direct vs total effect']")
        js("arguments[0].scrollIntoView({block: 'start', behavior: 'instant'});", heading)
        save("screenshot_heads_effects.png", ["heads-effects"], "the Heads page at the direct vs total scatter")
        print("  selected head:", json.dumps(js(
            "const g = document.querySelector('#heads-effects .js-plotly-plot'), out = [];"
            "g.data.forEach(t => (t.customdata || []).forEach((c, i) => {"
            f" if (c && c[0] === {args.layer} && c[1] === {args.head}) out.push([t.name, t.x[i], t.y[i]]); }}));"
            "return out;")))

        driver.get(f"{base}/curves?run={args.run}")
        wait(["curves-graph"], "the Curves page")
        save("screenshot_curves.png", ["curves-graph"], "the Curves page with its drop limits")
        print("  table:", js("return document.getElementById('curves-summary').innerText").replace("\n", " | "))
        print("  limits:", js("return (document.getElementById('curves-limits') || {}).innerText || '(none)'")
              .replace("\n", " | "))
    finally:
        driver.quit()
        server.shutdown()


if __name__ == "__main__":
    main()
