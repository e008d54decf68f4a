"""The GIL is released while the engine runs; progress; one engine for many calls."""

import threading
import time

import numpy as np
import pytest

import fcd
from conftest import CONFIG, STEPS, UNET


def test_detect_releases_the_gil(engine, flair, t1):
    """A second Python thread keeps running through the middle of a detect call."""
    ticks, stop = [], threading.Event()

    def tick():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    thread = threading.Thread(target=tick)
    thread.start()
    try:
        f, t = np.tile(flair, (4, 1, 1, 1)), np.tile(t1, (4, 1, 1, 1))
        start = time.perf_counter()
        engine.detect(f, t, steps=STEPS)
        end = time.perf_counter()
    finally:
        stop.set()
        thread.join()
    middle = (start + 0.25 * (end - start), start + 0.75 * (end - start))
    during = [x for x in ticks if middle[0] < x < middle[1]]
    assert end - start > 0.05, "detect too short to tell"
    assert len(during) >= 5, f"{len(during)} ticks in the middle of {end - start:.2f} s"


def test_progress_is_called_after_every_step(engine, flair, t1):
    calls = []
    engine.detect(flair, t1, steps=STEPS, batch=1, progress=lambda *a: calls.append(a))
    total = 2 * STEPS * 2
    assert calls == [(done, total) for done in range(1, total + 1)]


def test_an_exception_in_progress_stops_the_run(engine, flair, t1, cli):
    calls = []

    def progress(done, total):
        calls.append(done)
        if done == 2:
            raise KeyError("stop here")

    with pytest.raises(KeyError, match="stop here"):
        engine.detect(flair, t1, steps=STEPS, progress=progress)
    assert calls == [1, 2]
    # The engine is as good as before.
    pseudo_healthy, anomaly, _ = cli(seed=7)
    det = engine.detect(flair, t1, steps=STEPS, seed=7)
    assert np.array_equal(det.pseudo_healthy, pseudo_healthy)
    assert np.array_equal(det.anomaly, anomaly)


def test_one_engine_for_many_calls_equals_fresh_engines(flair, t1, noise):
    calls = [
        {"seed": 1},
        {"seed": 2, "hist_match": False},
        {"noise": noise, "guidance": 2.0},
        {"seed": 1},
    ]
    reused = fcd.Engine(CONFIG, UNET, device="cpu")
    for options in calls:
        det = reused.detect(flair, t1, steps=STEPS, **options)
        fresh = fcd.Engine(CONFIG, UNET, device="cpu").detect(flair, t1, steps=STEPS, **options)
        assert np.array_equal(det.pseudo_healthy, fresh.pseudo_healthy)
        assert np.array_equal(det.anomaly, fresh.anomaly)


def test_threads_share_one_engine(engine, flair, t1):
    serial = [engine.detect(flair, t1, steps=STEPS, seed=s).anomaly for s in range(3)]
    results = [None] * 3

    def work(s):
        results[s] = engine.detect(flair, t1, steps=STEPS, seed=s).anomaly

    threads = [threading.Thread(target=work, args=(s,)) for s in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert all(np.array_equal(a, b) for a, b in zip(results, serial))
