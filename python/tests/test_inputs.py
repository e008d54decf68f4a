"""Every accepted shape and dtype, volumes, and the refusals with the engine's message."""

import numpy as np
import pytest

import fcd
from conftest import CLASSIFIER, CONFIG, STEPS, UNET


def maps(det):
    return det.pseudo_healthy, det.anomaly


def same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(maps(a), maps(b)))


def test_slice_shapes_and_dtypes_agree(engine, flair, t1):
    """(B, 1, H, W), (B, H, W), float64, and arrays that are not C-contiguous."""
    reference = engine.detect(flair, t1, steps=STEPS, seed=3)
    variants = [
        (flair[:, 0], t1[:, 0]),
        (flair.astype(np.float64), t1.astype(np.float64)),
        (np.asfortranarray(flair), np.asfortranarray(t1)),
        (np.ascontiguousarray(flair.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2), t1),
    ]
    for f, t in variants:
        assert same(engine.detect(f, t, steps=STEPS, seed=3), reference)


def test_one_slice_in_every_shape(engine, flair, t1):
    f, t = flair[0, 0], t1[0, 0]
    reference = engine.detect(f, t, steps=STEPS, seed=5)
    assert reference.pseudo_healthy.shape == (1, 1, 32, 32)
    assert reference.anomaly.shape == (1, 32, 32)
    for shape in [(1, 32, 32), (1, 1, 32, 32)]:
        assert same(engine.detect(f.reshape(shape), t, steps=STEPS, seed=5), reference)


def test_noise_in_every_shape(engine, flair, t1, noise):
    reference = engine.detect(flair, t1, steps=STEPS, noise=noise)
    for n in (noise[:, 0], noise.astype(np.float64)):
        assert same(engine.detect(flair, t1, steps=STEPS, noise=n), reference)


def test_options_are_used(engine, flair, t1):
    det = engine.detect(flair, t1, steps=2, guidance=1.5, batch=1, hist_match=False)
    assert (det.steps, det.guidance, det.batch) == (2, 1.5, 1)
    assert all(0 <= p.slice < 2 and 0 <= p.row < 32 and 0 <= p.col < 32 for p in det.peaks)
    assert np.all((det.anomaly >= 0) & (det.anomaly <= 1))
    # A batch changes how products are split, so float32 rounding, no more.
    whole = engine.detect(flair, t1, steps=2, guidance=1.5, hist_match=False)
    assert whole.batch == 2
    assert np.allclose(det.pseudo_healthy, whole.pseudo_healthy, rtol=0, atol=1e-5)
    assert not np.array_equal(whole.anomaly, engine.detect(flair, t1, steps=2).anomaly)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda f, t: (np.where(f == f.max(), np.nan, f), t), "non-finite value"),
        (lambda f, t: (f[..., :16, :16], t[..., :16, :16]), "expected slices of 32 x 32"),
        (lambda f, t: (np.concatenate([f, f], 1), t), r"expected \(H, W\), \(B, H, W\)"),
        (lambda f, t: (f[0, 0, 0], t[0, 0, 0]), r"an array of shape \(32,\)"),
        (lambda f, t: (f.astype(np.int32), t), "float32 or float64 numpy array, got an array"),
        (lambda f, t: (f.tolist(), t), "float32 or float64 numpy array, got a list"),
        (lambda f, t: (f, t[:1]), "flair and t1 differ in shape"),
        (lambda f, t: (np.zeros_like(f), t), "constant slice"),
    ],
)
def test_bad_slices_raise_the_message(engine, flair, t1, change, message):
    f, t = change(flair, t1)
    with pytest.raises(fcd.FcdError, match=message):
        engine.detect(f, t, steps=1)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"noise": np.zeros((1, 32, 32), np.float32)}, "noise of shape"),
        ({"noise": np.full((2, 32, 32), np.inf, np.float32)}, "non-finite noise"),
        ({"steps": 0}, r"steps: 0 is out of range 1\.\."),
        ({"steps": 5000}, "--steps 5000 must be in 1..=1000"),
        ({"guidance": float("nan")}, "not a finite number"),
        ({"batch": 0}, r"batch: 0 is out of range 1\.\."),
        ({"progress": 3}, "progress: expected a callable, got a int"),
    ],
)
def test_bad_options_raise_the_message(engine, flair, t1, options, message):
    with pytest.raises(fcd.FcdError, match=message):
        engine.detect(flair, t1, **options)


def test_fcd_error_is_a_value_error():
    assert issubclass(fcd.FcdError, ValueError)


def test_bad_engines_raise_the_message(tmp_path):
    missing = tmp_path / "missing.pt"
    with pytest.raises(fcd.FcdError, match=str(missing)) as raised:
        fcd.Engine(CONFIG, missing, device="cpu")
    assert "\n" not in str(raised.value)
    with pytest.raises(fcd.FcdError, match=str(missing)):
        fcd.Engine(CONFIG, UNET, classifier=str(missing), device="cpu")
    with pytest.raises(fcd.FcdError, match='device "gpu": expected one of auto, cpu, cuda'):
        fcd.Engine(CONFIG, UNET, device="gpu")
    with pytest.raises(fcd.FcdError, match="the CPU backend computes in fp32 only"):
        fcd.Engine(CONFIG, UNET, CLASSIFIER, device="cpu", precision="bf16")


def test_engine_describes_itself(engine):
    assert engine.device == "cpu" and engine.image_size == 32
    assert repr(engine) == 'Engine(device="cpu", image_size=32)'


def volumes(flair, t1, depth=4):
    """(x, y, z) volumes of 32 x 32 axial slices: z = k holds fixture slice k % 2, the
    slice image being vol[:, :, z].T (rows are y, columns x)."""
    stack = lambda a: np.stack([a[k % 2, 0].T for k in range(depth)], axis=2)
    return stack(flair), stack(t1)


def test_volumes_agree_with_their_slices(engine, flair, t1):
    f, t = volumes(flair, t1)
    vd = engine.detect_volume(f, t, slices=(1, 2), steps=STEPS, seed=9)
    slices = engine.detect(flair[[1, 0]], t1[[1, 0]], steps=STEPS, seed=9)
    assert vd.slices == (1, 2) and vd.steps == STEPS
    assert vd.anomaly.shape == vd.pseudo_healthy.shape == f.shape
    assert vd.anomaly.dtype == np.float32
    assert same(vd.network, slices)
    for z in (1, 2):
        assert np.array_equal(vd.anomaly[:, :, z], slices.anomaly[z - 1].T)
    assert not vd.anomaly[:, :, [0, 3]].any()
    assert [(p.slice, p.voxel_y, p.voxel_x) for p in vd.peaks] == [
        (p.slice + 1, p.row, p.col) for p in slices.peaks
    ]


def test_volume_layouts_and_dtypes_agree(engine, flair, t1):
    f, t = volumes(flair, t1)
    reference = engine.detect_volume(f, t, slices=(0, 1), steps=1)
    for ff, tt in [(np.asfortranarray(f), t), (f.astype(np.float64), t.astype(np.float64))]:
        assert same(engine.detect_volume(ff, tt, slices=(0, 1), steps=1), reference)


def test_volume_peaks_in_world_coordinates(engine, flair, t1):
    f, t = volumes(flair, t1)
    affine = np.array([[0, -1.5, 0, 10], [2, 0, 0, -20], [0, 0, 3, 5], [0, 0, 0, 1]])
    vd = engine.detect_volume(f, t, slices=(0, 1), affine=affine, steps=1)
    identity = engine.detect_volume(f, t, slices=(0, 1), steps=1)
    assert vd.peaks
    for p, q in zip(vd.peaks, identity.peaks):
        voxel = np.array([p.voxel_x, p.voxel_y, p.slice, 1.0])
        assert np.allclose(p.world_mm, (affine @ voxel)[:3])
        assert np.allclose(q.world_mm, voxel[:3])


def test_volume_masks(engine, flair, t1):
    f, t = volumes(flair, t1)
    mask = np.zeros(f.shape, np.uint8)
    mask[10:14, 12:15, 1] = 1
    vd = engine.detect_volume(f, t, slices=(0, 1), mask=mask, steps=1)
    assert vd.anomaly.shape == f.shape
    with pytest.raises(fcd.FcdError, match="mask: empty mask"):
        engine.detect_volume(f, t, slices=(0, 1), mask=np.zeros_like(mask), steps=1)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda f, t: {"flair": f[..., 0]}, r"flair: an array of shape \(32, 32\); expected a volume"),
        (lambda f, t: {"t1": t[:16]}, "t1"),
        (lambda f, t: {"slices": (2, 1)}, "first <= last"),
        (lambda f, t: {"slices": (2, 9)}, "9"),
        (lambda f, t: {"affine": np.eye(3)}, r"affine: an array of shape \(3, 3\)"),
        (lambda f, t: {"mask": f[:16]}, "mask"),
    ],
)
def test_bad_volumes_raise_the_message(engine, flair, t1, change, message):
    f, t = volumes(flair, t1)
    args = {"flair": f, "t1": t, "slices": (0, 1)}
    args.update(change(f, t))
    with pytest.raises(fcd.FcdError, match=message):
        engine.detect_volume(args.pop("flair"), args.pop("t1"), steps=1, **args)
