#!/usr/bin/env python3
"""Write tests/fixtures/ (the PyTorch ground truth) that tests/fixtures/README.md
describes. From the repository root, in the environment of tools/requirements.txt:

    .venv-tools/bin/python tools/make_fixtures.py [--out tests/fixtures]

Deterministic: fixed seeds, one CPU thread. Every network parameter is
random (including the ones PyTorch initialises to zero), the same float32
weights drive the float32 run and, upcast, the float64 run; the float64
results are the references (`*_ref.npy`), the float32-vs-float64 gap of each
is the noise floor recorded in manifest.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import pathlib
import sys

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import fcd_ref as R  # noqa: E402

B, H, W = 2, 32, 32
WEIGHT_SEED = 20240607
DATA_SEED = 7
UNET_T, UNET_Y = [7, 93], [0, 3]
CLS_T = [5, 61]
INV_T = 37
GUIDED_T = 42
GUIDANCE = 5.0

CONFIG_YAML = """\
# Small diffusion config in the published layout (fixtures for the fcd engine).
tester:
  target: modules.Tester.Tester
  params:
    model_path: unet.pt
    noise_level: 100
    infer_step: 1000
    th: 0.4
    eta: 0.
    guide_w: 5

model:
  target: models.diffusion.ddpm2.DDPM
  params:
    linear_start: 0.0015
    linear_end: 0.0155
    timesteps: 1000
    image_size: 32
    channels: 2
    condition_type: t1
    guidance: cg
    use_ddim: True

    unet_config:
      target: models.unet.openaiunet.UNetModel
      params:
        image_size: 32
        in_channels: 2
        out_channels: 1
        model_channels: 32
        attention_resolutions: [ 2,4 ]
        num_res_blocks: 1
        channel_mult: [ 1,2,2 ]
        num_heads: 2
        use_scale_shift_norm: True
        resblock_updown: True
        num_classes: 9

    classifier_config:
      target: models.classifier.classifier.Classifier
      params:
        ckpt_path: classifier.pt
        timesteps: 1000
        linear_start: 0.0015
        linear_end: 0.0155
        image_size: 32
        in_channels: 1
        out_channels: 9
        model_channels: 32
        attention_resolutions: [ 2,4 ]
        num_res_blocks: 1
        channel_mult: [ 1,2,2 ]
        num_heads: 1
        num_head_channels: 32
        use_scale_shift_norm: True
        resblock_updown: True
        pool: attention
"""

# Output layers PyTorch initialises to zero; they get random weights too,
# somewhat larger than the rest so that every residual branch matters.
OUTPUT_LAYER_SUFFIXES = ("out_layers.3", "proj_out", "c_proj")
# Gains (x 1/sqrt(fan_in) for weights, plain std for embeddings), tuned so that
# activations stay O(1) (block outputs std 1..2.5, UNet eps std ~1) and the
# guidance step s * grad is ~0.04 per pixel on average (max ~0.4).
GAINS = {"default": 1.0, "output": 1.5, "emb": 0.5, "c_proj": 1.5, "label": 0.5, "pos": 0.5}


def randomise(model: nn.Module, gen: torch.Generator, unet_head: bool, gains: dict) -> None:
    def normal(shape):
        return torch.randn(shape, generator=gen, dtype=torch.float32)

    def uniform(shape, r):
        return (torch.rand(shape, generator=gen, dtype=torch.float32) * 2 - 1) * r

    mods = dict(model.named_modules())
    with torch.no_grad():
        for name, p in model.named_parameters():
            owner, leaf = name.rsplit(".", 1)
            mod = mods[owner]
            if isinstance(mod, nn.GroupNorm):
                v = 1 + uniform(p.shape, 0.3) if leaf == "weight" else uniform(p.shape, 0.3)
            elif isinstance(mod, nn.Embedding):
                v = normal(p.shape) * gains["label"]
            elif leaf == "positional_embedding":
                v = normal(p.shape) * gains["pos"]
            elif leaf == "bias":
                v = uniform(p.shape, 0.1)
            else:
                fan_in = p[0].numel()
                g = gains["default"]
                if owner.endswith(OUTPUT_LAYER_SUFFIXES) or (unet_head and owner == "out.2"):
                    g = gains["output"]
                if owner.endswith("c_proj"):
                    g = gains["c_proj"]
                if owner.endswith("emb_layers.1"):
                    g = gains["emb"]
                v = normal(p.shape) * (g / math.sqrt(fan_in))
            p.copy_(v)


# --------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------


def blobs(rng: np.random.Generator, n: int, amp: tuple, sig: tuple, rmax: float) -> np.ndarray:
    rr, cc = np.mgrid[0:H, 0:W].astype(np.float64)
    out = np.zeros((H, W))
    for _ in range(n):
        rad, ang = rng.uniform(0, rmax), rng.uniform(0, 2 * np.pi)
        r0, c0 = 15.5 + rad * np.sin(ang), 15.5 + rad * np.cos(ang)
        s = rng.uniform(*sig)
        out += rng.uniform(*amp) * np.exp(-((rr - r0) ** 2 + (cc - c0) ** 2) / (2 * s * s))
    return out


def make_mri(rng: np.random.Generator):
    rr, cc = np.mgrid[0:H, 0:W].astype(np.float64)
    flair, t1, lesion = [], [], []
    for b in range(B):
        radius = 13.0 + b
        disc = (rr - 15.5) ** 2 + (cc - 15.5) ** 2 <= radius ** 2
        base_f = 300 + blobs(rng, 8, (-80, 160), (2.0, 5.0), radius - 2)
        base_t = 500 + blobs(rng, 8, (-150, 150), (2.0, 5.0), radius - 2)
        ang = rng.uniform(0, 2 * np.pi)
        lr, lc = 15.5 + 6 * np.sin(ang), 15.5 + 6 * np.cos(ang)
        les = 400 * np.exp(-((rr - lr) ** 2 + (cc - lc) ** 2) / (2 * 1.8 ** 2))
        flair.append(np.where(disc, np.maximum(base_f + les, 20.0), 0.0))
        t1.append(np.where(disc, np.maximum(base_t, 20.0), 0.0))
        lesion.append(les > 100)
    f = np.stack(flair)[:, None].astype(np.float32)
    t = np.stack(t1)[:, None].astype(np.float32)
    return f, t, np.stack(lesion)


# --------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------


def floors(a32: torch.Tensor, a64: torch.Tensor) -> dict:
    d = a32.to(torch.float64) - a64
    return {"rel_l2": float(d.norm() / a64.norm()), "max_abs": float(d.abs().max())}


class Twin:
    """The float32 models and their float64 copies, run on the same inputs."""

    def __init__(self, unet, cls, abar32):
        self.m = {torch.float32: (unet, cls), torch.float64: (copy.deepcopy(unet).double(), copy.deepcopy(cls).double())}
        self.sch = {dt: R.Schedule(abar32, dt) for dt in self.m}

    def both(self, fn, *arrays):
        """fn(unet, cls, sch, *tensors) in float32 and float64 -> (out32, out64)."""
        res = {}
        for dt, (u, c) in self.m.items():
            ts = [torch.from_numpy(a).to(dt) for a in arrays]
            res[dt] = fn(u, c, self.sch[dt], *ts)
        return res[torch.float32], res[torch.float64]


def post_inputs(rng, flair_raw, lesion):
    """x0 and a pseudo-healthy image for SPEC 7: lesion removed, contrast changed, background constant."""
    x0 = R.normalize_pm1(flair_raw[:, 0])
    xh = []
    for b in range(B):
        disc = flair_raw[b, 0] > 0
        healed = flair_raw[b, 0].astype(np.float64).copy()
        healed[lesion[b]] = np.median(healed[disc & ~lesion[b]])
        healed = np.where(disc, 0.6 * healed ** 1.15 + rng.normal(0, 8, healed.shape), 0.0)
        xh.append(healed)
    xh = R.normalize_pm1(np.stack(xh).astype(np.float32)) * np.float32(0.9) - np.float32(0.05)
    return x0.astype(np.float32), xh.astype(np.float32)


def make_metrics_case(rng):
    """6 slices: 4 lesion slices (easy, far-top-peak, never recalled, partial), 2 healthy."""
    S = 6
    rr, cc = np.mgrid[0:H, 0:W].astype(np.float64)

    def bump(r0, c0, s, a):
        return a * np.exp(-((rr - r0) ** 2 + (cc - c0) ** 2) / (2 * s * s))

    maps = rng.uniform(0, 0.15, (S, H, W))
    masks = np.zeros((S, H, W), np.uint8)
    # 0: bright blob on the lesion: recalled at 1, good Dice.
    masks[0, 12:18, 10:17] = 1
    maps[0] += bump(14.5, 13, 2.5, 0.8)
    # 1: the highest peak far from the lesion, the second on it: R@1 fails, R@5 passes.
    masks[1, 4:8, 4:9] = 1
    maps[1] += bump(26, 25, 2.0, 0.85) + bump(6, 6, 2.0, 0.6)
    # 2: ten sharp peaks on a lattice away from a corner lesion: never recalled.
    masks[2, 29:32, 29:32] = 1
    lattice = [(0, 0), (0, 11), (0, 22), (10, 5), (10, 16), (10, 27), (20, 0), (20, 11), (20, 22), (30, 5)]
    for i, (r0, c0) in enumerate(lattice):
        maps[2] += bump(r0, c0, 1.2, 0.95 - 0.05 * i)
    # 3: irregular lesion half covered by a moderate blob.
    masks[3, 20:27, 8:12] = 1
    masks[3, 22:25, 12:16] = 1
    maps[3] += bump(23, 10, 2.0, 0.45)
    # 4, 5: healthy slices with a bright spot each.
    maps[4] += bump(10, 20, 2.0, 0.7)
    maps[5] += bump(25, 8, 3.0, 0.5)
    maps = np.stack([R.norm01(m) for m in maps]).astype(np.float32)
    return maps, masks


def check_metrics_case(maps, masks, met) -> None:
    """The metrics case must exercise what it was built for, or the fixture is useless."""
    rec = {k: [R.recalled(met["peaks"][i], masks[i], k) for i in range(4)] for k in (1, 5, 10)}
    assert rec[1][0] and rec[1][3], rec
    assert not rec[1][1] and rec[5][1], "slice 1 must fail R@1 and pass R@5"
    assert not rec[10][2] and len(met["peaks"][2]) == 10, "slice 2 must never be recalled"
    assert not masks[4:].any() and masks[:4].reshape(4, -1).any(axis=1).all()


def check_floors(fl: dict) -> None:
    for k, v in fl.items():
        assert all(math.isfinite(x) for x in v.values()), k
        hi = 1e-2 if k.startswith("sampler") else 1e-4
        assert 0 < v["rel_l2"] < hi, f"implausible float32 floor for {k}: {v}"


def main(argv=None) -> int:
    root = pathlib.Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(root / "tests" / "fixtures"))
    args = ap.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    def save(name, arr):
        assert arr.dtype.kind != "f" or np.isfinite(arr).all(), f"{name}: non-finite values"
        np.save(out / name, np.ascontiguousarray(arr))

    (out / "config_small.yaml").write_text(CONFIG_YAML)
    cfg = R.load_config(out / "config_small.yaml")
    mp = cfg["model"]["params"]
    gen = torch.Generator().manual_seed(WEIGHT_SEED)
    unet, cls = R.build_from_config(cfg)
    randomise(unet, gen, True, GAINS)
    randomise(cls, gen, False, GAINS)
    unet.eval(), cls.eval()
    torch.save({"state_dict": {"model." + k: v.detach().clone().contiguous() for k, v in unet.state_dict().items()},
                "epoch": 7, "note": "fixture"}, out / "unet.pt")
    torch.save({"state_dict": {k: v.detach().clone().contiguous() for k, v in cls.state_dict().items()},
                "epoch": 7}, out / "classifier.pt")

    abar32 = R.make_abar(int(mp["timesteps"]), float(mp["linear_start"]), float(mp["linear_end"]))
    save("schedule_abar.npy", abar32.numpy())
    tw = Twin(unet, cls, abar32)
    fl = {}

    rng = np.random.default_rng(DATA_SEED)
    flair_raw, t1_raw, lesion = make_mri(rng)
    x0 = R.normalize_pm1(flair_raw)
    cond = R.normalize_pm1(t1_raw)
    noise = rng.standard_normal((B, 1, H, W)).astype(np.float32)
    for n, a in [("flair_raw", flair_raw), ("t1_raw", t1_raw), ("x0", x0), ("cond", cond), ("noise", noise)]:
        save(f"{n}.npy", a)

    def noisy(t):
        a = float(abar32[t])
        z = rng.standard_normal((B, 1, H, W))
        return (math.sqrt(a) * x0 + math.sqrt(1 - a) * z).astype(np.float32)

    # UNet single forward
    unet_in = np.concatenate([noisy(50), cond], axis=1).astype(np.float32)
    save("unet_in.npy", unet_in)
    o32, o64 = tw.both(lambda u, c, s, x: u(x, torch.tensor(UNET_T), torch.tensor(UNET_Y)).detach(), unet_in)
    save("unet_out_ref.npy", o64.numpy())
    fl["unet_out"] = floors(o32, o64)

    # Classifier logits and input gradient
    cls_in = noisy(30)
    save("cls_in.npy", cls_in)
    (l32, g32), (l64, g64) = tw.both(lambda u, c, s, x: R.classifier_grad(c, x, torch.tensor(CLS_T), 0), cls_in)
    save("cls_logits_ref.npy", l64.numpy())
    save("cls_grad_ref.npy", g64.numpy())
    fl["cls_logits"] = floors(l32, l64)
    fl["cls_grad"] = floors(g32, g64)

    # One inversion step and one guided step
    inv_x = noisy(INV_T)
    save("inv_x.npy", inv_x)
    i32, i64 = tw.both(lambda u, c, s, x, cd: R.inversion_step(u, x, cd, INV_T, 0, s), inv_x, cond)
    save("inv_out_ref.npy", i64.numpy())
    fl["inv_out"] = floors(i32, i64)
    guided_x = noisy(GUIDED_T)
    save("guided_x.npy", guided_x)
    s32, s64 = tw.both(lambda u, c, s, x, cd: R.guided_step(u, c, x, cd, GUIDED_T, 0, GUIDANCE, s), guided_x, cond)
    save("guided_out_ref.npy", s64.numpy())
    fl["guided_out"] = floors(s32, s64)

    # Whole sampler
    for n in (10, 100):
        r32, r64 = tw.both(lambda u, c, s, x, cd, nz: R.sample(u, c, x, cd, nz, n, GUIDANCE, s), x0, cond, noise)
        save(f"sampler_n{n}_ref.npy", r64.numpy())
        save(f"sampler_n{n}_f32.npy", r32.numpy())
        fl[f"sampler_n{n}"] = floors(r32, r64)

    # Post-processing (numpy float32 is the reference)
    prng = np.random.default_rng(DATA_SEED + 1)
    px0, pxh = post_inputs(prng, flair_raw, lesion)
    matched = np.stack([R.hist_match(pxh[b], px0[b]) for b in range(B)])
    save("post_x0.npy", px0)
    save("post_xhat.npy", pxh)
    save("post_matched.npy", matched.astype(np.float32))
    save("anomaly_hm.npy", np.stack([R.anomaly(px0[b], matched[b]) for b in range(B)]).astype(np.float32))
    save("anomaly_nohm.npy", np.stack([R.anomaly(px0[b], pxh[b]) for b in range(B)]).astype(np.float32))

    # Metrics
    maps, masks = make_metrics_case(np.random.default_rng(DATA_SEED + 2))
    save("metrics_maps.npy", maps)
    save("metrics_masks.npy", masks)
    met = R.metrics(maps, masks, 0.4, 10.0)
    check_metrics_case(maps, masks, met)
    (out / "metrics.json").write_text(json.dumps(met, indent=1) + "\n")

    check_floors(fl)
    manifest = {"unet_t": UNET_T, "unet_y": UNET_Y, "cls_t": CLS_T, "inv_t": INV_T, "guided_t": GUIDED_T,
                "guidance": 5, "floors": fl, "torch_version": torch.__version__,
                "weight_seed": WEIGHT_SEED, "data_seed": DATA_SEED}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")

    print(f"{'output':<14}{'rel_l2':>12}{'max_abs':>12}")
    for k, v in fl.items():
        print(f"{k:<14}{v['rel_l2']:>12.3e}{v['max_abs']:>12.3e}")
    print("metrics:", {k: v for k, v in met.items() if k != "peaks"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
