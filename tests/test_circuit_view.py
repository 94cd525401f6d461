"""The circuit and sinks panels of view D and the Heads page's direct-vs-total scatter, without a
browser: their data functions against plain references written here (Python loops, explicit norms
and attention sums) and against the engine's public API (head_paths, direct_effects, which
tests/test_circuits.py holds to autograd and full forwards), on a synthetic run with a real random
ViT. The browser tests are in tests/test_circuit_browser.py."""
import numpy as np
import pandas as pd
import pytest
import torch

from analysis import direct_effects, head_paths
from analysis.errors import OnlineError
from analysis.serving import transport
from analysis.serving.service import MAX_EXACT_EDGES, ModelService
from app.callbacks import RULES, Invalid
from app.panels import circuit, sinks
from conftest import make_synthetic_run as make_run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def in_process(monkeypatch):
    monkeypatch.delenv("HEADSCOPE_BROKER_URL", raising=False)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(service, run dir, image id, vit, image [3, H, W], label) of a 2-image synthetic run of test_vit."""
    run = make_run(tmp_path_factory.mktemp("circuit") / "tiny", n_images=2, n_classes=4, model="test_vit",
                   img_size=32, seed=0)
    service = ModelService(device="cpu")
    image, label = service.image(run, 1)
    return service, run, 1, service.vit(run), image, label


def plain_top(scores, k, threshold=0.0):
    """The k largest-|value| forward edges of scores [L, H (b), L, H (a)], by a loop over every pair."""
    L, H = scores.shape[:2]
    edges = [(al, ah, bl, bh, float(scores[bl, bh, al, ah])) for bl in range(L) for bh in range(H)
             for al in range(L) for ah in range(H)
             if al < bl and scores[bl, bh, al, ah] != 0 and abs(scores[bl, bh, al, ah]) >= threshold]
    return sorted(edges, key=lambda e: -abs(e[4]))[:k]


def test_top_edges_and_top_heads_match_a_plain_loop():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(4, 3, 4, 3))
    assert circuit.top_edges(scores, 7) == plain_top(scores, 7)
    assert circuit.top_edges(scores, 100, threshold=1.0) == plain_top(scores, 100, threshold=1.0)
    assert all(e[0] < e[2] for e in circuit.top_edges(scores, 100))  # never backwards or within a layer
    direct = rng.normal(size=(4, 3))
    plain = sorted([(l, h, direct[l, h]) for l in range(4) for h in range(3)], key=lambda t: -abs(t[2]))
    assert circuit.top_heads(direct, 5) == [(l, h, float(v)) for l, h, v in plain[:5]]
    # a backbone's small exact set: into the head, from the earlier heads with the largest |direct|
    into = circuit.backbone_edges(direct, (2, 1), 4)
    earlier = sorted([(l, h) for l in range(2) for h in range(3)], key=lambda t: -abs(direct[t]))[:4]
    assert into == [[l, h, 2, 1] for l, h in earlier]


def test_the_circuit_payload_is_the_engines_eap_direct_and_exact_paths(served):
    service, run, image_id, vit, image, label = served
    stored = service.circuit(run, image_id)  # a synthetic run stores (made-up) direct_logit: the panel shows those
    assert stored["direct_stored"]
    np.testing.assert_allclose(np.array(stored["direct"], float), service.run(run).dense("direct_logit")[image_id])
    opened = service.run(run)
    opened.__dict__["metrics"] = [m for m in opened.metrics if m != "direct_logit"]  # a run without them
    out = service.circuit(run, image_id)
    assert out["classifier"] and out["label"] == label and not out["direct_stored"]
    ref = direct_effects(vit, image[None], [label])
    direct = np.array(out["direct"], float)
    np.testing.assert_allclose(direct, ref["direct_logit"].to_numpy().reshape(vit.depth, vit.num_heads), atol=1e-6)
    for via in ("q", "k", "v", "qkv"):
        eap = head_paths(vit, image, label, via=via, method="eap")
        eap = eap[eap.path_logit_eap != 0]
        want = eap.reindex(eap.path_logit_eap.abs().sort_values(ascending=False, kind="stable").index)[:10]
        got = circuit.top_edges(circuit.via_scores(out["eap"], via), 10)
        assert [e[:4] for e in got] == [tuple(int(v) for v in r) for r in want.iloc[:, :4].to_numpy()], via
        np.testing.assert_allclose([e[4] for e in got], want.path_logit_eap, rtol=1e-9, atol=1e-12)

    # exact values of the shown edges: path patching, relabelled in the figure
    shown = circuit.top_edges(circuit.via_scores(out["eap"], "k"), 6)
    res = service.circuit_exact(run, image_id, [list(e[:4]) for e in shown], "k")
    exact = head_paths(vit, image, label, via="k", method="exact", edges=[(e[:2], e[2:4]) for e in shown])
    assert res["name"] == "path_logit"
    relabelled = circuit.with_exact(shown, res["rows"])
    assert [e[:4] for e in relabelled] == [e[:4] for e in shown]
    by_edge = {tuple(int(v) for v in r[:4]): r[4] for r in exact.to_numpy()}
    np.testing.assert_allclose([e[4] for e in relabelled], [by_edge[e[:4]] for e in shown], rtol=1e-5, atol=1e-6)
    with pytest.raises(Exception, match="1-64 edges"):
        service.circuit_exact(run, image_id, [[0, 0, 1, 0]] * (MAX_EXACT_EDGES + 1), "qkv")

    fig = circuit.circuit_figure(direct, relabelled, circuit.top_heads(direct, 3), edge_label=circuit.EXACT_LABEL[
        "path_logit"], direct_label="direct_logit", selected=(1, 0), head_set=[[0, 1]])
    mids = next(t for t in fig["data"] if t.get("name") == "edges")
    assert mids["customdata"] == [list(e[:4]) for e in relabelled]
    assert all("path_logit (exact, path patching)" in t for t in mids["text"])
    nodes = next(t for t in fig["data"] if t.get("name") == "heads")
    assert nodes["marker"]["color"] == direct.ravel().tolist()
    H = vit.num_heads
    assert nodes["customdata"][H + H - 1] == [1, H - 1]  # x = layer, y = head, row-major
    assert sum(t.get("line", {}).get("dash") == "dot" for t in fig["data"]) == 3  # a -> logit edges


def test_run_mean_circuit_puts_each_stored_edge_at_receiver_then_sender():
    class Stored:
        L, H = 3, 2

        def circuit_mean(self, via):
            assert via == "v"
            return pd.DataFrame({"a_layer": [0, 1], "a_head": [1, 0], "b_layer": [2, 2], "b_head": [0, 1],
                                 "path_logit_eap": [0.5, -0.25]})

    scores = circuit.run_mean_circuit(Stored(), "v")
    assert scores[2, 0, 0, 1] == 0.5 and scores[2, 1, 1, 0] == -0.25 and np.count_nonzero(scores) == 2
    assert circuit.top_edges(scores, 5) == [(0, 1, 2, 0, 0.5), (1, 0, 2, 1, -0.25)]


def test_the_sinks_payload_against_plain_norms_and_attention_sums(served):
    service, run, image_id, vit, image, _ = served
    out = service.sinks(run, image_id, factor=1.01)  # a low f: the tiny random model (4 patches) has some
    T = vit.num_prefix_tokens
    with torch.no_grad():
        x, norms = vit.embed(image[None]), []
        for layer in range(vit.depth):
            norms.append(torch.linalg.vector_norm(x[0].double(), dim=-1))
            x = vit.block(layer, x)
        norms.append(torch.linalg.vector_norm(x[0].double(), dim=-1))
        A = vit.capture_attention(image[None])[0].double()  # [L, H, N, N]
    np.testing.assert_allclose(np.array(out["norms"], float), torch.stack(norms).numpy(), rtol=1e-5)
    np.testing.assert_allclose(np.array(out["prefix_share"], float), A[:, :, T:, :T].sum(-1).mean(-1).numpy(),
                               atol=1e-6)
    n = np.array(out["norms"], float)
    high = sinks.high_norm_mask(n, T, 1.01)
    for l in range(n.shape[0]):  # the rule, row by row: above f x numpy's median of the patch tokens
        assert high[l].tolist() == [v > 1.01 * np.median(n[l, T:]) for v in n[l, T:]]
    assert high.any() and high[:vit.depth].sum(1).tolist() == out["high_norm_count"]
    share = [[float((A[l, h, T:, T:] * torch.as_tensor(high[l])).sum(-1).mean()) for h in range(vit.num_heads)]
             for l in range(vit.depth)]
    np.testing.assert_allclose(np.array(out["high_norm_share"], float), share, atol=1e-6)
    np.testing.assert_allclose(sinks.norm_ratio(n, T)[:, T:].max(1), n[:, T:].max(1) / np.median(n[:, T:], 1))

    # the run's f: its stored norms and sink metrics, through the app's transport (in-process here)
    stored = transport.sinks(run, image_id)
    opened = service.run(run)
    assert stored["stored"] and stored["factor"] == opened.manifest["params"]["high_norm_factor"]
    np.testing.assert_allclose(np.array(stored["norms"], float), opened.token_norms(image_id), rtol=1e-6)
    np.testing.assert_allclose(np.array(stored["prefix_share"], float), opened.dense("prefix_share")[image_id])
    with pytest.raises(OnlineError, match="a_layer, a_head, b_layer, b_head"):
        transport.circuit_exact(run, image_id, [[0, 1, 2]])

    fig = sinks.norms_figure(n, T, high, vit.grid, 1.01)
    ring = fig["data"][1]
    assert sorted(zip(ring["y"], ring["x"])) == sorted((l, p + T) for l, p in zip(*np.nonzero(high)))
    over = sinks.image_figure(n[2], T, high[2], vit.grid, None, "")
    assert len(over["layout"]["shapes"]) == int(high[2].sum())


def test_the_heads_scatter_places_run_means_and_names_where_a_head_lies(served):
    import sys

    from app import create_app, data

    _, run, *_ = served
    create_app(run.parent, run.name)  # the pages register with an app
    heads = sys.modules["app.pages.heads"]
    total = np.array([1.0, 1.0, 0.05, -1.0, 1.0, -1.0])
    direct = np.array([0.0, 0.9, 1.0, 0.05, -0.8, -1.1])
    assert heads.effect_regions(total, direct).tolist() == ["through later heads", "acts directly", "cancels",
                                                            "through later heads", "cancels", "acts directly"]
    fig, note = heads.heads_effects({"run": run.name, "layer": 1, "head": 1})
    index = data.get_index(run.name)
    drop, dl = np.nanmean(index.values("logit_drop"), 0), np.nanmean(index.values("direct_logit"), 0)
    points = {(l, h): (x, y) for t in fig["data"] if t.get("name") in heads.EFFECT_REGIONS
              for (l, h), x, y in zip(t["customdata"], t["x"], t["y"])}
    assert len(points) == index.L * index.H and {t["name"] for t in fig["data"][:3]} == set(heads.EFFECT_REGIONS)
    for (l, h), (x, y) in points.items():
        assert x == pytest.approx(drop[l * index.H + h], rel=1e-5) and y == pytest.approx(dl[l * index.H + h], rel=1e-5)
    assert fig["data"][-1]["x"] == [points[(1, 1)][0]]  # the selected head ringed
    assert "through later heads" in str(note)


def test_the_guard_takes_the_panels_inputs():
    assert RULES[("circ-exact", "data")]({"image": 3, "layer": 1, "head": 0, "source": "image", "via": "q", "k": 20,
                                          "thr": 0}) is None
    for bad in ({"image": "x"}, {"via": "z"}, {"other": 1}, [1]):
        with pytest.raises(Invalid):
            RULES[("circ-exact", "data")](bad)
    assert RULES[("circ-graph", "clickData")]({"points": [{"customdata": [1, 2, 3, 4]}]}) is None
    with pytest.raises(Invalid):
        RULES[("circ-graph", "clickData")]({"points": [{"customdata": [1, 2, 3]}]})
    with pytest.raises(Invalid):
        RULES[("circ-k", "value")](65)
