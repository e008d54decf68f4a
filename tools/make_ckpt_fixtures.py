#!/usr/bin/env python3
"""Write the small checkpoint fixtures of tests/checkpoint.rs into tests/fixtures/ckpt/.

Run from the repository root in the environment of tools/requirements.txt:
    .venv-tools/bin/python tools/make_ckpt_fixtures.py
The output is deterministic apart from the zip timestamps and torch's serialization id.
"""

import collections
import io
import json
import os
import random
import struct
import zipfile

import torch

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "ckpt")

expected = {}


def record(fname, tensors):
    """Remember the values the Rust reader must return (as float32, row-major)."""
    entry = {}
    for k, t in tensors.items():
        entry[k] = {
            "shape": list(t.shape),
            "dtype": str(t.dtype).replace("torch.", ""),
            # .float() rounds float64 to nearest, exactly what the reader does.
            "values": t.detach().float().contiguous().reshape(-1).tolist(),
        }
    expected[fname] = entry


def save_bytes(obj, **kw):
    """torch.save into memory: the archive's top-level folder is then named "archive"."""
    buf = io.BytesIO()
    torch.save(obj, buf, **kw)
    return buf.getvalue()


def write(fname, data):
    with open(os.path.join(OUT, fname), "wb") as f:
        f.write(data)


def rewrite_zip(src, fname, drop=(), replace=None):
    """Copy a torch archive, leaving out or replacing entries (names relative to its folder)."""
    replace = replace or {}
    zin = zipfile.ZipFile(io.BytesIO(src))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            rel = info.filename.split("/", 1)[1]
            if rel in drop:
                continue
            zout.writestr(info.filename, replace.get(rel, zin.read(info.filename)))
    write(fname, buf.getvalue())


def torch_layout_zip(fname, folder, pickle_bytes):
    """A zip in torch.save's layout around a hand-written pickle."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr(folder + "/data.pkl", pickle_bytes)
        z.writestr(folder + "/byteorder", b"little")
        z.writestr(folder + "/version", b"3\n")
    write(fname, buf.getvalue())


def main():
    os.makedirs(OUT, exist_ok=True)
    g = torch.Generator().manual_seed(1234)

    def rnd(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    # 1. Training-wrapper checkpoint: nested dict, UNet keys prefixed with "model.", views
    #    sharing one storage (transpose, offset slice), extra non-tensor keys of every kind.
    base = rnd(20)
    proj = torch.arange(12, dtype=torch.float32).reshape(3, 4) * 0.5 - 2.0
    sd = collections.OrderedDict()
    sd["model.input_blocks.0.0.weight"] = rnd(4, 2, 3, 3)
    sd["model.input_blocks.0.0.bias"] = rnd(4)
    sd["model.proj.weight"] = proj.t()  # stride (1, 4), not contiguous
    sd["model.base"] = base
    sd["model.slice"] = base[5:11].view(2, 3)  # storage offset 5 in base's storage
    sd["model.every_other"] = base[1::2]  # stride 2
    sd["model.conv1d.weight"] = rnd(3, 2, 1)
    sd["model.scalar"] = torch.tensor(0.25)
    # What Module.state_dict() attaches; pickled as OrderedDict state, applied by BUILD.
    sd._metadata = collections.OrderedDict([("", {"version": 1}), ("model", {"version": 2})])
    step = torch.tensor(10.0)
    opt = {
        "state": {0: {"step": step, "exp_avg": rnd(4)}},
        "param_groups": [
            {"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "amsgrad": False, "foreach": None,
             "params": [0, 1], "name": "unet"}
        ],
    }
    ckpt = {
        "state_dict": sd,
        "epoch": 7,
        "global_step": 2**40 + 3,
        "neg": -123456,
        "best": -1.5,
        "note": "fixture \u00e9\u4e2d",
        "blob": b"\x00\x01abc",
        "flags": [True, False, None],
        "optimizer_states": [opt],
        "top_level_tensor": rnd(2),  # ignored: the state dict wins
    }
    data = save_bytes(ckpt)
    write("nested_f32.pt", data)
    record("nested_f32.pt", sd)

    # Same content under an arbitrary folder name (torch names it after the file).
    path = os.path.join(OUT, "unet_weights.pt")
    torch.save(ckpt, path)
    record("unet_weights.pt", sd)
    with zipfile.ZipFile(path) as z:
        assert z.namelist()[0].startswith("unet_weights/"), z.namelist()

    # Protocol 4: FRAME, MEMOIZE, SHORT_BINUNICODE, STACK_GLOBAL.
    write("proto4.pt", save_bytes(ckpt, pickle_protocol=4))
    record("proto4.pt", sd)

    # 2. Bare state dict (classifier style, no prefix), plain dict.
    bare = {"out.2.weight": rnd(9, 8), "out.2.bias": rnd(9), "time_embed.0.weight": rnd(8, 4)}
    write("bare_f32.pt", save_bytes(bare))
    record("bare_f32.pt", bare)

    # 3. Half precision kinds and float64, each with a transposed view.
    for dtype, name in ((torch.float16, "f16"), (torch.bfloat16, "bf16"), (torch.float64, "f64")):
        w = rnd(3, 5, dtype=dtype)
        t = {"w": w, "wt": w.t(), "b": rnd(5, dtype=dtype)}
        if dtype == torch.float64:
            t["tiny"] = torch.tensor([1e-300, 3.4e38, 1.0 / 3.0], dtype=dtype)
        else:
            t["special"] = torch.tensor([0.0, -0.0, 1.0, -2.5, 65504.0 if name == "f16" else 1e38,
                                         6.1e-5, 5.96e-8 if name == "f16" else 1e-38], dtype=dtype)
        write(f"{name}.pt", save_bytes({"state_dict": t, "epoch": 1}))
        record(f"{name}.pt", t)

    # 4. safetensors, mixed dtypes, written by hand (format: u64 header length, JSON header, data).
    st = {"model.a": rnd(2, 3), "model.h": rnd(4, dtype=torch.float16), "model.bf": rnd(2, 2, dtype=torch.bfloat16)}
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
    header, blob = {"__metadata__": {"format": "pt"}}, b""
    for k, t in st.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes()
        header[k] = {"dtype": names[t.dtype], "shape": list(t.shape),
                     "data_offsets": [len(blob), len(blob) + len(raw)]}
        blob += raw
    hj = json.dumps(header).encode()
    hj += b" " * (-len(hj) % 8)
    write("mixed.safetensors", struct.pack("<Q", len(hj)) + hj + blob)
    record("mixed.safetensors", st)

    # 5. Files that must be refused.
    # GLOBAL posix.system + REDUCE: what pickle would run as os.system("echo pwned").
    def binunicode(text):
        raw = text.encode()
        return b"X" + struct.pack("<I", len(raw)) + raw

    def short_binunicode(text):
        raw = text.encode()
        return b"\x8c" + bytes([len(raw)]) + raw

    evil = (b"\x80\x02}q\x00" + binunicode("state_dict") + b"q\x01cposix\nsystem\nq\x02"
            + binunicode("echo pwned") + b"q\x03\x85q\x04Rq\x05s.")
    torch_layout_zip("malicious_global.pt", "archive", evil)
    # Protocol 4 spelling: STACK_GLOBAL builtins.eval.
    evil4 = (b"\x80\x04" + short_binunicode("builtins") + b"\x94" + short_binunicode("eval") + b"\x94\x93\x94"
             + short_binunicode("1+1") + b"\x94\x85\x94R\x94.")
    torch_layout_zip("malicious_stack_global.pt", "unet_weights", evil4)
    write("truncated.pt", data[: len(data) // 2])
    rng = random.Random(99)
    noise = bytes(rng.getrandbits(8) for _ in range(4096))
    assert noise[:2] != b"PK" and noise[0] != 0x80
    write("random.bin", noise)
    rewrite_zip(data, "big_endian.pt", replace={"byteorder": b"big"})
    rewrite_zip(data, "missing_storage.pt", drop=("data/0",))
    rewrite_zip(data, "short_storage.pt", replace={"data/0": b"\x00" * 8})
    rewrite_zip(data, "no_data_pkl.pt", drop=("data.pkl",))
    write("state_dict_not_tensors.pt", save_bytes({"state_dict": {"w": rnd(2), "lr": 0.1}, "epoch": 1}))
    write("state_dict_list.pt", save_bytes({"state_dict": [rnd(2)]}))
    write("no_tensors.pt", save_bytes({"epoch": 1, "note": "empty"}))

    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(expected, f, indent=None, separators=(",", ":"))
        f.write("\n")

    total = sum(os.path.getsize(os.path.join(OUT, n)) for n in os.listdir(OUT))
    print(f"wrote {len(os.listdir(OUT))} files, {total} bytes, into {os.path.normpath(OUT)}")


if __name__ == "__main__":
    main()
