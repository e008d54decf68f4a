#!/usr/bin/env python3
"""PyTorch peer of `fcd bench` (issue 4): the same guided sampler on the same
networks, in the three usual PyTorch setups, plus the device's dense bf16
matmul rate that sets the floor.

    python3 benches/pytorch_peer.py --config C [--unet U.pt --classifier K.pt]
        [--batch 8] [--steps 100] [--device cuda|cpu] [--skip-compile]

The networks are tools/fcd_ref.py's (built from the YAML, random weights
from --seed unless checkpoints are given). Prints one JSON object; times are
seconds per slice, each the wall time of one whole sampler run (N inversion
+ N guided steps on --batch slices, ending after the result is on the host),
after an untimed warm-up run of N = 2.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tools"))
import fcd_ref  # noqa: E402


def timestep_embedding(t: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    # fcd_ref builds the frequencies on the default (CPU) device, which a
    # CUDA timestep cannot multiply; the same formula, on t's device.
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=dtype, device=t.device) / half)
    args = t.to(dtype)[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


fcd_ref.timestep_embedding = timestep_embedding


def load_state(path: str, strip_model: bool) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path)
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        sd = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if strip_model:
        sd = {k[len("model."):] if k.startswith("model.") else k: v for k, v in sd.items()}
    return {k: v.float() for k, v in sd.items()}


def build(cfg: dict, args) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(args.seed)
    unet, cls = fcd_ref.build_from_config(cfg)
    if args.unet:
        unet.load_state_dict(load_state(args.unet, strip_model=True), strict=True)
    if args.classifier:
        cls.load_state_dict(load_state(args.classifier, strip_model=False), strict=True)
    # Only the input gradient is wanted, as in the engine: without this,
    # a compiled backward would compute every weight gradient too.
    for p in (*unet.parameters(), *cls.parameters()):
        p.requires_grad_(False)
    return unet.eval(), cls.eval()


class Peer:
    """SPEC section 6 with device-resident timesteps and Python-float
    schedule coefficients, so that no step waits on the host."""

    def __init__(self, unet, cls, abar: torch.Tensor, steps: int, guidance: float, autocast, channels_last: bool):
        self.unet, self.cls = unet, cls
        self.abar = [float(a) for a in abar]
        self.steps, self.guidance = steps, guidance
        self.autocast, self.channels_last = autocast, channels_last

    def _a(self, i: int) -> float:
        return 1.0 if i < 0 else self.abar[i]

    def _fmt(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _eps(self, x, c, tv, yv):
        with torch.no_grad(), self.autocast():
            return self.unet(self._fmt(torch.cat([x, c], dim=1)), tv, yv).float()

    def _grad(self, x, tv, yv):
        with torch.enable_grad(), self.autocast():
            xi = self._fmt(x.detach()).requires_grad_(True)
            lp = torch.log_softmax(self.cls(xi, tv).float(), dim=-1)
            sel = lp.gather(1, yv[:, None]).sum()
            (g,) = torch.autograd.grad(sel, xi)
        return g.float()

    def run(self, x0, c, n):
        b = x0.shape[0]
        yv = torch.zeros(b, dtype=torch.long, device=x0.device)
        a0 = self.abar[0]
        x = a0 ** 0.5 * x0 + (1 - a0) ** 0.5 * n
        for t in range(self.steps):
            tv = torch.full((b,), t, dtype=torch.long, device=x0.device)
            eps = self._eps(x, c, tv, yv)
            a, a2 = self._a(t - 1), self._a(t)
            p = ((x - (1 - a) ** 0.5 * eps) / a ** 0.5).clamp(-1, 1)
            x = a2 ** 0.5 * p + (1 - a2) ** 0.5 * eps
        for t in range(self.steps - 1, -1, -1):
            tv = torch.full((b,), t, dtype=torch.long, device=x0.device)
            eps = self._eps(x, c, tv, yv)
            a, a2 = self._a(t), self._a(t - 1)
            p = ((x - (1 - a) ** 0.5 * eps) / a ** 0.5).clamp(-1, 1)
            eps2 = (x - a ** 0.5 * p) / (1 - a) ** 0.5
            x = (a2 ** 0.5 * p + (1 - a2) ** 0.5 * eps2).clamp(-1, 1)
            x = x + self.guidance * self._grad(x, tv, yv)
        return x


def timed(warm: Peer, peer: Peer, x0, c, n) -> float:
    """Seconds of one `peer` run after one `warm` run: the allocator, and for
    torch.compile the compilation of both networks and of the classifier's
    backward, and CUDA-graph recording, which takes a graph's second call."""
    warm.run(x0, c, n).cpu()
    t0 = time.perf_counter()
    out = peer.run(x0, c, n).cpu()
    secs = time.perf_counter() - t0
    if not torch.isfinite(out).all():
        raise RuntimeError("the sampler produced non-finite values")
    return secs


def matmul_tflops(device: torch.device) -> float | None:
    """Dense bf16 rate: 8192^3 products on random data, median of 10 timed
    with CUDA events after 3 warm-ups."""
    if device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        torch.matmul(a, b)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.matmul(a, b)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    med = 0.5 * (times[4] + times[5])
    return 2.0 * n ** 3 / med / 1e12


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--unet", default=None, help="UNet checkpoint (.pt or .safetensors); default random")
    ap.add_argument("--classifier", default=None, help="classifier checkpoint; default random")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--skip-compile", action="store_true", help="leave compiled_bf16 null")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 1
    device = torch.device(args.device)

    cfg = fcd_ref.load_config(args.config)
    mp = cfg["model"]["params"]
    size = int(mp["unet_config"]["params"]["image_size"])
    if not 1 <= args.steps <= int(mp["timesteps"]):
        print(f"error: --steps {args.steps} must be in 1..={mp['timesteps']}", file=sys.stderr)
        return 1
    abar = fcd_ref.make_abar(int(mp["timesteps"]), float(mp["linear_start"]), float(mp["linear_end"]))
    unet, cls = build(cfg, args)
    unet, cls = unet.to(device), cls.to(device)
    gen = torch.Generator().manual_seed(args.seed + 1)
    x0, c, n = (torch.rand(args.batch, 1, size, size, generator=gen) * 2 - 1 for _ in range(3))
    x0, c, n = x0.to(device), c.to(device), n.to(device)

    # PyTorch's defaults, stated: TF32 convolutions on, TF32 matmuls off.
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = False

    def fp32():
        return torch.autocast(device.type, enabled=False)

    def bf16():
        return torch.autocast(device.type, dtype=torch.bfloat16)

    def per_slice(u, k, autocast, channels_last) -> float:
        def peer(steps):
            return Peer(u, k, abar, steps, args.guidance, autocast, channels_last)

        return timed(peer(2), peer(args.steps), x0, c, n) / args.batch

    results = {"eager_fp32": per_slice(unet, cls, fp32, False)}
    # In place: from here on both networks are channels_last.
    unet.to(memory_format=torch.channels_last)
    cls.to(memory_format=torch.channels_last)
    results["eager_bf16_channels_last"] = per_slice(unet, cls, bf16, True)
    results["compiled_bf16"] = None
    if not args.skip_compile:
        cu = torch.compile(unet, mode="max-autotune")
        ck = torch.compile(cls, mode="max-autotune")
        results["compiled_bf16"] = per_slice(cu, ck, bf16, True)

    print(json.dumps({
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "batch": args.batch,
        "steps": args.steps,
        "pytorch": results,
        "matmul_tflops_measured": matmul_tflops(device),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
