"""Help: every number in the dashboard in plain words, with its formula (SPEC.md)."""
from __future__ import annotations

import dash
import numpy as np
from dash import dcc, html

from analysis.metrics.patterns import pattern_scores
from analysis.metrics import registry
from app import figures as F

dash.register_page(__name__, path="/help", name="Help", title="HeadScope · Help", order=5)

TEXT = r"""
## What HeadScope shows

HeadScope explains the attention heads of a Vision Transformer (ViT), following Li et al.,
*How Does Attention Work in Vision Transformers? A Visual Analytics Attempt* (IEEE TVCG 2023).
A ViT with $L$ blocks ("layers") and $H$ heads per block cuts an image into a $g_h \times g_w$ grid
of $P$ patches and adds $T$ prefix tokens (the CLS token, sometimes register tokens), so it works on
$N = T + P$ tokens. Head $h$ of layer $l$ computes an $N \times N$ attention matrix $A$: row = the
**source** (query) token, column = the **target** (key) token, every row sums to 1.
Layers and heads are numbered from 0.

The Explorer shows four linked views (the paper's Fig. 1). Selecting an image or a head in any view
updates all the others; the selection is kept in the page address, so you can share a view as a link.

| view | what it shows |
|---|---|
| **A** Image overview | every image placed by its head-importance vector (see *Layouts*), coloured by class |
| **B1** Head importance | the chosen metric for all $L \cdot H$ heads: mean ± std over all images, and the selected image's curve |
| **B2** Pruning modes | the metric when only some regions of the selected head are removed (computed live) |
| **B3** Top-5 | the five most likely classes under the chosen pruning mode; the true label in **bold** |
| **C1** Strength overview | every head of the image: x = layer, y = strength entropy |
| **C2** k-hop strength | how much attention a patch gives, on average, to a patch $k$ hops away |
| **C3** Entropy distribution | the selected head's strength entropy over all images; the line is the selected image |
| **D1** Pattern layout | all heads of all images by attention pattern (CLS vectors or patch latents) |
| **D2** Masks | the image, the patches that attend to a target token, the patches a source token attends to |
| **D3** Two-axis view | source tokens on top, target tokens below, a segment per attention value above the threshold |
| **D4** Heatmap | the attention matrix; the CLS row and column are drawn wider |
| **D5** Histogram | all $N^2$ attention values and the top-$q$ threshold used by D3 and D4 |
| **circuit** (switch over D3) | the selected image's circuit: heads by layer, edges $a \to b$ by their path value, nodes by direct effect (see *Head-to-head paths and circuits*) |
| **sinks** (switch over D3) | the selected image's token norms across layers, its high-norm tokens over the image, the selected head's prefix_share and high_norm_share |
| **D6** Saliency (switch over D3) | which patches matter for the prediction: occlusion, token drop, attention rollout and gradient rollout maps over the image, how much they agree (Spearman), and their deletion curves; computed online while shown, at once for runs built with `--patch-maps` |

Colours: blue = attention that involves the CLS token, orange = patch-to-patch attention, darker =
stronger. Layers use the cividis scale (dark blue = first layer, yellow = last) in every view.
Class colours use the colour-blind-safe Okabe-Ito / "Safe" palettes.

## Pruning a head

To *prune* head $(l, h)$, HeadScope sets entries of its attention matrix to zero **after** the softmax
(no renormalisation) and runs the rest of the network unchanged. The matrix has three regions:

* **R1** prefix → prefix (CLS → CLS, the CLS token's self-attention),
* **R2** prefix → patches and patches → prefix (the CLS ↔ patch interaction, both directions),
* **R3** patches → patches.

A **pruning mode** is a set of regions to remove. The eight modes:

| mode | removed | meaning |
|---|---|---|
| 0 | none | the original head |
| 1 | R1+R2+R3 | the whole head (used by every metric below unless stated) |
| 2 | R1 | CLS self-attention only |
| 3 | R2 | CLS ↔ patch interaction only |
| 4 | R3 | patch ↔ patch attention only |
| 5 | R1+R2 | everything CLS-related |
| 6 | R1+R3 | CLS self-attention and patch ↔ patch |
| 7 | R2+R3 | everything but CLS self-attention |

Modes 0–5 are the paper's Fig. 4; 6 and 7 complete the set.

{metrics}

## Head-to-head paths and circuits
A head can matter directly (what it writes is read by the classifier) or through later heads. For heads
$a = (i, h_a)$ and $b = (j, h_b)$ with $i < j$, "$b$ reads without $a$" means head $b$'s query, key and value are
computed from $\mathrm{norm1}_j(x_j - c_a)$ (block $j$'s input minus what $a$ wrote), while every other head and
module of block $j$ reads the clean $x_j$; blocks $j..L-1$ are then recomputed.
* **path_logit** (exact, path patching; logit units) — $\mathrm{logit}_y(x) - \mathrm{logit}_y(x \mid b \text{ reads
  without } a)$: how much of the true class's logit flows from $a$ through $b$. Positive: $a$ helps the class through
  $b$. One partial forward per edge. **path_emb** (backbones): the cosine distance of the pooled embeddings instead.
* **Q / K / V** — $b$ reads without $a$ only in its query (which tokens it looks from), its key (which tokens it
  looks at) or its value (what it copies): the Q-, K- and V-composition of Elhage et al. 2021. **QKV**: all three at once.
* **path_logit_eap** (**approximate**, edge attribution patching, Syed et al. 2023; classifiers) —
  $\sum_{\text{tokens}} \langle g_b, c_a \rangle$ with $g_b = \partial\,\mathrm{logit}_y / \partial$ (the copy of $x_j$ only
  $b$ reads) at the clean point; for Q, K or V the copy only $b$'s query, key or value reads, and QKV the sum of the
  three. One forward and one backward give every edge of an image. *When it misleads:* it is the first-order
  (linear) term of path_logit. Removing $c_a$ is not a small change when $a$ writes a lot, and the attention's
  softmax and the norms bend the response: edges can be mis-ranked or even change sign. The build's circuits stage
  reports its Spearman agreement with the exact values over each sampled image's edges (median and quartiles); the
  circuit view's "exact values for the shown edges" replaces the estimates by path patching, and every edge label says
  which it is.
* **Circuit** of an image — the graph of heads and the logit (a backbone: the embedding) with edges $a \to b$
  weighted by the path value and $a \to$ logit by direct_logit. The circuit view draws the $k$ edges with the largest
  |value| (at least the threshold), width by |value|, blue positive, red negative; the **run mean** is the mean of
  path_logit_eap over the run's images (the build's `--circuits` stage).
* **Direct vs total (Heads page)** — each head's run-mean logit_drop (x, total) against its run-mean direct_logit
  (y). By the angle $\alpha$ of the point (total, direct), folded into $[0°, 180°)$: within 22.5° of the x axis
  (direct ≈ 0) the head acts **through later heads**; within 22.5° of the diagonal (direct ≈ total) it **acts
  directly**; otherwise (near the y axis, or direct and total of opposite sign) later blocks **cancel** what it
  writes. The split is a reading aid, not a test.

## Token norms and attention sinks
* **Token norm** — $n[x, l, t] = \lVert x_l[t] \rVert_2$, the L2 norm of token $t$ in block $l$'s input stream
  ($l = 0..L$; $l = L$ is the stream after the last block, before the final norm). The sinks view draws
  $n$ as layers × tokens (prefix tokens first) and one block's patch-token norms over the image.
* **High-norm tokens** use a factor $f$ (the run's, 3 by default, changeable in the sinks view): patch
  tokens above $f$ × the median patch-token norm of that block. *When it misleads:* $f$ is a convention; a token just
  under the line is not different in kind, and a model whose norms grow smoothly has none at any sensible $f$ while
  its heads may still attend to the largest ones. Read the heatmap, not only the marks.

## Several heads at once

* **Head set** — a set $S$ of heads (each with its regions) pruned together in one forward; prob,
  prob_drop, jsd and emb_dist are the formulas above with that $P'$.
* **Pair interaction** — for metric $m$ (prob_drop or emb_dist) and heads $a, b$:
  $m(\lbrace a, b \rbrace) - m(\lbrace a \rbrace) - m(\lbrace b \rbrace)$. Positive: the pair matters more together than apart (one
  backs the other up); negative: their effects overlap.
* **Cumulative pruning curve (Curves page)** — for an order of the $L \cdot H$ heads (least important
  first) the first $k$ heads are pruned (whole heads, zero ablation) for $k$ from 0 to $L \cdot H$; the
  curve is top-1 accuracy and mean $P'(y)$ (mean emb_dist for a backbone) over the run's labelled
  images. Orders: **exact** (ascending run mean of prob_drop, emb_dist for a backbone), **taylor**
  (ascending run mean of grad_score: *approximate*), **random** (seeded; mean and range over 3 orders).
  **Area**: under the curve with $k$ scaled to $[0, 1]$. **Heads before a 1-point drop**: the largest $k$
  of the grid with accuracy within 0.01 of the unpruned model's at every step up to it.
* **Taylor agreement** (manifest `taylor_agreement`) — Spearman's rank correlation of taylor_prob_drop
  (and grad_score) with prob_drop over the $L \cdot H$ heads, per image (median and quartiles over
  images) and of the run means.

## Attention patterns

* **CLS vector** — the CLS token's attention row and column joined: $[A[0, :], A[T{:}, 0]]$, length
  $N + P$. It says what the CLS token reads and which patches read the CLS token.
* **Top-q binarisation** — the patch block $A[T{:}, T{:}]$ with its top $q$ fraction of values set to 1 and
  the rest to 0 ($q = 1\%$ by default). It keeps the *shape* of the pattern (diagonal, shifted diagonal,
  vertical stripes, blocks) and drops the magnitude.
* **Threshold in D3–D5** — the same idea for viewing: only attention values in the top $q$ (set on
  the D5 histogram) are drawn.
* **Autoencoder layout** — a small convolutional autoencoder (encoder: two convolution layers and one
  fully connected layer; the decoder mirrors it) is trained to reproduce all binarised patch matrices of
  the run ($\text{images} \times L \times H$ of them). Its bottleneck codes ("patch latents") summarise
  each head's pattern; heads with similar patterns get similar codes.

## Layouts

All 2-D layouts are t-SNE maps (nearby points = similar vectors; distances between far-apart clusters
mean little):

* **Image overview (A)** — each image's $L \cdot H$ vector of prob values, so images that depend on
  the same heads sit together.
* **CLS vectors (D1)** — every head of every image by its CLS vector.
* **Patch latents (D1)** — every head of every image by its autoencoder code. Heads that do the same
  thing on every image (content-agnostic, typical of low layers) form tight islands; content-dependent
  heads (higher layers) spread out.

## Tips

* Start with no image selected: B1 shows which heads matter on average (mean ± std band).
* Click an image in A, then a peak (or dip, for prob) in B1: B2 tells you *which region* of the head
  matters, C tells you *how far* its attention reaches, D shows *what* it attends to.
* Hover a token on D3's top axis to see, in D2, where that token looks; hover a token on the bottom
  axis to see who looks at it.
"""



# Prose that opens a metric group's section on this page (groups without one get a plain heading).
GROUP_INTROS = {
    "importance": ("Head importance metrics", r"""
Let $P(x)$ be the model's predicted class distribution for image $x$, $y$ its true label, and $P'$ the
distribution with the head pruned (mode 1).
""", r"""
Exact metrics are leave-one-out: the network is really re-run with one head removed. Heads are
removed one at a time, so two heads that can stand in for each other may each look unimportant.
Metrics marked *approximate* estimate an effect instead of measuring it.
"""),
    "strength": ("Attention strength", r"""
Only patch tokens have a position, so strength uses the patch → patch block $A[T{:}, T{:}]$.
The **hop distance** between patches $(r_1, c_1)$ and $(r_2, c_2)$ is $\max(|r_1 - r_2|, |c_1 - c_2|)$: the
8 patches around a patch are 1 hop away, the ring around those 2 hops, and so on.
""", ""),
    "semantic": ("Semantic concentration", "", ""),
    "direct": ("Direct and total effect", r"""
The stream after the last block is the sum of what every piece wrote (embedding, each head's $c_{l,h}$, output
biases, MLPs); the read-out with its norm scales frozen is affine, so each piece's **direct** effect is its own term.
The **total** effect (logit_drop) re-runs the network without the head.
""", r"""
*When they mislead:* the direct effect holds every norm's $1/\sigma$ at its clean value, so a head that matters by
changing the stream's scale shows up as indirect; zero ablation (pruning) removes the head's mean output too, so the
total effect includes "being off-distribution". Compare with mean ablation on the Heads page when the run has it.
"""),
    "sinks": ("Attention sinks", r"""
Heads often park attention on tokens without image content: the CLS or register tokens, or a few background patches
whose stream norm grows far above the others (Darcet et al. 2024). The token norms behind these are described in
*Token norms and attention sinks* above.
""", ""),
}


def metric_item(m) -> str:
    """One registry entry as a Help bullet: name, label, unit, kind, formula."""
    facts = [m.label] + ([m.unit] if m.unit else [])
    if m.important:
        facts.append(f"{m.important} = important")
    if not m.exact:
        facts.append("**approximate**")
    if m.level == "head":
        facts.append("one value per head")
    if m.applies_to != {"classifier", "backbone"}:
        facts.append("classifier models only" if m.applies_to == {"classifier"} else "backbones only")
    return f"* **{m.name}** ({'; '.join(facts)}) — {m.formula}"


def metrics_text() -> str:
    """The metric sections, one per registry group, in registry order."""
    groups: dict[str, list] = {}
    for m in registry.metrics():
        groups.setdefault(m.group, []).append(m)
    parts = []
    for group, ms in groups.items():
        title, before, after = GROUP_INTROS.get(group, (group.replace("_", " ").capitalize(), "", ""))
        parts.append(f"## {title}\n{before}\n" + "\n".join(metric_item(m) for m in ms) + f"\n{after}")
    return "\n".join(parts)


EXAMPLE_GRID = (5, 5)


def pattern_examples(grid=EXAMPLE_GRID) -> dict[str, np.ndarray]:
    """A hand-made binarised patch matrix E (bool [P, P], row = source, column = target) per basic
    pattern (the paper's Fig. 13) on ``grid``: each patch attends to the patch above it (a diagonal
    with an offset); to the patches at least 2 to its right in its row (horizontal); every patch to
    the same ceil(0.1 P) patches (vertical); the patches of each 2x2 block to one another (block)."""
    gh, gw = grid
    P = gh * gw
    r, c = np.divmod(np.arange(P), gw)
    same_row = r[:, None] == r[None, :]
    vertical = np.zeros((P, P), bool)
    vertical[:, np.linspace(0, P - 1, -(-P // 10)).astype(int)] = True
    same_block = ((r[:, None] // 2 == r[None, :] // 2) & (c[:, None] // 2 == c[None, :] // 2)
                  & (r[:, None] // 2 < gh // 2) & (c[:, None] // 2 < gw // 2))
    return {"diagonal with an offset (above)": (r[None, :] == r[:, None] - 1) & (c[None, :] == c[:, None]),
            "horizontal": same_row & (c[None, :] - c[:, None] >= 2),
            "vertical": vertical,
            "block": same_block & ~np.eye(P, dtype=bool)}


def pattern_example_figures(grid=EXAMPLE_GRID) -> list[tuple[str, dict, dict]]:
    """(title, pattern_scores, figure) of each example, scored by analysis.pattern_scores."""
    out = []
    for title, E in pattern_examples(grid).items():
        scores = pattern_scores(E, grid)
        out.append((title, scores, F.pattern_example(E, grid, scores, title)))
    return out


PATTERN_TEXT = r"""
## The four basic patterns

The paper sums up the patch → patch patterns it found into four (its Fig. 13). Each drawing below is
a hand-made binarised patch matrix (row = source patch, column = target patch, orange = kept) on a
5 × 5 grid, with the label and scores HeadScope's `pattern_scores` gives it (SPEC "Attention pattern
labels"): **diagonal** (every patch looks at its neighbour at one offset, e.g. the patch above: a shifted
diagonal), **horizontal** (patches look along their row), **vertical** (all patches look at the same few
patches: columns), **block** (patches of a region look at one another). D1 can colour every head by
its label ("by pattern").
"""


def layout(**_query):
    text = TEXT.replace("{metrics}", metrics_text())
    examples = [html.Div(dcc.Graph(figure=fig, config={"displayModeBar": False}, style={"height": "300px"}),
                         className="pattern-example", id=f"pattern-example-{i}")
                for i, (_, _, fig) in enumerate(pattern_example_figures())]
    return html.Div([dcc.Markdown(text, mathjax=True, className="help-text"),
                     dcc.Markdown(PATTERN_TEXT, className="help-text"),
                     html.Div(examples, className="pattern-examples")], className="help-page")
