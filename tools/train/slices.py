"""Training slices from a BIDS-like phantom folder, prepared the way `fcd` prepares
its inputs (README, "fcd detect"): the axial slice vol[:, :, z] with rows along y,
resized to the network's side (bilinear, half-pixel centres), min-max normalised to
[-1, 1] on its own; the lesion mask is `roi > 0`, resized the same way and kept
where >= 0.5. A slice's class is its subject's lobe label when the resized mask
holds a lesion pixel, else 0 (healthy). A patient made with `make.py --twins` also
has its lesion-free twin FLAIR (`sub-*/twin/`), prepared the same way.
"""
from __future__ import annotations

import json
import pathlib

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

# A slice with less brain than this (fraction of non-zero pixels after resizing) is
# mostly background: its min-max normalisation is dominated by a few voxels.
MIN_BRAIN_FRACTION = 0.05


def _resize(img: np.ndarray, side: int) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None]
    return F.interpolate(t, size=(side, side), mode="bilinear", align_corners=False)[0, 0].numpy()


def _pm1(v: np.ndarray) -> np.ndarray | None:
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return None
    return ((v - lo) / (hi - lo) - 0.5) * 2.0


def _lesion_label(subject: pathlib.Path) -> int:
    """The lobe class (1..8) of a patient's lesion, from the phantom's per-subject JSON."""
    found = sorted(subject.glob("*_lesion.json"))
    if not found:
        return 0
    lesion = json.loads(found[0].read_text()).get("lesion")
    return int(lesion["lobe_class"]) if lesion else 0


def load(folder: str | pathlib.Path, side: int) -> dict[str, np.ndarray]:
    """Arrays flair, t1, twin (N, side, side) float32 in [-1, 1], mask (N, side, side)
    uint8, label (N,) int64 and z_mm (N,) float32, the slice's world z. `twin` is the
    lesion-free twin's FLAIR where the subject has one, else NaN."""
    root = pathlib.Path(folder)
    subjects = sorted(p for p in root.glob("sub-*") if p.is_dir())
    if not subjects:
        raise SystemExit(f"{root}: no sub-* folders")
    out = {"flair": [], "t1": [], "twin": [], "mask": [], "label": [], "z_mm": []}
    for sub in subjects:
        anat = sub / "anat"
        flair_img = nib.load(next(anat.glob("*_FLAIR.nii*")))
        flair = np.asanyarray(flair_img.dataobj, dtype=np.float32)
        t1 = np.asanyarray(nib.load(next(anat.glob("*_T1w.nii*"))).dataobj, dtype=np.float32)
        rois = list(anat.glob("*_FLAIR_roi.nii*"))
        roi = np.asanyarray(nib.load(rois[0]).dataobj) if rois else None
        twins = list((sub / "twin").glob("*_FLAIR.nii*"))
        twin = np.asanyarray(nib.load(twins[0]).dataobj, dtype=np.float32) if twins else None
        label = _lesion_label(sub)
        for z in range(flair.shape[2]):
            fl = _resize(flair[:, :, z].T, side)
            if np.count_nonzero(fl) < MIN_BRAIN_FRACTION * side * side:
                continue
            f, t = _pm1(fl), _pm1(_resize(t1[:, :, z].T, side))
            if f is None or t is None:
                continue
            m = np.zeros((side, side), np.uint8)
            if roi is not None:
                m = (_resize((roi[:, :, z].T > 0).astype(np.float32), side) >= 0.5).astype(np.uint8)
            out["flair"].append(f)
            out["t1"].append(t)
            tw = _pm1(_resize(twin[:, :, z].T, side)) if twin is not None else None
            out["twin"].append(tw if tw is not None else np.full_like(f, np.nan))
            out["mask"].append(m)
            out["label"].append(label if m.any() else 0)
            out["z_mm"].append(float(flair_img.affine[2, 2] * z + flair_img.affine[2, 3]))
    arrays = {k: np.stack(v) for k, v in out.items()}
    arrays["flair"] = arrays["flair"].astype(np.float32)
    arrays["t1"] = arrays["t1"].astype(np.float32)
    arrays["twin"] = arrays["twin"].astype(np.float32)
    arrays["label"] = arrays["label"].astype(np.int64)
    arrays["z_mm"] = arrays["z_mm"].astype(np.float32)
    return arrays
