"""No lost wake-ups: a caller waiting on a call is woken as soon as its output is stored.

The output of a spawned call can be stored in the same event-loop turn in which its caller
subscribes; the caller must still get it. Each wait below is for an instant function, so a wait
that runs into its (generous) timeout while the output exists is a lost wake-up.
"""

import random
import sys
import threading
import time

import pytest

import mctl
from conftest import load_app
from mctl.core.client import Client, run_sync
from mctl.sdk.invoke import MapRun, Target

pytestmark = pytest.mark.integration

WAIT = 10  # seconds: far above the time an instant function takes, even on a loaded machine


def _background_traffic(square, stop):
    while not stop.is_set():
        list(square.map(range(20)))


def test_a_map_waiting_after_its_last_output_is_woken_when_the_producer_finishes():
    """The race behind a .map that never returned (2026-11-29): every output had arrived and
    been consumed before the producer thread recorded how many inputs it sent; the consumer,
    having seen no total yet, then waited for an output that would never come."""
    run = MapRun(Target(Client("http://127.0.0.1:9"), "fu-none", lambda a, k: b""))
    run_sync(run.open())
    waiting = threading.Thread(target=lambda: got.append(run_sync(run.batch())), daemon=True)
    got = []
    waiting.start()
    time.sleep(0.2)
    assert not got  # nothing has arrived: it waits
    run_sync(run.produced(0))
    waiting.join(5)
    assert got == [[]], "the wait was not woken when the producer finished"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bursts_of_small_maps_while_workers_scale_down_all_return(isolated_home):
    """Before the fix this found the race above: a map that never returned (2 hung maps in each
    of two 150-second runs; with the short switch interval, in the first 60-second run)."""
    _, app = load_app("churn")
    square = __import__("churn").square
    slow = []
    stop = threading.Event()

    errors = []

    def traffic():
        rng = random.Random()
        while not stop.is_set():
            n = rng.choice([1, 2, 5, 20])
            start = time.monotonic()
            try:  # e.g. an input lost by a worker stopped as it arrived: ContainerCrashedError
                assert list(square.map(range(n))) == [x * x for x in range(n)]
            except Exception as exc:
                errors.append(repr(exc))
            if time.monotonic() - start > 3 * WAIT:
                slow.append((n, round(time.monotonic() - start, 1)))
            time.sleep(rng.uniform(0.8, 1.6))  # around the scale-down window: workers churn

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # threads interleave at many more points: races show sooner
    try:
        with app.run():
            threads = [threading.Thread(target=traffic, daemon=True) for _ in range(4)]
            for t in threads:
                t.start()
            time.sleep(60)
            stop.set()
            for t in threads:
                t.join(6 * WAIT)
            assert not any(t.is_alive() for t in threads), "a .map never returned"
    finally:
        sys.setswitchinterval(switch)
    assert not errors, f"maps that failed while workers scaled down: {errors}"
    assert not slow, f"maps that outlived their results: {slow}"


@pytest.mark.timeout(300)
def test_every_way_of_waiting_is_woken(isolated_home):
    _, app = load_app("basic")
    module = __import__("basic")
    lost = []
    with app.run():
        stop = threading.Event()
        noise = threading.Thread(target=_background_traffic, args=(module.square, stop))
        noise.start()
        try:
            for i in range(120):
                assert list(module.square.map(range(10))) == [x * x for x in range(10)]
                call = module.square.spawn(12)
                try:
                    assert call.get(timeout=WAIT) == 144
                except TimeoutError:
                    lost.append(("get", i, call.get(timeout=WAIT)))
                calls = [module.square.spawn(j) for j in range(3)]
                start = time.monotonic()
                assert mctl.gather(*calls) == [0, 1, 4]
                if time.monotonic() - start > WAIT:
                    lost.append(("gather", i))
                start = time.monotonic()
                assert module.square.remote(i) == i * i
                assert list(module.gen.remote_gen(3)) == [0, 10, 20]
                if time.monotonic() - start > WAIT:
                    lost.append(("remote", i))
        finally:
            stop.set()
            noise.join()
    assert not lost, f"waits that outlived their results: {lost}"
