"""The saliency panel's pieces without a browser: what it says while maps compute online, the
deletion slider's step, and the note that says which maps a model cannot have."""
from app.panels import saliency


def _text(component) -> str:
    children = getattr(component, "children", None)
    if isinstance(children, str):
        return children
    return " ".join(_text(c) for c in (children if isinstance(children, list) else [children]) if c is not None
                    and not isinstance(c, (int, float)))


def test_the_panel_says_what_it_computes_while_it_computes():
    views = [c for c in _flatten(saliency.panel()) if "view-loading" in (getattr(c, "className", None) or "").split()]
    ids = [[getattr(g, "id", None) for g in _flatten(v.children)] for v in views]
    assert any("sal-graph" in i for i in ids) and any("sal-deletion" in i for i in ids)
    notes = [_text(n) for v in views for n in _flatten(v.children)
             if "view-loading-note" in (getattr(n, "className", None) or "")]
    assert any("once per patch" in t and "--patch-maps" in t for t in notes), notes
    assert any("deletion curves" in t for t in notes), notes


def _flatten(children):
    out = []
    for c in children if isinstance(children, list) else [children]:
        out.append(c)
        inner = getattr(c, "children", None)
        if inner is not None and not isinstance(inner, str):
            out += _flatten(inner)
    return out


def test_the_slider_steps_on_the_computed_counts():
    assert saliency._slider_step([0, 4, 8, 12]) == 4
    assert saliency._slider_step([0, 16, 32, 48, 64]) == 16
    assert saliency._slider_step([0, 16, 32, 48, 64, 80, 96, 112, 128, 143, 159]) == 1  # uneven: any n


def test_a_backbone_run_says_why_grad_rollout_is_missing():
    backbone = {"target": None, "num_prefix_tokens": 1}
    note = saliency._absent_note(backbone, {"occlusion": 0, "token_drop": 0, "rollout": 0})
    assert "gradient rollout" in _text(note) and "cosine distance" in _text(note)
    assert saliency._absent_note({"target": 3, "num_prefix_tokens": 1}, dict.fromkeys(saliency.MAPS)) is None
    no_cls = _text(saliency._absent_note({"target": 3, "num_prefix_tokens": 0}, {"occlusion": 0}))
    assert "rollouts" in no_cls and "gradient" not in no_cls
