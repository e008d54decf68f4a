"""Lane-by-lane numpy emulation of the float32 "3xTF32" kernels of
kernels/igemm.cu (StageF32 with the shared StageA, igemm_tf32x3<RS, VEC>, and
split_tf32 / mma_m16n8k8_tf32x3 of kernels/common/tensor_core.cuh, pack_weights_f32,
shared epilogue / decode_row), launched as
src/backend/cuda/igemm.rs does for Arith::Tf32x3 (BK 16, kp = round_up(k*k*cin, 16),
VEC iff cin % 16 == 0).

Every per-thread index formula is transcribed literally from the .cu,
vectorised over the 256 threads of a block (staging) or the 8 warps x 32
lanes (fragment loads).  Memory goes through checked accessors (bounds,
alignment, per-barrier-phase read/write sets for races, tile tags for stale
reads, bank-conflict degree).

mma.m16n8k8.row.col.f32.tf32.tf32.f32 fragment layout (PTX ISA,
"Matrix fragments for mma.m16n8k8", .tf32), g = lane >> 2, t = lane & 3:
  A 16x8: a0 (g, t)  a1 (g+8, t)  a2 (g, t+4)  a3 (g+8, t+4)
  B 8x8:  b0 (k t, n g)  b1 (k t+4, n g)
  C/D:    c0 c1 (g, 2t / 2t+1)  c2 c3 (g+8, 2t / 2t+1)
Products of two tf32 values are exact in float32 (11 x 11 significant bits).
The hardware's internal summation inside one mma is not IEEE; ACC selects
the model: "seq" (float32 sum c + p0 + ... + p7, one rounding per add; the
default), "fused" (exact sum, one round-to-nearest), "rz" (exact sum, one
round-toward-zero: a pessimistic model of the truncating tensor-core adder).

PASSES (argument passes=1|3, default 3): igemm_tf32<RS, VEC, PASSES>. 3 is the
3xTF32 kernel above (CFG products / order pick its accumulation variants);
1 is the tf32 mode, one mma_m16n8k8_tf32 of the big (cvt.rna) halves per
tile straight into acc (CFG products = 1).  With passes=1 each case also
reports the rel-L2 (as twin.rs's rel_l2, over the whole output) against
float64 and against a float64 reference on TF32-rounded operands (the
float32-transformed activation and the weights through tf32_rna, i.e. what
the GPU test's twin is fed), and the maximum over the cases.
"""
import sys
import numpy as np
import emu
from emu import GBuf, REP, P, cdiv, chk32, gather4, gather1, prologue, decode_row, epilogue, RS_SAME, RS_UP, RS_DOWN
from emu import set_source, coverage, fuses, StageA

BM, BN, BK32, SROW32, THREADS = 128, 128, 16, 20, 256

CFG = dict(acc="seq", products=3, order="flush")
PASSES = 3


# ---------------------------------------------------------------- tf32 helpers
def tf32_rna(x):
    """cvt.rna.tf32.f32 as Ampere's SASS does it: if |x| < inf, add 0x1000 to
    the bits; then keep the top 19 bits (round to nearest, ties away)."""
    x = np.asarray(x, dtype=np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    fin = np.abs(x) < np.inf
    u = np.where(fin, u + 0x1000, u) & 0xFFFFE000
    return u.astype(np.uint32).view(np.float32)


def split_tf32(x):
    big = tf32_rna(x)
    small = tf32_rna((np.asarray(x, np.float32) - big).astype(np.float32))
    return big, small


# ---------------------------------------------------------------- shared memory
class SmemF:
    """__shared__ __align__(16) float X[2][128][SROW32]."""

    def __init__(self, name):
        self.name = name
        self.size = 2 * 128 * SROW32
        self.v = np.full(self.size, np.nan, dtype=np.float32)
        self.ver = np.full(self.size, -1, dtype=np.int64)
        self.phase_w, self.phase_r = [], []
        self.max = -1
        self.bank_ld = 0   # worst conflict degree of a warp's 32-bit loads
        self.bank_st = 0   # worst degree of a quarter-warp's 128-bit stores

    @staticmethod
    def flat(stage, row, col):
        return (np.asarray(stage) * 128 + np.asarray(row)) * SROW32 + np.asarray(col)

    def store4(self, flat, vals, tid, tile):
        """float4 store by each thread: flat [256], vals [256][4]."""
        flat = np.asarray(flat, dtype=np.int64)
        if np.any((flat * 4) % 16):
            REP.bad(f"misaligned 16-byte smem store to {self.name}")
        if flat.min() < 0 or flat.max() + 4 > self.size:
            REP.bad(f"OOB smem store {self.name}: [{flat.min()}, {flat.max()+3}] size {self.size}")
            flat = np.clip(flat, 0, self.size - 4)
        self.max = max(self.max, int(flat.max()) + 3)
        # 128-bit accesses are served per 8-thread phase
        for ph in range(THREADS // 8):
            words = (flat[8 * ph:8 * ph + 8, None] + np.arange(4)).ravel()
            self.bank_st = max(self.bank_st, _degree(words))
        e = (flat[:, None] + np.arange(4)).ravel()
        self.v[e] = np.asarray(vals, dtype=np.float32).reshape(-1, 4).ravel()
        self.ver[e] = tile
        self.phase_w.append((e, np.repeat(tid, 4)))

    def lds(self, flat, tile):
        """32-bit loads: flat [8 warps][32 lanes] -> values [8][32]."""
        flat = np.asarray(flat, dtype=np.int64)
        if flat.min() < 0 or flat.max() >= self.size:
            REP.bad(f"OOB smem load {self.name}: [{flat.min()}, {flat.max()}] size {self.size}")
            flat = np.clip(flat, 0, self.size - 1)
        self.max = max(self.max, int(flat.max()))
        for w in range(flat.shape[0]):
            self.bank_ld = max(self.bank_ld, _degree(flat[w]))
        if np.any(self.ver[flat] != tile):
            REP.bad(f"stale/unwritten smem read in {self.name}: tile {tile}, "
                    f"found {sorted(set(self.ver[flat].ravel().tolist()))[:4]}")
        self.phase_r.append(flat.ravel())
        return self.v[flat]

    def barrier(self, phase):
        if self.phase_w:
            we = np.concatenate([a for a, _ in self.phase_w])
            u, c = np.unique(we, return_counts=True)
            if np.any(c > 1):
                REP.bad(f"smem {self.name}: element written twice in phase {phase}")
            if self.phase_r and np.intersect1d(we, np.concatenate(self.phase_r)).size:
                REP.bad(f"smem {self.name}: RAW/WAR race in phase {phase}")
        self.phase_w, self.phase_r = [], []


def _degree(words):
    """Bank-conflict degree: max number of distinct 4-byte words in one bank."""
    w = np.unique(words)
    return int(np.bincount(w % 32, minlength=32).max())


# ---------------------------------------------------------------- mma
_l = np.arange(32)
_g, _t = _l >> 2, _l & 3


def mma_m16n8k8_tf32(d, a, b):
    """d [..., 32, 4] += A B. a [..., 4, 32] (a0..a3 per lane), b [..., 2, 32];
    leading dims broadcast (warp, mt, nt)."""
    for arr, nm in ((a, "A"), (b, "B")):
        if np.any(np.asarray(arr, np.float32).view(np.uint32) & 0x1FFF):
            REP.bad(f"mma {nm} operand not a tf32 value (low 13 bits set)")
    lead = np.broadcast_shapes(d.shape[:-2], a.shape[:-2], b.shape[:-2])
    A = np.full(a.shape[:-2] + (16, 8), np.nan, np.float64)
    B = np.full(b.shape[:-2] + (8, 8), np.nan, np.float64)
    C = np.full(d.shape[:-2] + (16, 8), np.nan, np.float64)
    A[..., _g, _t] = a[..., 0, :]
    A[..., _g + 8, _t] = a[..., 1, :]
    A[..., _g, _t + 4] = a[..., 2, :]
    A[..., _g + 8, _t + 4] = a[..., 3, :]
    B[..., _t, _g] = b[..., 0, :]
    B[..., _t + 4, _g] = b[..., 1, :]
    for e in range(2):
        C[..., _g, 2 * _t + e] = d[..., :, e]
        C[..., _g + 8, 2 * _t + e] = d[..., :, 2 + e]
    A = np.broadcast_to(A, lead + (16, 8))
    B = np.broadcast_to(B, lead + (8, 8))
    C = np.broadcast_to(C, lead + (16, 8))
    # P[..., i, j, k] = A[i, k] B[k, j], exact (tf32 x tf32 fits float32)
    Pk = A[..., :, None, :] * np.swapaxes(B, -1, -2)[..., None, :, :]
    assert np.all(Pk.astype(np.float32) == Pk) or np.isnan(Pk).any()
    mode = CFG["acc"]
    if mode == "seq":
        D = C.astype(np.float32)
        for k in range(8):
            D = (D + Pk[..., k].astype(np.float32)).astype(np.float32)
    else:
        S = C + Pk.sum(-1)
        D = S.astype(np.float32)
        if mode == "rz":
            over = np.abs(D.astype(np.float64)) > np.abs(S)
            D = np.where(over, np.nextafter(D, np.float32(0)), D).astype(np.float32)
    out = np.empty(lead + (32, 4), np.float32)
    for e in range(2):
        out[..., :, e] = D[..., _g, 2 * _t + e]
        out[..., :, 2 + e] = D[..., _g + 8, 2 * _t + e]
    return out


# ---------------------------------------------------------------- StageF32
class StageF32:
    """Thread t stages rows t/4 + 64 i (i < 2) of A (through emu.StageA<RS, VEC, BK32, 2>,
    the 16-bit kernels' A staging) and of B, columns 4 (t % 4) .. +3."""

    def __init__(self, RS, VEC):
        self.a = StageA(RS, VEC, BK32, 2)
        self.bv = np.zeros((2, THREADS, 4), np.float32)

    def load(self, p, rows, k0, n0, tid):
        self.a.load(p, rows, k0, tid)
        q = tid & 3
        w = p.wt
        for j in range(2):
            n = n0 + (tid >> 2) + 64 * j
            m = n < p.cout
            chk32(n)
            self.bv[j] = np.where(m[:, None], w.load(n * p.kp + k0 + 4 * q, 4, m), np.float32(0))

    def store(self, p, rows, As, Bs, stage, tid, tile):
        q = tid & 3
        for i in range(2):
            As.store4(SmemF.flat(stage, (tid >> 2) + 64 * i, 4 * q), self.a.value(p, rows, i), tid, tile)
            Bs.store4(SmemF.flat(stage, (tid >> 2) + 64 * i, 4 * q), self.bv[i], tid, tile)


# ---------------------------------------------------------------- igemm_tf32x3
def igemm_tf32x3_block(p, RS, VEC, bx, by):
    As, Bs = p.As, p.Bs
    tid = np.arange(THREADS, dtype=np.int64)
    warp = np.arange(8)[:, None]            # [8 warps, 1]
    lane = np.arange(32)[None, :]           # [1, 32 lanes]
    wm, wn = warp & 1, warp >> 1
    g, t4 = lane >> 2, lane & 3
    m0, n0 = bx * BM, by * BN

    rows = [decode_row(p, m0 + (tid >> 2) + 64 * i) for i in range(2)]

    acc = np.zeros((8, 4, 4, 32, 4), np.float32)   # [warp][mt][nt][lane][e]
    acc_s = np.zeros_like(acc)
    ktiles = p.kp // BK32
    st = StageF32(RS, VEC)
    phase = 0
    st.load(p, rows, 0, n0, tid)
    st.store(p, rows, As, Bs, 0, tid, 0)
    As.barrier(phase); Bs.barrier(phase); phase += 1

    for kt in range(ktiles):
        cur = kt & 1
        more = kt + 1 < ktiles
        if more:
            st.load(p, rows, (kt + 1) * BK32, n0, tid)
        for ks in range(0, BK32, 8):
            ab = np.zeros((8, 4, 4, 32), np.float32); as_ = np.zeros_like(ab)
            bb = np.zeros((8, 4, 2, 32), np.float32); bs_ = np.zeros_like(bb)
            for mt in range(4):
                r = wm * 64 + mt * 16 + g
                ab[:, mt, 0], as_[:, mt, 0] = split_tf32(As.lds(SmemF.flat(cur, r, ks + t4), kt))
                ab[:, mt, 1], as_[:, mt, 1] = split_tf32(As.lds(SmemF.flat(cur, r + 8, ks + t4), kt))
                ab[:, mt, 2], as_[:, mt, 2] = split_tf32(As.lds(SmemF.flat(cur, r, ks + t4 + 4), kt))
                ab[:, mt, 3], as_[:, mt, 3] = split_tf32(As.lds(SmemF.flat(cur, r + 8, ks + t4 + 4), kt))
            for nt in range(4):
                n = wn * 32 + nt * 8 + g
                bb[:, nt, 0], bs_[:, nt, 0] = split_tf32(Bs.lds(SmemF.flat(cur, n, ks + t4), kt))
                bb[:, nt, 1], bs_[:, nt, 1] = split_tf32(Bs.lds(SmemF.flat(cur, n, ks + t4 + 4), kt))
            A_b, A_s = ab[:, :, None], as_[:, :, None]     # [8, mt, 1, 4, 32]
            B_b, B_s = bb[:, None], bs_[:, None]           # [8, 1, nt, 2, 32]
            if CFG["products"] == 1:
                acc = mma_m16n8k8_tf32(acc, A_b, B_b)
            elif CFG["order"] == "small_first":            # variant: straight into acc
                acc = mma_m16n8k8_tf32(acc, A_s, B_b)
                acc = mma_m16n8k8_tf32(acc, A_b, B_s)
                acc = mma_m16n8k8_tf32(acc, A_b, B_b)
            elif CFG["order"] == "flush":                  # the .cu: per-k8 partial from zero, IEEE add into acc
                tt = np.zeros_like(acc)
                tt = mma_m16n8k8_tf32(tt, A_s, B_b)
                tt = mma_m16n8k8_tf32(tt, A_b, B_s)
                tt = mma_m16n8k8_tf32(tt, A_b, B_b)
                acc = (acc + tt).astype(np.float32)
            elif CFG["order"] == "sep":                    # variant: cross terms in their own accumulator
                acc_s = mma_m16n8k8_tf32(acc_s, A_s, B_b)
                acc_s = mma_m16n8k8_tf32(acc_s, A_b, B_s)
                acc = mma_m16n8k8_tf32(acc, A_b, B_b)
            else:                                          # big first (sensitivity)
                acc = mma_m16n8k8_tf32(acc, A_b, B_b)
                acc = mma_m16n8k8_tf32(acc, A_s, B_b)
                acc = mma_m16n8k8_tf32(acc, A_b, B_s)
        if more:
            st.store(p, rows, As, Bs, cur ^ 1, tid, kt + 1)
        As.barrier(phase); Bs.barrier(phase); phase += 1

    if CFG["order"] == "sep":
        acc = (acc + acc_s).astype(np.float32)
    warp_t, lane_t = tid >> 5, tid & 31
    wm_t, wn_t = warp_t & 1, warp_t >> 1
    epilogue(p, acc[warp_t, :, :, lane_t, :], m0 + wm_t * 64, n0 + wn_t * 32, lane_t)


def pack_weights_f32(wbuf, kk, cout, kp):
    n = cout * kp
    i = np.arange(n, dtype=np.int64)
    co = i // kp
    j = i - co * kp
    m = j < kk
    return np.where(m, wbuf.load(j * cout + co, 1, m)[:, 0], np.float32(0)).astype(np.float32)


def run_case(b, h, w, cin, cout, k, rs, affine, silu, bvec, res, seed=0, scale=None, c1=None):
    rng = np.random.default_rng(seed)
    sh, sw = {RS_SAME: (h, w), RS_UP: (h // 2, w // 2), RS_DOWN: (2 * h, 2 * w)}[rs]
    x = rng.standard_normal((b, sh, sw, cin)).astype(np.float32)
    kk = k * k * cin
    bk = 16                                   # Arith::Tf32x3.bk()
    kp = max(-(-kk // bk), 1) * bk
    W = (rng.standard_normal((kk, cout)) / np.sqrt(kk)).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32)
    aff = np.stack([rng.uniform(0.5, 1.5, (b, cin)), rng.standard_normal((b, cin))], 1).astype(np.float32)
    bv = rng.standard_normal((b, cout)).astype(np.float32)
    rs_ = rng.standard_normal((b * h * w, cout)).astype(np.float32)

    p = P()
    xcat = set_source(p, x, cin, c1)
    wbuf = GBuf("w_f32", W)
    p.wt = GBuf("wt32", pack_weights_f32(wbuf, kk, cout, kp), eb=4)
    p.bias = GBuf("bias", bias)
    p.affine = GBuf("affine", aff) if affine else GBuf("affine(=x)", x, absent=True)
    p.bvec = GBuf("bvec", bv) if bvec else GBuf("bvec(=x)", x, absent=True)
    p.res = GBuf("res", rs_) if res else GBuf("res(=x)", x, absent=True)
    m = b * h * w
    p.y = GBuf("y", np.full(m * cout, np.nan, np.float32))
    p.b, p.h, p.w, p.cin, p.cout, p.k, p.kp = b, h, w, cin, cout, k, kp
    p.has_affine, p.silu, p.has_bvec, p.has_res = int(affine), int(silu), int(bvec), int(res)
    p.As, p.Bs = SmemF("As"), SmemF("Bs")
    VEC = cin % bk == 0                       # d.cin.is_multiple_of(bk)
    gx, gy = -(-m // BM), -(-cout // BN)
    for bx in range(gx):
        for by in range(gy):
            igemm_tf32x3_block(p, rs, VEC, bx, by)

    coverage(p)
    x = xcat            # the references below read the materialised concatenation [x, x2]
    # float64 reference on the float64-transformed input
    t = x.astype(np.float64)
    if affine:
        t = aff[:, 0].astype(np.float64)[:, None, None, :] * t + aff[:, 1].astype(np.float64)[:, None, None, :]
    if silu:
        t = t / (1 + np.exp(-t))
    if rs == RS_UP:
        t = t.repeat(2, 1).repeat(2, 2)
    elif rs == RS_DOWN:
        t = t.reshape(b, h, 2, w, 2, cin).mean((2, 4))
    Wr = W.astype(np.float64)
    pad = k // 2
    tp = np.pad(t, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    conv = np.zeros((b, h, w, cout))
    absconv = np.zeros((b, h, w, cout))
    for ky in range(k):
        for kx in range(k):
            j0 = (ky * k + kx) * cin
            conv += tp[:, ky:ky + h, kx:kx + w, :] @ Wr[j0:j0 + cin]
            absconv += np.abs(tp[:, ky:ky + h, kx:kx + w, :]) @ np.abs(Wr[j0:j0 + cin])
    ref = conv + bias
    if bvec:
        ref += bv[:, None, None, :]
    ref = ref.reshape(m, cout)
    if res:
        ref += rs_
    # float32 baseline: the same transform, sgemm per tap, float32 epilogue (what a plain
    # float32 conv would reach)
    t32 = x
    if affine:
        t32 = (aff[:, 0][:, None, None, :] * t32 + aff[:, 1][:, None, None, :]).astype(np.float32)
    if silu:
        t32 = (t32 / (np.float32(1) + np.exp(-t32))).astype(np.float32)
    if rs == RS_UP:
        t32 = t32.repeat(2, 1).repeat(2, 2)
    elif rs == RS_DOWN:
        t32 = (t32.reshape(b, h, 2, w, 2, cin).sum((2, 4), dtype=np.float32) * np.float32(0.25)).astype(np.float32)
    tp32 = np.pad(t32, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    c32 = np.zeros((b, h, w, cout), np.float32)
    for ky in range(k):
        for kx in range(k):
            j0 = (ky * k + kx) * cin
            c32 = (c32 + tp32[:, ky:ky + h, kx:kx + w, :] @ W[j0:j0 + cin]).astype(np.float32)
    y32 = (c32 + bias).astype(np.float32)
    if bvec:
        y32 = (y32 + bv[:, None, None, :]).astype(np.float32)
    y32 = y32.reshape(m, cout)
    if res:
        y32 = (y32 + rs_).astype(np.float32)
    err_f32 = np.abs(y32 - ref).max() / np.abs(ref).max()
    # naive float32 FMA loop over K in the kernel's (ky, kx, ci) order (a CUDA-core fp32 conv)
    A32 = np.concatenate([tp32[:, ky:ky + h, kx:kx + w, :] for ky in range(k) for kx in range(k)], -1).reshape(m, kk)
    accf = np.zeros((m, cout), np.float32)
    for j in range(kk):
        accf = (accf.astype(np.float64) + A32[:, j:j + 1].astype(np.float64) * W[j].astype(np.float64)).astype(np.float32)
    yf = (accf + bias).astype(np.float32)
    if bvec:
        yf = (yf + np.repeat(bv, h * w, 0)).astype(np.float32)
    if res:
        yf = (yf + rs_).astype(np.float32)
    err_fma = np.abs(yf - ref).max() / np.abs(ref).max()
    extra = {}
    if PASSES == 1:
        # float64 reference on TF32-rounded operands: the activation as the kernel's
        # float32 staging computes it (the 2x2 pool summed tap by tap, in order), then
        # cvt.rna; the weights through cvt.rna.
        ta = x
        if affine or silu:
            ta = prologue(ta, aff[:, 0][:, None, None, :], aff[:, 1][:, None, None, :], int(affine), int(silu))
        if rs == RS_UP:
            ta = ta.repeat(2, 1).repeat(2, 2)
        elif rs == RS_DOWN:
            t6 = ta.reshape(b, h, 2, w, 2, cin)
            sacc = np.zeros((b, h, w, cin), np.float32)
            for u in range(4):
                sacc = (sacc + t6[:, :, u >> 1, :, u & 1]).astype(np.float32)
            ta = (sacc * np.float32(0.25)).astype(np.float32)
        tpr = np.pad(tf32_rna(ta).astype(np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        Wt = tf32_rna(W).astype(np.float64)
        conv_r = np.zeros((b, h, w, cout))
        for ky in range(k):
            for kx in range(k):
                j0 = (ky * k + kx) * cin
                conv_r += tpr[:, ky:ky + h, kx:kx + w, :] @ Wt[j0:j0 + cin]
        ref_r = conv_r + bias
        if bvec:
            ref_r += bv[:, None, None, :]
        ref_r = ref_r.reshape(m, cout)
        if res:
            ref_r += rs_
        yy = p.y.a.reshape(m, cout).astype(np.float64)
        l2 = lambda d, r: float(np.sqrt(np.sum(d ** 2) / np.sum(r ** 2)))
        extra = dict(l2_f64=l2(yy - ref, ref), l2_rnd=l2(yy - ref_r, ref_r),
                     l2_rnd_conv=l2(yy - ref_r, conv_r), l2_f32=l2(y32 - ref, ref))
    yv = p.y.a.reshape(m, cout).astype(np.float64)
    d = np.abs(yv - ref)
    err = np.max(d) / np.abs(ref).max()                      # normwise; NaN if any output is NaN
    err_conv = np.nanmax(d) / np.abs(conv).max()             # vs the conv part alone
    err_cw = np.nanmax(d / (absconv.reshape(m, cout) + np.abs(ref - conv.reshape(m, cout)) + 1e-30))  # componentwise
    wc = p.y.wcount
    if np.isnan(yv).any():
        REP.bad("NaN / unwritten outputs")
    if wc is None or wc.min() != 1 or wc.max() != 1:
        REP.bad(f"output write counts min {None if wc is None else wc.min()} max {None if wc is None else wc.max()}")
    bufs = [p.x, p.x2, wbuf, p.wt, p.bias, p.affine, p.bvec, p.res, p.y]
    accs = ", ".join(f"{B.name}:{B.max}/{B.a.size}" for B in bufs if B.nacc)
    accs += f", As:{p.As.max}/{p.As.size}, Bs:{p.Bs.max}/{p.Bs.size}"
    banks = (max(p.As.bank_ld, p.Bs.bank_ld), max(p.As.bank_st, p.Bs.bank_st))
    return dict(**extra, err_fma=err_fma, err_f32=err_f32, err=err, err_conv=err_conv, err_cw=err_cw, acc=accs, gx=gx, gy=gy, VEC=VEC, kp=kp, banks=banks, fuses=fuses(bk, cin, rs, c1))


CASES = emu.CASES + [
    dict(b=2, h=6, w=7, cin=48, cout=24, k=3, rs=RS_SAME, affine=1, silu=1, bvec=1, res=0),   # VEC tf32, scalar bf16
    dict(b=1, h=8, w=6, cin=48, cout=12, k=1, rs=RS_DOWN, affine=1, silu=1, bvec=0, res=1),
    dict(b=2, h=5, w=4, cin=8, cout=19, k=3, rs=RS_SAME, affine=1, silu=0, bvec=0, res=1),  # cin 8 scalar
    dict(b=2, h=4, w=6, cin=8, cout=16, k=3, rs=RS_UP, affine=1, silu=1, bvec=1, res=0),
    dict(b=2, h=10, w=14, cin=48, cout=260, k=3, rs=RS_UP, affine=1, silu=1, bvec=1, res=1),  # M 280, cout 260: grid (3, 3)
]
CONCAT = emu.CONCAT + [
    # a split on the 16-channel tile (VEC for tf32x3 only)
    dict(b=2, h=6, w=7, cin=48, c1=16, cout=24, k=3, rs=RS_SAME, affine=1, silu=1, bvec=1, res=0),
    dict(b=2, h=4, w=6, cin=48, c1=16, cout=40, k=3, rs=RS_DOWN, affine=1, silu=1, bvec=0, res=1),
    dict(b=2, h=6, w=4, cin=48, c1=32, cout=20, k=3, rs=RS_UP, affine=1, silu=1, bvec=0, res=0),
]
# Long K (argument big; not in the default run): the GPU test's longest (cin 256, k 3,
# cout 1: K = 2304) and the networks' longest (cin 768, k 3: K = 6912).
BIG = [
    dict(b=1, h=17, w=19, cin=256, cout=1, k=3, rs=RS_SAME, affine=0, silu=1, bvec=0, res=0),
    dict(b=1, h=8, w=16, cin=768, cout=32, k=3, rs=RS_SAME, affine=1, silu=1, bvec=0, res=0),
]
NAMES = {0: "same", 1: "up", 2: "down"}


def tag(c):
    cc = f"{c['cin']}={c['c1']}+{c['cin']-c['c1']}" if c.get("c1") else f"{c['cin']}"
    return (f"b{c['b']} {c['h']}x{c['w']} cin{cc} cout{c['cout']} k{c['k']} {NAMES[c['rs']]}"
            f" a{c['affine']}s{c['silu']}v{c['bvec']}r{c['res']}")


if __name__ == "__main__":
    failed = False
    sets = [a for a in sys.argv[1:] if a in ("old", "concat", "big")] or ["old", "concat"]
    for a in sys.argv[1:]:
        if a in sets:
            continue
        k_, v_ = a.split("=")
        if k_ == "passes":
            assert v_ in ("1", "3"), "passes=1 or passes=3"
            PASSES = int(v_)
            CFG["products"] = 1 if PASSES == 1 else 3
            continue
        CFG[k_] = int(v_) if v_.isdigit() else v_
    print("CFG", CFG)
    if PASSES == 1:
        print("passes 1 (igemm_tf32<RS, VEC, 1>): rel-L2 over y against float64 | against float64 on "
              "tf32-rounded operands (and with ||conv|| as the denominator)")
    worst = {}
    for c in (CASES if "old" in sets else []) + (CONCAT if "concat" in sets else []) + (BIG if "big" in sets else []):
        REP.problems = []
        r = run_case(**c)
        print(f"{tag(c):44s} | {'VEC' if r['VEC'] else 'scal'} kp={r['kp']:4d} grid=({r['gx']},{r['gy']}){'' if r['fuses'] else ' (launcher refuses: kernel-level)'} | "
              f"relerr {r['err']:.2e} (f32 sgemm {r['err_f32']:.2e} fma-loop {r['err_fma']:.2e}) conv {r['err_conv']:.2e} cw {r['err_cw']:.2e} | banks ld{r['banks'][0]} st{r['banks'][1]} | "
              f"problems {REP.problems or 'none'}")
        print(f"     max idx/len: {r['acc']}")
        if PASSES == 1:
            print(f"     passes 1: K={c['k'] ** 2 * c['cin']:5d} relL2 vs f64 {r['l2_f64']:.2e} (f32 sgemm {r['l2_f32']:.2e}) | "
                  f"vs tf32-rounded f64 {r['l2_rnd']:.2e} (conv denominator {r['l2_rnd_conv']:.2e})")
            for key in ("l2_f64", "l2_rnd", "l2_rnd_conv"):
                worst[key] = max(worst.get(key, 0.0), r[key])
        failed = failed or bool(REP.problems)
    if PASSES == 1:
        print(f"passes 1, acc {CFG['acc']}: max over cases: relL2 vs f64 {worst['l2_f64']:.2e}, "
              f"vs tf32-rounded f64 {worst['l2_rnd']:.2e} (conv denominator {worst['l2_rnd_conv']:.2e})")
    sys.exit(1 if failed else 0)
