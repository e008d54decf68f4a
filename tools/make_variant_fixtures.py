#!/usr/bin/env python3
"""Write tests/fixtures/variant/: the configuration switches the published
models do not use but the engine accepts (use_scale_shift_norm: false,
use_new_attention_order: true, heads from num_head_channels in the UNet),
checked on one UNet forward and one classifier gradient.

    .venv-tools/bin/python tools/make_variant_fixtures.py [--out tests/fixtures/variant]

(from the repository root, in the environment of tools/requirements.txt)

Same method as make_fixtures.py: random weights (stored as float16) (zero-initialised
layers included), float64 references, float32 floors in manifest.json.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import fcd_ref as R  # noqa: E402
from make_fixtures import GAINS, Twin, floors, randomise  # noqa: E402

WEIGHT_SEED = 20241124
DATA_SEED = 11
UNET_T, UNET_Y = [3, 640], [5, 0]
CLS_T = [12, 480]

CONFIG_YAML = """\
# Variant config (fixtures for the fcd engine): the switches the published models leave at
# their other value. Layout as published.
tester:
  params:
    noise_level: 10
    guide_w: 5
    th: 0.4
model:
  params:
    linear_start: 0.0015
    linear_end: 0.0155
    timesteps: 1000
    unet_config:
      params:
        image_size: 16
        in_channels: 2
        out_channels: 1
        model_channels: 32
        attention_resolutions: [ 1,2 ]
        num_res_blocks: 1
        channel_mult: [ 1,2 ]
        num_head_channels: 16
        use_scale_shift_norm: False
        use_new_attention_order: True
        resblock_updown: True
        num_classes: 9
    classifier_config:
      params:
        image_size: 16
        in_channels: 1
        out_channels: 4
        model_channels: 32
        attention_resolutions: [ 2 ]
        num_res_blocks: 1
        channel_mult: [ 1,2 ]
        num_head_channels: 32
        use_scale_shift_norm: False
        resblock_updown: True
        pool: attention
"""


def main(argv=None) -> int:
    root = pathlib.Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(root / "tests" / "fixtures" / "variant"))
    out = pathlib.Path(ap.parse_args(argv).out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    (out / "config.yaml").write_text(CONFIG_YAML)
    cfg = R.load_config(out / "config.yaml")
    gen = torch.Generator().manual_seed(WEIGHT_SEED)
    unet, cls = R.build_from_config(cfg)
    randomise(unet, gen, True, GAINS)
    randomise(cls, gen, False, GAINS)
    unet.eval(), cls.eval()
    # Checkpoints in float16 (half the bytes, and the engine's float16 import
    # exercised on whole networks): the weights are rounded to float16 values
    # first, so the float32 and float64 runs use exactly what is stored.
    with torch.no_grad():
        for p in list(unet.parameters()) + list(cls.parameters()):
            p.copy_(p.half().float())
    torch.save({"state_dict": {"model." + k: v.detach().half().contiguous() for k, v in unet.state_dict().items()}},
               out / "unet.pt")
    torch.save({"state_dict": {k: v.detach().half().contiguous() for k, v in cls.state_dict().items()}},
               out / "classifier.pt")
    mp = cfg["model"]["params"]
    tw = Twin(unet, cls, R.make_abar(int(mp["timesteps"]), float(mp["linear_start"]), float(mp["linear_end"])))
    rng = np.random.default_rng(DATA_SEED)
    unet_in = rng.standard_normal((2, 2, 16, 16)).astype(np.float32)
    cls_in = rng.standard_normal((2, 1, 16, 16)).astype(np.float32)
    np.save(out / "unet_in.npy", unet_in)
    np.save(out / "cls_in.npy", cls_in)
    o32, o64 = tw.both(lambda u, c, s, x: u(x, torch.tensor(UNET_T), torch.tensor(UNET_Y)).detach(), unet_in)
    (l32, g32), (l64, g64) = tw.both(lambda u, c, s, x: R.classifier_grad(c, x, torch.tensor(CLS_T), 0), cls_in)
    np.save(out / "unet_out_ref.npy", o64.numpy())
    np.save(out / "cls_logits_ref.npy", l64.numpy())
    np.save(out / "cls_grad_ref.npy", g64.numpy())
    fl = {"unet_out": floors(o32, o64), "cls_logits": floors(l32, l64), "cls_grad": floors(g32, g64)}
    for k, v in fl.items():
        assert 0 < v["rel_l2"] < 1e-4, (k, v)
    manifest = {"unet_t": UNET_T, "unet_y": UNET_Y, "cls_t": CLS_T, "floors": fl, "torch_version": torch.__version__}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    for k, v in fl.items():
        print(f"{k:<12}{v['rel_l2']:>12.3e}{v['max_abs']:>12.3e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
