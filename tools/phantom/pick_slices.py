#!/usr/bin/env python3
"""Copies a subset of make.py's PNG slice layout into a new folder, so that an
evaluation on CPU stays short while keeping every subject.

    python3 tools/phantom/pick_slices.py DIR/png OUT --lesion-slices 3 --healthy-slices 1

Per subject: the `--lesion-slices` slices with the largest lesion area (small
lesion cross-sections vanish at the network's size), and `--healthy-slices`
lesion-free slices evenly spaced over the subject's kept range.
"""
from __future__ import annotations

import argparse
import pathlib
import shutil
import sys
from collections import defaultdict

import numpy as np
from PIL import Image


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="the png/ folder written by make.py --png")
    ap.add_argument("out")
    ap.add_argument("--lesion-slices", type=int, default=3)
    ap.add_argument("--healthy-slices", type=int, default=1)
    args = ap.parse_args(argv)

    src, out = pathlib.Path(args.src), pathlib.Path(args.out)
    by_subject: dict[str, list[tuple[pathlib.Path, int]]] = defaultdict(list)
    for folder in sorted(p for p in src.iterdir() if p.is_dir()):
        subject = folder.name.rsplit("_z", 1)[0]
        rois = list(folder.glob("*_roi.png"))
        area = int(np.count_nonzero(np.asarray(Image.open(rois[0])))) if rois else 0
        by_subject[subject].append((folder, area))
    if not by_subject:
        raise SystemExit(f"{src}: no slice folders")
    out.mkdir(parents=True, exist_ok=True)
    picked = 0
    for subject, slices in sorted(by_subject.items()):
        lesion = sorted((s for s in slices if s[1] > 0), key=lambda s: -s[1])[: args.lesion_slices]
        healthy = [s for s in slices if s[1] == 0]
        if healthy and args.healthy_slices:
            at = np.linspace(0, len(healthy) - 1, args.healthy_slices + 2)[1:-1].round().astype(int)
            healthy = [healthy[i] for i in sorted(set(at))]
        else:
            healthy = []
        for folder, _ in lesion + healthy:
            shutil.copytree(folder, out / folder.name, dirs_exist_ok=True)
            picked += 1
        print(f"{subject}: {len(lesion)} lesion, {len(healthy)} healthy slice(s)")
    print(f"{picked} slices -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
