"""Load test: N concurrent users against a served HeadScope app, each doing what the Explorer page does.

Each simulated user opens the Explorer as a browser does: the page, its layout and callback list
(``/_dash-layout``, ``/_dash-dependencies``), then every callback the Dash renderer fires while the
page loads. Then it loops until --duration over four selections, one at a time: a click on an image
in A, a click on a head in B1, a new threshold (D5's slider) and D1's layout toggle. Nothing about
the page is written here beyond those four inputs: which requests a selection sends is found by
following the page's own callback graph from the input the user changes, as the renderer does
(server-side callbacks are POSTed to ``/_dash-update-component`` with the inputs and state the page
holds at that moment; clientside callbacks, and the page's scripts in /assets, run in Node.js, in
one context per user with a minimal DOM, so their effect on the stores and the requests they make
by ``fetch``, e.g. /api/warm, are the browser's). The graphs are never zoomed; the image, head,
threshold and layout picked are random among the points and options the page shows.

Prints per request kind (each callback by its output ids, each /api query, the page's own
requests) and per interaction (the time from the user's input to its last response): count,
req/s, p50, p95 and errors. Needs Node.js (``node`` on PATH, or $HEADSCOPE_NODE).

Against a running app (gunicorn app.wsgi:server, with or without a worker):
    python scripts/load_test.py --url http://127.0.0.1:8050 --run default --users 10
Or let it serve everything on free localhost ports (redis-server, Celery worker, gunicorn):
    python scripts/load_test.py --serve --cache-dir /tmp/hs --run synthetic --users 50
(--serve with --make-run writes a synthetic run with a small random model first.)
"""
from __future__ import annotations

import argparse
import html as html_text
import itertools
import json
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import ExitStack
from pathlib import Path

import requests

from analysis.errors import HeadScopeError
from analysis.paths import default_cache_dir
from analysis.runs.reader import open_run

ROOT = Path(__file__).resolve().parent.parent
BROWSER_CONNECTIONS = 6  # a browser's concurrent HTTP/1.1 connections to one host
# The four selections: the input the user changes (component id, property). What each sends is
# found from the page's callback graph; a test fails when one sends nothing.
INTERACTIONS = {"A image": ("a-graph", "clickData"), "B1 head": ("b1-graph", "clickData"),
                "threshold": ("q-slider", "value"), "D1 toggle": ("d1-kind", "value")}


# ---- statistics ------------------------------------------------------------------------------
class Stats:
    """Latencies and errors per request kind and per interaction."""

    def __init__(self):
        self.lat = {"request": defaultdict(list), "interaction": defaultdict(list)}
        self.errors = {"request": defaultdict(int), "interaction": defaultdict(int)}
        self.examples: dict[str, str] = {}
        self.sends: dict[str, Counter] = defaultdict(Counter)  # interaction -> the requests it sent, by kind
        self.lock = threading.Lock()

    def add(self, table: str, kind: str, seconds: float, error: str | None = None) -> None:
        with self.lock:
            self.lat[table][kind].append(seconds)
            if error:
                self.errors[table][kind] += 1
                self.examples.setdefault(kind, error)

    def add_interaction(self, name: str, seconds: float, sent: list, error: str | None) -> None:
        self.add("interaction", name, seconds, error)
        with self.lock:
            self.sends[name].update(kind for kind, _ in sent)

    def summary(self, seconds: float) -> dict:
        """{table: {kind: {n, errors, rps, p50_ms, p95_ms}}}."""
        out = {}
        for table, kinds in self.lat.items():
            out[table] = {}
            for kind, lat in sorted(kinds.items()):
                lat = sorted(lat)
                out[table][kind] = {"n": len(lat), "errors": self.errors[table][kind], "rps": len(lat) / seconds,
                                    "p50_ms": statistics.median(lat) * 1e3,
                                    "p95_ms": lat[min(len(lat) - 1, int(0.95 * len(lat)))] * 1e3}
            if table == "request" and kinds:
                lat = sorted(x for v in kinds.values() for x in v)
                out[table]["all"] = {"n": len(lat), "errors": sum(self.errors[table].values()),
                                     "rps": len(lat) / seconds, "p50_ms": statistics.median(lat) * 1e3,
                                     "p95_ms": lat[min(len(lat) - 1, int(0.95 * len(lat)))] * 1e3}
        return out


def report(stats: Stats, seconds: float, users: int) -> str:
    summary = stats.summary(seconds)
    width = max([len(k) for t in summary.values() for k in t] + [12]) + 2
    lines = [f"{users} users, {seconds:.1f} s"]
    for table, title in (("request", "request"), ("interaction", "interaction")):
        lines.append(f"{title:<{width}}{'n':>7}{'errors':>8}{'per s':>8}{'p50 ms':>9}{'p95 ms':>9}")
        for kind, f in summary[table].items():
            lines.append(f"{kind:<{width}}{f['n']:>7}{f['errors']:>8}{f['rps']:>8.1f}{f['p50_ms']:>9.0f}{f['p95_ms']:>9.0f}")
    for kind, example in stats.examples.items():
        lines.append(f"first {kind} error: {example}")
    return "\n".join(lines)


# ---- the page's scripts, run in Node.js --------------------------------------------------------
# One Node.js process runs every user's page scripts, each user in a vm context of its own with
# the DOM the scripts touch: elements by id (those of the layout), the graphs' plotly divs (their
# hover point, drag mode, never zoomed), window.location and history, fetch (recorded: the
# simulator sends it), addEventListener (recorded: the simulator dispatches a click's mousedown),
# dash_clientside's no_update, PreventUpdate, callback_context and set_props (recorded).
NODE_PROGRAM = r"""
const vm = require('vm'), readline = require('readline');
const pages = {}, compiled = new Map();
class PreventUpdate extends Error {}
function open(msg) {
  const rec = {fetches: [], setProps: [], listeners: {}, ids: new Set(msg.ids), attrs: msg.attrs, els: {}, graphs: {}};
  const loc = new URL(msg.href);
  const gd = id => Object.assign(rec.graphs[id] || (rec.graphs[id] = {}), {_context: {doubleClickDelay: 300}});
  const el = id => {
    if (!rec.ids.has(id)) { return null; }
    return rec.els[id] || (rec.els[id] = {id, closest: s => (s === '.dash-graph' ? rec.els[id] : null),
                                          querySelector: s => (s === '.js-plotly-plot' ? gd(id) : null),
                                          getAttribute: a => ((rec.attrs[id] || {})[a] ?? null),
                                          textContent: id === '_dash-config' ? JSON.stringify(msg.config) : ''});
  };
  const document = {
    getElementById: el,
    querySelector: s => { const m = /^#([\w-]+) \.js-plotly-plot$/.exec(s); return m && el(m[1]) ? gd(m[1]) : null; },
    addEventListener: () => {},
  };
  const location = {get search() { return loc.search; }, get pathname() { return loc.pathname; },
                    get hash() { return loc.hash; }, get href() { return loc.href; }};
  const window = {
    document, location, URL, URLSearchParams, setTimeout, clearTimeout, console, Promise,
    history: {pushState: (s, t, url) => { const u = new URL(url, loc); loc.pathname = u.pathname; loc.search = u.search; loc.hash = u.hash; },
              replaceState: () => {}},
    addEventListener: (type, fn) => { (rec.listeners[type] = rec.listeners[type] || []).push(fn); },
    fetch: url => { rec.fetches.push(String(url)); return new Promise(() => {}); },
  };
  window.window = window;
  const ctx = vm.createContext(window);
  const page = {ctx, rec, loc};
  pages[msg.user] = page;
  for (const [i, src] of msg.scripts.entries()) {
    if (i === msg.rendererAt) { setupDash(page); }
    run(page, src);
  }
  if (msg.rendererAt >= msg.scripts.length) { setupDash(page); }
  return {};
}
function setupDash(page) {
  const C = page.ctx.dash_clientside = page.ctx.dash_clientside || {};
  C.no_update = C.no_update || {description: 'return value to prevent updating'};
  C.PreventUpdate = PreventUpdate;
  C.callback_context = {};
  C.set_props = (id, props) => { page.rec.setProps.push([id, props]); };
}
function run(page, src) {
  if (!compiled.has(src)) { compiled.set(src, new vm.Script(src)); }
  compiled.get(src).runInContext(page.ctx);
}
function drain(page, out) {
  const C = page.ctx.dash_clientside, nu = C.no_update;
  const body = JSON.stringify(out === undefined ? null : out, (k, v) => (v === nu ? {__hs_no_update: 1} : v));
  const res = {out: JSON.parse(body === undefined ? 'null' : body), setProps: page.rec.setProps, fetches: page.rec.fetches};
  page.rec.setProps = []; page.rec.fetches = [];
  return res;
}
function sync(page, msg) {
  if (msg.ids) { page.rec.ids = new Set(msg.ids); page.rec.attrs = msg.attrs; }
  for (const [id, g] of Object.entries(msg.graphs || {})) { Object.assign(page.rec.graphs[id] = page.rec.graphs[id] || {}, g); }
}
async function call(msg) {
  const page = pages[msg.user];
  sync(page, msg);
  const C = page.ctx.dash_clientside;
  C.callback_context = msg.context;
  let out;
  try {
    out = await C[msg.ns][msg.fn](...msg.args);
  } catch (e) {
    if (e instanceof PreventUpdate || (e && e.constructor && e.constructor.name === 'PreventUpdate')) {
      return Object.assign(drain(page, null), {prevent: true});
    }
    return Object.assign(drain(page, null), {error: String(e && e.stack || e)});
  }
  return drain(page, out);
}
function mousedown(msg) {
  const page = pages[msg.user];
  sync(page, msg);
  const el = page.ctx.document.getElementById(msg.graph);
  const event = {target: {closest: s => (s === '.dash-graph' ? el : null)}, shiftKey: false, button: 0};
  for (const fn of page.rec.listeners.mousedown || []) { fn(event); }
  return drain(page, null);
}
const ops = {open, call, mousedown, close: msg => { delete pages[msg.user]; return {}; }};
readline.createInterface({input: process.stdin}).on('close', () => process.exit(0)).on('line', async line => {
  const msg = JSON.parse(line);
  let res;
  try { res = await ops[msg.op](msg); } catch (e) { res = {error: String(e && e.stack || e)}; }
  process.stdout.write(JSON.stringify(Object.assign(res, {id: msg.id})) + '\n');
});
"""

NO_UPDATE = {"__hs_no_update": 1}


class NodeScripts:
    """The Node.js process that runs the users' page scripts (one vm context per user)."""

    def __init__(self):
        node = os.environ.get("HEADSCOPE_NODE") or shutil.which("node") or shutil.which("nodejs")
        if not node:
            raise SystemExit("error: the load test runs the page's clientside callbacks in Node.js: install it "
                             "(e.g. apt-get install nodejs) or give its path in $HEADSCOPE_NODE.")
        self.proc = subprocess.Popen([node, "-e", NODE_PROGRAM], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)
        self.lock = threading.Lock()
        self.waiting: dict[int, list] = {}
        self.ids = itertools.count()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            msg = json.loads(line)
            slot = self.waiting.pop(msg["id"])
            slot[1] = msg
            slot[0].set()
        for slot in list(self.waiting.values()):  # node ended
            slot[1] = {"error": "Node.js ended"}
            slot[0].set()

    def ask(self, op: str, **msg) -> dict:
        slot = [threading.Event(), None]
        with self.lock:
            n = next(self.ids)
            self.waiting[n] = slot
            self.proc.stdin.write(json.dumps({"op": op, "id": n, **msg}) + "\n")
            self.proc.stdin.flush()
        slot[0].wait()
        if slot[1].get("error"):
            raise RuntimeError(f"page script failed in Node.js ({op}): {slot[1]['error'][:800]}")
        return slot[1]

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---- the page as the Dash renderer holds it -----------------------------------------------------
def collect_props(tree, props: dict, types: dict | None = None) -> dict:
    """Walk a Dash layout (JSON) and record each component's props (and type) by its (string) id."""
    if isinstance(tree, list):
        for t in tree:
            if isinstance(t, (dict, list)):  # not a figure's numbers, one by one
                collect_props(t, props, types)
    elif isinstance(tree, dict):
        if "props" in tree and "type" in tree:
            cid = tree["props"].get("id")
            if isinstance(cid, str):
                props.setdefault(cid, {}).update(tree["props"])
                if types is not None:
                    types[cid] = tree["type"]
            for value in tree["props"].values():
                collect_props(value, props, types)
        else:
            for value in tree.values():
                collect_props(value, props, types)
    return props


def split_outputs(output: str, keep_hash: bool = False) -> list[tuple[str, str]]:
    """Dash's output key ('a.b' or '..a.b...c.d..', maybe with '@hash') -> [(id, property)] (with
    ``keep_hash``, an allow_duplicate output's property keeps its '@hash', as in the renderer's graph)."""
    parts = output[2:-2].split("...") if output.startswith("..") else [output]
    return [tuple((p if keep_hash else p.split("@")[0]).rsplit(".", 1)) for p in parts]


class Callback:
    def __init__(self, spec: dict):
        self.spec, self.key = spec, spec["output"]
        self.outputs = split_outputs(spec["output"])
        self.graph_outputs = split_outputs(spec["output"], keep_hash=True)  # what the renderer's graph follows
        self.inputs = [(d["id"], d["property"]) for d in spec["inputs"]]
        self.state = [(d["id"], d["property"]) for d in spec.get("state", [])]
        self.clientside = spec.get("clientside_function")
        self.initial = not spec.get("prevent_initial_call")
        ids = list(dict.fromkeys(i for i, _ in self.outputs))  # its name in the report
        self.name = "+".join(ids) if len(ids) <= 4 else "+".join(ids[:3]) + f"+{len(ids) - 3} more"


PATCH_OPERATIONS = {
    "Assign": lambda old, p: p["value"], "Merge": lambda old, p: {**(old or {}), **p["value"]},
    "Extend": lambda old, p: [*(old or []), *p["value"]], "Append": lambda old, p: [*(old or []), p["value"]],
    "Prepend": lambda old, p: [p["value"], *(old or [])], "Clear": lambda old, p: [],
    "Insert": lambda old, p: [*(old or [])[:p["index"]], p["value"], *(old or [])[p["index"]:]],
    "Reverse": lambda old, p: list(reversed(old or [])), "Remove": lambda old, p: [x for x in old or [] if x != p["value"]],
    "Add": lambda old, p: old + p["value"], "Sub": lambda old, p: old - p["value"],
    "Mul": lambda old, p: old * p["value"], "Div": lambda old, p: old / p["value"],
}


def apply_patch(value, patch: dict):
    """Dash's Patch operations applied to ``value`` (in place where it can), as the renderer does."""
    root = {"value": value}
    for op in patch["operations"]:
        path = ["value", *op["location"]]
        try:
            holder = root
            for k in path[:-1]:
                holder = holder[k]
            key = path[-1]
            if op["operation"] == "Delete":
                del holder[key]
            else:
                old = holder[key] if isinstance(holder, list) or key in holder else None
                holder[key] = PATCH_OPERATIONS[op["operation"]](old, op["params"])
        except (KeyError, IndexError, TypeError):  # a path the value does not have: left as it is
            continue
    return root["value"]


class Page:
    """One user's Explorer: the component props and the renderer's callback queue."""

    def __init__(self, user: int, base: str, session: requests.Session, node: NodeScripts, stats: Stats,
                 timeout: float):
        self.user, self.base, self.session, self.node, self.stats, self.timeout = user, base, session, node, stats, timeout
        self.props: dict[str, dict] = {}
        self.types: dict[str, str] = {}
        self.callbacks: list[Callback] = []
        self.by_input: dict[tuple, list[Callback]] = {}  # (id, prop) -> the callbacks it is an input of
        self.reach: dict[str, set] = {}  # Page.downstream's cache (cleared when components come)
        self.hovered: str | None = None  # the graph under the mouse
        self.drawn: set[str] = set()  # the graphs that have drawn a figure
        self.pool = ThreadPoolExecutor(BROWSER_CONNECTIONS)
        self.sent: list[tuple[str, int | None]] = []  # (request kind, HTTP status) since the last interaction
        self.ids_sent: set | None = None
        self.hover: dict[str, dict] = {}  # graph id -> the point under the mouse
        self.extra: list = []  # the fetches of the running interaction (futures)

    # -- HTTP --
    def request(self, kind: str, method: str, path: str, **kw):
        t = time.perf_counter()
        try:
            r = self.session.request(method, self.base + path, timeout=self.timeout, **kw)
            err = None if r.status_code < 400 else f"HTTP {r.status_code}: {r.text[:300]}"
        except requests.RequestException as e:
            r, err = None, f"{type(e).__name__}: {e}"
        self.stats.add("request", kind, time.perf_counter() - t, err)
        self.sent.append((kind, None if r is None else r.status_code))
        return r, err

    def open(self, path: str, scripts: list[str], renderer_at: int, config: dict) -> str | None:
        """Load the page as a browser does; the first error, or None."""
        errors = []
        for kind, p in (("page", path), ("page", "/_dash-layout"), ("page", "/_dash-dependencies")):
            r, err = self.request(kind, "GET", p)
            if err:
                return err
            if p == "/_dash-layout":
                collect_props(r.json(), self.props, self.types)
            elif p == "/_dash-dependencies":
                self.callbacks = [Callback(cb) for cb in r.json()]
                for cb in self.callbacks:
                    for d in cb.inputs:
                        self.by_input.setdefault(d, []).append(cb)
        self.node.ask("open", user=self.user, scripts=scripts, rendererAt=renderer_at, config=config,
                      ids=sorted(self.props), attrs=self.attributes(), href=self.base + path)
        self.ids_sent = set(self.props)
        # the renderer's first pass: every callback of the layout; dcc.Location sets the URL on mount
        changes = {}
        pathname, _, search = path.partition("?")
        for cid, kind in self.types.items():
            if kind == "Location":
                changes.update({(cid, "pathname"): pathname, (cid, "search"): "?" + search if search else "",
                                (cid, "href"): self.base + path, (cid, "hash"): ""})
        self.run(changes, mounted=set(self.props), errors=errors)
        return errors[0] if errors else None

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.node.ask("close", user=self.user)

    # -- the renderer's queue --
    def present(self, cb: Callback) -> bool:
        return all(i in self.props for i, _ in cb.outputs) and all(i in self.props for i, _ in cb.inputs)

    def value(self, cid: str, prop: str):
        return self.props.get(cid, {}).get(prop)

    def downstream(self, cb: Callback) -> set:
        """Every (id, prop) that ``cb`` may change, itself or through the callbacks that follow it (as
        the renderer's graph has it: an allow_duplicate output is a property of its own, 'data@hash',
        that no callback listens to)."""
        if cb.key not in self.reach:
            out, todo = set(cb.graph_outputs), list(cb.graph_outputs)
            while todo:
                hit = todo.pop()
                for other in self.by_input.get(hit, ()):
                    if self.present(other):
                        new = [o for o in other.graph_outputs if o not in out]
                        out.update(new)
                        todo += new
            self.reach[cb.key] = out
        return self.reach[cb.key]

    def run(self, changes: dict, mounted: set | None = None, errors: list | None = None) -> None:
        """Apply ``changes`` {(id, prop): value} (a user's input; ``mounted``: the ids of the page's
        first layout) and fire every callback that follows, as the Dash renderer does: a callback
        waits while a pending one may still change one of its inputs (through any chain); ready
        server-side callbacks are sent at once, BROWSER_CONNECTIONS at a time."""
        pending: dict[str, set] = {}
        executing: dict = {}  # future -> callback
        by_key = {cb.key: cb for cb in self.callbacks}

        def fire(cb: Callback, hit: set) -> None:
            if self.present(cb):
                pending.setdefault(cb.key, set()).update(f"{c}.{p}" for c, p in hit)

        def changed(props: dict) -> None:
            for (cid, prop), v in props.items():
                self.props.setdefault(cid, {})[prop] = v
            for key in props:
                for cb in self.by_input.get(key, ()):
                    fire(cb, {key})

        def mount(ids: set, outputs_only: bool) -> None:
            """New components: the callbacks with an output among them fire (unless prevent_initial_call);
            in a new chunk also those with an input among them and no output in it (changed: those inputs)."""
            self.reach.clear()
            for cb in self.callbacks:
                if cb.initial and any(i in ids for i, _ in cb.outputs):
                    fire(cb, set())
                elif not outputs_only and any(i in ids for i, _ in cb.inputs) and not any(i in ids for i, _ in cb.outputs):
                    fire(cb, {d for d in cb.inputs if d[0] in ids})

        def apply(values: dict) -> None:
            """A response's {id: {prop: value}}; components in it join the page."""
            flat, new_ids = {}, set()
            for cid, vals in values.items():
                for prop, v in vals.items():
                    if isinstance(v, dict) and v.get("__dash_patch_update"):
                        v = apply_patch(self.value(cid, prop), v)
                    flat[(cid, prop)] = v
                    if isinstance(v, (dict, list)):
                        before = set(self.props)
                        collect_props(v, self.props, self.types)
                        new_ids |= set(self.props) - before
            if new_ids:
                mount(new_ids, outputs_only=False)
            for cid, prop in list(flat):  # a graph's first drawing: plotly's autosize (relayoutData)
                if prop == "figure" and self.types.get(cid) == "Graph" and cid not in self.drawn:
                    self.drawn.add(cid)
                    if (cid, "relayoutData") in self.by_input:
                        flat[(cid, "relayoutData")] = {"autosize": True}
            changed(flat)

        if mounted:
            mount(mounted, outputs_only=True)
        changed(changes)
        while pending or executing:
            busy = set()
            for cb in [by_key[k] for k in pending] + list(executing.values()):
                busy |= self.downstream(cb)
            ready = [k for k in pending if not any(i in busy - set(by_key[k].graph_outputs) for i in by_key[k].inputs)]
            if not ready and not executing:  # a cycle of pending callbacks: the oldest goes first
                ready = [next(iter(pending))]
            for key in ready:
                cb, hit = by_key[key], pending.pop(key)
                if cb.clientside:
                    apply(self.clientside(cb, hit))
                elif len(executing) < BROWSER_CONNECTIONS:
                    executing[self.pool.submit(self.server_side, cb, hit)] = cb
                else:
                    pending[key] = hit
                    break
            if not executing:
                continue
            done, _ = wait(list(executing), return_when=FIRST_COMPLETED)
            for fut in done:
                executing.pop(fut)
                values, err = fut.result()
                if err and errors is not None:
                    errors.append(err)
                apply(values)

    def body(self, cb: Callback, hit: set) -> dict:
        """The request the renderer sends for ``cb`` (the page's values at this moment)."""
        def dep(d):
            return {"id": d["id"], "property": d["property"], "value": self.value(d["id"], d["property"])}

        outs = [{"id": i, "property": p} for i, p in cb.outputs]
        return {"output": cb.key, "outputs": outs if cb.key.startswith("..") else outs[0],
                "inputs": [dep(d) for d in cb.spec["inputs"]], "state": [dep(d) for d in cb.spec.get("state", [])],
                "changedPropIds": sorted(hit)}

    def server_side(self, cb: Callback, hit: set) -> tuple[dict, str | None]:
        r, err = self.request(cb.name, "POST", "/_dash-update-component", json=self.body(cb, hit))
        if err or r.status_code == 204:
            return {}, err
        out = r.json()
        values = out.get("response", {})
        for cid, vals in out.get("sideUpdate", {}).items():  # dash.set_props in a callback
            values.setdefault(cid, {}).update(vals)
        return values, None

    def dom(self) -> dict:
        """What the page scripts see of the DOM beyond the ids: each graph's drag mode."""
        msg = {"graphs": {cid: {"_fullLayout": {"dragmode": ((p.get("figure") or {}).get("layout") or {}).get("dragmode")},
                                "_hsOwnView": {}, "_hoverdata": [self.hover[cid]] if cid in self.hover else None}
                          for cid, p in self.props.items() if self.types.get(cid) == "Graph"}}
        if set(self.props) != self.ids_sent:
            self.ids_sent = set(self.props)
            msg["ids"], msg["attrs"] = sorted(self.props), self.attributes()
        return msg

    def attributes(self) -> dict:
        """The components' HTML attributes the page scripts may read (data-*, aria-*)."""
        return {cid: {k: v for k, v in p.items() if k.startswith(("data-", "aria-"))} for cid, p in self.props.items()
                if any(k.startswith(("data-", "aria-")) for k in p)}

    def clientside(self, cb: Callback, hit: set) -> dict:
        """Run a clientside callback in Node.js; its outputs and set_props as {id: {prop: value}}; the
        requests it made by fetch are sent (not awaited: the browser does not wait for them either)."""
        args = [self.value(i, p) for i, p in cb.inputs + cb.state]
        inputs = {f"{i}.{p}": self.value(i, p) for i, p in cb.inputs}
        trig = sorted(hit)
        context = {"triggered": [{"prop_id": t, "value": inputs.get(t)} for t in trig],
                   "triggered_id": trig[0].rsplit(".", 1)[0] if trig else None, "inputs": inputs,
                   "states": {f"{i}.{p}": self.value(i, p) for i, p in cb.state},
                   "inputs_list": [{"id": i, "property": p, "value": self.value(i, p)} for i, p in cb.inputs],
                   "states_list": [{"id": i, "property": p, "value": self.value(i, p)} for i, p in cb.state],
                   "outputs_list": ([{"id": i, "property": p} for i, p in cb.outputs] if cb.key.startswith("..")
                                    else {"id": cb.outputs[0][0], "property": cb.outputs[0][1]})}
        res = self.node.ask("call", user=self.user, ns=cb.clientside["namespace"], fn=cb.clientside["function_name"],
                            args=args, context=context, **self.dom())
        values = self.fetches(res)
        if res.get("prevent"):
            return values
        outs = res["out"] if cb.key.startswith("..") else [res["out"]]
        for (cid, prop), v in zip(cb.outputs, outs if isinstance(outs, list) else [outs]):
            if v != NO_UPDATE:
                values.setdefault(cid, {})[prop] = v
        return values

    def fetches(self, res: dict) -> dict:
        """Send the requests the page scripts made by fetch (in the background, as the browser does);
        their set_props as {id: {prop: value}}."""
        for url in res.get("fetches", []):
            path = "/" + re.sub(r"^(https?://[^/]+)?/*", "", url)
            self.extra.append(self.pool.submit(self.request, path.split("?")[0], "GET", path))
        values = {}
        for cid, props in res.get("setProps", []):
            values.setdefault(cid, {}).update(props)
        return values

    # -- a user's input --
    def interact(self, cid: str, prop: str, value) -> list[tuple[str, int | None]]:
        """The user sets ``cid.prop``; a click is on a point the mouse hovers first (hoverData, and
        the mousedown the page scripts listen to), and the mouse leaving a graph that clears its hover
        clears it. Returns the requests it sent."""
        self.sent, self.extra = [], []
        changes = {}
        if self.hovered and self.hovered != cid and self.value(self.hovered, "clear_on_unhover"):
            changes[(self.hovered, "hoverData")] = None
        self.hovered = None
        if prop == "clickData":
            point = value["points"][0]
            changes[(cid, "hoverData")] = {"points": [{**point, "bbox": {"x0": 0, "x1": 8, "y0": 0, "y1": 8}}]}
            self.hovered, self.hover[cid] = cid, point
            res = self.node.ask("mousedown", user=self.user, graph=cid, **self.dom())
            changes.update({(c, p): v for c, ps in self.fetches(res).items() for p, v in ps.items()})
        changes[(cid, prop)] = value
        self.run(changes)
        for fut in self.extra:
            fut.result()
        return list(self.sent)


# ---- what a user picks ------------------------------------------------------------------------
def pick_point(figure: dict | None, rng: random.Random, avoid=None) -> dict | None:
    """clickData (plotly's form) of a random point, among every trace's points that have customdata,
    other than ``avoid`` (the last one clicked)."""
    points = []
    for n, trace in enumerate((figure or {}).get("data") or []):
        cd = trace.get("customdata")
        if not isinstance(cd, list):
            continue
        for i, c in enumerate(cd):
            if trace.get("type") == "heatmap" and isinstance(c, list):  # customdata [row][col]
                points += [(n, trace, [i, j], c[j]) for j in range(len(c)) if c[j] != avoid]
            elif c is not None and c != avoid:
                points.append((n, trace, i, c))
    if not points:
        return None
    n, trace, i, cd = rng.choice(points)
    point = {"curveNumber": n, "pointNumber": i, "pointIndex": i, "customdata": cd}
    for axis, k in (("x", i[1] if isinstance(i, list) else i), ("y", i[0] if isinstance(i, list) else i)):
        if isinstance(trace.get(axis), list) and k < len(trace[axis]):
            point[axis] = trace[axis][k]
    return {"points": [point]}


def pick_value(props: dict, rng: random.Random):
    """Another value of a control: a slider's value on its step grid, another option of a choice."""
    now = props.get("value")
    if "options" in props:
        values = [o["value"] if isinstance(o, dict) else o for o in props["options"] or []]
        others = [v for v in values if v != now]
        return rng.choice(others) if others else None
    if "min" in props and "max" in props:
        step = props.get("step") or (props["max"] - props["min"]) / 100
        grid = [round(props["min"] + k * step, 10) for k in range(int(round((props["max"] - props["min"]) / step)) + 1)]
        others = [v for v in grid if now is None or abs(v - now) > step / 2]
        return rng.choice(others) if others else None
    return None


def next_input(page: Page, cid: str, prop: str, rng: random.Random):
    """The value the user gives ``cid.prop`` now (None: the page offers none)."""
    if cid not in page.props:
        return None
    if prop == "clickData":
        last = page.hover.get(cid)
        return pick_point(page.value(cid, "figure"), rng, None if last is None else last["customdata"])
    return pick_value(page.props[cid], rng)


# ---- the simulated user -----------------------------------------------------------------------
class Assets:
    """The page's own scripts (its /assets and inline scripts, in page order) and config, read once."""

    def __init__(self, base: str, path: str, auth, timeout: float):
        s = requests.Session()
        s.auth = auth
        text = s.get(base + path, timeout=timeout).text
        text = re.sub(r"<!--.*?-->", "", text, flags=re.S)  # e.g. the Internet Explorer warning
        self.scripts, self.renderer_at, self.config = [], None, {}
        for attrs, body in re.findall(r"<script([^>]*)>(.*?)</script>", text, flags=re.S):
            src = re.search(r'src="([^"]+)"', attrs)
            if 'id="_dash-config"' in attrs:
                self.config = json.loads(html_text.unescape(body))
            elif src and "dash-renderer" in src.group(1):
                self.renderer_at = len(self.scripts)
            elif src and "/assets/vendor/" in src.group(1):
                continue  # third-party libraries (plotly.js): they only draw
            elif src and "/assets/" in src.group(1):
                self.scripts.append(s.get(base + src.group(1).replace(self.config.get("requests_pathname_prefix", "/"),
                                                                      "/", 1), timeout=timeout).text)
            elif not src and body.strip() and "type=" not in attrs:
                self.scripts.append(body)
        if self.renderer_at is None:
            self.renderer_at = len(self.scripts)


def is_callback(kind: str) -> bool:
    """Whether a request kind is a server-side callback (not the page's own requests, not an /api query)."""
    return kind != "page" and not kind.startswith("/")


def user(n: int, base: str, run: str, assets: Assets, node: NodeScripts, stats: Stats, stop_at: float, auth,
         timeout: float, seed: int | None = None) -> None:
    """One user on the Explorer page: open it, then make the INTERACTIONS in random order until ``stop_at``."""
    s = requests.Session()
    s.auth = auth
    s.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=BROWSER_CONNECTIONS))
    page = Page(n, base, s, node, stats, timeout)
    rng = random.Random(seed)
    try:
        t = time.perf_counter()
        err = page.open(f"/?run={run}", assets.scripts, assets.renderer_at, assets.config)
        stats.add_interaction("page load", time.perf_counter() - t, page.sent, err)
        while err is None and time.monotonic() < stop_at:
            name = rng.choice(list(INTERACTIONS))
            cid, prop = INTERACTIONS[name]
            value = next_input(page, cid, prop, rng)
            if value is None:
                stats.add_interaction(name, 0.0, [], f"the page offers no value for {cid}.{prop}")
                time.sleep(0.5)
                continue
            t = time.perf_counter()
            sent = page.interact(cid, prop, value)
            bad = [f"{k}: {'no answer' if code is None else f'HTTP {code}'}" for k, code in sent
                   if code is None or code >= 400]
            problem = "; ".join(bad) or (None if any(is_callback(k) for k, _ in sent)
                                         else f"{cid}.{prop} fired no server-side callback")
            stats.add_interaction(name, time.perf_counter() - t, sent, problem)
    finally:
        page.close()


# ---- serving the stack locally (--serve) -------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{what} did not come up within {timeout:.0f} s")


def serve(stack: ExitStack, cache_dir: Path, run: str, gunicorn_workers: int, threads: int, logs: Path) -> str:
    """Start redis-server, a Celery worker and gunicorn on free localhost ports; return the app URL."""
    def start(name, cmd, env=None):
        log = (logs / f"{name}.log").open("w")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        stack.callback(lambda: (proc.terminate(), proc.wait(30)))
        return proc

    rport, aport = free_port(), free_port()
    broker = f"redis://127.0.0.1:{rport}/0"
    start("redis", ["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                    "--appendonly", "no", "--dir", str(logs)])
    env = {**os.environ, "HEADSCOPE_BROKER_URL": broker, "HEADSCOPE_CACHE": str(cache_dir),
           "HEADSCOPE_RUN": run, "PYTHONPATH": str(ROOT)}
    start("worker", [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool=threads",
                     "--concurrency=4", "-Q", "online,build", "--without-gossip", "--without-mingle"], env)
    start("gunicorn", [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{aport}", "--worker-class",
                       "gthread", "--workers", str(gunicorn_workers), "--threads", str(threads),
                       "--timeout", "120", "app.wsgi:server"], env)
    url = f"http://127.0.0.1:{aport}"
    wait_for(lambda: requests.get(url + "/healthz", timeout=5).json()["online"]["ok"],
             "the app with its worker (see logs in " + str(logs) + ")")
    return url


def load(url: str, run: str, users: int, seconds: float, auth=None, timeout: float = 90,
         seed: int | None = None) -> tuple[Stats, float]:
    """``users`` simulated users for ``seconds`` against the app at ``url``: (stats, seconds taken)."""
    node = NodeScripts()
    try:
        assets = Assets(url, f"/?run={run}", auth, timeout)
        stats = Stats()
        stop_at = time.monotonic() + seconds
        t = time.monotonic()
        threads = [threading.Thread(target=user, args=(n, url, run, assets, node, stats, stop_at, auth, timeout),
                                    kwargs={"seed": None if seed is None else seed + n})
                   for n in range(users)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        return stats, time.monotonic() - t
    finally:
        node.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running app, e.g. http://127.0.0.1:8050 (else use --serve)")
    ap.add_argument("--serve", action="store_true", help="start redis-server, a worker and gunicorn here")
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="runs directory, the one the app serves: the run is checked there first "
                         "(default $HEADSCOPE_CACHE or cache/)")
    ap.add_argument("--run", default="default", help="run to open (a name under --cache-dir)")
    ap.add_argument("--make-run", action="store_true",
                    help="with --serve: first write a synthetic run (test_vit, 40 images) named --run")
    ap.add_argument("--users", type=int, default=10, help="concurrent users (default 10)")
    ap.add_argument("--duration", type=float, default=30, help="seconds of load (default 30)")
    ap.add_argument("--warmup", type=float, default=0, help="seconds of unmeasured load first (default 0)")
    ap.add_argument("--timeout", type=float, default=90, help="per-request timeout in s (default 90)")
    ap.add_argument("--auth", default=None, help="user:password when the app asks for a login")
    ap.add_argument("--gunicorn-workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=8, help="gunicorn threads per worker (default 8)")
    ap.add_argument("--seed", type=int, default=None, help="seed of the users' random picks")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    if not args.url and not args.serve:
        ap.error("give --url of a running app or --serve")
    cache_dir = args.cache_dir or default_cache_dir()
    if args.make_run:
        from analysis.runs.synthetic import make_run

        make_run(cache_dir / args.run, n_images=40, model="test_vit", img_size=64)
    try:  # the run must be there (the users open it), and its size goes into the report
        run = open_run(cache_dir / args.run)
        facts = f"{len(run.images)} images, {int(run.model['depth'])} layers x {int(run.model['heads'])} heads"
    except HeadScopeError as err:
        where = "" if args.cache_dir else " (no --cache-dir given: looked in $HEADSCOPE_CACHE or cache/)"
        print(f"error: the load test reads run {args.run!r} from {cache_dir}{where} to check it, "
              f"and cannot: {err}\nGive --cache-dir DIR, the runs directory the app at {args.url or 'the stack'} "
              "serves (or a copy of it).", file=sys.stderr)
        return 2
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    with ExitStack() as stack:
        url = args.url or serve(stack, cache_dir.resolve(), args.run, args.gunicorn_workers, args.threads,
                                Path(tempfile.mkdtemp(prefix="headscope-load-")))
        if args.warmup > 0:
            load(url, args.run, args.users, args.warmup, auth, args.timeout, args.seed)
        stats, seconds = load(url, args.run, args.users, args.duration, auth, args.timeout, args.seed)
        print(f"HeadScope load test against {url}, run {args.run} ({facts})")
        print(report(stats, seconds, args.users))
        if args.json:
            args.json.write_text(json.dumps({"users": args.users, "seconds": seconds, **stats.summary(seconds),
                                             "sends": stats.sends}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
