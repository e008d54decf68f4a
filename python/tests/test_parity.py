"""The package and the C ABI give the command line's results, bit for bit."""

import json
import subprocess

import numpy as np

import fcd

from conftest import CONFIG, STEPS, UNET


def test_seed_gives_the_command_lines_maps(engine, flair, t1, cli):
    det = engine.detect(flair, t1, steps=STEPS, seed=7)
    pseudo_healthy, anomaly, _ = cli(seed=7)
    assert det.pseudo_healthy.dtype == np.float32 and det.anomaly.dtype == np.float32
    assert det.pseudo_healthy.shape == pseudo_healthy.shape == flair.shape
    assert det.anomaly.shape == anomaly.shape == flair.shape[:1] + flair.shape[2:]
    assert np.array_equal(det.pseudo_healthy, pseudo_healthy)
    assert np.array_equal(det.anomaly, anomaly)


def test_noise_gives_the_command_lines_maps(engine, flair, t1, noise, cli):
    det = engine.detect(flair, t1, steps=STEPS, noise=noise)
    pseudo_healthy, anomaly, _ = cli(init_noise=True)
    assert np.array_equal(det.pseudo_healthy, pseudo_healthy)
    assert np.array_equal(det.anomaly, anomaly)


def test_peaks_and_settings_are_the_command_lines(engine, flair, t1, cli):
    det = engine.detect(flair, t1, steps=STEPS, seed=7)
    _, _, summary = cli(seed=7)
    assert [(p.slice, p.row, p.col) for p in det.peaks] == [
        (p["slice"], p["row"], p["col"]) for p in summary["peaks"]
    ]
    for key in ("score", "strength"):
        assert np.array_equal(
            np.array([getattr(p, key) for p in det.peaks], np.float32),
            np.array([p[key] for p in summary["peaks"]], np.float32),
        )
    settings = summary["settings"]
    assert (det.steps, det.guidance, det.batch) == (
        settings["steps"], settings["guidance"], settings["batch"]
    )


def test_c_example_gives_the_command_lines_maps(c_example, flair, t1, cli, tmp_path):
    for name, a in (("flair", flair), ("t1", t1)):
        a.astype("<f4").tofile(tmp_path / f"{name}.f32")
    healthy, anomaly = tmp_path / "healthy.f32", tmp_path / "anomaly.f32"
    args = [c_example, CONFIG, UNET, tmp_path / "flair.f32", tmp_path / "t1.f32"]
    args += ["7", str(STEPS), healthy, anomaly, "cpu"]
    run = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "2 slices of 32 x 32"
    pseudo_healthy_cli, anomaly_cli, _ = cli(seed=7)
    assert healthy.read_bytes() == pseudo_healthy_cli.astype("<f4").tobytes()
    assert anomaly.read_bytes() == anomaly_cli.astype("<f4").tobytes()


def test_c_example_reports_the_engines_error(c_example, flair, tmp_path):
    flair.astype("<f4").tofile(tmp_path / "flair.f32")
    missing = tmp_path / "missing.pt"
    raw = tmp_path / "flair.f32"
    args = [c_example, CONFIG, missing, raw, raw, "0", "1", tmp_path / "a", tmp_path / "b", "cpu"]
    run = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    assert run.returncode == 1
    assert run.stderr.startswith("fcd: ") and str(missing) in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


def test_save_writes_the_command_lines_files(engine, flair, t1, cli, tmp_path):
    det = engine.detect(flair, t1, steps=STEPS, seed=7)
    out = tmp_path / "saved"
    det.save(out)
    pseudo_healthy, anomaly, summary = cli(seed=7)
    assert sorted(p.name for p in out.iterdir()) == [
        ".fcd-output", "anomaly.npy", "pseudo_healthy.npy", "summary.json"
    ]
    assert np.array_equal(np.load(out / "pseudo_healthy.npy"), pseudo_healthy)
    assert np.array_equal(np.load(out / "anomaly.npy"), anomaly)
    saved = json.loads((out / "summary.json").read_text())
    assert saved["peaks"] == summary["peaks"]
    assert saved["outputs"] == summary["outputs"]
    for key in ("steps", "guidance", "batch", "hist_match", "noise"):
        assert saved["settings"][key] == summary["settings"][key], key


def test_volume_save_writes_maps_overlays_and_montage(engine, flair, t1, tmp_path):
    vol = lambda a: np.ascontiguousarray(np.transpose(a[:, 0], (2, 1, 0)))  # noqa: E731
    det = engine.detect_volume(vol(flair), vol(t1), slices=(0, 1), steps=STEPS, seed=7)
    out = tmp_path / "saved"
    det.save(out)
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert names == [
        ".fcd-output", "anomaly.nii.gz", "montage.png", "overlays/slice_000.png",
        "overlays/slice_001.png", "pseudo_healthy.nii.gz", "summary.json",
    ]
    summary = json.loads((out / "summary.json").read_text())
    assert [(p["slice"], p["voxel_x"], p["voxel_y"]) for p in summary["peaks"]] == [
        (p.slice, p.voxel_x, p.voxel_y) for p in det.peaks
    ]
    try:
        det.network.save(tmp_path / "network")
    except fcd.FcdError as e:
        assert "save the VolumeDetection" in str(e)
    else:
        raise AssertionError("the network-grid results of a volume were saved")
    assert not (tmp_path / "network").exists()
