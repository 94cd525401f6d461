"""Benchmark: the Explorer's interactions in a real headless chromium, event -> last repaint.

    python scripts/bench_browser.py --cache /path/to/cache --run default [--reps 20]
        [--baseline-root /path/to/older/checkout]

Starts the app of this checkout (and, with --baseline-root, the same app from another checkout,
e.g. the code before a change) on the run, drives it with selenium like a user (clicks, a key on
the threshold slider, a toggle, a hover, Back) and times each interaction in the page: from the
time stamp of the user's DOM event (mousedown, keydown, mousemove or popstate; not the webdriver's
round trips before it) to the first animation frame after Dash has no callback pending, no request
in flight and plotly no figure left to draw (checked for 5 frames in a row). The two apps take
turns, one repetition each. Prints p50 / p95 over the repetitions per interaction, and the ratio to
the baseline when one is given. A benchmark, not a test: it asserts nothing.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from headless import chromium, free_port

ROOT = Path(__file__).resolve().parent.parent

# In the page: count requests in flight and plotly draws under way (Plotly.react / newPlot until
# their promise settles: dcc.Graph draws a new figure after Dash has applied it, so a Dash with no
# callback pending can still be drawing for hundreds of ms); t0 = the time stamp of the user's event
# (the first mousedown / keydown / mousemove / popstate after INSTALL, as the interaction says: the
# webdriver's own round trips before the event are not the app's latency); resolve once nothing is
# pending for 5 frames, with the first of those frames as the end.
INSTALL = """
if (!window.__hsBench) {
  window.__hsBench = {inflight: 0, drawing: 0};
  const orig = window.fetch;
  window.fetch = function(...a) {
    window.__hsBench.inflight++;
    return orig.apply(this, a).finally(() => { window.__hsBench.inflight--; });
  };
}
if (window.Plotly && !window.Plotly.__hsBench) {
  window.Plotly.__hsBench = true;
  for (const name of ['react', 'newPlot']) {
    const draw = window.Plotly[name];
    window.Plotly[name] = function(...a) {
      const B = window.__hsBench;
      B.drawing++;
      let out;
      try { out = draw.apply(this, a); } catch (e) { B.drawing--; throw e; }
      Promise.resolve(out).finally(() => { B.drawing--; });
      return out;
    };
  }
}
window.__hsBench.t0 = performance.now();  // until the event arrives
window.__hsBench.seen = false;
if (!window.__hsBench.listening) {
  window.__hsBench.listening = true;
  for (const type of ['mousedown', 'keydown', 'mousemove', 'popstate']) {
    window.addEventListener(type, (e) => {
      const B = window.__hsBench;
      if (!B.seen && type === B.event) { B.t0 = e.timeStamp; B.seen = true; }
    }, true);
  }
}
"""
WAIT = """
const done = arguments[arguments.length - 1];
const B = window.__hsBench;
function busy() {
  const s = window.store && window.store.getState();
  const cbs = s ? Object.assign({}, s.callbacks) : {};
  delete cbs.stored; delete cbs.completed;
  const pending = Object.values(cbs).reduce((n, v) => n + (v ? v.length : 0), 0);
  return pending > 0 || B.inflight > 0 || B.drawing > 0 || !(B.ready ? B.ready() : true);
}
let quiet = 0, end = performance.now(), frames = 0;
function tick() {
  frames++;
  if (busy()) { quiet = 0; }
  else if (++quiet === 1) { end = performance.now(); }
  if (quiet >= 5 && frames > 6) { done(end - B.t0); return; }
  if (performance.now() - B.t0 > 30000) { done(-1); return; }
  requestAnimationFrame(tick);
}
requestAnimationFrame(tick);
"""


def start_app(code_root: Path, cache: Path, run: str, port: int) -> subprocess.Popen:
    """The app of ``code_root`` on ``cache``/``run`` in a subprocess, served as the README serves it
    (``python -m app``: werkzeug, threaded, one torch thread per online query; PYTHONPATH and cwd
    put that checkout's code first)."""
    cmd = [sys.executable, "-m", "app", "--cache-dir", str(cache), "--run", run, "--port", str(port)]
    env = dict(os.environ, PYTHONPATH=str(code_root))
    proc = subprocess.Popen(cmd, cwd=code_root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import urllib.request

    for _ in range(240):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"the app of {code_root} did not start on port {port}")


def timed(driver, action, event: str = "mousedown") -> float:
    """ms from the user's ``event`` (mousedown, keydown, mousemove, popstate) to the last repaint (WAIT)."""
    driver.execute_script(INSTALL + f"window.__hsBench.event = {event!r};")
    action()
    return float(driver.execute_async_script(WAIT))


def load_page(driver, url: str, ready: str) -> float:
    """ms from the navigation's start to the last repaint of the page at ``url`` (WAIT), once the JS
    expression ``ready`` (its views drawn) holds."""
    driver.get(url)
    driver.execute_script(INSTALL + f"window.__hsBench.t0 = 0; window.__hsBench.seen = true; "
                                    f"window.__hsBench.ready = () => {{ try {{ return !!({ready}); }} catch (e) {{ return false; }} }};")
    try:
        return float(driver.execute_async_script(WAIT))
    finally:
        driver.execute_script("window.__hsBench.ready = null;")


def settle(driver) -> None:
    driver.execute_script(INSTALL)
    driver.execute_async_script(WAIT)


class NotOnThisRun(LookupError):
    """The view an interaction needs is not drawn on this run (B2's bars on a run without a model)."""


def interactions(driver, rng: random.Random):
    """name -> (a function doing one user action that changes the state, the DOM event it starts with,
    an untimed action before it or None)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    def points(selector):
        return driver.find_elements("css selector", selector)

    def click_one(selector):
        def act():
            els = points(selector)
            if not els:
                raise NotOnThisRun(selector)
            el = els[rng.randrange(len(els))]
            ActionChains(driver, duration=0).move_to_element(el).pause(0.05).click().perform()
        return act

    state = {"key": Keys.ARROW_LEFT, "hover": 0}

    def threshold():
        handle = driver.find_element("css selector", "#q-slider [role=slider]")
        state["key"] = Keys.ARROW_RIGHT if state["key"] == Keys.ARROW_LEFT else Keys.ARROW_LEFT
        handle.send_keys(state["key"])

    def toggle_d1():
        radios = [r for r in points("#d1-style input") if not r.is_selected()]
        radios[0].click()

    def hover_token():
        toks = points("#d3-graph .scatterlayer .trace:nth-last-of-type(2) .point")
        if not toks:
            raise NotOnThisRun("D3 tokens")
        state["hover"] = (state["hover"] + 7) % max(len(toks) - 1, 1) + 1
        ActionChains(driver, duration=0).move_to_element(toks[state["hover"]]).pause(0.05).perform()

    def b1_head():
        """A click on a head of B1's image curve other than the selected one (the same head changes no
        state: a Back after it would leave the page)."""
        els = points("#b1-graph .scatterlayer .trace:nth-of-type(4) .point")
        if not els:
            raise NotOnThisRun("#b1-graph's heads")
        selected = driver.execute_script(
            "const u = new URLSearchParams(location.search), gd = document.querySelector('#b1-graph .js-plotly-plot');"
            "return gd.data[3].customdata.findIndex(c => c[0] === +u.get('layer') && c[1] === +u.get('head'));")
        i = rng.choice([j for j in range(len(els)) if j != selected])
        ActionChains(driver, duration=0).move_to_element(els[i]).pause(0.05).click().perform()

    def shift_click():
        els = points("#b1-graph .scatterlayer .trace:nth-of-type(4) .point")
        if not els:
            raise NotOnThisRun("#b1-graph's heads")
        (ActionChains(driver, duration=0).move_to_element(els[rng.randrange(len(els))]).pause(0.05)
         .key_down(Keys.SHIFT).click().key_up(Keys.SHIFT).perform())

    return {
        "click an image in A": (click_one("#a-graph .scatterlayer .trace .point"), "mousedown", None),
        "click a head in B1": (b1_head, "mousedown", None),
        "click a head in C1": (click_one("#c1-graph .scatterlayer .trace:nth-of-type(1) .point"), "mousedown", None),
        "click a bar in B2": (click_one("#b2-graph .barlayer .point"), "mousedown", None),
        "change the threshold": (threshold, "keydown", None),
        "toggle D1": (toggle_d1, "mousedown", None),
        "hover a D3 token": (hover_token, "mousemove", None),
        "Back after a head in B1": (driver.back, "popstate", b1_head),
        "shift-click a head into the set": (shift_click, "mousedown", None),
        "load the Explorer": (EXPLORER_READY, "load", None),
        "load the Heads page": (HEADS_READY, "load", None),
    }


def drawn(graph: str) -> str:
    return f"(document.querySelector('#{graph} .js-plotly-plot') || {{}}).data.length > 0"


# a page load ends when Dash is idle and these hold (its views drawn)
# (D3 or, on a run without its model, D's message saying why)
EXPLORER_READY = ("/", " && ".join([*(drawn(g) for g in ("a-graph", "b1-graph", "c1-graph", "d1-graph")),
                                    f"({drawn('d3-graph')} || document.getElementById('d-msg').textContent.length > 0)"]))
HEADS_READY = ("/heads", drawn("heads-map"))


class Session:
    """The app of one checkout on the run, and a chromium on the reference selection."""

    def __init__(self, code_root: Path, cache: Path, run: str, image: int, layer: int, head: int,
                 size=(1920, 1080)):
        self.url_path = f"/?run={run}&image={image}&layer={layer}&head={head}"
        port = free_port()
        self.proc = start_app(code_root, cache, run, port)
        self.base = f"http://127.0.0.1:{port}"
        self.driver = chromium(*size)
        self.reset()
        for _ in range(240):  # the first online query loads the model
            if self.driver.execute_script("return document.querySelectorAll('#d2-images img').length") >= 3:
                break
            time.sleep(0.5)
        settle(self.driver)
        self.acts = interactions(self.driver, random.Random(0))

    def reset(self) -> None:
        """Back to the reference selection (before each interaction's repetitions)."""
        self.driver.get(self.base + self.url_path)
        settle(self.driver)

    def time(self, name: str) -> float | None:
        act, event, before = self.acts[name]
        if event == "load":  # act: (path, the JS that holds once the page is drawn)
            return load_page(self.driver, self.base + self.url_path.replace("/", act[0], 1), act[1])
        for attempt in range(2):  # a stale element after a redraw: retry once, from its untimed action
            if before:
                before()
                settle(self.driver)
            try:
                return timed(self.driver, act, event)
            except NotOnThisRun:
                raise
            except Exception as err:
                if attempt:
                    print(f"  {name}: {type(err).__name__}", file=sys.stderr)
                    return None
                time.sleep(0.3)

    def close(self) -> None:
        self.driver.quit()
        self.proc.terminate()
        self.proc.wait(10)


def bench(sessions: dict[str, Session], reps: int, only: list[str] | None = None) -> dict[str, dict[str, list[float]]]:
    """name of session -> interaction -> ms per repetition. The sessions take turns, one repetition
    each, so that a slower spell of the machine falls on all of them alike."""
    out = {label: {} for label in sessions}
    for name in next(iter(sessions.values())).acts:
        if only and not any(text in name for text in only):
            continue
        for s in sessions.values():
            s.reset()
        times = {label: [] for label in sessions}
        try:
            for rep in range(reps + 2):  # the first two warm the caches of this interaction
                for label, s in sessions.items():
                    t = s.time(name)
                    if rep >= 2 and t is not None and t >= 0:
                        times[label].append(t)
        except NotOnThisRun as missing:
            print(f"  {name}: not on this run (no {missing})", file=sys.stderr)
        for label in sessions:
            out[label][name] = times[label]
    return out


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--run", required=True)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--image", type=int, default=3)
    ap.add_argument("--layer", type=int, default=11)
    ap.add_argument("--head", type=int, default=0)
    ap.add_argument("--baseline-root", type=Path, help="another checkout to time the same way (e.g. before a change)")
    ap.add_argument("--only", action="append", metavar="TEXT",
                    help="time only the interactions whose name contains TEXT (repeatable), e.g. --only threshold")
    args = ap.parse_args(argv)
    if not (shutil.which("chromedriver") and (shutil.which("chromium") or shutil.which("google-chrome"))):
        sys.exit("bench_browser needs chromium and chromedriver")
    print(f"run {args.run} of {args.cache}: {args.reps} repetitions, image {args.image}, layer {args.layer} head {args.head}")
    roots = {"this": ROOT, **({"baseline": args.baseline_root} if args.baseline_root else {})}
    sessions = {}
    try:
        for label, root in roots.items():
            sessions[label] = Session(root, args.cache, args.run, args.image, args.layer, args.head)
        results = bench(sessions, args.reps, args.only)
    finally:
        for s in sessions.values():
            s.close()
    print(f"{'interaction':24s} {'n':>3s} {'p50 ms':>8s} {'p95 ms':>8s}" +
          (f" {'base p50':>9s} {'base p95':>9s} {'p95 ratio':>9s}" if "baseline" in results else ""))
    for name, times in results["this"].items():
        line = f"{name:24s} {len(times):3d} {pct(times, 0.5):8.0f} {pct(times, 0.95):8.0f}"
        if "baseline" in results:
            base = results["baseline"].get(name, [])
            p95 = pct(base, 0.95)
            line += f" {pct(base, 0.5):9.0f} {p95:9.0f} {pct(times, 0.95) / p95 if p95 == p95 and p95 else float('nan'):9.2f}"
        print(line)
    print(f"(all: p50 {statistics.median([t for v in results['this'].values() for t in v]):.0f} ms)")


if __name__ == "__main__":
    main()
