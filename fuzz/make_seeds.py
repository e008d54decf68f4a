#!/usr/bin/env python3
"""Writes fuzz/corpus-seed/<target>/: the test fixtures each parser reads, and a few small
valid inputs made here (the standard library only). Run from the repository root."""

import gzip
import json
import pathlib
import shutil
import struct
import zipfile

FIX = pathlib.Path("tests/fixtures")
OUT = pathlib.Path("fuzz/corpus-seed")


def put(target, name, data):
    d = OUT / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


def npy(shape, descr, payload, fortran=False):
    header = "{'descr': '%s', 'fortran_order': %s, 'shape': (%s), }" % (
        descr, fortran, "".join(f"{d}, " for d in shape))
    pad = 64 - (10 + len(header) + 1) % 64
    header = header + " " * pad + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + payload


def nifti(dims, datatype, bitpix, payload, slope=0.0, vox_offset=352):
    h = bytearray(348)
    struct.pack_into("<i", h, 0, 348)
    dim = [len(dims)] + list(dims) + [1] * (7 - len(dims))
    struct.pack_into("<8h", h, 40, *dim)
    struct.pack_into("<hh", h, 70, datatype, bitpix)
    struct.pack_into("<8f", h, 76, 1, 1, 1, 1, 1, 1, 1, 1)
    struct.pack_into("<fff", h, 108, vox_offset, slope, 0.0)
    struct.pack_into("<hh", h, 252, 0, 1)  # qform_code 0, sform_code 1
    for row, at in enumerate((280, 296, 312)):
        struct.pack_into("<4f", h, at, *[1.0 if c == row else 0.0 for c in range(4)])
    h[344:348] = b"n+1\0"
    return bytes(h) + b"\0" * (vox_offset - 348) + payload


def safetensors(tensors):
    header, data = {}, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape,
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    for pt in sorted(FIX.glob("ckpt/*.pt")):
        if zipfile.is_zipfile(pt):
            z = zipfile.ZipFile(pt)
            for n in z.namelist():
                if n.endswith("data.pkl"):
                    put("pickle", pt.stem + ".pkl", z.read(n))
    put("pickle", "unet.pkl", zipfile.ZipFile(FIX / "unet.pt").read("unet/data.pkl"))

    put("safetensors", "mixed.safetensors", (FIX / "ckpt/mixed.safetensors").read_bytes())
    for name in ("bare_f32.pt", "f16.pt", "truncated.pt"):
        put("safetensors", name, (FIX / "ckpt" / name).read_bytes())
    put("safetensors", "three.safetensors", safetensors({
        "a.weight": ("F32", [2, 3], struct.pack("<6f", *range(6))),
        "b.bias": ("F16", [2], b"\x00\x3c\x00\x40"),
        "c": ("BF16", [1, 2], b"\x80\x3f\x00\x40"),
        "d": ("F64", [1], struct.pack("<d", 0.25)),
    }))

    for name in ("cls_logits_ref.npy", "schedule_abar.npy", "flair_raw.npy"):
        put("npy", name, (FIX / name).read_bytes())
    put("npy", "b1hw_f64.npy", npy((2, 1, 3, 4), "<f8", struct.pack("<24d", *range(24))))
    put("npy", "hw_fortran.npy", npy((3, 2), "<f4", struct.pack("<6f", *range(6)), True))
    put("npy", "bhw_i16.npy", npy((1, 2, 2), "<i2", struct.pack("<4h", 1, -2, 3, -4)))

    cube = (2, 3, 4)
    i16 = struct.pack("<24h", *range(24))
    f32 = struct.pack("<24f", *range(24))
    for mode, kind in ((0, "nii"), (1, "gzipped")):
        put("nifti", f"i16.{kind}", bytes([mode]) + nifti(cube, 4, 16, i16))
        put("nifti", f"f32_scaled.{kind}", bytes([mode]) + nifti(cube, 16, 32, f32, slope=2.0))
        put("nifti", f"u8_4d.{kind}",
            bytes([mode]) + nifti((2, 3, 4, 1), 2, 8, bytes(range(24)), vox_offset=400))
    put("nifti", "i16.nii.gz", b"\x02" + gzip.compress(nifti(cube, 4, 16, i16), mtime=0))

    for yaml in ("config_small.yaml", "variant/config.yaml",
                 "published/config_t1_cond_multiclass_cg.yaml"):
        put("config", yaml.replace("/", "_"),
            (FIX / yaml).read_bytes())


if __name__ == "__main__":
    main()
