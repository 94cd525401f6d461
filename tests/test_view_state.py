"""The view state, declared once (app/state.py): the URL parser, the canonical URL, the callback
guard's rule for sel and the checks against a run (issue 23 items 6, 7, 9; issue 25 item 3).

The browser's side (assets/url.js reads the declaration from the page) is tested in
tests/test_app_browser.py."""
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app import state
from app.callbacks import RULES
from app.state import parse_selection

SEL_RULE = RULES[("sel", "data")]
HUGE = ("999999999999999999", "99999999999999999999999", "2147483648", "1" * 5000, "-1", "-99999999999")
INJECTED = ("<script>alert(1)</script>", "'\"><img src=x onerror=alert(1)>", "../../etc/passwd", "a&b=c", "%00",
            "q1;drop", "NaN", "inf", "-inf", "1e999", "true", "[1]", "{}", "٣", "１２", "1_0", " 7 ", "0x10", "ⅷ")
RUN = state.RunFacts("r", frozenset(range(10)), layers=12, heads=6, metrics=("prob", "jsd"))


def notes_for(query: str) -> list[str]:
    return state.parse_query(query, "d")[1]


def the_note(notes: list[str], key: str) -> str:
    """The one note naming ``key`` (as "key=" or "key:")."""
    named = [n for n in notes if n.startswith((f"{key}=", f"{key}:"))]
    assert len(named) == 1, (key, notes)
    return named[0]


# ---- item 6: huge integers ----------------------------------------------------------------------
@pytest.mark.parametrize("query, key", [("?image=999999999999999999", "image"), ("?set=99999999999999999999999", "set"),
                                        ("?heads=0:99999999999", "heads"), ("?layer=2147483648", "layer"),
                                        ("?mode=99999999999999999", "mode")])
def test_huge_integers_are_dropped_with_a_note_and_the_guard_accepts_what_is_left(query, key):
    sel = parse_selection(query, "d")
    SEL_RULE(sel)  # before: parsed, then every callback refused with 400
    assert sel[key] is None
    assert query.partition("=")[2][:20] in the_note(notes_for(query), key)


# ---- item 7: long queries -------------------------------------------------------------------------
def test_a_long_query_reaches_the_parser_which_cuts_it_with_a_note():
    long_image = "?image=" + "7" * 5000
    for rule in (RULES[("url", "search")], RULES[("_pages_location", "search")]):
        rule(long_image)  # before: over 2,048 characters, the page router and parse_url answered 400
        rule("?set=" + ",".join(map(str, range(6000))))
    note = the_note(notes_for(long_image), "image")
    assert note.startswith("image=" + "7" * 40 + "…") and len(note) < 120  # shortened
    sel, notes = state.parse_query("?image=3&set=" + ",".join(map(str, range(6000))), "d")
    assert sel["image"] == 3 and sel["set"] == list(range(5000))
    assert the_note(notes, "set") == "set: 6000 images given, the first 5000 kept."
    over = "?image=3&heads=0:1&set=" + ",".join(map(str, range(20000))) + "&layer=2"
    sel, notes = state.parse_query(over, "d")
    assert len(over) > state.MAX_QUERY and sel["image"] == 3 and sel["layer"] is None
    assert f"only the first {state.MAX_QUERY} were read" in notes[0]
    SEL_RULE(sel)


# ---- item 9: no silent value ------------------------------------------------------------------------
@pytest.mark.parametrize("query, key", [
    ("?thr=q999", "thr"), ("?thr=a-5", "thr"), ("?thr=qNaN", "thr"), ("?thr=ainf", "thr"), ("?thr=q0", "thr"),
    ("?mode=99", "mode"), ("?d1=flat", "d1"), ("?color=rainbow", "color"), ("?scale=world", "scale"),
    ("?bins=sqrt", "bins"), ("?image=NaN", "image"), ("?layer=true", "layer"), ("?head=[1]", "head"),
    ("?image=" + quote("٣"), "image"), ("?layer=" + quote("١٢"), "layer"), ("?image=1_0", "image"),
    ("?run=../etc", "run"),
])
def test_an_invalid_value_is_dropped_and_its_note_names_the_key_and_the_value(query, key):
    sel = parse_selection(query, "d")
    # before: thr / mode / d1 / color / scale / bins were kept as given (tokens), the rest dropped silently
    assert sel[key] == ("d" if key == "run" else None)
    value = state.query_values(query)[key]
    assert the_note(notes_for(query), key).startswith(f"{key}={value} ignored: ")
    SEL_RULE(sel)


def test_a_head_set_with_one_bad_entry_keeps_the_good_ones_and_names_the_bad_one():
    assert parse_selection("?heads=0:1,1:x,2:3", "d")["heads"] == [[0, 1], [2, 3]]  # before: the whole set dropped
    assert "'1:x'" in the_note(notes_for("?heads=0:1,1:x,2:3"), "heads")


def test_cut_head_sets_say_so():
    many = ",".join(f"{l}:{h}" for l in range(12) for h in range(6))
    sel = parse_selection(f"?heads={many}", "d")
    assert len(sel["heads"]) == 64 and sel["heads"][-1] == [10, 3]
    assert the_note(notes_for(f"?heads={many}"), "heads") == "heads: 72 heads given, the first 64 kept."


def test_image_ids_are_ascii_digits_only():
    query = "?set=1_0," + quote(" 7 ") + "," + quote("٣") + ",5"
    assert parse_selection(query, "d")["set"] == [5]  # before: [3, 5, 7, 10] (Python's int())
    assert "3 of 4 entries ignored ('1_0', ' 7 ', '٣')" in the_note(notes_for(query), "set")


def test_values_the_run_lacks_are_dropped_with_a_note():
    sel = state.parse_selection("?image=42&layer=3&head=6&metric=bogus&heads=0:1,12:0&set=2,11,12,13,14", "r")
    judged, notes = state.judge(sel, RUN)
    assert [judged[k] for k in ("image", "layer", "head", "metric", "heads", "set")] == [
        None, None, None, None, [[0, 1]], [2]]
    assert the_note(notes, "set") == "set: 4 of 5 ids ignored (11, 12, 13 …): not in run r."
    assert "run r has no such image (ids 0–9)" in the_note(notes, "image")
    assert "heads 0–5" in the_note(notes, "head")
    assert "prob, jsd" in the_note(notes, "metric")
    assert "12:0" in the_note(notes, "heads")
    good = state.parse_selection("?image=4&layer=11&head=5&metric=jsd&heads=0:1", "r")
    assert state.judge(good, RUN) == (good, [])


@pytest.mark.parametrize("text, parsed", [("q1", ("q", 0.01)), ("q100", ("q", 1.0)), ("a0", ("a", 0.0)),
                                          ("a1.5e-7", ("a", 1.5e-7)), ("q.5", ("q", 0.005)),
                                          ("q0", None), ("q100.1", None), ("a1.01", None), ("a-0", None),
                                          ("aNaN", None), ("qinf", None), ("q1e999", None), ("b1", None),
                                          ("q", None), ("q 1", None), ("q١", None)])
def test_the_threshold_grammar(text, parsed):
    assert state.parse_threshold_text(text) == (parsed and (parsed[0], pytest.approx(parsed[1])))
    assert state.parse_threshold(text) == (parsed or ("q", 0.01))


def test_the_guard_rule_for_sel_is_the_declaration():
    SEL_RULE({"run": "r", "image": state.MAX_INT, "layer": 0, "head": 4095, "set": [0, state.MAX_INT]})
    for bad in ({"image": state.MAX_INT + 1}, {"image": -1}, {"image": True}, {"layer": 4096}, {"mode": 8},
                {"thr": "q0"}, {"d1": "flat"}, {"set": [1] * 5001}, {"heads": [[0, 1, 2]]}, {"zoom": 1},
                {"metric": "<b>"}, {"run": "../x"}):
        with pytest.raises(ValueError):
            SEL_RULE(bad)


# ---- properties --------------------------------------------------------------------------------------
def _value():
    ints = st.integers(min_value=-(10 ** 30), max_value=10 ** 30).map(str)
    listed = st.lists(st.one_of(ints, st.sampled_from(INJECTED)), max_size=8).map(",".join)
    pairs = st.lists(st.tuples(ints, ints).map(":".join), max_size=8).map(",".join)
    return st.one_of(st.text(max_size=60), ints, st.sampled_from(HUGE + INJECTED), listed, pairs,
                     st.from_regex(r"[qa]-?[0-9.eE+-]{0,8}|[qa](nan|inf|NaN)", fullmatch=True))


QUERIES = st.one_of(
    st.text(max_size=300),
    st.lists(st.tuples(st.sampled_from(state.STATE_KEYS + ("zz",)), _value()), max_size=12).map(
        lambda kv: "?" + "&".join(f"{quote(k)}={quote(v)}" if i % 2 else f"{k}={v}" for i, (k, v) in enumerate(kv))),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(QUERIES)
def test_any_query_gives_a_valid_state_and_notes_never_an_exception(query):
    sel, notes = state.parse_query(query, "d")
    assert list(sel) == list(state.STATE_KEYS)
    SEL_RULE(sel)  # nothing the parser gives is refused by the guard
    assert sel["run"] is not None
    assert all(isinstance(n, str) and len(n) < 400 for n in notes)  # long values are shortened
    for k, v in state.query_values(query).items():  # a value given and not taken is named
        taken = sel.get(k) == v if k == "run" else sel.get(k) is not None
        if k in state.STATE and not taken and v.strip(","):
            assert any(n.startswith((f"{k}=", f"{k}:")) for n in notes), (k, query, notes)


def _state_values():
    ints = {k.name: st.integers(k.lo, k.hi) for k in state.STATE.values() if k.kind == "int"}
    numbers = st.floats(min_value=0, max_value=1, allow_nan=False)
    by_kind = {
        "run": st.from_regex(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,20}", fullmatch=True),
        "token": st.from_regex(state.TOKEN, fullmatch=True),
        "thr": st.one_of(numbers.map(lambda v: f"a{v!r}"),
                         st.floats(min_value=1e-9, max_value=100).map(lambda v: f"q{v!r}")),
        "ids": st.lists(st.integers(0, state.MAX_INT), min_size=1, max_size=40, unique=True).map(sorted),
        "heads": st.lists(st.tuples(st.integers(0, state.MAX_INDEX), st.integers(0, state.MAX_INDEX)), min_size=1,
                          max_size=state.MAX_HEADS, unique=True).map(lambda hs: [list(h) for h in sorted(hs)]),
        "runs": st.lists(st.from_regex(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,20}", fullmatch=True), min_size=1,
                         max_size=state.MAX_RUNS, unique=True),
    }
    return st.fixed_dictionaries({
        k.name: (by_kind["run"] if k.kind == "run" else st.none() | (
            ints[k.name] if k.kind == "int" else st.sampled_from(k.choices) if k.kind == "choice" else by_kind[k.kind]))
        for k in state.STATE.values()})


@settings(max_examples=300, deadline=None)
@given(_state_values())
def test_valid_states_round_trip_through_the_canonical_url(sel):
    SEL_RULE(sel)
    assert state.parse_query(state.selection_query(sel), "d") == (sel, [])
