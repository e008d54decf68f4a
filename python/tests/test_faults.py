"""What a notebook can throw at the package: huge views, a callback that calls back in,
threads that wait, and arguments of every wrong kind. Each raises fcd.FcdError (a
ValueError) with one line naming the argument, and never aborts, hangs or deadlocks."""

import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from numpy.lib.stride_tricks import as_strided

import fcd
from conftest import CONFIG, STEPS, UNET


def test_a_huge_view_is_refused_before_any_copy(engine, t1):
    one = np.zeros(1, np.float32)
    huge = as_strided(one, shape=(131072, 131072), strides=(0, 0))
    with pytest.raises(fcd.FcdError, match=r"flair: an array of shape \(131072, 131072\) holds"):
        engine.detect(huge, t1)
    many = as_strided(one, shape=(1 << 21, 32, 32), strides=(0, 0, 0))
    with pytest.raises(fcd.FcdError, match="holds more than"):
        engine.detect(many, many)
    volume = as_strided(one, shape=(4096, 4096, 4096), strides=(0, 0, 0))
    with pytest.raises(fcd.FcdError, match="mask: an array of shape"):
        engine.detect_volume(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), mask=volume)
    with pytest.raises(fcd.FcdError, match=r"expected slices of 32 x 32"):
        engine.detect(np.zeros((2, 64, 64)), np.zeros((2, 64, 64)))


def test_detect_from_its_own_progress_callback_is_busy(engine, flair, t1):
    seen = []

    def progress(done, total):
        if done == 1:
            try:
                engine.detect(flair, t1, steps=1)
            except fcd.FcdError as e:
                seen.append(str(e))

    det = engine.detect(flair, t1, steps=STEPS, progress=progress)
    assert det.anomaly.shape == (2, 32, 32)
    assert len(seen) == 1 and "the engine is busy" in seen[0], seen
    # The engine is free again, for this thread and others.
    engine.detect(flair, t1, steps=1)
    other = []
    thread = threading.Thread(target=lambda: other.append(engine.detect(flair, t1, steps=1)))
    thread.start()
    thread.join(timeout=120)
    assert other, "the other thread never got the engine"


def test_a_waiting_thread_answers_ctrl_c():
    """A call waiting for the engine while another thread's call runs is interrupted by
    SIGINT (KeyboardInterrupt), not left waiting."""
    script = textwrap.dedent(
        f"""
        import os, signal, threading, time
        import numpy as np
        import fcd
        engine = fcd.Engine({str(CONFIG)!r}, {str(UNET)!r}, device="cpu")
        x = np.random.default_rng(0).random((2, 32, 32), dtype=np.float32) + 1
        started = threading.Event()
        def long():
            engine.detect(x, x, steps=400, progress=lambda d, n: started.set())
        threading.Thread(target=long, daemon=True).start()
        started.wait()
        threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        try:
            engine.detect(x, x, steps=1)
        except KeyboardInterrupt:
            print("interrupted")
            os._exit(0)
        print("not interrupted")
        os._exit(1)
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert run.stdout.strip() == "interrupted", run.stdout + run.stderr


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": -1}, r"steps: -1 is out of range"),
        ({"steps": 10**30}, r"steps: 1000000000000000000000000000000 is out of range"),
        ({"steps": 0}, r"steps: 0 is out of range 1\.\."),
        ({"steps": 2.5}, r"steps: expected an int, got a float"),
        ({"steps": True}, r"steps: expected an int, got a bool"),
        ({"seed": -3}, r"seed: -3 is out of range"),
        ({"seed": 2**64}, r"seed: 18446744073709551616 is out of range"),
        ({"batch": -1}, r"batch: -1 is out of range"),
        ({"batch": "2"}, r"batch: expected an int, got a str"),
        ({"guidance": "high"}, r"guidance: expected a number, got a str"),
        ({"hist_match": "yes"}, r"hist_match: expected a bool, got a str"),
        ({"progress": 3}, r"progress: expected a callable, got a int"),
    ],
)
def test_bad_detect_arguments_raise_fcd_error(engine, flair, t1, kwargs, message):
    with pytest.raises(fcd.FcdError, match=message):
        engine.detect(flair, t1, **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"slices": (-1, 2)}, r"slices\[0\]: -1 is out of range"),
        ({"slices": (3, 2)}, r"first <= last"),
        ({"slices": (0, 2**40)}, r"slices\[1\]: .* is out of range"),
        ({"slices": "0:2"}, r"slices: expected \(first, last\)"),
        ({"affine": "eye"}, r"affine: expected a 4 x 4 array"),
        ({"seed": None, "steps": -5}, r"steps: -5 is out of range"),
    ],
)
def test_bad_volume_arguments_raise_fcd_error(engine, kwargs, message):
    v = np.zeros((40, 36, 6), np.float32)
    with pytest.raises(fcd.FcdError, match=message):
        engine.detect_volume(v, v, **kwargs)


@pytest.mark.parametrize(
    "args, message",
    [
        ((None, UNET), r"config: expected a path \(str or os.PathLike\), got a NoneType"),
        ((CONFIG, None), r"unet: expected a path"),
        ((CONFIG, UNET, 7), r"classifier: expected a path \(str or os.PathLike\), got a int"),
        ((CONFIG, UNET, None, 3), r"device: expected a str, got a int"),
        ((CONFIG, UNET, None, "tpu"), r'device "tpu": expected one of'),
        ((CONFIG, UNET, None, "cpu", "fp64"), r'precision "fp64": expected one of'),
    ],
)
def test_bad_engine_arguments_raise_fcd_error(args, message):
    with pytest.raises(fcd.FcdError, match=message):
        fcd.Engine(*args)


def test_fcd_error_is_a_value_error():
    assert issubclass(fcd.FcdError, ValueError)
