"""Online serving in one process: the one result cache (single flight, failures not kept), the
per-model locks that cache hits do not wait behind, OnlineError in the HeadScopeError family,
and a run replaced in place answered with the new run's numbers (app index and /api)."""
import shutil
import threading

import numpy as np
import pytest

from analysis.errors import HeadScopeError, OnlineError
from analysis.serving import transport as online
from analysis.serving.service import ModelService, ResultCache
from conftest import make_synthetic_run as make_run

WAIT = 60  # s before a test calls a thread stuck (a deadlock), not a speed limit


@pytest.fixture(autouse=True)
def in_process(monkeypatch):
    monkeypatch.delenv("HEADSCOPE_BROKER_URL", raising=False)


def test_online_error_is_a_headscope_error():
    assert issubclass(OnlineError, HeadScopeError) and online.OnlineError is OnlineError
    with pytest.raises(HeadScopeError, match="must be integers"):
        online.attention("/nowhere", "x", 0, 0)


def test_result_cache_single_flight_and_no_waiting_for_other_keys():
    cache, release, started, calls = ResultCache(max_items=2), threading.Event(), threading.Event(), []

    def slow():
        calls.append("slow")
        started.set()
        assert release.wait(WAIT)
        return "slow value"

    cache.get(("hit",), lambda: "cached value")
    got = []
    first = threading.Thread(target=lambda: got.append(cache.get(("slow",), slow)))
    second = threading.Thread(target=lambda: got.append(cache.get(("slow",), slow)))
    first.start()
    assert started.wait(WAIT)
    second.start()
    assert cache.get(("hit",), lambda: pytest.fail("recomputed")) == "cached value"  # no wait behind "slow"
    release.set()
    first.join(WAIT)
    second.join(WAIT)
    assert got == ["slow value", "slow value"] and calls == ["slow"]  # computed once for both callers
    with pytest.raises(ZeroDivisionError):
        cache.get(("bad",), lambda: 1 / 0)
    assert cache.get(("bad",), lambda: "fixed") == "fixed"  # a failure is not kept
    assert len(cache) == 2  # LRU bound


def test_a_computing_model_blocks_neither_cache_hits_nor_other_models(tmp_path, monkeypatch):
    import analysis.metrics.importance as importance

    a = make_run(tmp_path / "a", n_images=2, model="test_vit", img_size=32, seed=0)
    b = make_run(tmp_path / "b", n_images=2, model="vit_tiny_patch16_224", img_size=32, seed=1)
    service = ModelService(cache=ResultCache())
    cached = service.attention(a, 0, 0, 0)
    real, entered, release = importance.partial_pruning, threading.Event(), threading.Event()

    def blocked(vit, *args, **kw):
        if vit.depth == 6:  # test_vit, run a's model
            entered.set()
            assert release.wait(WAIT)
        return real(vit, *args, **kw)

    monkeypatch.setattr(importance, "partial_pruning", blocked)
    busy = threading.Thread(target=service.partial_pruning, args=(a, 0, 0, 0))
    busy.start()
    try:
        assert entered.wait(WAIT)  # model a is computing, holding its lock
        done = []
        others = [threading.Thread(target=lambda: done.append(service.attention(a, 0, 0, 0) is cached)),
                  threading.Thread(target=lambda: done.append(len(service.partial_pruning(b, 1, 0, 0)["rows"])))]
        for t in others:
            t.start()
        for t in others:
            t.join(WAIT)
        assert sorted(done, key=str) == [8, True]  # both answered while a's compute still waits
        assert busy.is_alive()
    finally:
        release.set()
        busy.join(WAIT)


def test_results_are_copies_and_the_app_process_caches_once(tmp_path):
    run = make_run(tmp_path / "r", n_images=2, model="test_vit", img_size=32)
    first = online.attention(run, 1, 0, 1)
    first["attention"] = None  # a caller changing its answer does not change the cache
    again = online.attention(run, 1, 0, 1)
    assert again["attention"].shape == (5, 5)
    assert online.local_service().cache is None  # in-process, the transport's cache is the only one


def test_a_run_replaced_in_place_gets_the_new_models_numbers_in_the_app(tmp_path):
    from app import create_app, data

    a = make_run(tmp_path / "a", n_images=3, model="test_vit", img_size=32, seed=0)
    b = make_run(tmp_path / "b", n_images=3, model="vit_tiny_patch16_224", img_size=32, seed=1)
    swap = tmp_path / "swap"
    shutil.copytree(a, swap)
    client = create_app(tmp_path, "swap").server.test_client()
    q = "?run=swap&image=0&layer=0&head=0"

    def api(query):
        r = client.get(f"/api/{query}{q}")
        assert r.status_code == 200, r.json
        return r.json

    old = api("attention"), api("partial_pruning"), data.get_index("swap").manifest["model"]["name"]
    shutil.rmtree(swap)
    shutil.copytree(b, swap)
    new = api("attention"), api("partial_pruning"), data.get_index("swap").manifest["model"]["name"]
    reference = ModelService()
    expected = reference.attention(b, 0, 0, 0), reference.partial_pruning(b, 0, 0, 0)
    from analysis.serving.service import decode_array

    np.testing.assert_allclose(np.array(new[0]["attention"]), decode_array(expected[0]["attention"]).astype(float))
    assert new[1]["rows"] == expected[1]["rows"] != old[1]["rows"]
    assert (old[2], new[2]) == ("test_vit", "vit_tiny_patch16_224")
    np.testing.assert_allclose(data.attention("swap", 0, 0, 0)["attention"], np.array(new[0]["attention"]))
