"""The metric registry: every per-image x head and per-head quantity of a run, declared once.

The cache schema (``analysis.runs.schema``), the engine's per-batch arrays (``engine.analyse_batch``),
the tables and ``head_summary`` (``analysis.runs.tables``), the run reader's dense arrays, and the
app's dropdowns, legends, axis titles, the Heads page and the Help page are all derived from it.

Adding a metric = one compute function + one ``register_metric(Metric(...))`` call, e.g.::

    def max_attention(vit, layer, A, batch):            # A: [B, H, N, N] post-softmax, unpruned
        return A.amax(dim=(-2, -1))                      # -> [B, H]

    register_metric(Metric(
        name="max_attention", label="max attention", unit="",
        meaning="the largest single attention weight of the head",
        formula=r"$\\max_{u,v} A[u, v]$",
        group="pattern", compute=OnAttention(max_attention)))

Compute hooks (how the engine / the merge obtain the values; see ``engine.analyse_batch``):

* ``OnAttention(fn)``: ``fn(vit, layer, A [B,H,N,N], batch) -> [B,H]`` (``[B,H,K]`` for a vector),
  torch or numpy, called for every block during the engine's single unpruned pass.
* ``OnBatch(fn)``: ``fn(vit, images [B,3,H,W], labels LongTensor [B] or None, batch) ->
  {name: [B,L,H(,K)]}`` for quantities needing passes of their own (gradients, ablations). One
  function may fill several metrics: declare each with the same ``OnBatch`` object (called once).
* ``OnRun(fn)`` (``level="head"``): ``fn(arrays) -> [L, H]`` (or ``[L*H]``) evaluated when the
  run's tables are written; ``arrays`` = {metric name: [n_images, L, H(,K)]} of the whole run, plus
  the engine arrays the writer is given as ``inputs`` (the build passes ``patch_bits``).

``batch`` (``engine.Batch``) gives hooks ``batch.images``, ``batch.labels`` (-1 = unknown replaced
by 0; ``needs_label`` metrics are set to NaN there afterwards), ``batch.options`` (build options,
e.g. ``q``; ``label_known``: bool [B], which images have a true label, None without labels), ``batch.memo(key, compute)`` to share work between hooks of a batch, and
``batch.take_attention_pass()`` (an OnBatch hook that runs an unpruned forward anyway passes it as
that forward's attention hook, so the OnAttention metrics need no pass of their own). OnAttention
hooks run under ``torch.inference_mode``; OnBatch hooks with autograd available.

Values: ``"scalar"`` (float32 column, NaN = missing), ``"vector"`` (list<float32> column, dense
``[..., K]``), ``"category"`` (string column, dense object array; hooks return str arrays, "" =
missing; needs ``summary=False``). ``summary=True`` gives ``head_summary`` the columns
``<name>_mean`` and ``<name>_std`` (population std, ddof=0, over images; a vector gets
``<name>_mean`` only, the mean vector). A metric with ``stage`` set is computed only when the build
enables that stage (``BuildConfig.stages``); a run lists what it has in ``manifest["metrics"]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from analysis.columns import RESERVED_COLUMNS

LEVELS = ("image_head", "head")
VALUES = ("scalar", "vector", "category")
MODEL_KINDS = frozenset({"classifier", "backbone"})


@dataclass(frozen=True, eq=False)
class OnAttention:
    """``fn(vit, layer, A [B,H,N,N], batch) -> [B,H] or [B,H,K]`` on every unpruned block."""
    fn: Callable


@dataclass(frozen=True, eq=False)
class OnBatch:
    """``fn(vit, images, labels, batch) -> {name: [B,L,H(,K)]}``; shared by the metrics it fills."""
    fn: Callable


@dataclass(frozen=True, eq=False)
class OnRun:
    """``fn(arrays: {name: [n,L,H(,K)]}) -> [L,H]`` at table-writing time (level="head")."""
    fn: Callable


@dataclass(frozen=True)
class Metric:
    """One declared quantity. ``name`` is its column (head_metrics for level "image_head",
    head_summary for level "head"); ``label`` the short UI label (legends, titles); ``axis`` the
    axis title (default: label and unit); ``meaning`` one line (dropdown hint, Help); ``formula``
    the Help text (Markdown + MathJax); ``important``: "high" / "low" = an importance metric where
    a high / low value marks an important head (B1, Heads), None = a head property (C1, Heads);
    ``exact=False`` labels it "approximate" everywhere; ``applies_to`` the model kinds with values
    (others get NaN); ``needs_label``: NaN for images without a known true label; ``range``: the
    value range axes use (None: automatic); ``stage``: the build option that switches it on (None:
    always computed)."""
    name: str
    label: str
    meaning: str
    formula: str
    compute: OnAttention | OnBatch | OnRun
    unit: str = ""
    axis: str | None = None
    level: str = "image_head"
    value: str = "scalar"
    important: str | None = None
    group: str = "property"
    exact: bool = True
    applies_to: frozenset = MODEL_KINDS
    needs_label: bool = False
    summary: bool = True
    stage: str | None = None
    range: tuple[float, float] | None = None

    def __post_init__(self):
        object.__setattr__(self, "applies_to", frozenset(self.applies_to))
        problems = [
            (not self.name.isidentifier(), "name must be an identifier (it is a column name)"),
            (self.level not in LEVELS, f"level must be one of {LEVELS}"),
            (self.value not in VALUES, f"value must be one of {VALUES}"),
            (self.important not in ("high", "low", None), 'important must be "high", "low" or None'),
            (not self.applies_to or not self.applies_to <= MODEL_KINDS, f"applies_to must be a subset of {set(MODEL_KINDS)}"),
            (self.level == "head" and not isinstance(self.compute, OnRun), 'level="head" needs compute=OnRun(fn)'),
            (self.level == "image_head" and isinstance(self.compute, OnRun), "OnRun is for level=\"head\" metrics"),
            (self.value == "category" and self.summary, "a category metric has no mean: use summary=False"),
            (self.important is not None and self.value != "scalar", "an importance metric must be scalar"),
        ]
        for bad, message in problems:
            if bad:
                raise ValueError(f"Metric {self.name!r}: {message}.")

    @property
    def is_importance(self) -> bool:
        return self.important is not None

    @property
    def title(self) -> str:
        """Axis title: ``axis`` or label (unit), 'approx.' for approximations."""
        text = self.axis or (f"{self.label} ({self.unit})" if self.unit else self.label)
        return text if self.exact else f"{text} (approx.)"

    @property
    def option(self) -> str:
        """Dropdown text: 'name · meaning' (+ approximate)."""
        return f"{self.name} · {self.meaning}" + ("" if self.exact else " (approximate)")

    def summary_columns(self) -> list[str]:
        """Its columns in head_summary."""
        if self.level == "head":
            return [self.name]
        if not self.summary:
            return []
        return [f"{self.name}_mean"] if self.value == "vector" else [f"{self.name}_mean", f"{self.name}_std"]


_REGISTRY: dict[str, Metric] = {}


def register_metric(metric: Metric, *, replace: bool = False) -> Metric:
    """Declare ``metric`` (see the module docstring). Raises ValueError when the name is taken
    (pass replace=True to redeclare it) or collides with a fixed table column. Returns it."""
    if metric.name in RESERVED_COLUMNS:
        raise ValueError(f"Metric name {metric.name!r} is a fixed column of the run tables; choose another name.")
    if metric.name in _REGISTRY and not replace:
        raise ValueError(f"Metric {metric.name!r} is already registered (pass replace=True to redeclare it).")
    _REGISTRY[metric.name] = metric
    return metric


def unregister_metric(name: str) -> None:
    """Remove a metric (tests that register toy metrics undo them with this)."""
    _REGISTRY.pop(name, None)


def get_metric(name: str) -> Metric:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"No metric {name!r} is registered (known: {', '.join(_REGISTRY)}).") from None


def metrics(level: str | None = None, *, value: str | None = None, importance: bool | None = None,
            names: Iterable[str] | None = None) -> list[Metric]:
    """Registered metrics in declaration order, optionally filtered (``names``: keep only those)."""
    keep = None if names is None else set(names)
    return [m for m in _REGISTRY.values()
            if (level is None or m.level == level) and (value is None or m.value == value)
            and (importance is None or m.is_importance == importance) and (keep is None or m.name in keep)]


def computed_metrics(level: str, stages: Iterable[str] = ()) -> list[Metric]:
    """The metrics of ``level`` a build computes with these optional ``stages`` enabled."""
    stages = set(stages)
    return [m for m in metrics(level) if m.stage is None or m.stage in stages]
