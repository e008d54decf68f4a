#!/usr/bin/env python3
"""Synthetic FCD type II subjects (T1w + FLAIR + lesion ROI) from real brain anatomy.

    python3 tools/phantom/make.py --t1 T1.nii.gz [--gm GM.nii.gz --wm WM.nii.gz] \
        --subjects K --lesion-fraction F --seed S --out DIR [--png] \
        [--z-range A:B] [--z-step K] [--first-id N] [--twins]

See tools/phantom/README.md for what is made, the parameter ranges and the lobe lookup.
Needs numpy, scipy and nibabel (Pillow optional, only for --png; a tiny built-in PNG
writer is used without it). Same arguments -> byte-identical outputs.
"""

import argparse
import gzip
import io
import json
import os
import struct
import sys
import time
import zlib

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

# ----------------------------------------------------------------------------------------
# Parameter ranges (uniform draws unless noted). Documented in README.md and copied into
# every subject's JSON.
RANGES = {
    # deformation (per subject)
    "rotation_deg": (-3.0, 3.0),          # about each axis, around the brain centroid
    "scale": (0.96, 1.04),                # isotropic
    "translation_mm": (-2.0, 2.0),        # per axis
    "smooth_disp_std_mm": (0.8, 2.0),     # std of the low-frequency displacement field
    # intensities (per subject)
    "t1_wm_level": (600.0, 1400.0),       # T1 white-matter intensity
    "flair_wm_level": (400.0, 1000.0),    # FLAIR white-matter intensity
    "flair_gm_over_wm": (1.18, 1.35),     # FLAIR GM / WM ratio
    "flair_csf_over_wm": (0.08, 0.20),    # FLAIR CSF / WM ratio (suppressed CSF)
    "texture_t1": (0.01, 0.025),          # multiplicative texture amplitude (std)
    "texture_flair": (0.02, 0.04),
    "bias_log_std_t1": (0.04, 0.10),      # std of the log bias field, T1
    "bias_log_std_flair": (0.08, 0.16),   # the same, FLAIR (separate field; not N4-corrected,
                                          # as in the paper's preprocessing)
    "noise_t1": (0.010, 0.030),           # Rician sigma / WM level
    "noise_flair": (0.015, 0.035),
    # periventricular rims and caps, normal FLAIR hyperintensities (every subject)
    "rim_mm": (2.0, 4.0),                 # rim width in the WM next to the lateral ventricles
    "cap_mm": (2.0, 5.0),                 # extra width at the caps
    "flair_rim": (2.5, 4.5),              # FLAIR excess at the caps, fraction of (GM-WM) FLAIR;
                                          # 40% of that along the rest of the rim
    # lesion (patients)
    "radius_mm": (10.0, 16.0),            # mean semi-axis of the lesion ellipsoid
    "axis_jitter": (0.75, 1.25),          # per-axis factor on the radius
    "thickening_mm": (1.5, 4.0),          # WM depth turned into GM-like tissue
    "thickening_strength": (0.5, 0.85),   # fraction of that WM turned into GM (partial volume)
    "blur_sigma_mm": (1.0, 2.0),          # grey/white junction blurring inside the lesion
    "flair_sub": (1.80, 3.00),            # subcortical FLAIR excess, fraction of (GM-WM) FLAIR
    "flair_ctx": (0.15, 0.35),            # intracortical FLAIR excess, same unit
    "sub_depth_mm": (6.0, 12.0),          # depth of the subcortical hyperintensity below GM
    "t1_sub": (0.05, 0.25),               # subcortical T1 darkening, fraction of (WM-GM) T1
    "tail_probability": 0.5,
    "tail_radius_frac": (0.35, 0.6),      # tail radius at the lesion, times radius; 1 mm at the end
    "tail_contrast_frac": (0.6, 1.0),     # tail FLAIR excess at the lesion, times flair_sub;
                                          # tapers linearly to 40% of that at the ventricle
    "tail_max_mm": 45.0,
}

LOBE_CLASSES = {("FL",): 1, ("OL", "TL"): 2, ("FL", "PL"): 3, ("TL",): 4, ("IL",): 5,
                ("PL",): 6, ("PL", "TL"): 7, ("OL",): 8}
LOBE_NAMES = {1: "FL", 2: "TL,OL", 3: "FL,PL", 4: "TL", 5: "IL", 6: "PL", 7: "TL,PL", 8: "OL"}
COMBINED_MIN_FRACTION = 0.25


def lobe_of(x, y, z):
    """Lobe code per MNI point (arrays, mm): 'FL','TL','PL','OL','IL'. A coarse box/plane
    lookup (see README): insula first, then occipital, temporal, frontal, parietal."""
    x, y, z = (np.asarray(v, dtype=np.float64) for v in (x, y, z))
    ax = np.abs(x)
    out = np.full(x.shape, "PL", dtype="<U2")
    # central sulcus approximation: frontal is anterior of y_cs(z)
    y_cs = -10.0 - 0.5 * np.maximum(z - 20.0, 0.0)
    # top of the temporal lobe (Sylvian fissure), rising posteriorly
    t_top = np.where(y > -10.0, -4.0, -4.0 + 0.4 * (-10.0 - y))
    temporal = (ax >= 25.0) & (y < 15.0) & (z < t_top)
    occipital = y < -72.0
    insula = (ax >= 28.0) & (ax <= 42.0) & (y >= -12.0) & (y <= 18.0) & (z >= -10.0) & (z <= 22.0)
    out[y > y_cs] = "FL"
    out[temporal] = "TL"
    out[occipital] = "OL"
    out[insula] = "IL"
    return out


def lobe_class(codes):
    """Class 1..8 from the lobe codes of the lesion's voxels: the majority lobe, or the
    combined class (TL,OL / FL,PL / TL,PL) when the second lobe holds >= 25% of the voxels."""
    names, counts = np.unique(codes, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    frac = {str(names[i]): float(counts[i]) / counts.sum() for i in order}
    first = str(names[order[0]])
    cls = LOBE_CLASSES[(first,)]
    if len(order) > 1 and counts[order[1]] / counts.sum() >= COMBINED_MIN_FRACTION:
        pair = tuple(sorted((first, str(names[order[1]]))))
        cls = LOBE_CLASSES.get(pair, cls)
    return cls, frac


# ----------------------------------------------------------------------------------------
# small helpers

def sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def uni(rng, key):
    lo, hi = RANGES[key]
    return float(rng.uniform(lo, hi))


def load(path):
    img = nib.load(path)
    return img, np.asarray(img.dataobj, dtype=np.float32)


def interp_matrix(pos, n):
    """(len(pos), n) linear-interpolation weights for positions `pos` on a 0..n-1 grid."""
    pos = np.clip(np.asarray(pos, dtype=np.float64), 0, n - 1)
    i0 = np.minimum(np.floor(pos).astype(int), n - 2) if n > 1 else np.zeros(len(pos), int)
    w = np.zeros((len(pos), n), dtype=np.float32)
    if n == 1:
        w[:, 0] = 1
        return w
    f = pos - i0
    w[np.arange(len(pos)), i0] = 1 - f
    w[np.arange(len(pos)), i0 + 1] += f
    return w


def upsample(coarse, wx, wy, wz):
    """Separable trilinear upsampling of a coarse 3-D field with weight matrices."""
    a = np.tensordot(coarse, wz, axes=([2], [1]))       # (cx, cy, nz)
    a = np.tensordot(a, wy, axes=([1], [1]))            # (cx, nz, ny)
    a = np.tensordot(a, wx, axes=([0], [1]))            # (nz, ny, nx)
    return np.ascontiguousarray(a.transpose(2, 1, 0), dtype=np.float32)


def smooth_noise(rng, shape, sigma):
    f = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return f / max(float(f.std()), 1e-6)


def write_nifti(path, data, affine, codes):
    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(data.dtype)
    img.header.set_xyzt_units("mm", "sec")
    img.set_sform(affine, code=codes[0])
    img.set_qform(affine, code=codes[1])
    img.header.set_slope_inter(1.0, 0.0)
    raw = img.to_bytes()
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        with gzip.GzipFile(filename="", mode="wb", fileobj=fh, mtime=0, compresslevel=6) as gz:
            gz.write(raw)
    os.replace(tmp, path)


def write_png(path, img8):
    img8 = np.ascontiguousarray(img8, dtype=np.uint8)
    try:
        from PIL import Image
        Image.fromarray(img8).save(path, format="PNG", optimize=False)
        return
    except ImportError:
        pass
    h, w = img8.shape

    def chunk(tag, data):
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))
    raw = b"".join(b"\x00" + img8[r].tobytes() for r in range(h))
    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                 + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


# ----------------------------------------------------------------------------------------
# template preparation (once per run)

def segment_t1(t1, mask, rng_seed=0):
    """3-class Gaussian mixture (CSF < GM < WM) on brain intensities -> smooth soft maps."""
    v = t1[mask].astype(np.float64)
    sub = v[:: max(1, v.size // 400000)]
    mu = np.percentile(sub, [10, 50, 90])
    sd = np.full(3, sub.std() / 3)
    pi = np.full(3, 1 / 3)
    for _ in range(40):
        ll = -0.5 * ((sub[:, None] - mu) / sd) ** 2 - np.log(sd) + np.log(pi)
        ll -= ll.max(1, keepdims=True)
        r = np.exp(ll)
        r /= r.sum(1, keepdims=True)
        nk = r.sum(0) + 1e-9
        mu = (r * sub[:, None]).sum(0) / nk
        sd = np.sqrt((r * (sub[:, None] - mu) ** 2).sum(0) / nk) + 1e-3
        pi = nk / nk.sum()
    o = np.argsort(mu)
    mu, sd, pi = mu[o], sd[o], pi[o]
    # likelihoods, then a few mean-field-like passes with a smoothed-posterior spatial prior
    # (removes isolated "GM" islands where WM is locally darker in T1)
    ll = -0.5 * ((v[:, None] - mu) / sd) ** 2 - np.log(sd)
    ll -= ll.max(1, keepdims=True)
    lik = np.exp(ll)
    post = lik * pi
    post /= post.sum(1, keepdims=True)
    maps = [np.zeros(t1.shape, np.float32) for _ in range(3)]
    for it in range(4):
        prior = []
        for k in range(3):
            maps[k][mask] = post[:, k]
            prior.append(ndi.gaussian_filter(maps[k], 1.5)[mask])
        prior = np.stack(prior, 1) + 1e-3
        post = lik * prior
        post /= post.sum(1, keepdims=True)
    for k in range(3):
        maps[k][mask] = post[:, k]
        maps[k] = ndi.gaussian_filter(maps[k], 0.6)
    tot = maps[0] + maps[1] + maps[2] + 1e-6
    csf, gm, wm = (m / tot * mask for m in maps)
    return gm.astype(np.float32), wm.astype(np.float32), {
        "means": mu.tolist(), "stds": sd.tolist(), "weights": pi.tolist()}


class Template:
    def __init__(self, t1_path, gm_path=None, wm_path=None):
        img, t1 = load(t1_path)
        if t1.ndim != 3:
            sys.exit(f"{t1_path}: expected a 3-D volume, got shape {t1.shape}")
        self.affine = img.affine.copy()
        self.codes = (int(img.header["sform_code"]) or 1, int(img.header["qform_code"]) or 1)
        self.vox = np.sqrt((self.affine[:3, :3] ** 2).sum(0))
        if np.any(np.abs(self.vox - 1) > 0.05):
            print(f"warning: voxel size {self.vox} is not 1 mm; sizes in mm are still honoured",
                  file=sys.stderr)
        self.shape = t1.shape
        t1 = np.where(np.isfinite(t1), t1, 0).astype(np.float32)
        # bounding box of the head content, for speed
        nz = np.argwhere(t1 > 0)
        if nz.size == 0:
            sys.exit(f"{t1_path}: empty volume")
        lo, hi = np.maximum(nz.min(0) - 2, 0), np.minimum(nz.max(0) + 3, self.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        self.seg = None
        if gm_path:
            gm = load(gm_path)[1]
            wm = load(wm_path)[1]
            for name, m in (("gm", gm), ("wm", wm)):
                if m.shape != t1.shape:
                    sys.exit(f"--{name} shape {m.shape} != T1 shape {t1.shape}")
            scale = max(float(gm.max()), float(wm.max()))
            if scale > 1.5:          # stored as 0..255 (the MNI maps) or 0..100
                gm, wm = gm / scale, wm / scale
            gm, wm = np.clip(gm, 0, 1), np.clip(wm, 0, 1)
            # template maps are population averages (very soft): sharpen p -> p^2 / sum
            csf = np.clip(1 - gm - wm, 0, 1)
            tot = csf ** 2 + gm ** 2 + wm ** 2 + 1e-6
            gm, wm = gm ** 2 / tot * (gm + wm + csf), wm ** 2 / tot * (gm + wm + csf)
            mask = np.zeros(self.shape, bool)
            mask[box] = ndi.binary_fill_holes((t1[box] > 0) | ((gm[box] + wm[box]) > 0.3))
            # the T1 may carry a skull: keep only the closed GM+WM envelope
            env = np.zeros(self.shape, bool)
            env[box] = ndi.binary_fill_holes(ndi.binary_closing(
                (gm[box] + wm[box]) > 0.15, structure=np.ones((3, 3, 3)), iterations=3))
            mask &= ndi.binary_dilation(env, iterations=1)
        else:
            mask = np.zeros(self.shape, bool)
            mask[box] = ndi.binary_fill_holes(t1[box] > 0)
            gm, wm = np.zeros(self.shape, np.float32), np.zeros(self.shape, np.float32)
            gm[box], wm[box], self.seg = segment_t1(t1[box], mask[box])
        self.mask = mask.astype(np.float32)
        self.gm = (gm * mask).astype(np.float32)
        self.wm = (wm * mask).astype(np.float32)
        self.csf = np.clip(1 - self.gm - self.wm, 0, 1) * self.mask
        # T1 normalised so that WM = 1; class means for the lesion edits
        t1 = t1 * mask
        ref = float(np.median(t1[self.wm > 0.9])) if np.any(self.wm > 0.9) else float(t1.max())
        self.t1 = (t1 / ref).astype(np.float32)
        self.t1_wm = float(np.median(self.t1[self.wm > 0.9])) if np.any(self.wm > 0.9) else 1.0
        self.t1_gm = float(np.median(self.t1[self.gm > 0.8])) if np.any(self.gm > 0.8) else 0.8
        self.centroid = np.array(ndi.center_of_mass(mask), dtype=np.float64)
        self.bbox = (lo, hi)
        # lateral ventricles (the transmantle tails point at them): dark (T1 below the midpoint
        # of CSF and GM), >= 8 mm inside the brain, inside an MNI box around the lateral
        # ventricles (3 < |x| < 30, -45 < y < 25, -5 < z < 35 mm), opened once
        dist = np.zeros(self.shape, np.float32)
        dist[box] = ndi.distance_transform_edt(mask[box], sampling=self.vox)
        t1_csf = float(np.median(self.t1[self.csf > 0.9])) if np.any(self.csf > 0.9) else 0.3
        dark = (self.t1 < 0.5 * (t1_csf + self.t1_gm)) & mask & (dist > 8.0)
        vijk = np.argwhere(dark)
        x, y, z = self.mni(vijk).T
        keep = (np.abs(x) > 3) & (np.abs(x) < 30) & (y > -45) & (y < 25) & (z > -5) & (z < 35)
        vent = np.zeros(self.shape, bool)
        vent[tuple(vijk[keep].T)] = True
        vent = ndi.binary_opening(vent, iterations=1)
        self.ventricles = np.argwhere(vent).astype(np.float64)
        # periventricular rims: distance (mm) from the lateral ventricles, and the caps at
        # their frontal (MNI y > -5 mm) and occipital (y < -30 mm) horns
        self.vent_dist = np.full(self.shape, 1e3, np.float32)
        self.vent_dist[box] = ndi.distance_transform_edt(~vent[box], sampling=self.vox)
        y = self.mni(np.stack(np.meshgrid(*[np.arange(n) for n in self.shape], indexing="ij"),
                              -1).reshape(-1, 3))[:, 1].reshape(self.shape)
        self.cap = (np.clip((y + 5.0) / 15.0, 0, 1) + np.clip((-30.0 - y) / 10.0, 0, 1)
                    ).astype(np.float32)
        # candidate lesion centres: GM voxels at the grey/white junction, cortical
        # (within 6 mm of non-ventricular CSF or of the brain's outer edge, so deep WM islands
        # are excluded, and >= ~10 mm from the ventricles, so periventricular grey is excluded)
        vnear = ndi.binary_dilation(vent[box], structure=np.ones((3, 3, 3)), iterations=10)
        near_csf = np.zeros(self.shape, np.float32)
        near_csf[box] = ndi.distance_transform_edt(
            ((self.csf[box] < 0.3) | vnear) & mask[box], sampling=self.vox)
        far_v = np.ones(self.shape, bool)
        far_v[box] = ~vnear
        cand = ((self.gm > 0.5) & ndi.binary_dilation(self.wm > 0.5, iterations=1)
                & (near_csf <= 6.0) & far_v)
        ijk = np.argwhere(cand)
        mni = self.mni(ijk)
        x, y, z = mni.T
        ax = np.abs(x)
        excl = ((y < -40) & (z < -15))                                  # cerebellum
        excl |= (ax < 15) & (y < -10) & (z < -5)                        # brainstem
        excl |= (ax < 30) & (y > -32) & (y < 25) & (z > -15) & (z < 25)  # deep grey matter
        self.candidates = ijk[~excl]

    def mni(self, ijk):
        ijk = np.asarray(ijk, dtype=np.float64)
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]


# ----------------------------------------------------------------------------------------
# per subject

class Grid:
    """Output grid: template x, y; template z indices z0, z0+step, ..., <= z1."""

    def __init__(self, tpl, z0, z1, step):
        self.z = np.arange(z0, z1 + 1, step)
        self.step, self.z0, self.z1 = step, z0, z1
        nx, ny, _ = tpl.shape
        self.shape = (nx, ny, len(self.z))
        aff = tpl.affine.copy()
        aff[:3, 3] = tpl.affine[:3, :3] @ np.array([0, 0, z0]) + tpl.affine[:3, 3]
        aff[:3, 2] = tpl.affine[:3, 2] * step
        self.affine = aff
        # in-plane crop where brain can land (brain bbox + margin)
        lo, hi = tpl.bbox
        m = 14
        self.xs = np.arange(max(lo[0] - m, 0), min(hi[0] + m, nx))
        self.ys = np.arange(max(lo[1] - m, 0), min(hi[1] + m, ny))
        self.cshape = (len(self.xs), len(self.ys), len(self.z))


def draw_deformation(rng, tpl, grid):
    rot = np.deg2rad([uni(rng, "rotation_deg") for _ in range(3)])
    scale = uni(rng, "scale")
    trans = np.array([uni(rng, "translation_mm") for _ in range(3)])
    sd = uni(rng, "smooth_disp_std_mm")
    cx, cy, cz = np.cos(rot)
    sx, sy, sz = np.sin(rot)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    A = scale * rz @ ry @ rx
    spacing = 8.0  # mm between control points
    nshape = tuple(int(np.ceil(n * v / spacing)) + 1 for n, v in zip(tpl.shape, tpl.vox))
    coarse = np.stack([smooth_noise(rng, nshape, 1.5) * sd for _ in range(3)])
    params = {"rotation_deg": np.rad2deg(rot).round(4).tolist(), "scale": round(scale, 5),
              "translation_mm": trans.round(4).tolist(), "smooth_disp_std_mm": round(sd, 4),
              "control_spacing_mm": spacing}
    return {"A": A, "t": trans, "coarse": coarse, "spacing": spacing, "params": params}


def deform_points(defo, tpl, pts):
    """Template voxel coordinates sampled by output points `pts` (N, 3) in template index
    units (pull map q = c + A (p - c) + t + u(p))."""
    vox = tpl.vox
    c = tpl.centroid
    pm = (pts - c) * vox
    q = pm @ defo["A"].T + defo["t"]
    cpos = pts * vox / defo["spacing"]
    for k in range(3):
        q[:, k] += ndi.map_coordinates(defo["coarse"][k], cpos.T, order=1, mode="nearest")
    return q / vox + c


def deform_grid(defo, tpl, grid):
    """(3, *grid.cshape) template voxel coordinates for the cropped output grid."""
    vox, c, sp = tpl.vox, tpl.centroid, defo["spacing"]
    nsh = defo["coarse"].shape[1:]
    wx = interp_matrix(grid.xs * vox[0] / sp, nsh[0])
    wy = interp_matrix(grid.ys * vox[1] / sp, nsh[1])
    wz = interp_matrix(grid.z * vox[2] / sp, nsh[2])
    X = ((grid.xs - c[0]) * vox[0])[:, None, None]
    Y = ((grid.ys - c[1]) * vox[1])[None, :, None]
    Z = ((grid.z - c[2]) * vox[2])[None, None, :]
    A, t = defo["A"], defo["t"]
    q = np.empty((3,) + grid.cshape, np.float32)
    for k in range(3):
        u = upsample(defo["coarse"][k], wx, wy, wz)
        q[k] = (A[k, 0] * X + A[k, 1] * Y + A[k, 2] * Z + t[k] + u) / vox[k] + c[k]
    return q


def output_point(defo, tpl, target):
    """Output-grid point (template index units) whose pull-map lands on `target`."""
    p = np.array(target, dtype=np.float64)
    for _ in range(30):
        q = deform_points(defo, tpl, p[None])[0]
        p = p - (q - target)
    return p


def make_lesion(rng, tpl, centre):
    """Edits, in a template-space box around `centre`: returns dict of box slices and delta
    arrays for gm, wm, t1, plus flair excess and roi (soft) arrays, and the parameters."""
    vox = tpl.vox
    r = uni(rng, "radius_mm")
    axes = np.array([r * uni(rng, "axis_jitter") for _ in range(3)])
    thick = uni(rng, "thickening_mm")
    thick_k = uni(rng, "thickening_strength")
    blur = uni(rng, "blur_sigma_mm")
    h_sub = uni(rng, "flair_sub")
    h_ctx = uni(rng, "flair_ctx")
    depth = uni(rng, "sub_depth_mm")
    t1_sub = uni(rng, "t1_sub")
    tail = bool(rng.random() < RANGES["tail_probability"])
    tail_r0 = uni(rng, "tail_radius_frac") * r
    tail_c = uni(rng, "tail_contrast_frac") * h_sub
    c = np.asarray(centre, dtype=np.float64)
    # tail end: nearest ventricle voxel, capped length
    vend, tail_len = None, 0.0
    if tail and len(tpl.ventricles):
        d = np.sqrt((((tpl.ventricles - c) * vox) ** 2).sum(1))
        i = int(np.argmin(d))
        vec = (tpl.ventricles[i] - c) * vox
        L = float(d[i])
        tail_len = min(max(L - 2.0, 0.0), RANGES["tail_max_mm"])
        if tail_len < axes.max():       # ventricle is inside the lesion itself: no tail
            tail = False
        else:
            vend = c + vec / L * tail_len / vox
    elif tail:
        tail = False
    # box
    half = np.ceil((axes.max() * 1.5 + 3 * blur + 4) / vox).astype(int)
    lo = np.floor(c).astype(int) - half
    hi = np.floor(c).astype(int) + half + 1
    if tail:
        lo = np.minimum(lo, np.floor(vend).astype(int) - 4)
        hi = np.maximum(hi, np.floor(vend).astype(int) + 5)
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, tpl.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    gm0, wm0, t10 = tpl.gm[box].copy(), tpl.wm[box].copy(), tpl.t1[box].copy()
    m = tpl.mask[box]
    ii = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), -1)
    rel = (ii - c) * vox
    dn = np.sqrt(((rel / axes) ** 2).sum(-1))             # 1 on the ellipsoid surface
    w = sigmoid((1.0 - dn) * r / 1.0) * m                  # ~1 mm soft edge
    dW = ndi.distance_transform_edt(wm0 > 0.5, sampling=vox).astype(np.float32)
    # 1) cortical thickening: WM within `thick` of the cortex becomes GM-like
    s = thick_k * w * sigmoid((thick - dW) / 0.6) * wm0
    gm, wm = gm0 + s, wm0 - s
    t1 = t10 + s * (tpl.t1_gm - tpl.t1_wm)
    # 2) subcortical hyperintensity band below the (thickened) cortex
    sub = w * wm * sigmoid((thick + depth - dW) / 1.0)
    flair = h_sub * sub + h_ctx * w * gm0
    t1 = t1 - t1_sub * (tpl.t1_wm - tpl.t1_gm) * sub
    # 3) transmantle tail toward the ventricle, tapering
    tailw = np.zeros_like(w)
    if tail:
        seg = (vend - c) * vox
        sl = float(np.sqrt((seg ** 2).sum()))
        u = np.clip((rel @ seg) / sl ** 2, 0.0, 1.0)
        dseg = np.sqrt(((rel - u[..., None] * seg) ** 2).sum(-1))
        rad = tail_r0 * (1 - u) + 1.0 * u
        tailw = sigmoid((rad - dseg) / 0.6) * wm * m
        tailw *= sigmoid((sl - (rel @ seg) / sl) / 1.0)  # stop at the end point
        flair = np.maximum(flair, tail_c * (1.0 - 0.6 * u) * tailw)
        t1 = t1 - 0.5 * t1_sub * (tpl.t1_wm - tpl.t1_gm) * tailw * (1 - u)
    # 4) blur the grey/white junction inside the lesion
    wb = np.clip(w * 1.2, 0, 1)
    sig = blur / vox
    gm = (1 - wb) * gm + wb * ndi.gaussian_filter(gm, sig)
    wm = (1 - wb) * wm + wb * ndi.gaussian_filter(wm, sig)
    t1 = (1 - wb) * t1 + wb * ndi.gaussian_filter(t1, sig)
    flair = (1 - wb) * flair + wb * ndi.gaussian_filter(flair, sig)
    gm, wm = np.clip(gm, 0, 1) * m, np.clip(wm, 0, 1) * m
    # ROI: lesional cortex + subcortical band + tail
    roi = np.maximum.reduce([w * (gm0 + s > 0.3), (sub > 0.2) * 1.0, (tailw > 0.3) * 1.0])
    roi = ndi.gaussian_filter(roi.astype(np.float32), 0.5) * m
    params = {"radius_mm": round(r, 3), "semi_axes_mm": axes.round(3).tolist(),
              "thickening_mm": round(thick, 3), "thickening_strength": round(thick_k, 3), "blur_sigma_mm": round(blur, 3),
              "flair_sub_contrast": round(h_sub, 4), "flair_ctx_contrast": round(h_ctx, 4),
              "sub_depth_mm": round(depth, 3), "t1_sub_darkening": round(t1_sub, 4),
              "tail": tail, "tail_length_mm": round(tail_len, 2) if tail else 0.0,
              "tail_radius0_mm": round(tail_r0, 3) if tail else 0.0,
              "tail_contrast": round(tail_c, 4) if tail else 0.0,
              "tail_end_template_vox": (vend.round(2).tolist() if tail else None)}
    return {"box": box, "lo": lo, "dgm": gm - gm0, "dwm": wm - wm0, "dt1": t1 - t10,
            "flair": flair.astype(np.float32), "roi": roi.astype(np.float32),
            "roi_vox": np.argwhere(roi > 0.5) + lo, "params": params}


def sample(arr, q, order=1):
    return ndi.map_coordinates(arr, q, order=order, mode="constant", cval=0.0, prefilter=False)


def sample_box(arr, lo, q):
    """Sample a box array (origin `lo`) at q (3, ...); zero outside the box."""
    out = np.zeros(q.shape[1:], np.float32)
    qq = q - lo.reshape((3,) + (1,) * (q.ndim - 1))
    ins = np.ones(q.shape[1:], bool)
    for k in range(3):
        ins &= (qq[k] > -1) & (qq[k] < arr.shape[k])
    if ins.any():
        out[ins] = ndi.map_coordinates(arr, qq[:, ins], order=1, mode="constant", cval=0.0,
                                       prefilter=False)
    return out


def make_subject(tpl, grid, sid, patient, seed, index, twin=False):
    rng = np.random.default_rng([seed, index, 0x5ca1ab1e])
    info = {"id": sid, "group": "patient" if patient else "control", "seed": seed,
            "subject_index": index}
    defo = draw_deformation(rng, tpl, grid)
    info["deformation"] = defo["params"]
    ints = {k: uni(rng, k) for k in ("t1_wm_level", "flair_wm_level", "flair_gm_over_wm",
                                      "flair_csf_over_wm", "texture_t1", "texture_flair",
                                      "noise_t1", "noise_flair")}
    ints["bias_log_std_t1"] = uni(rng, "bias_log_std_t1")
    ints["bias_log_std_flair"] = uni(rng, "bias_log_std_flair")
    info["intensity"] = {k: round(v, 5) for k, v in ints.items()}
    q = deform_grid(defo, tpl, grid)
    lesion = None
    if patient:
        zlo, zhi = grid.z0 + 5, grid.z1 - 5
        cand = tpl.candidates[(tpl.candidates[:, 2] >= zlo + 2) & (tpl.candidates[:, 2] <= zhi - 2)]
        if len(cand) == 0:
            sys.exit(f"no cortical lesion candidates in z {zlo}..{zhi}: widen --z-range")
        for attempt in range(50):
            centre = cand[int(rng.integers(len(cand)))].astype(np.float64)
            pc = output_point(defo, tpl, centre)
            if not (zlo <= pc[2] <= zhi):
                continue
            les = make_lesion(rng, tpl, centre)
            roi_s = sample_box(les["roi"], les["lo"], q)
            if (roi_s > 0.5).any():
                lesion = les
                break
        if lesion is None:
            sys.exit(f"{sid}: could not place a lesion on the kept slices")
        codes = lobe_of(*tpl.mni(lesion["roi_vox"]).T)
        cls, frac = lobe_class(codes)
        mni_c = tpl.mni(centre[None])[0]
        kz = (pc[2] - grid.z0) / grid.step
        info["lesion"] = dict(lesion["params"], **{
            "lobe_class": cls, "lobe_name": LOBE_NAMES[cls],
            "lobe_fractions": {k: round(v, 4) for k, v in frac.items()},
            "centre_template_vox": centre.astype(int).tolist(),
            "centre_mni_mm": mni_c.round(2).tolist(),
            "centre_out_vox": [round(float(pc[0]), 2), round(float(pc[1]), 2), round(float(kz), 2)],
            "centre_out_template_z": round(float(pc[2]), 2)})
    # tissue maps on the output grid
    gm = sample(tpl.gm, q)
    wm = sample(tpl.wm, q)
    msk = sample(tpl.mask, q)
    t1 = sample(tpl.t1, q)
    rim_w, cap_w, rim_c = uni(rng, "rim_mm"), uni(rng, "cap_mm"), uni(rng, "flair_rim")
    info["periventricular"] = {"rim_mm": round(rim_w, 3), "cap_mm": round(cap_w, 3),
                               "flair_rim": round(rim_c, 4)}
    dv = sample(tpl.vent_dist, q)
    cap = np.clip(sample(tpl.cap, q), 0, 1)
    rim = ((0.4 + 0.6 * cap) * sigmoid((rim_w + cap_w * cap - dv) / 0.7)
           * (dv > 0.5) * rim_c * (ints["flair_gm_over_wm"] - 1.0))
    del dv, cap
    Fw = 1.0
    Fg = ints["flair_gm_over_wm"]
    Fc = ints["flair_csf_over_wm"]

    def flair_of(g, w):
        """Noiseless FLAIR (units of WM) of tissue maps g, w: CSF dark, rims bright."""
        return Fc * np.clip(msk - g - w, 0, 1) + Fg * g + Fw * w + rim * w

    fl_ex = roi = None
    # The patient's lesion-free twin: the same subject before the lesion edit, given the
    # same texture, bias and noise below, so that the two FLAIRs differ by the lesion only.
    flair_twin = flair_of(gm, wm) if twin and lesion is not None else None
    if lesion is not None:
        lo = lesion["lo"]
        gm += sample_box(lesion["dgm"], lo, q)
        wm += sample_box(lesion["dwm"], lo, q)
        t1 += sample_box(lesion["dt1"], lo, q)
        fl_ex = sample_box(lesion["flair"], lo, q)
        roi = sample_box(lesion["roi"], lo, q) > 0.5
    del q
    brain = msk > 0.5
    flair = flair_of(gm, wm)
    if fl_ex is not None:
        flair += fl_ex * (Fg - Fw)
    if roi is not None:
        # noiseless FLAIR (units of WM) of normal tissue vs the lesion, for the JSON
        nr = brain & ~roi
        g, wref = np.median(flair[nr & (gm > 0.5)]), np.median(flair[nr & (wm > 0.5)])
        lv = flair[roi & brain]
        info["lesion"]["flair_check"] = {
            "normal_gm_median": round(float(g), 4), "normal_wm_median": round(float(wref), 4),
            "roi_median": round(float(np.median(lv)), 4),
            "roi_p90": round(float(np.percentile(lv, 90)), 4),
            "roi_fraction_above_gm_median": round(float((lv > g).mean()), 4)}
    tsig = (1.0, 1.0, 1.0 / grid.step)
    texture = 1 + ints["texture_flair"] * smooth_noise(rng, grid.cshape, tsig)
    flair *= texture
    if flair_twin is not None:
        flair_twin *= texture
    t1 = t1 * (1 + ints["texture_t1"] * smooth_noise(rng, grid.cshape, tsig))
    # bias fields (coarse, 16 mm), trilinear upsampling
    out = {}
    sp = 16.0
    nsh = tuple(int(np.ceil(n * v / sp)) + 1 for n, v in zip(tpl.shape, tpl.vox))
    wx = interp_matrix(grid.xs * tpl.vox[0] / sp, nsh[0])
    wy = interp_matrix(grid.ys * tpl.vox[1] / sp, nsh[1])
    wz = interp_matrix(grid.z * tpl.vox[2] / sp, nsh[2])
    for name, img, level, bstd, nfrac in (
            ("T1w", t1, ints["t1_wm_level"], ints["bias_log_std_t1"], ints["noise_t1"]),
            ("FLAIR", flair, ints["flair_wm_level"], ints["bias_log_std_flair"], ints["noise_flair"])):
        bias = np.exp(bstd * upsample(smooth_noise(rng, nsh, 1.2), wx, wy, wz))
        sigma = nfrac * level
        n1 = rng.standard_normal(grid.cshape, dtype=np.float32) * sigma
        n2 = rng.standard_normal(grid.cshape, dtype=np.float32) * sigma
        versions = [(name, img)]
        if name == "FLAIR" and flair_twin is not None:
            versions.append(("FLAIR_twin", flair_twin))
        for key, clean in versions:
            v = np.sqrt((clean * bias * level + n1) ** 2 + n2 ** 2)
            v[~brain] = 0
            full = np.zeros(grid.shape, np.int16)
            full[grid.xs[0]:grid.xs[-1] + 1, grid.ys[0]:grid.ys[-1] + 1] = np.clip(
                np.rint(v), 0, 32767).astype(np.int16)
            out[key] = full
    if roi is not None:
        full = np.zeros(grid.shape, np.uint8)
        full[grid.xs[0]:grid.xs[-1] + 1, grid.ys[0]:grid.ys[-1] + 1] = roi & brain
        out["FLAIR_roi"] = full
        ks = np.nonzero(full.any((0, 1)))[0]
        info["lesion"]["roi_voxels"] = int(full.sum())
        info["lesion"]["roi_out_slices"] = ks.tolist()
        info["lesion"]["roi_template_z"] = grid.z[ks].tolist()
    return out, info


# ----------------------------------------------------------------------------------------

def parse_range(text, n):
    if text is None:
        return 0, n - 1
    try:
        a, b = (int(t) for t in text.split(":"))
    except ValueError:
        sys.exit(f"--z-range {text!r}: expected A:B")
    if not (0 <= a <= b < n):
        sys.exit(f"--z-range {text!r}: must satisfy 0 <= A <= B < {n}")
    if b - a < 12:
        sys.exit(f"--z-range {text!r}: need at least 13 slices (lesions sit >= 5 mm from the ends)")
    return a, b


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--t1", required=True, help="skull-stripped ~1 mm T1 volume (e.g. MNI152 2009a)")
    ap.add_argument("--gm", help="GM probability map on the T1 grid (with --wm)")
    ap.add_argument("--wm", help="WM probability map on the T1 grid (with --gm)")
    ap.add_argument("--subjects", type=int, required=True)
    ap.add_argument("--lesion-fraction", type=float, required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--png", action="store_true", help="also write the PNG slice layout under OUT/png/")
    ap.add_argument("--z-range", help="inclusive axial voxel range A:B of the T1 grid (default: all)")
    ap.add_argument("--z-step", type=int, default=1, help="keep every K-th axial slice (default 1)")
    ap.add_argument("--first-id", type=int, default=1, help="number of the first subject (default 1)")
    ap.add_argument("--twins", action="store_true",
                    help="also write each patient's lesion-free twin FLAIR under sub-*/twin/")
    a = ap.parse_args(argv)
    if bool(a.gm) != bool(a.wm):
        sys.exit("--gm and --wm go together")
    if a.subjects < 1 or not (0.0 <= a.lesion_fraction <= 1.0) or a.z_step < 1 or a.first_id < 0:
        sys.exit("need --subjects >= 1, 0 <= --lesion-fraction <= 1, --z-step >= 1, --first-id >= 0")
    t0 = time.time()
    tpl = Template(a.t1, a.gm, a.wm)
    z0, z1 = parse_range(a.z_range, tpl.shape[2])
    grid = Grid(tpl, z0, z1, a.z_step)
    print(f"template ready in {time.time() - t0:.1f} s; output grid {grid.shape}, "
          f"{len(tpl.candidates)} lesion candidates, {len(tpl.ventricles)} ventricle voxels",
          file=sys.stderr)
    n_pat = int(round(a.lesion_fraction * a.subjects))
    perm = np.random.default_rng([a.seed, 0x0fcd]).permutation(a.subjects)
    patients = set(int(i) for i in perm[:n_pat])
    width = max(3, len(str(a.first_id + a.subjects - 1)))
    os.makedirs(a.out, exist_ok=True)
    rows = []
    for idx in range(a.subjects):
        ts = time.time()
        sid = f"sub-{a.first_id + idx:0{width}d}"
        vols, info = make_subject(tpl, grid, sid, idx in patients, a.seed, idx, a.twins)
        twin = vols.pop("FLAIR_twin", None)
        if twin is not None:
            os.makedirs(os.path.join(a.out, sid, "twin"), exist_ok=True)
            write_nifti(os.path.join(a.out, sid, "twin", f"{sid}_FLAIR.nii.gz"), twin,
                        grid.affine, tpl.codes)
        info["z_range"] = [z0, z1]
        info["z_step"] = a.z_step
        info["kept_template_z"] = grid.z.tolist()
        info["template"] = os.path.basename(a.t1)
        info["tissue_maps"] = "given" if a.gm else "segmented from T1 (3-class GMM)"
        info["ranges"] = RANGES
        anat = os.path.join(a.out, sid, "anat")
        os.makedirs(anat, exist_ok=True)
        for name, vol in vols.items():
            write_nifti(os.path.join(anat, f"{sid}_{name}.nii.gz"), vol, grid.affine, tpl.codes)
        with open(os.path.join(a.out, sid, f"{sid}_lesion.json"), "w") as fh:
            json.dump(info, fh, indent=1, sort_keys=True)
            fh.write("\n")
        if a.png:
            write_pngs(a.out, sid, vols, grid)
        les = info.get("lesion")
        rows.append([sid, info["group"],
                     str(les["lobe_class"]) if les else "0",
                     les["lobe_name"] if les else "n/a",
                     " ".join(f"{v:.2f}" for v in les["centre_out_vox"]) if les else "n/a",
                     " ".join(f"{v:.2f}" for v in les["centre_mni_mm"]) if les else "n/a",
                     f"{les['radius_mm']:.2f}" if les else "n/a",
                     f"{les['flair_sub_contrast']:.3f}" if les else "n/a",
                     ("yes" if les["tail"] else "no") if les else "n/a",
                     str(a.seed)])
        print(f"{sid}: {info['group']}"
              + (f", lobe {les['lobe_class']} ({les['lobe_name']}), r={les['radius_mm']:.1f} mm, "
                 f"tail={'yes' if les['tail'] else 'no'}, roi {les['roi_voxels']} vox" if les else "")
              + f" [{time.time() - ts:.1f} s]", file=sys.stderr)
    with open(os.path.join(a.out, "participants.tsv"), "w") as fh:
        fh.write("participant_id\tgroup\tlobe_label\tlobe_name\tcentre_vox_xyz\tcentre_mni_mm\t"
                 "radius_mm\tflair_contrast\ttail\tseed\n")
        for r in rows:
            fh.write("\t".join(r) + "\n")
    print(f"done: {a.subjects} subjects ({n_pat} patients) in {time.time() - t0:.1f} s -> {a.out}",
          file=sys.stderr)


def write_pngs(out, sid, vols, grid):
    t1, fl = vols["T1w"], vols["FLAIR"]
    roi = vols.get("FLAIR_roi")
    s1 = 255.0 / max(float(t1.max()), 1.0)
    s2 = 255.0 / max(float(fl.max()), 1.0)
    for k, z in enumerate(grid.z):
        if not (t1[:, :, k].any() or fl[:, :, k].any()):
            continue
        name = f"{sid}_z{int(z):03d}"
        d = os.path.join(out, "png", name)
        os.makedirs(d, exist_ok=True)
        write_png(os.path.join(d, f"{name}_T1w.png"), np.rint(t1[:, :, k].T * s1))
        write_png(os.path.join(d, f"{name}_FLAIR.png"), np.rint(fl[:, :, k].T * s2))
        if roi is not None and roi[:, :, k].any():
            write_png(os.path.join(d, f"{name}_FLAIR_roi.png"), roi[:, :, k].T * 255)


if __name__ == "__main__":
    main()
