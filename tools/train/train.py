#!/usr/bin/env python3
"""Trains one network of the demo model on phantom subjects (tools/phantom), the way
the published code trains them, and saves it in the published checkpoint format.

    python3 tools/train/train.py --net unet --config weights/config.yaml \
        --data DIR --steps 2400 --seed 1 --out weights/unet.pt
    python3 tools/train/train.py --net classifier --config weights/config.yaml \
        --data DIR [DIR2 ...] --steps 2400 --seed 2 --out weights/classifier.pt

- UNet: epsilon prediction (MSE), input concat[x_t, T1], class-conditional on the
  slice's lobe label, which is replaced by 0 with the config's `drop_prob` (0.3, as
  published). Saved as {"state_dict": {"model." + key: tensor}}.
- Classifier: cross-entropy of the lobe label on the noised FLAIR x_t alone.
  Half of each batch is lesion slices, the other half the same slices of their
  lesion-free twins (`make.py --twins`), each pair noised alike, flipped
  left-right alike (the lobe classes are the same on both sides) and shifted
  alike (MIN_LESION_PIXELS and MAX_SHIFT below say why). The lesion's contrast
  follows a curriculum (CONTRAST_START, CONTRAST_UNTIL). Saved as
  {"state_dict": {key: tensor}}.
- `--val DIR` scores a held-out set during training (`evaluate`); the scores go
  into OUT.loss.json.
- Timesteps t are drawn uniformly from 0 .. noise_level - 1: the sampler only ever
  evaluates both networks there (SPEC 6), so a small model spends all of its
  capacity on the part of the schedule it is used on.

Deterministic for a given seed and thread count. Writes OUT, OUT's loss curve as
OUT.loss.png and the per-step losses as OUT.loss.json.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import fcd_ref  # noqa: E402
import slices  # noqa: E402


# The classifier learns from slices whose lesion covers at least this many pixels of the
# network grid, or none: a slice the lesion only grazes looks healthy, and calling it a
# lesion teaches noise.
MIN_LESION_PIXELS = 8


# Classifier inputs are shifted by up to this many pixels, so that it cannot learn where
# lesions of the training subjects were rather than what they look like.
MAX_SHIFT = 4


# The lesion (a lesion slice minus its twin) is scaled by a factor drawn per pair from
# 1 .. c, c falling linearly from CONTRAST_START to 1 over the first CONTRAST_UNTIL of
# the steps; the rest train at the true contrast. At the true contrast alone the
# classifier sat at the label prior for hundreds of steps (tools/train/README.md); a
# brighter lesion is found within about a hundred, and the feature then carries over.
CONTRAST_START = 3.0
CONTRAST_UNTIL = 0.4


def contrast(step: int, steps: int, rng: np.random.Generator, n: int) -> torch.Tensor:
    c = max(1.0, CONTRAST_START + (1.0 - CONTRAST_START) * step / (CONTRAST_UNTIL * steps))
    return torch.from_numpy(rng.uniform(1.0, c, n).astype(np.float32)).view(-1, 1, 1, 1)


def lesion_slices(data: dict) -> np.ndarray:
    """The classifier's lesion slices: a lesion of at least MIN_LESION_PIXELS, and a twin.
    Pairing each with its own lesion-free twin leaves the lesion as the only difference
    between the classes; pairing with other healthy slices, even of the same level, left
    enough else (anatomy, level, intensity) for a small classifier to learn instead."""
    idx = np.flatnonzero((data["label"] > 0) & (data["mask"].sum((1, 2)) >= MIN_LESION_PIXELS))
    idx = idx[~np.isnan(data["twin"][idx]).any((1, 2))]
    if not len(idx):
        raise SystemExit("no lesion slice with a twin: make the training sets with make.py --twins")
    return idx


def paired(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """x (2B, 1, H, W), items k and B + k a pair: each pair flipped left-right or not and
    rolled by one random shift (the border is background)."""
    out, b = torch.empty_like(x), len(x) // 2
    for k in range(b):
        dy, dx = (int(v) for v in rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, 2))
        flip = rng.random() < 0.5
        for i in (k, b + k):
            v = x[i].flip(-1) if flip else x[i]
            out[i] = torch.roll(v, (dy, dx), dims=(-2, -1))
    return out


# Held-out timesteps: low, middle and high within the sampler's range.
VAL_T = (10, 50, 90)


def held_out(folder: str, side: int, abar: torch.Tensor, noise_level: int, seed: int) -> dict:
    """A fixed held-out batch: every slice of `folder` noised once at each of VAL_T."""
    d = slices.load(folder, side)
    area = d["mask"].sum((1, 2))
    keep = (area == 0) | (area >= MIN_LESION_PIXELS)
    d = {k: v[keep] for k, v in d.items()}
    g = np.random.default_rng(seed + 1000)
    x0 = torch.from_numpy(d["flair"])[:, None].repeat(len(VAL_T), 1, 1, 1)
    t = torch.tensor(VAL_T).repeat_interleave(len(d["label"]))
    n = torch.from_numpy(g.standard_normal(x0.shape).astype(np.float32))
    a = abar[t].view(-1, 1, 1, 1)
    return {"xt": a.sqrt() * x0 + (1 - a).sqrt() * n, "n": n, "t": t,
            "t1": torch.from_numpy(d["t1"])[:, None].repeat(len(VAL_T), 1, 1, 1),
            "y": torch.from_numpy(d["label"]).repeat(len(VAL_T))}


@torch.no_grad()
def evaluate(model, net: str, v: dict) -> dict:
    """UNet: epsilon MSE at label 0, as the sampler runs it. Classifier: whether it calls
    a slice a lesion (p(healthy) < 0.5, the class the guidance follows), as sensitivity,
    specificity and their mean (lesion slices are rare), mean p(healthy) of both groups,
    and the lobe accuracy (argmax) on lesion slices."""
    out = []
    for i in range(0, len(v["y"]), 64):
        s = slice(i, i + 64)
        if net == "unet":
            eps = model(torch.cat([v["xt"][s], v["t1"][s]], 1), v["t"][s],
                        torch.zeros_like(v["y"][s]))
            out.append(((eps - v["n"][s]) ** 2).mean((1, 2, 3)))
        else:
            out.append(model(v["xt"][s], v["t"][s]).softmax(1))
    if net == "unet":
        return {"mse": float(torch.cat(out).mean())}
    p, les = torch.cat(out), v["y"] > 0
    called = p[:, 0] < 0.5
    sens, spec = float(called[les].float().mean()), float((~called[~les]).float().mean())
    return {"balanced_acc": (sens + spec) / 2, "sensitivity": sens, "specificity": spec,
            "p_healthy_lesion": float(p[les, 0].mean()),
            "p_healthy_healthy": float(p[~les, 0].mean()),
            "lobe_acc": float((p[les].argmax(1) == v["y"][les]).float().mean())}


def plot(losses: list[float], path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    v = np.asarray(losses)
    w = max(1, len(v) // 50)
    smooth = np.convolve(v, np.ones(w) / w, mode="valid")
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(v, lw=0.5, alpha=0.35, label="per step")
    ax.plot(np.arange(len(smooth)) + w - 1, smooth, lw=1.5, label=f"mean of {w}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--net", choices=["unet", "classifier"], required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--data", required=True, nargs="+",
                    help="BIDS-like phantom folders (tools/phantom/make.py)")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--lr", type=float, help="peak learning rate (default: the config's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    ap.add_argument("--val", help="held-out phantom folder, scored every --val-every steps")
    ap.add_argument("--val-every", type=int, default=250)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    cfg = fcd_ref.load_config(args.config)
    mp = cfg["model"]["params"]
    tp = cfg["trainer"]["params"]
    noise_level = int(cfg["tester"]["params"]["noise_level"])
    unet, cls = fcd_ref.build_from_config(cfg)
    model = unet if args.net == "unet" else cls
    side = int(mp["image_size"])
    abar = fcd_ref.make_abar(int(mp["timesteps"]), float(mp["linear_start"]), float(mp["linear_end"]))

    t0 = time.time()
    parts = [slices.load(d, side) for d in args.data]
    data = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    n_lesion = int((data["label"] > 0).sum())
    print(f"{len(data['label'])} slices ({n_lesion} with lesion) from {args.data} "
          f"in {time.time() - t0:.0f} s", flush=True)
    flair = torch.from_numpy(data["flair"])[:, None]
    t1 = torch.from_numpy(data["t1"])[:, None]
    twin = torch.from_numpy(data["twin"])[:, None]
    label = torch.from_numpy(data["label"])
    lesion = lesion_slices(data) if args.net == "classifier" else None

    params = sum(p.numel() for p in model.parameters())
    lr = args.lr if args.lr is not None else float(tp["lr"])
    batch = int(tp["batch_size"])
    drop = float(mp.get("drop_prob", 0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = min(100, args.steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    val = held_out(args.val, side, abar, noise_level, args.seed) if args.val else None
    val_log = []

    def score_val(step: int) -> None:
        if val is None:
            return
        model.eval()
        row = {"step": step, **evaluate(model, args.net, val)}
        model.train()
        val_log.append(row)
        print("  held-out " + " ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "step"),
              flush=True)

    losses, accs = [], []
    model.train()
    start = time.time()
    for step in range(args.steps):
        if args.net == "unet":
            idx = torch.from_numpy(rng.integers(0, len(label), batch))
            x0, y = flair[idx], label[idx]
            t = torch.from_numpy(rng.integers(0, noise_level, batch))
            n = torch.from_numpy(rng.standard_normal(x0.shape).astype(np.float32))
        else:
            idx = torch.from_numpy(rng.choice(lesion, batch // 2))
            k = contrast(step, args.steps, rng, len(idx))
            x0 = torch.cat([twin[idx] + k * (flair[idx] - twin[idx]), twin[idx]])
            y = torch.cat([label[idx], torch.zeros_like(label[idx])])
            t = torch.from_numpy(rng.integers(0, noise_level, len(idx))).repeat(2)
            n = torch.from_numpy(rng.standard_normal(flair[idx].shape).astype(np.float32)).repeat(2, 1, 1, 1)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * n
        if args.net == "unet":
            keep = torch.from_numpy(rng.random(batch) >= drop)
            eps = model(torch.cat([xt, t1[idx]], dim=1), t, torch.where(keep, y, torch.zeros_like(y)))
            loss = F.mse_loss(eps, n)
        else:
            logits = model(paired(xt, rng), t)
            loss = F.cross_entropy(logits, y)
            accs.append(float((logits.argmax(1) == y).float().mean()))
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if step % 50 == 0 or step == args.steps - 1:
            recent = np.mean(losses[-50:])
            extra = f" acc {np.mean(accs[-50:]):.3f}" if accs else ""
            print(f"step {step} loss {recent:.5f}{extra} ({time.time() - start:.0f} s)", flush=True)
        if (step + 1) % args.val_every == 0 or step == args.steps - 1:
            score_val(step + 1)

    wall = time.time() - start
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if args.net == "unet":
        state = {"model." + k: v for k, v in state.items()}
    torch.save({"state_dict": state}, out)
    final = float(np.mean(losses[-100:]))
    summary = {
        "net": args.net, "parameters": params, "steps": args.steps, "batch": batch, "lr": lr,
        "seed": args.seed, "threads": args.threads, "wall_s": round(wall, 1),
        "slices": len(data["label"]), "lesion_slices": n_lesion,
        "final_loss_mean_last_100": final, "losses": losses,
    }
    if val_log:
        summary["held_out"] = {"data": args.val, "slices": int(len(val["y"])), "scores": val_log}
    if accs:
        summary["final_accuracy_mean_last_100"] = float(np.mean(accs[-100:]))
    pathlib.Path(str(out) + ".loss.json").write_text(json.dumps(summary))
    plot(losses, pathlib.Path(str(out) + ".loss.png"),
         f"{args.net}: {params / 1e6:.2f} M parameters, batch {batch}")
    print(f"saved {out}: {params} parameters, {args.steps} steps in {wall:.0f} s, "
          f"final loss {final:.5f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
