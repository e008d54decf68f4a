#!/usr/bin/env python3
"""Independent PyTorch reference of SPEC.md, in the project's shared folder
(the fixtures' ground truth).

Written from the SPEC, not from the published code. Module and parameter
names reproduce the published state-dict keys exactly (see reference/*.tsv
in the shared folder, and --check), so a published checkpoint loads with
`load_state_dict(strict=True)`.

Every function works in float32 and float64: the dtype of the model and of
the inputs decides; nothing is silently cast to float32 (GroupNorm, softmax
and the timestep embedding follow the run's dtype), so a `.double()` model
on float64 inputs gives the high-precision twin of the float32 run.

    python tools/fcd_ref.py --check [--config PATH] [--reference DIR]

builds both networks from the published config and compares their key sets
and shapes with the .tsv listings.
"""
from __future__ import annotations

import argparse
import math
import os
import pathlib
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

# --------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------


def group_norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, ch, eps=1e-5, affine=True)


def timestep_embedding(t: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """[cos(t f_i) .., sin(t f_i) ..], f_i = exp(-ln(10000) i / half), in `dtype`."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=dtype) / half)
    args = t.to(dtype)[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class ResBlock(nn.Module):
    def __init__(self, ch: int, emb_ch: int, out_ch: int, scale_shift: bool, up: bool = False, down: bool = False):
        super().__init__()
        self.scale_shift = scale_shift
        self.up, self.down = up, down
        self.in_layers = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, 2 * out_ch if scale_shift else out_ch))
        self.out_layers = nn.Sequential(group_norm(out_ch), nn.SiLU(), nn.Dropout(p=0.0),
                                        nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip_connection = nn.Identity() if out_ch == ch else nn.Conv2d(ch, out_ch, 1)

    def _resample(self, v: torch.Tensor) -> torch.Tensor:
        if self.down:
            return F.avg_pool2d(v, kernel_size=2, stride=2)
        if self.up:
            return F.interpolate(v, scale_factor=2, mode="nearest")
        return v

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        norm_in, act_in, conv_in = self.in_layers
        h = act_in(norm_in(x))
        h = self._resample(h)
        x = self._resample(x)
        h = conv_in(h)
        e = self.emb_layers(emb)[:, :, None, None]
        norm_out, act_out, drop, conv_out = self.out_layers
        if self.scale_shift:
            scale, shift = torch.chunk(e, 2, dim=1)
            h = norm_out(h) * (1 + scale) + shift
        else:
            h = norm_out(h + e)
        h = conv_out(drop(act_out(h)))
        return self.skip_connection(x) + h


def qkv_attention(qkv: torch.Tensor, heads: int, legacy: bool) -> torch.Tensor:
    """qkv (B, 3C, T) -> (B, C, T). Softmax in the run's dtype."""
    b, width, t = qkv.shape
    c = width // 3
    d = c // heads
    if legacy:
        q, k, v = qkv.reshape(b * heads, 3 * d, t).split(d, dim=1)
    else:
        q, k, v = (z.reshape(b * heads, d, t) for z in qkv.chunk(3, dim=1))
    s = 1.0 / math.sqrt(math.sqrt(d))
    w = torch.einsum("nct,ncs->nts", q * s, k * s)
    w = torch.softmax(w, dim=-1)
    a = torch.einsum("nts,ncs->nct", w, v)
    return a.reshape(b, c, t)


class AttentionBlock(nn.Module):
    def __init__(self, ch: int, heads: int, legacy: bool = True):
        super().__init__()
        assert ch % heads == 0, f"{ch} channels not divisible into {heads} heads"
        self.heads, self.legacy = heads, legacy
        self.norm = group_norm(ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv1d(ch, ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        b, c, hh, ww = x.shape
        xf = x.reshape(b, c, hh * ww)
        h = qkv_attention(self.qkv(self.norm(xf)), self.heads, self.legacy)
        return (xf + self.proj_out(h)).reshape(b, c, hh, ww)


class AttentionPool2d(nn.Module):
    def __init__(self, side: int, ch: int, head_channels: int, out_ch: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(ch, side * side + 1) / ch ** 0.5)
        self.qkv_proj = nn.Conv1d(ch, 3 * ch, 1)
        self.c_proj = nn.Conv1d(ch, out_ch, 1)
        self.heads = ch // head_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        x = x.reshape(b, c, -1)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)
        x = x + self.positional_embedding[None].to(x.dtype)
        x = qkv_attention(self.qkv_proj(x), self.heads, legacy=False)
        return self.c_proj(x)[:, :, 0]


class EmbedSequential(nn.Sequential):
    """A Sequential whose ResBlocks also receive the embedding."""

    def forward(self, x, emb):  # noqa: D401
        for m in self:
            x = m(x, emb) if isinstance(m, (ResBlock, AttentionBlock)) else m(x)
        return x


def heads_for(p: dict, ch: int) -> int:
    nhc = int(p.get("num_head_channels", -1))
    return ch // nhc if nhc != -1 else int(p.get("num_heads", 1))


# --------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------


class _Encoder(nn.Module):
    """Shared time embedding, encoder and middle block."""

    def _build_encoder(self, p: dict):
        mc = int(p["model_channels"])
        self.mc = mc
        emb_ch = 4 * mc
        ss = bool(p.get("use_scale_shift_norm", False))
        if not p.get("resblock_updown", False):
            raise ValueError("resblock_updown: false is not part of the SPEC")
        legacy = not bool(p.get("use_new_attention_order", False))
        attn = set(int(a) for a in p["attention_resolutions"])
        mult = list(p["channel_mult"])
        nrb = int(p["num_res_blocks"])
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        blocks = [EmbedSequential(nn.Conv2d(int(p["in_channels"]), mc, 3, padding=1))]
        chans = [mc]
        ch, ds = mc, 1
        for level, m in enumerate(mult):
            for _ in range(nrb):
                layers = [ResBlock(ch, emb_ch, m * mc, ss)]
                ch = m * mc
                if ds in attn:
                    layers.append(AttentionBlock(ch, heads_for(p, ch), legacy))
                blocks.append(EmbedSequential(*layers))
                chans.append(ch)
            if level != len(mult) - 1:
                blocks.append(EmbedSequential(ResBlock(ch, emb_ch, ch, ss, down=True)))
                chans.append(ch)
                ds *= 2
        self.input_blocks = nn.ModuleList(blocks)
        self.middle_block = EmbedSequential(
            ResBlock(ch, emb_ch, ch, ss), AttentionBlock(ch, heads_for(p, ch), legacy), ResBlock(ch, emb_ch, ch, ss))
        return ch, ds, chans, emb_ch, ss, legacy, attn, mult, nrb

    def _embed(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.time_embed(timestep_embedding(t, self.mc, dtype))


class UNet(_Encoder):
    def __init__(self, p: dict):
        super().__init__()
        ch, ds, chans, emb_ch, ss, legacy, attn, mult, nrb = self._build_encoder(p)
        mc = self.mc
        self.num_classes = p.get("num_classes")
        if self.num_classes is not None:
            self.label_emb = nn.Embedding(int(self.num_classes), emb_ch)
        out = []
        for level, m in list(enumerate(mult))[::-1]:
            for i in range(nrb + 1):
                skip = chans.pop()
                layers = [ResBlock(ch + skip, emb_ch, m * mc, ss)]
                ch = m * mc
                if ds in attn:
                    layers.append(AttentionBlock(ch, heads_for(p, ch), legacy))
                if level and i == nrb:
                    layers.append(ResBlock(ch, emb_ch, ch, ss, up=True))
                    ds //= 2
                out.append(EmbedSequential(*layers))
        self.output_blocks = nn.ModuleList(out)
        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(mc, int(p["out_channels"]), 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        emb = self._embed(t, x.dtype)
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        hs = []
        h = x
        for blk in self.input_blocks:
            h = blk(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for blk in self.output_blocks:
            h = blk(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)


class Classifier(_Encoder):
    def __init__(self, p: dict):
        super().__init__()
        ch, ds, *_ = self._build_encoder(p)
        if p.get("pool", "attention") != "attention":
            raise ValueError(f"pool {p.get('pool')!r} is not part of the SPEC")
        side = int(p["image_size"]) // ds
        nhc = int(p.get("num_head_channels", -1))
        if nhc == -1:
            raise ValueError("AttentionPool2d needs num_head_channels")
        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), AttentionPool2d(side, ch, nhc, int(p["out_channels"])))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self._embed(t, x.dtype)
        h = x
        for blk in self.input_blocks:
            h = blk(h, emb)
        h = self.middle_block(h, emb)
        return self.out(h)


def load_config(path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def build_from_config(cfg: dict):
    mp = cfg["model"]["params"]
    return UNet(mp["unet_config"]["params"]), Classifier(mp["classifier_config"]["params"])


# --------------------------------------------------------------------------
# Schedule and sampler (SPEC 5, 6)
# --------------------------------------------------------------------------


def make_abar(timesteps: int, linear_start: float, linear_end: float) -> torch.Tensor:
    """Float32 abar, as the diffusers 'linear' schedule computes it."""
    betas = torch.linspace(linear_start, linear_end, timesteps, dtype=torch.float32)
    return torch.cumprod(1.0 - betas, dim=0)


class Schedule:
    """abar in the run's dtype; index -1 (t - 1 at t = 0) is 1.0 (set_alpha_to_one)."""

    def __init__(self, abar32: torch.Tensor, dtype: torch.dtype):
        self.abar = abar32.to(dtype)
        self.dtype = dtype

    def __call__(self, i: int) -> torch.Tensor:
        if i < 0:
            return torch.tensor(1.0, dtype=self.dtype)
        return self.abar[i]


def _tvec(t: int, b: int) -> torch.Tensor:
    return torch.full((b,), int(t), dtype=torch.long)


def _yvec(y, b: int) -> torch.Tensor:
    if isinstance(y, torch.Tensor):
        return y.to(torch.long)
    return torch.full((b,), int(y), dtype=torch.long)


def classifier_grad(cls: nn.Module, x: torch.Tensor, t, y) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, d/dx sum_b log_softmax(logits_b)[y_b]); t and y per batch or scalar."""
    b = x.shape[0]
    tv = t if isinstance(t, torch.Tensor) else _tvec(t, b)
    with torch.enable_grad():
        xi = x.detach().requires_grad_(True)
        logits = cls(xi, tv)
        lp = torch.log_softmax(logits, dim=-1)
        sel = lp[torch.arange(b), _yvec(y, b)].sum()
        (g,) = torch.autograd.grad(sel, xi)
    return logits.detach(), g


def add_noise(x0: torch.Tensor, n: torch.Tensor, sch: Schedule) -> torch.Tensor:
    a = sch(0)
    return a ** 0.5 * x0 + (1 - a) ** 0.5 * n


@torch.no_grad()
def inversion_step(unet, x, c, t: int, y, sch: Schedule) -> torch.Tensor:
    b = x.shape[0]
    eps = unet(torch.cat([x, c], dim=1), _tvec(t, b), _yvec(y, b))
    a, a2 = sch(t - 1), sch(t)
    p = ((x - (1 - a) ** 0.5 * eps) / a ** 0.5).clamp(-1, 1)
    return a2 ** 0.5 * p + (1 - a2) ** 0.5 * eps


def guided_step(unet, cls, x, c, t: int, y, s: float, sch: Schedule) -> torch.Tensor:
    b = x.shape[0]
    with torch.no_grad():
        eps = unet(torch.cat([x, c], dim=1), _tvec(t, b), _yvec(y, b))
        a, a2 = sch(t), sch(t - 1)
        p = ((x - (1 - a) ** 0.5 * eps) / a ** 0.5).clamp(-1, 1)
        eps2 = (x - a ** 0.5 * p) / (1 - a) ** 0.5
        x = (a2 ** 0.5 * p + (1 - a2) ** 0.5 * eps2).clamp(-1, 1)
    _, g = classifier_grad(cls, x, t, y)
    return x + s * g


def sample(unet, cls, x0, c, n, noise_level: int, s: float, sch: Schedule, y=0) -> torch.Tensor:
    x = add_noise(x0, n, sch)
    for t in range(noise_level):
        x = inversion_step(unet, x, c, t, y, sch)
    for t in range(noise_level - 1, -1, -1):
        x = guided_step(unet, cls, x, c, t, y, s, sch)
    return x


# --------------------------------------------------------------------------
# Data normalisation and post-processing (SPEC 2, 7), numpy float32
# --------------------------------------------------------------------------


def normalize_pm1(v: np.ndarray) -> np.ndarray:
    """Per-slice min-max to [-1, 1]; v (..., H, W) float32."""
    v = v.astype(np.float32)
    mn = v.min(axis=(-2, -1), keepdims=True)
    mx = v.max(axis=(-2, -1), keepdims=True)
    if np.any(mx == mn):
        raise ValueError("constant slice: normalisation undefined")
    return (((v - mn) / (mx - mn)) - np.float32(0.5)) * np.float32(2)


def norm01(v: np.ndarray) -> np.ndarray:
    """min-max of one slice to [0, 1] in float32."""
    v = v.astype(np.float32)
    mn, mx = v.min(), v.max()
    if mx == mn:
        raise ValueError("constant slice: normalisation undefined")
    return (v - mn) / (mx - mn)


def _cdf(img_u8: np.ndarray) -> np.ndarray:
    h = np.bincount(img_u8.ravel(), minlength=256)
    c = np.cumsum(h).astype(np.float32)
    return c / c[-1]


def hist_match(x: np.ndarray, x0: np.ndarray) -> np.ndarray:
    """SPEC 7 for one slice (H, W): norm(lut[src]), float32."""
    src = (norm01(x) * np.float32(255)).astype(np.int64)
    ref = (norm01(x0) * np.float32(255)).astype(np.int64)
    lut = np.interp(_cdf(src), _cdf(ref), np.arange(256)).astype(np.uint8)
    return norm01(lut[src].astype(np.float32))


def anomaly(x0: np.ndarray, xhat: np.ndarray) -> np.ndarray:
    return norm01(np.abs(norm01(x0) - norm01(xhat)))


# --------------------------------------------------------------------------
# Metrics (SPEC 8 + tests/fixtures/README.md)
# --------------------------------------------------------------------------


def dice(a: np.ndarray, m: np.ndarray, th: float) -> float:
    p = a.astype(np.float32).astype(np.float64) >= th
    mm = m > 0
    return 2.0 * float(np.sum(p & mm)) / float(p.sum() + mm.sum())


def peaks(a: np.ndarray, k: int = 10, radius: float = 10.0) -> list[list[int]]:
    a = a.astype(np.float32).copy()
    hh, ww = a.shape
    rr, cc = np.mgrid[0:hh, 0:ww]
    out = []
    while len(out) < k:
        i = int(np.argmax(a))
        r, c = divmod(i, ww)
        if a[r, c] == -np.inf:
            break
        out.append([r, c])
        a[(rr - r) ** 2 + (cc - c) ** 2 <= radius * radius] = -np.inf
    return out


def recalled(pk: list, m: np.ndarray, k: int, radius: float = 10.0) -> bool:
    ls = np.argwhere(m > 0)
    for r, c in pk[:k]:
        if np.min((ls[:, 0] - r) ** 2 + (ls[:, 1] - c) ** 2) <= radius * radius:
            return True
    return False


def metrics(maps: np.ndarray, masks: np.ndarray, th: float = 0.4, radius: float = 10.0) -> dict:
    lesion = [i for i in range(len(masks)) if np.any(masks[i] > 0)]
    per = [dice(maps[i], masks[i], th) for i in lesion]
    best_k, best = 0, -1.0
    for k in range(101):
        d = float(np.mean([dice(maps[i], masks[i], k / 100) for i in lesion]))
        if d > best:
            best_k, best = k, d
    pk = [peaks(maps[i], 10, radius) for i in range(len(maps))]
    rk = {kk: sum(recalled(pk[i], masks[i], kk, radius) for i in lesion) / len(lesion) for kk in (1, 5, 10)}
    return {
        "threshold": th,
        "dice_at_threshold": float(np.mean(per)),
        "per_slice_dice": per,
        "best_threshold": best_k / 100,
        "dice_best": best,
        "r_at_1": rk[1],
        "r_at_5": rk[5],
        "r_at_10": rk[10],
        "peaks": pk,
        "radius": radius,
    }


# --------------------------------------------------------------------------
# --check
# --------------------------------------------------------------------------


def read_tsv(path) -> dict:
    out = {}
    for line in open(path):
        if line.startswith("#") or line.startswith("key\t") or not line.strip():
            continue
        k, shape = line.rstrip("\n").split("\t")
        out[k] = [int(s) for s in shape.strip("[]").split(",") if s.strip()]
    return out


def compare(name: str, model: nn.Module, tsv: dict) -> bool:
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(tsv) - set(got))
    extra = sorted(set(got) - set(tsv))
    bad = sorted(k for k in set(got) & set(tsv) if got[k] != tsv[k])
    n = sum(v.numel() for v in model.state_dict().values())
    ok = not (missing or extra or bad)
    print(f"{name}: {len(got)} keys (reference {len(tsv)}), {n} parameters ({n / 1e6:.2f} M): "
          f"{'OK' if ok else 'MISMATCH'}")
    for k in missing[:20]:
        print(f"  missing {k} {tsv[k]}")
    for k in extra[:20]:
        print(f"  extra   {k} {got[k]}")
    for k in bad[:20]:
        print(f"  shape   {k} built {got[k]} reference {tsv[k]}")
    return ok


def main(argv=None) -> int:
    # The published key listings live in the project's shared folder
    # (reference/*.tsv), not in this repository: FCD_SHARED names that folder;
    # without it, a folder "shared" beside the checkout is tried.
    here = pathlib.Path(__file__).resolve()
    shared = pathlib.Path(os.environ.get("FCD_SHARED", here.parent.parent.parent / "shared"))
    default_ref = shared / "reference"
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="compare built key sets with the reference .tsv")
    ap.add_argument("--reference", default=str(default_ref),
                    help="folder of unet_state_dict.tsv, classifier_state_dict.tsv, configs/ "
                         "(default: $FCD_SHARED/reference, else ../shared/reference beside the checkout)")
    ap.add_argument("--config", default=None)
    args = ap.parse_args(argv)
    if not args.check:
        ap.print_help()
        return 0
    ref = pathlib.Path(args.reference)
    cfg = load_config(args.config or ref / "configs" / "config_t1_cond_multiclass_cg.yaml")
    unet, cls = build_from_config(cfg)
    ok = compare("unet", unet, read_tsv(ref / "unet_state_dict.tsv"))
    ok &= compare("classifier", cls, read_tsv(ref / "classifier_state_dict.tsv"))
    # A forward pass of both on a tiny batch proves the built graph is consistent.
    with torch.no_grad():
        size = int(cfg["model"]["params"]["unet_config"]["params"]["image_size"])
        x = torch.randn(1, 2, size, size)
        e = unet(x, torch.tensor([3]), torch.tensor([0]))
        lg = cls(x[:, :1], torch.tensor([3]))
    print(f"forward shapes: unet {tuple(e.shape)}, classifier {tuple(lg.shape)}")
    print("check:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
