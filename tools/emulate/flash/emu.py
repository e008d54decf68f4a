# Lane-level emulation of kernels/flash.cu (transliterated), with ldmatrix and
# mma semantics coded from the PTX ISA fragment definitions.
import numpy as np, sys
rng = np.random.default_rng(1)

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
                    if lo_in: x[0] = (flat[p], flat[p+1])
                    if hi_in: x[2] = (flat[p+8], flat[p+9])
                  if r1 < t:
                    p = base + r1*c3 + qo + col
                    if lo_in: x[1] = (flat[p], flat[p+1])
                    if hi_in: x[3] = (flat[p+8], flat[p+9])
                  qf[lane][kk] = [pack(*x[e], kind) for e in range(4)]
            W['qf'] = qf
            W['o'] = [[[0.]*4 for _ in range(2*KD)] for _ in range(32)]
            W['m'] = [[-np.inf, -np.inf] for _ in range(32)]
            W['l'] = [[0., 0.] for _ in range(32)]
            warps.append(W)
          per_row = dp // 4
          for kt in range((t + 63)//64):
            key0 = kt*BN
            for tid in range(128):
              for it in range(DMAX//8):
                if it < dp//8:
                  idx = tid + it*128
                  r = idx // per_row; col = (idx - r*per_row)*4
                  key = key0 + r
                  kw = [0.]*4; vw = [0.]*4
                  if key < t and col < d:
                    rp = base + key*c3
                    kw = list(r16(flat[rp+ko+col:rp+ko+col+4], kind))
                    vw = list(r16(flat[rp+vo+col:rp+vo+col+4], kind))
                  assert col + 4 <= ld - 8 and r < 64
                  ks[r, col:col+4] = kw; vs[r, col:col+4] = vw
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
                  ls[lane][0] += sum(P[0]) + sum(P[2]); ls[lane][1] += sum(P[1]) + sum(P[3])
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
                W['l'][lane][0] = W['l'][lane][0]*a0 + ls[lane][0]; W['l'][lane][1] = W['l'][lane][1]*a1 + ls[lane][1]
          for warp, W in enumerate(warps):
            if not W['active']: continue
            l = [list(x) for x in W['l']]
            for sh in (1, 2):
              l = [[l[x][0] + l[x ^ sh][0], l[x][1] + l[x ^ sh][1]] for x in range(32)]
            ob = bi*t*c + h*d
            for lane in range(32):
              g, qd = lane >> 2, lane & 3
              r0 = W['row0'] + g; r1 = r0 + 8
              inv0 = 1/l[lane][0]; inv1 = 1/l[lane][1]
              for n in range(2*KD):
                col = n*8 + 2*qd
                if n < 2*nk and col < d:
                  o = W['o'][lane][n]
                  if r0 < t: oflat[ob + r0*c + col: ob + r0*c + col + 2] = [o[0]*inv0, o[1]*inv0]
                  if r1 < t: oflat[ob + r1*c + col: ob + r1*c + col + 2] = [o[2]*inv1, o[3]*inv1]

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
    kernel(qkv, out, b, t, c, heads, legacy, kind, 64 if d <= 64 else 128)
    want = ref(qkv, b, t, c, heads, legacy, kind)
    assert np.isfinite(out).all(), "unwritten"
    rel = np.linalg.norm(out - want)/np.linalg.norm(want)
    print(b, t, d, heads, legacy, kind, std, "rel", rel, flush=True)
