# Lane-level emulation of the 16-bit kernels attn_flash_{bf16,f16}[_d128] of
# kernels/flash.cu (transliterated), with ldmatrix and mma semantics coded
# from the PTX ISA fragment definitions. Follows the kernel as it is now:
# the K/V staging of stage_kv<DMAX / 8, WHOLE = true> (shared with the
# 3xTF32 kernel), the float32 order of the row sums (ls += u.x + u.y per
# register, l = fmaf(l, alpha, ls), quad_sum), 1 / l then o * inv.
# Checks: shared memory is NaN before every tile and each staged word is
# written once per tile (a read of an unstaged or stale word poisons the
# output), ldmatrix rows stay inside the staged columns, every output
# element is written exactly once, and the highest index reached in every
# buffer is printed against its length.
import numpy as np, sys
rng = np.random.default_rng(1)
F32 = np.float32

def r16(x, kind):
    x = np.asarray(x, np.float32)
    if kind == 'f16':
        return x.astype(np.float16).astype(np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    u = (u + 0x7fff + ((u >> 16) & 1)) & 0xffff0000
    return u.astype(np.uint32).view(np.float32)

# a "register" = tuple (lo, hi) of already-rounded floats
def pack(lo, hi, kind): return (float(r16(lo, kind)), float(r16(hi, kind)))

def ldsm(smem, addrs, trans):
    # addrs[lane] = (row, col) index in smem (2-D array); matrix m rows from lanes 8m..8m+7
    out = [[None]*4 for _ in range(32)]
    for m in range(4):
        mat = np.array([smem[addrs[8*m+r][0], addrs[8*m+r][1]:addrs[8*m+r][1]+8] for r in range(8)])
        for i in range(32):
            if not trans:
                out[i][m] = (mat[i//4, 2*(i%4)], mat[i//4, 2*(i%4)+1])
            else:
                out[i][m] = (mat[2*(i%4), i//4], mat[2*(i%4)+1, i//4])
    return out

def mma(C, A, B0, B1):
    # C[lane][4] floats, A[lane][4] regs, B0/B1[lane] regs; PTX fragment tables
    Am = np.zeros((16,16)); Bm = np.zeros((16,8)); Cm = np.zeros((16,8))
    for lane in range(32):
        g, tig = lane >> 2, lane % 4
        el = [A[lane][0][0],A[lane][0][1],A[lane][1][0],A[lane][1][1],A[lane][2][0],A[lane][2][1],A[lane][3][0],A[lane][3][1]]
        for i in range(8):
            row = g if (i < 2 or 4 <= i < 6) else g + 8
            col = tig*2 + (i & 1) + (8 if i >= 4 else 0)
            Am[row, col] = el[i]
        bl = [B0[lane][0], B0[lane][1], B1[lane][0], B1[lane][1]]
        for i in range(4):
            row = tig*2 + (i & 1) + (8 if i >= 2 else 0)
            Bm[row, g] = bl[i]
        for i in range(4):
            row = g if i < 2 else g + 8
            Cm[row, tig*2 + (i & 1)] = C[lane][i]
    D = (Am @ Bm + Cm).astype(np.float32)
    for lane in range(32):
        g, tig = lane >> 2, lane % 4
        for i in range(4):
            row = g if i < 2 else g + 8
            C[lane][i] = D[row, tig*2 + (i & 1)]

def kernel(qkv, out, b, t, c, heads, legacy, kind, DMAX):
    d = c // heads
    BM = BN = 64
    dp = (d + 15) & ~15
    nk = dp // 16; ld = dp + 8; KD = DMAX // 16; NT = 8
    scale_log2 = np.float32(np.log2(np.e) / np.sqrt(d))
    c3 = 3*c
    flat = qkv.reshape(-1); oflat = out.reshape(-1)
    owrites = np.zeros(oflat.shape, int)
    hi = dict(qkv=-1, out=-1, ks=-1, vs=-1)
    for bi in range(b):
      for h in range(heads):
        if legacy: qo = h*3*d; ko = qo + d; vo = qo + 2*d
        else: qo = h*d; ko = c + h*d; vo = 2*c + h*d
        base = bi*t*c3
        for bx in range((t + 63)//64):
          ks = np.full((BN, ld), np.nan, np.float32); vs = np.full((BN, ld), np.nan, np.float32)
          warps = []
          for warp in range(4):
            row0 = bx*BM + warp*16
            W = dict(active=row0 < t, row0=row0)
            qf = [[None]*KD for _ in range(32)]
            for lane in range(32):
              g, qd = lane >> 2, lane & 3
              r0 = row0 + g; r1 = r0 + 8
              for kk in range(KD):
                if kk < nk and W['active']:
                  col = kk*16 + 2*qd
                  x = [(0.,0.)]*4
                  lo_in = col < d; hi_in = col + 8 < d
                  if r0 < t:
                    p = base + r0*c3 + qo + col
                    assert p % 2 == 0, "float2 load misaligned"
                    if lo_in: x[0] = (flat[p], flat[p+1]); hi['qkv'] = max(hi['qkv'], p+1)
                    if hi_in: x[2] = (flat[p+8], flat[p+9]); hi['qkv'] = max(hi['qkv'], p+9)
                  if r1 < t:
                    p = base + r1*c3 + qo + col
                    if lo_in: x[1] = (flat[p], flat[p+1]); hi['qkv'] = max(hi['qkv'], p+1)
                    if hi_in: x[3] = (flat[p+8], flat[p+9]); hi['qkv'] = max(hi['qkv'], p+9)
                  qf[lane][kk] = [pack(*x[e], kind) for e in range(4)]
            W['qf'] = qf
            W['o'] = [[[0.]*4 for _ in range(2*KD)] for _ in range(32)]
            W['m'] = [[-np.inf, -np.inf] for _ in range(32)]
            W['l'] = [[0., 0.] for _ in range(32)]
            warps.append(W)
          per_row = dp // 4
          for kt in range((t + 63)//64):
            key0 = kt*BN
            # stage_kv<DMAX / 8, true>(..., used = dp / 8): slot tid + it * THREADS.
            ks[:] = np.nan; vs[:] = np.nan
            kwr = np.zeros(ks.shape, int); vwr = np.zeros(vs.shape, int)
            for tid in range(128):
              for it in range(DMAX//8):
                idx = tid + it*128
                if it < dp//8:
                  r = idx // per_row; col = (idx - r*per_row)*4
                  key = key0 + r
                  inb = key < t and col < d
                  kx = [0.]*4; vx = [0.]*4
                  if inb:
                    rp = base + key*c3
                    assert (rp + ko + col) % 4 == 0 and (rp + vo + col) % 4 == 0, "float4 load misaligned"
                    kx = list(flat[rp+ko+col:rp+ko+col+4]); vx = list(flat[rp+vo+col:rp+vo+col+4])
                    hi['qkv'] = max(hi['qkv'], rp+ko+col+3, rp+vo+col+3)
                  # put: pack2<T> when in range, else zeros
                  kw = list(r16(kx, kind)) if inb else [0.]*4
                  vw = list(r16(vx, kind)) if inb else [0.]*4
                  assert col + 4 <= dp and r < 64 and (r*ld + col) % 4 == 0
                  ks[r, col:col+4] = kw; vs[r, col:col+4] = vw
                  kwr[r, col:col+4] += 1; vwr[r, col:col+4] += 1
                  hi['ks'] = max(hi['ks'], r*ld + col + 3); hi['vs'] = hi['ks']
            assert (kwr[:, :dp] == 1).all() and (vwr[:, :dp] == 1).all() and kwr[:, dp:].sum() == 0, "staging: a word written twice or never"
            for warp, W in enumerate(warps):
              if not W['active']: continue
              s = [[[0.]*4 for _ in range(NT)] for _ in range(32)]
              for np_ in range(NT//2):
                for kk in range(KD):
                  if kk < nk:
                    addrs = []
                    for lane in range(32):
                      lm_tile, lm_row = lane >> 3, lane & 7
                      key = np_*16 + (lm_tile >> 1)*8 + lm_row
                      col = kk*16 + (lm_tile & 1)*8
                      assert col + 8 <= dp
                      addrs.append((key, col))
                    bb = ldsm(ks, addrs, False)
                    A = [W['qf'][lane][kk] for lane in range(32)]
                    mma([s[l][2*np_] for l in range(32)], A, [bb[l][0] for l in range(32)], [bb[l][1] for l in range(32)])
                    mma([s[l][2*np_+1] for l in range(32)], A, [bb[l][2] for l in range(32)], [bb[l][3] for l in range(32)])
              tail = key0 + BN > t
              mx = []
              for lane in range(32):
                qd = lane & 3
                for n in range(NT):
                  for e in range(4):
                    s[lane][n][e] = np.float32(s[lane][n][e]) * scale_log2
                    if tail and key0 + n*8 + 2*qd + (e & 1) >= t: s[lane][n][e] = -np.inf
                m0, m1 = W['m'][lane]
                for n in range(NT):
                  m0 = max(m0, s[lane][n][0], s[lane][n][1]); m1 = max(m1, s[lane][n][2], s[lane][n][3])
                mx.append([m0, m1])
              for sh in (1, 2):
                mx = [[max(mx[l][0], mx[l ^ sh][0]), max(mx[l][1], mx[l ^ sh][1])] for l in range(32)]
              alpha = []
              for lane in range(32):
                a0 = np.exp2(np.float32(W['m'][lane][0] - mx[lane][0])); a1 = np.exp2(np.float32(W['m'][lane][1] - mx[lane][1]))
                W['m'][lane] = list(mx[lane]); alpha.append((a0, a1))
                for n in range(2*KD):
                  o = W['o'][lane][n]; o[0] *= a0; o[1] *= a0; o[2] *= a1; o[3] *= a1
              ls = [[0., 0.] for _ in range(32)]
              for j in range(NT//2):
                pf = []
                for lane in range(32):
                  S = s[lane]; m0, m1 = mx[lane]
                  P = [pack(np.exp2(S[2*j][0]-m0), np.exp2(S[2*j][1]-m0), kind),
                       pack(np.exp2(S[2*j][2]-m1), np.exp2(S[2*j][3]-m1), kind),
                       pack(np.exp2(S[2*j+1][0]-m0), np.exp2(S[2*j+1][1]-m0), kind),
                       pack(np.exp2(S[2*j+1][2]-m1), np.exp2(S[2*j+1][3]-m1), kind)]
                  # ls0 += u.x + u.y for pf[0], then pf[2]; ls1 for pf[1], pf[3] (float32)
                  ls[lane][0] = F32(F32(ls[lane][0]) + F32(F32(P[0][0]) + F32(P[0][1])))
                  ls[lane][0] = F32(ls[lane][0] + F32(F32(P[2][0]) + F32(P[2][1])))
                  ls[lane][1] = F32(F32(ls[lane][1]) + F32(F32(P[1][0]) + F32(P[1][1])))
                  ls[lane][1] = F32(ls[lane][1] + F32(F32(P[3][0]) + F32(P[3][1])))
                  pf.append(P)
                for p in range(KD):
                  if p < nk:
                    addrs = []
                    for lane in range(32):
                      lm_tile, lm_row = lane >> 3, lane & 7
                      key = j*16 + (lm_tile & 1)*8 + lm_row
                      col = p*16 + (lm_tile >> 1)*8
                      assert col + 8 <= dp
                      addrs.append((key, col))
                    bb = ldsm(vs, addrs, True)
                    mma([W['o'][l][2*p] for l in range(32)], pf, [bb[l][0] for l in range(32)], [bb[l][1] for l in range(32)])
                    mma([W['o'][l][2*p+1] for l in range(32)], pf, [bb[l][2] for l in range(32)], [bb[l][3] for l in range(32)])
              for lane in range(32):
                a0, a1 = alpha[lane]
                # fmaf: one rounding of the exact l * alpha + ls
                W['l'][lane][0] = F32(np.float64(W['l'][lane][0])*np.float64(a0) + np.float64(ls[lane][0]))
                W['l'][lane][1] = F32(np.float64(W['l'][lane][1])*np.float64(a1) + np.float64(ls[lane][1]))
          for warp, W in enumerate(warps):
            if not W['active']: continue
            l = [list(x) for x in W['l']]
            for sh in (1, 2):
              l = [[F32(l[x][0] + l[x ^ sh][0]), F32(l[x][1] + l[x ^ sh][1])] for x in range(32)]  # quad_sum
            ob = bi*t*c + h*d
            for lane in range(32):
              g, qd = lane >> 2, lane & 3
              r0 = W['row0'] + g; r1 = r0 + 8
              inv0 = F32(1)/F32(l[lane][0]); inv1 = F32(1)/F32(l[lane][1])
              for n in range(2*KD):
                col = n*8 + 2*qd
                if n < 2*nk and col < d:
                  o = W['o'][lane][n]
                  for r, a, inv in ((r0, 0, inv0), (r1, 2, inv1)):
                    if r < t:
                      e = ob + r*c + col
                      assert e % 2 == 0, "float2 store misaligned"
                      oflat[e: e + 2] = [F32(o[a])*inv, F32(o[a+1])*inv]
                      owrites[e: e + 2] += 1; hi['out'] = max(hi['out'], e + 1)
    assert (owrites == 1).all(), "an output element written %d times" % owrites.max() if owrites.max() > 1 else "an output element never written"
    return hi

def ref(qkv, b, t, c, heads, legacy, kind):
    d = c // heads
    x = r16(qkv, kind).astype(np.float64)
    out = np.zeros((b, t, c))
    for bi in range(b):
      for h in range(heads):
        if legacy: qo = h*3*d; ko = qo + d; vo = qo + 2*d
        else: qo = h*d; ko = c + h*d; vo = 2*c + h*d
        q = x[bi, :, qo:qo+d]; k = x[bi, :, ko:ko+d]; v = x[bi, :, vo:vo+d]
        S = q @ k.T / np.sqrt(d)
        W = np.exp(S - S.max(1, keepdims=True)); W /= W.sum(1, keepdims=True)
        out[bi, :, h*d:(h+1)*d] = W @ v
    return out

for (b, t, d, heads, legacy, kind, std) in [(1, 70, 24, 2, True, 'bf16', 1.0), (2, 17, 64, 1, False, 'f16', 1.0),
                                             (1, 130, 48, 2, False, 'bf16', 3.0), (1, 65, 80, 1, True, 'f16', 1.0),
                                             (1, 1, 8, 2, False, 'bf16', 1.0), (1, 64, 32, 1, True, 'f16', 3.0)]:
    c = d*heads
    qkv = (rng.standard_normal((b, t, 3*c))*std).astype(np.float32)
    out = np.full((b, t, c), np.nan, np.float32)
    DMAX = 64 if d <= 64 else 128
    hi = kernel(qkv, out, b, t, c, heads, legacy, kind, DMAX)
    ld = ((d + 15) & ~15) + 8
    lens = dict(qkv=qkv.size, out=out.size, ks=64*(DMAX + 8), vs=64*(DMAX + 8))
    want = ref(qkv, b, t, c, heads, legacy, kind)
    assert np.isfinite(out).all(), "unwritten"
    rel = np.linalg.norm(out - want)/np.linalg.norm(want)
    assert all(hi[k] < lens[k] for k in hi), "out of bounds"
    print(f"b{b} t{t} d{d} heads{heads} legacy{int(legacy)} {kind} std{std} DMAX{DMAX} | rel {rel:.2e} | "
          "max idx/len: " + ", ".join(f"{k}:{hi[k]}/{lens[k]}" for k in hi), flush=True)
