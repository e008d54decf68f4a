# Error table of the emulated attn_flash_tf32x3 against float64.
import sys, numpy as np
from emu_tf32 import *
variants = sys.argv[1].split(',') if len(sys.argv) > 1 else ['rn']
stds = [float(x) for x in sys.argv[2].split(',')] if len(sys.argv) > 2 else [1.0, 3.0]
ts = [int(x) for x in sys.argv[3].split(',')] if len(sys.argv) > 3 else [1, 17, 65, 256, 1000]
ds = [int(x) for x in sys.argv[4].split(',')] if len(sys.argv) > 4 else [24, 32, 48, 64]
for std in stds:
    for var in variants:
        model, nprod, form, noise, sacc, oacc = 'rn', 3, 'fold', None, 'step', 'group'
        for part in var.split('+'):
            if part in ('rn', 'rz', 'tc'): model = part
            elif part == '1x': nprod = 1
            elif part == 'pre': form = 'prescale'
            elif part == 'noise': noise = True
            elif part == 'schain': sacc = 'chain'
            elif part == 'ochain': oacc = 'chain'
        print(f"== std={std} variant={var}", flush=True)
        allrel = []; allrow = []; allcpu = []
        for t in ts:
            line = []
            for d in ds:
                for legacy in (True, False):
                    rng = np.random.default_rng(1000 * t + d + legacy)
                    heads = heads_for(d); b = 1 if t >= 256 else 2
                    c = d * heads
                    qkv = (rng.standard_normal((b, t, 3 * c)) * std).astype(F32)
                    _, out = run(b, t, d, heads, legacy, std, None, model, nprod, None,
                                 np.random.default_rng(7) if noise else None, True, form, qkv, sacc, oacc)
                    want = ref64(qkv, b, t, c, heads, legacy)
                    rel, rowrel, maxn = errs(out, want)
                    cpu = cpu_twin(qkv, b, t, c, heads, legacy)
                    crel = errs(cpu, want)[0]
                    kc = np.linalg.norm(out.astype(np.float64) - cpu) / np.linalg.norm(cpu.astype(np.float64))
                    allrel.append(rel); allrow.append(rowrel); allcpu.append((crel, kc))
                    line.append(f"d{d}{'L' if legacy else 'T'} {rel:.2e}/{rowrel:.1e}")
            print(f"t={t:5d}: " + "  ".join(line), flush=True)
        a = np.array(allrel); r = np.array(allrow); cc = np.array(allcpu)
        print(f"   rel-L2 max {a.max():.3e} rms {np.sqrt((a**2).mean()):.3e}; worst row rel {r.max():.3e}; "
              f"cpu-twin rel-L2 max {cc[:,0].max():.3e} rms {np.sqrt((cc[:,0]**2).mean()):.3e}; "
              f"kernel-vs-cpu max {cc[:,1].max():.3e} rms {np.sqrt((cc[:,1]**2).mean()):.3e}", flush=True)
