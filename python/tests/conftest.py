"""The fixture model and inputs, the `fcd detect` command line's results on them, and the C
example built against the C ABI."""

import json
import os
import pathlib
import subprocess

import numpy as np
import pytest

import fcd

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
CONFIG = FIXTURES / "config_small.yaml"
UNET = FIXTURES / "unet.pt"
CLASSIFIER = FIXTURES / "classifier.pt"
# A few steps of the 32 x 32 fixture model keep the suite within CI's time.
STEPS = 3
FCD = pathlib.Path(os.environ.get("FCD_BIN", ROOT / "target" / "release" / "fcd"))
LIBDIR = pathlib.Path(os.environ.get("FCD_CAPI_DIR", ROOT / "target" / "release"))


@pytest.fixture(scope="session")
def engine():
    return fcd.Engine(CONFIG, UNET, device="cpu")


@pytest.fixture(scope="session")
def flair():
    return np.load(FIXTURES / "flair_raw.npy")


@pytest.fixture(scope="session")
def t1():
    return np.load(FIXTURES / "t1_raw.npy")


@pytest.fixture(scope="session")
def noise():
    return np.load(FIXTURES / "noise.npy")


@pytest.fixture(scope="session")
def cli(tmp_path_factory):
    """`fcd detect` on the fixture slices with `--seed seed`, or `--init-noise noise.npy`:
    (pseudo_healthy, anomaly, summary), each run once."""
    runs = {}

    def run(seed=0, init_noise=False):
        key = (seed, init_noise)
        if key not in runs:
            out = tmp_path_factory.mktemp("cli") / "out"
            args = [FCD, "detect", "--config", CONFIG, "--unet", UNET]
            args += ["--flair", FIXTURES / "flair_raw.npy", "--t1", FIXTURES / "t1_raw.npy"]
            args += ["--out", out, "--steps", str(STEPS), "--device", "cpu"]
            if init_noise:
                args += ["--init-noise", FIXTURES / "noise.npy"]
            else:
                args += ["--seed", str(seed)]
            subprocess.run([str(a) for a in args], check=True, capture_output=True)
            runs[key] = (
                np.load(out / "pseudo_healthy.npy"),
                np.load(out / "anomaly.npy"),
                json.loads((out / "summary.json").read_text()),
            )
        return runs[key]

    return run


@pytest.fixture(scope="session")
def c_example(tmp_path_factory):
    """examples/c/detect.c built with the system's cc against libfcd_capi."""
    exe = tmp_path_factory.mktemp("c") / "detect"
    subprocess.run(
        [
            "cc", "-std=c99", "-Wall", "-Wextra", "-Werror", "-O2",
            f"-I{ROOT / 'include'}", str(ROOT / "examples" / "c" / "detect.c"),
            f"-L{LIBDIR}", "-lfcd_capi", f"-Wl,-rpath,{LIBDIR}", "-o", str(exe),
        ],
        check=True,
    )
    return exe
