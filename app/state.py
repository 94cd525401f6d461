"""The Explorer's view state, declared once: one ``Key`` per state key (its name is its URL key).

Everything about the state is derived from ``STATE``: the URL parser (``parse_query``: query
string -> state + notes on what was ignored), the canonical URL (``selection_query``), the callback
guard's rule for ``sel`` and the ``k-*`` parts (``check_state``, app/callbacks.py), the threshold
grammar (``parse_threshold``), the checks against a run (``judge``) and the declaration the browser
reads from the page (``browser_spec``: assets/url.js builds the URL from it, the Explorer's
clientside callbacks its parts and control defaults). Add a key here and it is in the URL, the
guard and the browser.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlencode

from analysis.metrics import registry
from analysis.metrics.head_sets import MAX_SET_HEADS
from analysis.models.pruning import MODE_LABELS

from . import config

MAX_INT = 2 ** 31 - 1     # no integer in the state is larger (the guard uses the same bound)
MAX_INDEX = 4095          # layers and heads
MAX_SET = 5000            # images in a set
MAX_HEADS = MAX_SET_HEADS  # heads in a head set (64)
MAX_RUNS = 16             # runs the Compare page compares
MAX_QUERY = 65536         # characters of a query string read; the rest is ignored with a note
MAX_URL = 2 * 1024 * 1024  # characters of a URL the guard lets through to the parser (Chromium's limit)
SHOWN = 40                # characters of an ignored value a note shows
TOKEN = re.compile(r"[A-Za-z0-9_.:-]{1,40}")
DIGITS = re.compile(r"[0-9]{1,12}")
NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]{1,3})?"
THRESHOLD = re.compile(rf"([qa])({NUMBER})")


class Invalid(ValueError):
    """A state value that the pages would not accept (the message says what is expected)."""


@dataclass(frozen=True)
class Key:
    """One state key: ``kind`` is "run", "int", "token", "choice", "thr", "ids" (image ids),
    "heads" ([layer, head] pairs) or "runs" (run names, in their order); ``lo``/``hi`` bound integers; ``default`` is what an absent key
    means (the controls show it; the state holds None for it)."""
    name: str
    kind: str
    doc: str
    default: object = None
    lo: int = 0
    hi: int = MAX_INT
    choices: tuple = field(default=())

    # ---- one value, as the callbacks carry it -------------------------------------------------
    def check(self, v) -> None:
        """Raise Invalid unless ``v`` (not None) is a value of this key."""
        if self.kind == "run":
            problem = config.name_problem(v) if isinstance(v, str) else "expected a run name"
            if problem:
                raise Invalid(problem)
        elif self.kind == "int":
            _integer(v, self.lo, self.hi)
        elif self.kind == "token":
            if not (isinstance(v, str) and TOKEN.fullmatch(v)):
                raise Invalid("expected a name of letters, digits, '_', '.', ':', '-' (at most 40)")
        elif self.kind == "choice":
            if v not in self.choices:
                raise Invalid(f"expected one of {', '.join(self.choices)}")
        elif self.kind == "thr":
            if not isinstance(v, str) or parse_threshold_text(v) is None:
                raise Invalid("expected q<percent> (0 < percent <= 100) or a<value> (0 <= value <= 1)")
        elif self.kind == "ids":
            if not isinstance(v, list) or len(v) > MAX_SET:
                raise Invalid(f"expected a list of at most {MAX_SET} image ids")
            for i in v:
                _integer(i, 0, MAX_INT)
        elif self.kind == "heads":
            if not isinstance(v, list) or len(v) > MAX_HEADS:
                raise Invalid(f"expected a list of at most {MAX_HEADS} [layer, head]")
            for pair in v:
                if not (isinstance(pair, list) and len(pair) == 2):
                    raise Invalid("expected [layer, head]")
                for x in pair:
                    _integer(x, 0, MAX_INDEX)
        elif self.kind == "runs":
            if not isinstance(v, list) or not 0 < len(v) <= MAX_RUNS or len(set(v)) < len(v):
                raise Invalid(f"expected a list of at most {MAX_RUNS} different run names")
            for name in v:
                problem = config.name_problem(name) if isinstance(name, str) else "expected a run name"
                if problem:
                    raise Invalid(problem)
        else:
            raise AssertionError(f"unknown kind {self.kind!r} of state key {self.name!r}")

    def accepts(self, v) -> bool:
        try:
            self.check(v)
        except Invalid:
            return False
        return True

    # ---- the URL -----------------------------------------------------------------------------
    def parse(self, text: str) -> tuple[object, list[str]]:
        """The URL's text -> (value or None, notes on what was ignored)."""
        if self.kind in ("ids", "heads", "runs"):
            return self._parse_list(text)
        try:
            value = self._scalar(text)
            self.check(value)
        except Invalid as err:
            return None, [ignored(self.name, text, str(err))]
        return value, []

    def _scalar(self, text: str):
        if self.kind == "int":
            if not DIGITS.fullmatch(text):
                raise Invalid(f"expected a whole number {self.lo}–{self.hi} in ASCII digits")
            return int(text)
        return text

    def _parse_list(self, text: str) -> tuple[list | None, list[str]]:
        items = [t for t in text.split(",") if t != ""]
        good, bad = {}, []  # dict: the first of duplicates, in the URL's order
        for item in items:
            try:
                if self.kind == "runs":
                    if config.name_problem(item):
                        raise Invalid
                    value = item
                elif self.kind == "ids":
                    if not DIGITS.fullmatch(item):
                        raise Invalid
                    value = int(item)
                    _integer(value, 0, MAX_INT)
                else:
                    parts = item.split(":")
                    if len(parts) != 2 or not all(DIGITS.fullmatch(p) for p in parts):
                        raise Invalid
                    value = tuple(int(p) for p in parts)
                    for x in value:
                        _integer(x, 0, MAX_INDEX)
                good[value] = None
            except Invalid:
                bad.append(item)
        notes = []
        if bad:
            what = {"ids": f"image ids: whole numbers 0–{MAX_INT}", "heads": f"layer:head, whole numbers 0–{MAX_INDEX}",
                    "runs": "run names (letters, digits, '_', '.', '-')"}[self.kind]
            shown = ", ".join(repr(short(b)) for b in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            notes.append(f"{self.name}: {len(bad)} of {len(items)} entries ignored ({shown}): expected {what}.")
        cap, unit = {"ids": (MAX_SET, "images"), "heads": (MAX_HEADS, "heads"), "runs": (MAX_RUNS, "runs")}[self.kind]
        values = list(good) if self.kind == "runs" else sorted(good)  # the runs' order is the comparison's
        if len(values) > cap:
            notes.append(f"{self.name}: {len(values)} {unit} given, the first {cap} kept.")
            values = values[:cap]
        out = [list(h) for h in values] if self.kind == "heads" else list(values)
        return out or None, notes

    def text(self, v) -> str:
        """A value -> its URL text (lists joined as ``join`` says)."""
        return _join(v, self.join)

    @property
    def join(self) -> list[str]:
        """How a list value is written: outer separator first (ids "1,2"; heads "0:4,11:5")."""
        return {"ids": [","], "heads": [",", ":"], "runs": [","]}.get(self.kind, [])


def _integer(v, lo: int, hi: int) -> int:
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise Invalid(f"expected a whole number {lo}–{hi}")
    return v


def _join(v, seps: list[str]) -> str:
    if isinstance(v, (list, tuple)):
        return seps[0].join(_join(x, seps[1:]) for x in v)
    return str(v)


def short(text: str) -> str:
    """``text`` as a note shows it: at most SHOWN characters, then "…"."""
    return text if len(text) <= SHOWN else text[:SHOWN] + "…"


def ignored(key: str, value, why: str) -> str:
    """The note for a dropped value: key, the value (shortened) and what was expected."""
    return f"{key}={short(str(value))} ignored: {why.rstrip('.')}."


# ---- the declaration ------------------------------------------------------------------------------
STATE: dict[str, Key] = {k.name: k for k in (
    Key("run", "run", "the run shown (a name under the cache directory)"),
    Key("image", "int", "the selected image id"),
    Key("layer", "int", "the selected head's layer", hi=MAX_INDEX),
    Key("head", "int", "the selected head within its layer", hi=MAX_INDEX),
    Key("mode", "int", "the pruning mode B3 shows", default=1, hi=len(MODE_LABELS) - 1),
    Key("metric", "token", "the metric shown: B1's importance metric on the Explorer, the compared metric on "
                           "Compare (the page's default when absent)"),
    Key("thr", "thr", "D3-D5's threshold: q1 = top 1 %, a0.05 = value >= 0.05", default="q1"),
    Key("d1", "choice", "D1's layout: CLS or patch attention", default="cls", choices=("cls", "patch")),
    Key("d1s", "choice", "D1's style", default="points", choices=("points", "both", "contours")),
    Key("color", "choice", "A's colour", default="class", choices=("class", "prob", "correct", "head")),
    Key("scale", "choice", "D3/D4's shared colour scale", default="layer", choices=("layer", "image", "run")),
    Key("bins", "choice", "D5's bins", default="log", choices=("log", "linear")),
    Key("scope", "choice", "the images B1's band, C3 and D1 are restricted to", default="set",
        choices=("set", "class", "wrong")),
    Key("set", "ids", "the selected set of image ids (A's lasso)"),
    Key("heads", "heads", "the head set pruned at once"),
    Key("runs", "runs", "the runs the Compare page shows side by side, in order (the head-level views: the first two)"),
)}
STATE_KEYS = tuple(STATE)  # the built-in keys (the app reads names(), which sees keys added later)

# The parts of the state the Explorer's views listen to: sel is split into the stores k-<part>
# (app/explorer/), so that a view is redrawn only when a part it reads changes. "color"
# holds the selected head too while A is coloured by it.
PARTS: dict[str, tuple[str, ...]] = {
    "image": ("run", "image"), "head": ("run", "layer", "head"), "metric": ("run", "metric"), "thr": ("thr", "bins"),
    "d1": ("d1", "d1s"), "mode": ("mode",), "color": ("color",), "set": ("set", "scope"), "scale": ("scale",),
    "run": ("run",),
}
PART_WHEN = {"color": {"if": ["color", "head"], "keys": ["metric", "layer", "head"]}}
STATE_PARTS = tuple(PARTS)


def names() -> tuple[str, ...]:
    return tuple(STATE)


def check_state(v, keys=None) -> None:
    """The guard's rule for ``sel`` and its parts: an object of declared keys, each None or valid."""
    allowed = names() if keys is None else keys
    if not isinstance(v, dict) or not set(v) <= set(allowed):
        raise Invalid(f"expected an object with keys among {', '.join(allowed)}")
    for k, value in v.items():
        if value is not None:
            try:
                STATE[k].check(value)
            except Invalid as err:
                raise Invalid(f"{k}: {err}") from None


# ---- the URL ------------------------------------------------------------------------------------
def parse_query(search: str | None, default_run: str | None) -> tuple[dict, list[str]]:
    """URL query string -> (state with every declared key, notes): each invalid or out-of-range
    value is None and named in a note; cut lists and a cut query say so. Never raises."""
    search = (search or "").lstrip("?")
    notes = []
    if len(search) > MAX_QUERY:
        notes.append(f"The query string has {len(search)} characters: only the first {MAX_QUERY} were read.")
        search = search[:MAX_QUERY].rpartition("&")[0]
    q = query_values(search)
    sel = {}
    for name, key in STATE.items():
        value, why = key.parse(q[name]) if name in q else (None, [])
        sel[name] = value
        notes += why
    if sel["run"] is None:
        sel["run"] = default_run
    return sel, notes


def query_values(search: str) -> dict[str, str]:
    """{key: its last non-empty value} of a query string, decoded (what parse_query reads)."""
    return {k: v[-1] for k, v in parse_qs(search.lstrip("?")).items()}


def parse_selection(search: str | None, default_run: str | None) -> dict:
    """URL query string -> the state (parse_query without its notes)."""
    return parse_query(search, default_run)[0]


def selection_query(sel: dict | None) -> str:
    """State -> canonical query string ("?run=..&image=.."; "" when empty), keys in declaration
    order: the inverse of parse_query. The browser writes the same string (assets/url.js)."""
    pairs = [(k, key.text(v)) for k, key in STATE.items()
             if (v := (sel or {}).get(k)) is not None and v != [] and v != ""]
    return "?" + urlencode(pairs, safe=",:") if pairs else ""


@dataclass(frozen=True)
class RunFacts:
    """What the state is judged against once its run is open."""
    name: str
    image_ids: frozenset
    layers: int
    heads: int
    metrics: tuple        # importance metrics (B1's)
    scalars: tuple = ()   # every scalar head metric (Compare's): importance, properties, run-level


def run_facts(index) -> RunFacts:
    """The facts of an open run (app.data.RunIndex: name, image_ids, L, H, importance, head_metrics)."""
    return RunFacts(index.name, frozenset(int(i) for i in index.image_ids), index.L, index.H, tuple(index.importance),
                    tuple(index.head_metrics))


def judge(sel: dict, run: RunFacts | None, compared: dict | None = None) -> tuple[dict, list[str]]:
    """Drop the values ``run`` does not have (an image id, a layer or head, a metric), with notes.
    On the Compare page, ``compared`` = {name: its RunFacts, or why it cannot be opened} for each run
    of ``sel["runs"]``: the runs that cannot be opened are dropped, and the metric is judged as
    Compare's (a scalar metric of one of those runs) instead of B1's. ``run`` None: not judged."""
    sel, notes = dict(sel), []
    if compared is not None:
        sel, notes = _judge_compared(sel, compared)
    if run is None:
        return sel, notes
    if sel.get("image") is not None and sel["image"] not in run.image_ids:
        notes.append(ignored("image", sel["image"], f"run {run.name} has no such image "
                                                     f"(ids {min(run.image_ids)}–{max(run.image_ids)})"
                     if run.image_ids else f"run {run.name} has no images"))
        sel["image"] = None
    for k, n in (("layer", run.layers), ("head", run.heads)):
        if sel.get(k) is not None and sel[k] >= n:
            notes.append(ignored(k, sel[k], f"run {run.name} has {k}s 0–{n - 1}"))
            sel["layer"] = sel["head"] = None
    if compared is None and sel.get("metric") is not None and sel["metric"] not in run.metrics:
        shown = ", ".join(run.metrics[:8]) + (", …" if len(run.metrics) > 8 else "")
        what = ("B1 shows importance metrics only" if sel["metric"] in run.scalars  # e.g. from Compare
                else f"run {run.name} has no metric of that name")
        notes.append(ignored("metric", sel["metric"], f"{what} ({shown})"))
        sel["metric"] = None
    if sel.get("set"):
        kept = [i for i in sel["set"] if i in run.image_ids]
        if len(kept) < len(sel["set"]):
            out = [str(i) for i in sel["set"] if i not in run.image_ids]
            notes.append(f"set: {len(out)} of {len(sel['set'])} ids ignored ({', '.join(out[:3])}"
                         f"{' …' if len(out) > 3 else ''}): not in run {run.name}.")
            sel["set"] = kept or None
    if sel.get("heads"):
        kept = [h for h in sel["heads"] if h[0] < run.layers and h[1] < run.heads]
        if len(kept) < len(sel["heads"]):
            out = [f"{l}:{h}" for l, h in sel["heads"] if [l, h] not in kept]
            notes.append(f"heads: {', '.join(out[:3])}{' …' if len(out) > 3 else ''} ignored: run {run.name} has "
                         f"layers 0–{run.layers - 1}, heads 0–{run.heads - 1}.")
            sel["heads"] = kept or None
    return sel, notes


def _judge_compared(sel: dict, compared: dict) -> tuple[dict, list[str]]:
    """Compare's part of judge(): the runs of ``sel["runs"]`` that cannot be opened, and a metric
    that none of the compared runs has (any registered scalar metric when no runs are named)."""
    sel, notes = dict(sel), []
    if sel.get("runs"):
        for name in sel["runs"]:
            if not isinstance(compared.get(name), RunFacts):
                notes.append(ignored("runs", name, str(compared.get(name) or "the run cannot be opened")))
        sel["runs"] = [r for r in sel["runs"] if isinstance(compared.get(r), RunFacts)] or None
    metric = sel.get("metric")
    if metric is not None:
        facts = [compared[r] for r in sel.get("runs") or []]
        known = ({m for f in facts for m in f.scalars} if facts
                 else {m.name for m in registry.metrics(value="scalar")})
        if metric not in known:
            where = (f"none of the compared runs ({', '.join(f.name for f in facts)}) has a scalar metric of that name"
                     if facts else "no scalar metric has that name")
            notes.append(ignored("metric", metric, where))
            sel["metric"] = None
    return sel, notes


# ---- the threshold grammar ----------------------------------------------------------------------
def parse_threshold_text(thr: str) -> tuple[str, float] | None:
    """"q1" -> ("q", 0.01) (top 1 %); "a0.05" -> ("a", 0.05) (value >= 0.05); None if invalid."""
    m = THRESHOLD.fullmatch(thr) if isinstance(thr, str) and len(thr) <= 40 else None
    if m is None:
        return None
    kind, v = m[1], float(m[2])
    if kind == "q" and math.isfinite(v) and 0 < v <= 100:
        return "q", v / 100
    if kind == "a" and 0 <= v <= 1:
        return "a", v
    return None


def parse_threshold(thr: str | None) -> tuple[str, float]:
    """The state's threshold, or the declared default when absent or invalid."""
    return parse_threshold_text(thr) or parse_threshold_text(STATE["thr"].default)


# ---- the browser's copy, read from the page --------------------------------------------------------
def browser_spec() -> dict:
    """The declaration as the browser reads it (assets/url.js: window.hsUrl.spec())."""
    longest = {"ids": MAX_SET, "heads": MAX_HEADS, "runs": MAX_RUNS}
    return {"keys": [{"name": k.name, "join": k.join, "default": k.default, "max": longest.get(k.kind)}
                     for k in STATE.values()],
            "parts": {p: list(keys) for p, keys in PARTS.items()}, "partWhen": PART_WHEN}
