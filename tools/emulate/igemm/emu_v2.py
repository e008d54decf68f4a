"""Lane-by-lane numpy emulation of kernels/igemm2.cu (version 2 of the 16-bit
convolution), launched as src/backend/cuda/igemm2.rs does:

  conv_prep<T, RS>            grid-stride pass writing transformed4() of
                              kernels/common/conv_prologue.cuh once, as T, NHWC;
  igemm2<T, BN, WARPS_M, P>   prologue-free implicit GEMM fed by cp.async
                              (STAGES = 3 slots, commit_group / wait_group<1>),
                              split-K over blockIdx.z (P = PARTIAL);
  igemm2_reduce               the split sums in split order + the epilogue.

Every per-thread index formula is transcribed literally from the .cu
(vectorised over the 256 threads of a block, or the 32 lanes of a warp).
Global memory goes through emu.GBuf (bounds, alignment, max index, write
counts).  The dynamic shared memory (As[STAGES][128][40] then
Bs[STAGES][BN][40], unsigned short) is one SmemAsync, which models
cp.async per thread:

  * a copy is issued into the thread's open (uncommitted) group; commit closes
    it; wait_group N retires all but the newest N committed groups of that
    thread (groups retire in commit order; uncommitted copies never retire);
  * a retired copy becomes visible to every thread at the next __syncthreads,
    not before: until then the words keep their old content (tag);
  * while a copy is in flight (from its issue to the barrier after its
    retirement) it may land at any moment, so any ldmatrix read of its words
    in a barrier phase it spans is a race, and two copies in flight to one
    word are a double write;
  * a copy's global source must be a valid, 16-byte aligned address even
    with src-size 0 (zero fill); a zero-fill copy reads nothing.

Every staged word is tagged with its K tile (2 kt for A, 2 kt + 1 for B), so a
read of a slot holding another tile, of a copy not landed + synced, or of
never-written (NaN-poisoned) shared memory is reported as stale.  mma.sync /
ldmatrix fragment layouts are emu.py's.

The result is compared with float64 on the same 16-bit operands: the
transformed input computed in float32 with numpy over whole tensors (must
equal conv_prep's output bit for bit) and the weights, both rounded to T.

    python3 emu_v2.py                 # every case; exit 1 on any problem
    python3 emu_v2.py bug=wait        # a planted bug (see BUGS); must report problems
    python3 emu_v2.py only=0,3        # a subset of the cases
"""
import sys
import time
import numpy as np
import emu
from emu import (GBuf, REP, P, Smem, cdiv, chk32, prologue, src_at, bf16_round, mma_m16n8k16,
                 pack_weights, set_source, coverage, RS_SAME, RS_UP, RS_DOWN)

BM, BK, SROW, THREADS, STAGES = 128, 32, 40, 256, 3
WARPS_M_OF = {128: 2, 64: 4, 32: 8}      # the IGEMM2_KERNEL list
SM_COUNT = 2                             # elementwise_config's grid cap is sm_count * 8 blocks;
                                         # small here so that the grid-stride loops wrap
TOL = 1e-4                               # max |y - ref| / max |ref| above this is a problem

BUGS = {
    "wait": "cp_async_wait<STAGES - 1> in the main loop (tile i not yet landed)",
    "slot": "the refill goes to slot i % STAGES, the one being read",
    "sync": "no __syncthreads after the wait",
    "zfill": "zero-fill A copies pass the computed (out-of-image) address, not p.xp",
    "split": "nk = tiles_per_split (no min with the tiles left): the last split runs past K",
}
BUG = None


def f16_round(x):
    """__floats2half2_rn: float32 -> fp16, round to nearest even."""
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


ROUND = {"bf16": bf16_round, "f16": f16_round}


def gstore(buf, idx, vals, width, mask):
    """A `width`-element vector store (uint2 of 4 halves) to global buffer `buf`."""
    idx, mask, sel = buf._check(idx, width, mask, f"{width * buf.eb}-byte store")
    if buf.wcount is None:
        buf.wcount = np.zeros(buf.a.size, dtype=np.int64)
    if sel.size:
        s = np.clip(sel, 0, buf.a.size - width)
        e = s[:, None] + np.arange(width)
        np.add.at(buf.wcount, e.ravel(), 1)
        buf.a[e] = np.asarray(vals, np.float32).reshape(idx.shape + (width,))[mask]


def launch_grid(n):
    """Gpu::elementwise_config(n): 256 threads, min(ceil(n / 256), sm_count * 8) blocks, >= 1."""
    return max(1, min(-(-n // 256), SM_COUNT * 8)), 256


# ---------------------------------------------------------------- conv_prologue.cuh
def prologue4(p, bi, ci, v, mask):
    a = np.ones(bi.shape + (4,), np.float32)
    s = np.zeros(bi.shape + (4,), np.float32)
    if p.has_affine:
        a = p.affine.load((2 * bi) * p.cin + ci, 4, mask)
        s = p.affine.load((2 * bi + 1) * p.cin + ci, 4, mask)
    return prologue(v, a, s, p.has_affine, p.silu)


def gather4(RS, p, bi, sy, sx, ci, mask):
    if RS == RS_DOWN:
        sw, sh = 2 * p.w, 2 * p.h
        acc = np.zeros(bi.shape + (4,), np.float32)
        for u in range(4):
            yy, xx = 2 * sy + (u >> 1), 2 * sx + (u & 1)
            chk32(bi * sh + yy)
            v = prologue4(p, bi, ci, src_at(p, (bi * sh + yy) * sw + xx, ci, 4, mask), mask)
            acc = (acc + v).astype(np.float32)
        return (acc * np.float32(0.25)).astype(np.float32)
    if RS == RS_UP:
        pix = (bi * (p.h >> 1) + (sy >> 1)) * (p.w >> 1) + (sx >> 1)
    else:
        pix = (bi * p.h + sy) * p.w + sx
    chk32(bi * p.h + sy)
    return src_at(p, pix, ci, 4, mask)


def transformed4(RS, p, bi, sy, sx, ci, mask):
    v = gather4(RS, p, bi, sy, sx, ci, mask)
    return v if RS == RS_DOWN or not (p.has_affine or p.silu) else prologue4(p, bi, ci, v, mask)


# ---------------------------------------------------------------- conv_prep
def conv_prep(p, RS, rnd, out):
    cq = p.cin >> 2
    hw = p.h * p.w
    n = p.b * hw * cq
    grid, block = launch_grid(n)
    stride = grid * block
    i = np.arange(stride, dtype=np.int64)          # blockIdx.x * blockDim.x + threadIdx.x
    while np.any(i < n):
        live = i < n
        m = i // cq                                 # size_t
        ci = 4 * (i - m * cq)
        bi = m // hw
        rem = m - bi * hw
        oy, ox = cdiv(rem, p.w), rem - cdiv(rem, p.w) * p.w
        chk32(np.where(live, bi, 0))
        v = transformed4(RS, p, bi, oy, ox, ci, live)
        gstore(out, m * p.cin + ci, rnd(v), 4, live)
        i = i + stride


# ---------------------------------------------------------------- shared memory with cp.async
class SmemAsync(Smem):
    """extern __shared__ unsigned short smem[]: As[STAGES][BM][SROW] then Bs[STAGES][BN][SROW].
    v / ver hold what a thread reading after a barrier sees (value, tile tag); copies in
    flight live in self.flight until the barrier after their retirement."""

    def __init__(self, bn):
        self.name = f"smem(BN {bn})"
        self.size = STAGES * (BM + bn) * SROW        # launcher: STAGES * (BM + bn) * SROW * 2 bytes
        self.v = np.full(self.size, np.nan, dtype=np.float32)
        self.ver = np.full(self.size, -1, dtype=np.int64)
        self.phase_r = []
        self.max = -1
        self.phase = 0
        self.ncommit = np.zeros(THREADS, dtype=np.int64)
        self.flight = []     # dicts: tid, dst, vals [n][8], tag, group (-1 open), retire (-1)

    def cp_async16(self, dst, gbuf, src, nbytes, tag, active=True):
        tid = np.arange(THREADS, dtype=np.int64)
        act = np.broadcast_to(np.asarray(active, bool), tid.shape)
        dst = np.broadcast_to(np.asarray(dst, np.int64), tid.shape)[act]
        src = np.broadcast_to(np.asarray(src, np.int64), tid.shape)
        nbytes = np.broadcast_to(np.asarray(nbytes), tid.shape)
        if np.any((nbytes != 0) & (nbytes != 16) & act):
            REP.bad(f"cp.async src-size other than 0 / 16")
        full, zero = act & (nbytes == 16), act & (nbytes == 0)
        vals = gbuf.load(src, 8, full)                          # [256][8]
        gbuf._check(src, 8, zero, "zero-fill cp.async source address")
        vals = np.where(zero[:, None], np.float32(0), vals)[act]
        if dst.size == 0:
            return
        if np.any((dst * 2) % 16):
            REP.bad(f"cp.async destination not 16-byte aligned in {self.name}")
        if dst.min() < 0 or dst.max() + 8 > self.size:
            REP.bad(f"OOB cp.async destination in {self.name}: [{dst.min()}, {dst.max() + 7}] size {self.size}")
            dst = np.clip(dst, 0, self.size - 8)
        self.max = max(self.max, int(dst.max()) + 7)
        n = dst.size
        self.flight.append(dict(tid=tid[act], dst=dst, vals=vals, tag=tag,
                                group=np.full(n, -1, np.int64), retire=np.full(n, -1, np.int64)))

    def commit(self):
        """cp.async.commit_group by every thread (the kernel calls it unconditionally)."""
        for c in self.flight:
            op = c["group"] == -1
            c["group"][op] = self.ncommit[c["tid"][op]]
        self.ncommit += 1

    def wait(self, n):
        """cp.async.wait_group n by every thread."""
        for c in self.flight:
            done = (c["group"] >= 0) & (c["group"] < self.ncommit[c["tid"]] - n) & (c["retire"] < 0)
            c["retire"][done] = self.phase

    def _check_phase(self):
        if not self.flight:
            return
        words = np.concatenate([(c["dst"][:, None] + np.arange(8)).ravel() for c in self.flight])
        u, cnt = np.unique(words, return_counts=True)
        if np.any(cnt > 1):
            REP.bad(f"{self.name}: two cp.async copies in flight to one word in phase {self.phase}")
        if self.phase_r and np.intersect1d(u, np.concatenate([a for a, _ in self.phase_r])).size:
            REP.bad(f"{self.name}: ldmatrix reads words that a cp.async in flight may overwrite "
                    f"in phase {self.phase} (race)")

    def barrier(self, phase=None):
        """__syncthreads: retired copies become visible to all."""
        self._check_phase()
        keep = []
        for c in self.flight:
            r = c["retire"] >= 0
            if r.any():
                e = (c["dst"][r][:, None] + np.arange(8)).ravel()
                self.v[e] = c["vals"][r].ravel()
                self.ver[e] = c["tag"]
            if not r.all():
                c = {k: (v[~r] if isinstance(v, np.ndarray) else v) for k, v in c.items()}
                keep.append(c)
        self.flight = keep
        self.phase_r = []
        self.phase += 1

    def finish(self):
        """Block exit: the last phase's races, and no copy left uncommitted or unretired."""
        self._check_phase()
        for c in self.flight:
            if np.any(c["group"] < 0):
                REP.bad(f"{self.name}: cp.async never committed at exit")
            if np.any(c["retire"] < 0):
                REP.bad(f"{self.name}: cp.async not waited for at exit")


# ---------------------------------------------------------------- igemm2
def igemm2_block(p, BNt, WARPS_M, PARTIAL, bx, by, bz):
    WARPS_N = 8 // WARPS_M
    WTM, WTN = BM // WARPS_M, BNt // WARPS_N
    MT, NT = WTM // 16, WTN // 8
    assert MT >= 1 and NT >= 2 and NT % 2 == 0, "warp tile"
    A_IT = BM * 4 // THREADS
    B_IT = (BNt * 4 + THREADS - 1) // THREADS
    sm = SmemAsync(BNt)
    A0, B0 = 0, STAGES * BM * SROW                 # As, Bs inside the dynamic shared memory

    tid = np.arange(THREADS, dtype=np.int64)
    lane = np.arange(32, dtype=np.int64)
    m0, n0 = bx * BM, by * BNt
    hw = p.h * p.w
    m_total = p.b * hw
    pad = p.k >> 1
    q = tid & 3

    abase, aoy, aox = [], [], []
    for i in range(A_IT):
        m = m0 + (tid >> 2) + 64 * i
        chk32(m)
        bi = cdiv(m, hw)
        rem = m - cdiv(m, hw) * hw
        aoy.append(np.where(m < m_total, cdiv(rem, p.w), -(1 << 20)))
        aox.append(rem - cdiv(rem, p.w) * p.w)
        abase.append(bi * hw)

    ktiles = p.kp // BK
    kt0 = bz * p.tiles_per_split
    nk = p.tiles_per_split if BUG == "split" else min(p.tiles_per_split, ktiles - kt0)
    if nk <= 0:
        REP.bad(f"split {bz} is empty (kt0 {kt0}, {ktiles} tiles)")

    def load(kt, slot):
        k0 = kt * BK
        tap = cdiv(k0, p.cin)
        ky, kx = cdiv(tap, p.k), tap - cdiv(tap, p.k) * p.k
        ci = k0 - tap * p.cin + 8 * q
        for i in range(A_IT):
            sy, sx = aoy[i] + ky - pad, aox[i] + kx - pad
            inn = (sy >= 0) & (sy < p.h) & (sx >= 0) & (sx < p.w)
            pix = abase[i] + sy * p.w + sx
            chk32(np.where(inn, pix, 0))
            src = (pix * p.cin + ci) if BUG == "zfill" else np.where(inn, pix * p.cin + ci, 0)
            sm.cp_async16(A0 + (slot * BM + (tid >> 2) + 64 * i) * SROW + 8 * q, p.xp, src,
                          np.where(inn, 16, 0), 2 * kt)
        for j in range(B_IT):
            r = (tid >> 2) + 64 * j
            n = n0 + r
            src = np.where(n < p.cout, n * p.kp + k0 + 8 * q, 0)
            sm.cp_async16(B0 + (slot * BNt + r) * SROW + 8 * q, p.wt, src,
                          np.where(n < p.cout, 16, 0), 2 * kt + 1, active=r < BNt)

    acc = np.zeros((8, MT, NT, 32, 4), np.float32)   # [warp][mt][nt][lane][e]

    for s in range(STAGES - 1):
        if s < nk:
            load(kt0 + s, s)
        sm.commit()
    for i in range(nk):
        sm.wait(STAGES - 1 if BUG == "wait" else STAGES - 2)
        if BUG != "sync":
            sm.barrier()
        if i + STAGES - 1 < nk:
            load(kt0 + i + STAGES - 1, i % STAGES if BUG == "slot" else (i + STAGES - 1) % STAGES)
        sm.commit()
        cur = i % STAGES
        ta, tb = 2 * (kt0 + i), 2 * (kt0 + i) + 1
        for ks in range(0, BK, 16):
            for warp in range(8):
                wm, wn = warp % WARPS_M, warp // WARPS_M
                af = [sm.ldmatrix_x4(A0 + (cur * BM + wm * WTM + mt * 16 + (lane & 15)) * SROW
                                     + ks + 8 * (lane >> 4), warp, ta) for mt in range(MT)]
                bf = [None] * NT
                for np_ in range(NT // 2):
                    r = sm.ldmatrix_x4(B0 + (cur * BNt + wn * WTN + np_ * 16 + (lane & 7) + 8 * (lane >> 4)) * SROW
                                       + ks + 8 * ((lane >> 3) & 1), warp, tb)
                    bf[2 * np_] = np.stack([r[0], r[1]])
                    bf[2 * np_ + 1] = np.stack([r[2], r[3]])
                for mt in range(MT):
                    for nt in range(NT):
                        acc[warp, mt, nt] = mma_m16n8k16(acc[warp, mt, nt], af[mt], bf[nt])
    sm.wait(0)
    sm.finish()

    # epilogue, per thread
    warp_t, lane_t = tid >> 5, tid & 31
    wm_t, wn_t = warp_t % WARPS_M, warp_t // WARPS_M
    g, t4 = lane_t >> 2, lane_t & 3
    y = p.y
    yoff = bz * m_total * p.cout if PARTIAL else 0
    for mt in range(MT):
        for half in range(2):
            m = m0 + wm_t * WTM + mt * 16 + g + 8 * half
            mv = m < m_total
            bi = cdiv(np.where(mv, m, 0), hw)
            for nt in range(NT):
                for e in range(2):
                    n = n0 + wn_t * WTN + nt * 8 + 2 * t4 + e
                    ok = mv & (n < p.cout)
                    o = m * p.cout + n
                    v = acc[warp_t, mt, nt, lane_t, 2 * half + e]
                    if not PARTIAL:
                        v = (v + p.bias.load(n, 1, ok)[:, 0]).astype(np.float32)
                        if p.has_bvec:
                            v = (v + p.bvec.load(bi * p.cout + n, 1, ok)[:, 0]).astype(np.float32)
                        if p.has_res:
                            v = (v + p.res.load(o, 1, ok)[:, 0]).astype(np.float32)
                    y.store(yoff + o, v, ok)
    return sm


def igemm2_reduce(part, bias, bvec, res, y, mn, cout, hw, splits, has_bvec, has_res):
    grid, block = launch_grid(mn)
    stride = grid * block
    i = np.arange(stride, dtype=np.int64)
    while np.any(i < mn):
        live = i < mn
        v = np.zeros(i.shape, np.float32)
        for s in range(splits):
            v = (v + part.load(s * mn + i, 1, live)[:, 0]).astype(np.float32)
        m = i // cout
        n = i - m * cout
        v = (v + bias.load(n, 1, live)[:, 0]).astype(np.float32)
        if has_bvec:
            v = (v + bvec.load((m // hw) * cout + n, 1, live)[:, 0]).astype(np.float32)
        if has_res:
            v = (v + res.load(i, 1, live)[:, 0]).astype(np.float32)
        y.store(i, v, live)
        i = i + stride


# ---------------------------------------------------------------- launcher (igemm2.rs)
def takes(cin, c1):
    return cin % BK == 0 and (c1 is None or c1 % 4 == 0)


def split_k(kp, splits):
    tiles = kp // BK
    per = -(-tiles // min(max(splits, 1), max(tiles, 1)))
    return max(-(-tiles // max(per, 1)), 1), max(per, 1)


def run_case(b, h, w, cin, cout, k, rs, affine, silu, bvec, res, bn, splits, T="bf16", seed=0, c1=None):
    rng = np.random.default_rng(seed)
    rnd = ROUND[T]
    assert takes(cin, c1), "the launcher refuses this case"
    sh, sw = {RS_SAME: (h, w), RS_UP: (h // 2, w // 2), RS_DOWN: (2 * h, 2 * w)}[rs]
    x = rng.standard_normal((b, sh, sw, cin)).astype(np.float32)
    kk = k * k * cin
    kp = max(-(-kk // BK), 1) * BK                 # = kk: cin is a multiple of BK
    W = (rng.standard_normal((kk, cout)) / np.sqrt(kk)).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32)
    aff = np.stack([rng.uniform(0.5, 1.5, (b, cin)), rng.standard_normal((b, cin))], 1).astype(np.float32)
    bv = rng.standard_normal((b, cout)).astype(np.float32)
    rs_ = rng.standard_normal((b * h * w, cout)).astype(np.float32)
    m = b * h * w

    p = P()
    xcat = set_source(p, x, cin, c1)
    wbuf = GBuf("w_f32", W)
    wt = GBuf("wt", pack_weights(W, kk, cout, kp, rnd, wbuf), eb=2)
    p.affine = GBuf("affine", aff) if affine else GBuf("affine(=x)", x, absent=True)
    p.b, p.h, p.w, p.cin = b, h, w, cin
    p.has_affine, p.silu = int(affine), int(silu)
    xp = GBuf("xp", np.full(m * cin, np.nan, np.float32), eb=2)
    conv_prep(p, rs, rnd, xp)

    nsplit, per = split_k(kp, splits)
    part = GBuf("part", np.full(nsplit * m * cout, np.nan, np.float32)) if nsplit > 1 else None
    y = GBuf("y", np.full(m * cout, np.nan, np.float32))
    g = P()
    g.xp, g.wt = xp, wt
    g.bias = GBuf("bias", bias)
    g.bvec = GBuf("bvec", bv) if bvec else GBuf("bvec(=x)", x, absent=True)
    g.res = GBuf("res", rs_) if res else GBuf("res(=x)", x, absent=True)
    g.y = part if nsplit > 1 else y
    g.b, g.h, g.w, g.cin, g.cout, g.k, g.kp = b, h, w, cin, cout, k, kp
    g.has_bvec, g.has_res, g.tiles_per_split = int(bvec), int(res), per
    grid = (-(-m // BM), -(-cout // bn), nsplit)
    smax, ssize = -1, 0
    for bz in range(grid[2]):
        for bx in range(grid[0]):
            for by in range(grid[1]):
                sm = igemm2_block(g, bn, WARPS_M_OF[bn], nsplit > 1, bx, by, bz)
                smax, ssize = max(smax, sm.max), sm.size
    if nsplit > 1:
        igemm2_reduce(part, g.bias, g.bvec, g.res, y, m * cout, cout, h * w, nsplit, int(bvec), int(res))

    # --- checks
    coverage(p)
    for B in (xp, wt):
        if B.rcount is None or B.rcount.min() == 0:
            REP.bad(f"{B.a.size if B.rcount is None else int((B.rcount == 0).sum())} elements of {B.name} never read")
    for B in (xp, part, y):
        if B is None:
            continue
        wc = B.wcount
        if wc is None or wc.min() != 1 or wc.max() != 1:
            REP.bad(f"{B.name} write counts min {None if wc is None else wc.min()} max {None if wc is None else wc.max()}")
        if np.isnan(B.a).any():
            REP.bad(f"NaN / unwritten elements in {B.name}")

    # reference: the transformed input in float32 over whole tensors, rounded to T
    t = xcat
    if affine or silu:
        t = prologue(t, aff[:, 0][:, None, None, :], aff[:, 1][:, None, None, :], int(affine), int(silu))
    if rs == RS_UP:
        t = t.repeat(2, 1).repeat(2, 2)
    elif rs == RS_DOWN:
        t6 = t.reshape(b, h, 2, w, 2, cin)
        s = np.zeros((b, h, w, cin), np.float32)
        for u in range(4):
            s = (s + t6[:, :, u >> 1, :, u & 1]).astype(np.float32)
        t = (s * np.float32(0.25)).astype(np.float32)
    tr = rnd(t).reshape(m, cin)
    prep_bad = int(np.sum(~(xp.a.reshape(m, cin) == tr)))
    if prep_bad:
        REP.bad(f"conv_prep output differs from the reference transform at {prep_bad} of {m * cin} values")
    Wr = rnd(W).astype(np.float64)
    pad = k // 2
    tp = np.pad(tr.reshape(b, h, w, cin).astype(np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ref = np.zeros((b, h, w, cout))
    for ky in range(k):
        for kx in range(k):
            j0 = (ky * k + kx) * cin
            ref += tp[:, ky:ky + h, kx:kx + w, :] @ Wr[j0:j0 + cin]
    ref += bias
    if bvec:
        ref += bv[:, None, None, :]
    ref = ref.reshape(m, cout)
    if res:
        ref += rs_
    yv = y.a.reshape(m, cout).astype(np.float64)
    err = np.max(np.abs(yv - ref)) / np.abs(ref).max()          # NaN if any output is NaN
    l2 = np.sqrt(np.sum((yv - ref) ** 2) / np.sum(ref ** 2))
    if not err <= TOL:
        REP.bad(f"relerr {err:.2e} > {TOL:.0e}")
    bufs = [p.x, p.x2, wbuf, p.affine, xp, wt, g.bias, g.bvec, g.res] + ([part] if part else []) + [y]
    accs = ", ".join(f"{B.name}:{B.max}/{B.a.size}" for B in bufs if B.nacc)
    accs += f", smem:{smax}/{ssize}"
    return dict(err=err, l2=l2, acc=accs, grid=grid, per=per, kp=kp, prep_bad=prep_bad)


S, U, D = RS_SAME, RS_UP, RS_DOWN
CASES = [
    # b2 9x7: M = 126 (one partial M tile); cout 96 with BN 64 (a partial N tile)
    dict(b=2, h=9, w=7, cin=96, cout=96, k=3, rs=S, affine=1, silu=1, bvec=1, res=1, bn=64, splits=1),
    # split-K 4 of 27 tiles: 7 + 7 + 7 + 6
    dict(b=2, h=9, w=7, cin=96, cout=96, k=3, rs=S, affine=1, silu=1, bvec=1, res=1, bn=128, splits=4),
    # up, BN 32, cout 33 (2 columns in the last N tile), 9 tiles in 2 splits: 5 + 4
    dict(b=2, h=8, w=6, cin=32, cout=33, k=3, rs=U, affine=1, silu=1, bvec=0, res=0, bn=32, splits=2),
    # down, cout 1 (the output conv), affine without SiLU, residual
    dict(b=1, h=6, w=10, cin=32, cout=1, k=3, rs=D, affine=1, silu=0, bvec=0, res=1, bn=128, splits=1),
    # k 1, no prologue / epilogue terms; 3 tiles in 3 splits: nk = 1 < STAGES - 1
    dict(b=2, h=9, w=7, cin=96, cout=96, k=1, rs=S, affine=0, silu=0, bvec=0, res=0, bn=64, splits=3),
    # concatenation [x, x2] split at 64 of 96, 27 tiles in 2 splits: 14 + 13
    dict(b=2, h=5, w=7, cin=96, c1=64, cout=40, k=3, rs=S, affine=1, silu=1, bvec=1, res=0, bn=64, splits=2),
    # a split off the K tile (c1 = 36, a multiple of 4 only): prep's float4 reads either half
    dict(b=1, h=6, w=8, cin=96, c1=36, cout=20, k=1, rs=D, affine=1, silu=1, bvec=0, res=1, bn=32, splits=1),
    # concatenation through up-sampling, SiLU only
    dict(b=1, h=8, w=6, cin=96, c1=64, cout=64, k=3, rs=U, affine=0, silu=1, bvec=1, res=1, bn=32, splits=1),
    # M = 297 (3 M tiles), cout 130 with BN 128 (2 N tiles), every epilogue term
    dict(b=3, h=9, w=11, cin=32, cout=130, k=3, rs=S, affine=1, silu=1, bvec=1, res=1, bn=128, splits=1),
    # fp16; 9 tiles, 8 splits asked -> 5 of 2 + 2 + 2 + 2 + 1
    dict(b=2, h=5, w=6, cin=32, cout=64, k=3, rs=S, affine=1, silu=1, bvec=1, res=1, bn=32, splits=8, T="f16"),
    # M = 30 < 64 (the second A row of every thread is out of range), k 1: one tile
    dict(b=1, h=5, w=6, cin=32, cout=8, k=1, rs=S, affine=0, silu=1, bvec=0, res=0, bn=128, splits=2),
    # fp16 down with BN 64, splits 2 of 9
    dict(b=2, h=4, w=6, cin=32, cout=72, k=3, rs=D, affine=1, silu=1, bvec=1, res=0, bn=64, splits=2, T="f16"),
    # M = 128 and cout = 128 exactly (no partial tile), up, 9 tiles in 3 splits of 3
    dict(b=2, h=8, w=8, cin=32, cout=128, k=3, rs=U, affine=1, silu=1, bvec=1, res=1, bn=128, splits=3),
    # concatenation through pooling with split-K, cout 1 with BN 32
    dict(b=1, h=4, w=8, cin=96, c1=64, cout=1, k=3, rs=D, affine=1, silu=1, bvec=1, res=1, bn=32, splits=3),
    # M = 200 (2 M tiles, the second with 72 rows), BN 64 with cout 64, k 1 in 3 splits
    dict(b=2, h=10, w=10, cin=96, cout=64, k=1, rs=S, affine=1, silu=0, bvec=0, res=1, bn=64, splits=3),
]
NAMES = {0: "same", 1: "up", 2: "down"}


def tag(c):
    cc = f"{c['cin']}={c['c1']}+{c['cin'] - c['c1']}" if c.get("c1") else f"{c['cin']}"
    return (f"[{c.get('T', 'bf16')}] b{c['b']} {c['h']}x{c['w']} cin{cc} cout{c['cout']} k{c['k']} {NAMES[c['rs']]}"
            f" a{c['affine']}s{c['silu']}v{c['bvec']}r{c['res']} BN{c['bn']}")


def shown(probs, n=4):
    if not probs:
        return "none"
    return str(probs[:n]) + (f" (+{len(probs) - n} more)" if len(probs) > n else "")


if __name__ == "__main__":
    only = None
    for a in sys.argv[1:]:
        k_, _, v_ = a.partition("=")
        if k_ == "bug":
            assert v_ in BUGS, f"bug= one of {sorted(BUGS)}"
            BUG = v_
        elif k_ == "only":
            only = [int(s) for s in v_.split(",")]
        else:
            sys.exit(f"unknown argument {a}")
    if BUG:
        print(f"planted bug '{BUG}': {BUGS[BUG]}")
    cases = [c for i, c in enumerate(CASES) if only is None or i in only]
    if BUG and only is None:
        cases = [CASES[i] for i in (0, 2, 4)]
    failed = []
    t_all = time.time()
    for c in cases:
        REP.problems = []
        t0 = time.time()
        r = run_case(**c)
        gx, gy, gz = r["grid"]
        print(f"{tag(c):58s} | kp={r['kp']:4d} grid=({gx},{gy},{gz}) tiles/split {r['per']:2d} | "
              f"prep {'exact' if r['prep_bad'] == 0 else 'DIFFERS'} | relerr {r['err']:.2e} relL2 {r['l2']:.2e} | "
              f"{time.time() - t0:4.1f}s | problems {shown(REP.problems)}")
        print(f"     max idx/len: {r['acc']}")
        if REP.problems:
            failed.append(tag(c))
    print(f"{len(cases)} cases in {time.time() - t_all:.0f}s; problems {failed or 'none'}")
    sys.exit(1 if failed else 0)
