#!/usr/bin/env python3
"""Sanity checks and montages for a phantom set made by make.py.

    python3 tools/phantom/check.py DIR [--montage OUTDIR]

Checks per subject: T1w/FLAIR/ROI share shape and affine, the affine matches the JSON's
z range/step, patients have a non-empty ROI on the kept slices and controls have none,
every kept slice with brain has a PNG folder (when DIR/png exists). With --montage, writes
OUTDIR/<sub>.png for patients: FLAIR and T1 at the lesion's largest slice, full and zoomed,
ROI contour in red. Needs matplotlib for --montage.
"""
import argparse
import glob
import json
import os
import sys

import nibabel as nib
import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--montage")
    a = ap.parse_args()
    bad = 0
    subs = sorted(glob.glob(os.path.join(a.dir, "sub-*")))
    for sd in subs:
        sid = os.path.basename(sd)
        info = json.load(open(os.path.join(sd, f"{sid}_lesion.json")))
        anat = os.path.join(sd, "anat")
        t1i = nib.load(os.path.join(anat, f"{sid}_T1w.nii.gz"))
        fli = nib.load(os.path.join(anat, f"{sid}_FLAIR.nii.gz"))
        t1, fl = t1i.get_fdata(), fli.get_fdata()
        roip = os.path.join(anat, f"{sid}_FLAIR_roi.nii.gz")
        msgs = []
        if t1.shape != fl.shape or not np.allclose(t1i.affine, fli.affine):
            msgs.append("T1/FLAIR grid mismatch")
        z0, z1 = info["z_range"]
        if t1.shape[2] != len(range(z0, z1 + 1, info["z_step"])):
            msgs.append("wrong number of slices")
        if abs(t1i.affine[2, 2] - info["z_step"]) > 1e-4:
            msgs.append("affine z voxel size != z_step")
        if ((t1 > 0) != (fl > 0)).mean() > 0.001:
            msgs.append("T1/FLAIR brain masks differ")
        brain = fl > 0
        line = f"{sid} {info['group']:7s} shape {t1.shape} "
        roi = None
        if info["group"] == "patient":
            if not os.path.exists(roip):
                msgs.append("patient without ROI")
            else:
                ri = nib.load(roip)
                roi = np.asarray(ri.dataobj) > 0
                if ri.shape != t1.shape or not np.allclose(ri.affine, t1i.affine):
                    msgs.append("ROI grid mismatch")
                if ri.get_data_dtype() != np.uint8:
                    msgs.append("ROI not uint8")
                if not roi.any():
                    msgs.append("empty ROI")
                L = info["lesion"]
                ks = np.nonzero(roi.any((0, 1)))[0]
                cz = L["centre_out_template_z"]
                if not (z0 + 5 <= cz <= z1 - 5):
                    msgs.append(f"lesion centre z {cz} not >= 5 mm inside {z0}:{z1}")
                les = fl[roi]
                # normal tissue reference: brain voxels away from the lesion
                norm = fl[brain & ~roi]
                p = np.percentile(norm, [50, 75, 90, 95, 99])
                line += (f"lobe {L['lobe_class']} ({L['lobe_name']}) r={L['radius_mm']:.1f} "
                         f"tail={L['tail']} roi={roi.sum()} vox on slices {ks.tolist()}; "
                         f"FLAIR lesion median {np.median(les):.0f} / brain p50,75,90,95,99 "
                         f"{np.round(p).astype(int).tolist()}; lesion>p95: {(les > p[3]).mean():.2f}; "
                         f"noiseless {L.get('flair_check')}")
        else:
            if os.path.exists(roip) and (np.asarray(nib.load(roip).dataobj) > 0).any():
                msgs.append("control with ROI")
        pngd = os.path.join(a.dir, "png")
        if os.path.isdir(pngd):
            zs = [z for k, z in enumerate(info["kept_template_z"]) if brain[:, :, k].any()]
            for k, z in enumerate(info["kept_template_z"]):
                d = os.path.join(pngd, f"{sid}_z{z:03d}")
                has = os.path.isdir(d)
                if has != (z in zs):
                    msgs.append(f"png folder {d} presence {has}")
                if has and roi is not None and roi[:, :, k].any() != os.path.exists(
                        os.path.join(d, f"{sid}_z{z:03d}_FLAIR_roi.png")):
                    msgs.append(f"png roi mismatch at z {z}")
        print(line + ("  OK" if not msgs else "  FAIL: " + "; ".join(msgs)))
        bad += bool(msgs)
        if a.montage and roi is not None and roi.any():
            montage(a.montage, sid, t1, fl, roi, info)
    print(f"{len(subs)} subjects, {bad} with problems")
    sys.exit(1 if bad else 0)


def montage(outdir, sid, t1, fl, roi, info):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(outdir, exist_ok=True)
    k = int(np.argmax(roi.sum((0, 1))))
    ij = np.argwhere(roi[:, :, k])
    ci, cj = ij.mean(0).astype(int)
    h = 28
    fig, ax = plt.subplots(2, 3, figsize=(13, 9))
    for r, (img, name) in enumerate(((fl, "FLAIR"), (t1, "T1w"))):
        sl = img[:, :, k].T
        vmax = np.percentile(sl[sl > 0], 99.5)
        for c, zoom in enumerate((False, True)):
            a = ax[r, c]
            a.imshow(sl, cmap="gray", origin="lower", vmin=0, vmax=vmax)
            if zoom:
                a.set_xlim(ci - h, ci + h)
                a.set_ylim(cj - h, cj + h)
            a.set_title(f"{name} z={info['kept_template_z'][k]}" + (" (zoom)" if zoom else ""))
            a.axis("off")
        a = ax[r, 2]
        a.imshow(sl, cmap="gray", origin="lower", vmin=0, vmax=vmax)
        a.contour(roi[:, :, k].T.astype(float), [0.5], colors="r", linewidths=0.8)
        a.set_xlim(ci - h, ci + h)
        a.set_ylim(cj - h, cj + h)
        a.set_title(f"{name} + ROI")
        a.axis("off")
    L = info["lesion"]
    fig.suptitle(f"{sid}: lobe {L['lobe_class']} ({L['lobe_name']}), r={L['radius_mm']:.1f} mm, "
                 f"flair_sub={L['flair_sub_contrast']:.2f}, thick={L['thickening_mm']:.1f} mm, "
                 f"tail={L['tail']}, MNI {L['centre_mni_mm']}")
    fig.tight_layout()
    fig.savefig(os.path.join(outdir, f"{sid}.png"), dpi=70)
    plt.close(fig)


if __name__ == "__main__":
    main()
