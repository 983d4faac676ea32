// conv2d: forward, grad of input, grad of weight and grad of bias, NCHW, every option of
// torch.nn.functional.conv2d (stride, padding, dilation, groups).
//
// The three convolution passes are one tiled GEMM each, with the im2col matrix never built
// ("implicit GEMM"): a Problem struct says how to read an element of A (M x K) and B (K x N)
// straight from the tensors and where C (M x N) goes.
//
//   pass             M         N                  K                   A         B
//   forward          C_out/g   N*Ho*Wo            C_in/g*kH*kW        weight    im2col(x)
//   backward_input   C_in/g    N*H*W              C_out/g*kH*kW       weight^T  col2im(gy)
//   backward_weight  C_out/g   C_in/g*kH*kW       N*Ho*Wo (split)     gy        im2col(x)^T
//
// Two main loops run every Problem: a CUDA-core loop with shared-memory and register tiling
// (float32 in true fp32, float64) and a tensor-core loop (mma.sync m16n8k16, fp32
// accumulation) for float16 and bfloat16. 1x1 convolutions with unit stride and no padding
// take the Pointwise variant of each Problem: a plain GEMM with no window arithmetic.
// Depthwise convolutions (C_in/g == 1) use direct kernels instead: with one input channel
// per group, a GEMM has a K of kH*kW and would waste nearly every tile. The grad of input of
// any other layer with few input channels per group (C_in/g <= 8: RGB stems, LeNet) is direct
// too, conv2d_backward_input_direct.
//
// Every reduction runs in a fixed order: the weight gradient's split-K partials are summed by
// conv2d_backward_weight_reduce in split order, and bias and depthwise weight gradients use
// the block tree of block_sum, so results are bitwise identical run to run (no atomics).
#include "fastconv_common.cuh"

namespace fastconv {

// Per-K-index facts shared by a whole tile (one entry per k in the tile's K slice), computed
// once per tile by BK threads instead of once per loaded element.
struct KEntry {
    long long a_off;  // offset of A(m, k) from A's row base
    long long b_off;  // offset contributed by k to B(k, n) (channel plane, image, ...)
    int dy, dx;       // row/column shift contributed by k
    int valid;        // k inside this block's K range
};

// Every Problem reads A the same way: its row base (per m) plus the entry's a_off (per k).
template <typename T, typename Row>
__device__ __forceinline__ T load_a(const T* __restrict__ p, const Row& r, const KEntry& e) {
    return (r.valid && e.valid) ? p[r.base + (decltype(r.base))e.a_off] : zero_value<T>();
}

// ---- forward -------------------------------------------------------------------------------
template <typename T, typename Index, bool Pointwise>
struct ForwardProblem {
    const T* __restrict__ x;
    const T* __restrict__ w;
    const T* __restrict__ bias;  // nullptr for none
    T* __restrict__ y;
    ConvGeometry g;
    int group;

    static constexpr bool kBAlongK = false;  // B is contiguous along N (output columns)
    __device__ Index M() const { return g.cout_g; }
    __device__ Index N() const { return (Index)g.n * g.ho * g.wo; }
    __device__ Index K() const { return (Index)g.cin_g * g.kh * g.kw; }
    __device__ Index k_begin() const { return 0; }
    __device__ Index k_end() const { return K(); }

    struct Col { Index base; int y0, x0; bool valid; };
    struct Row { Index base; bool valid; };

    // Column n is output pixel (img, oy, ox).
    __device__ Col col(Index n) const {
        Col c;
        c.valid = n < N();
        const PlanePos<Index> at = plane_pos(c.valid ? n : 0, g.ho, g.wo);
        c.base = (at.plane * g.c_in + (Index)group * g.cin_g) * g.h * g.w;
        if (Pointwise) c.base += at.y * g.wo + at.x;
        c.y0 = at.y * g.sh - g.pt;
        c.x0 = at.x * g.sw - g.pl;
        return c;
    }
    // A(m = co, k) = w[group*cout_g + co][k], weight rows being contiguous in k.
    __device__ Row row(Index m) const {
        Row r;
        r.valid = m < M();
        r.base = ((Index)group * g.cout_g + (r.valid ? m : 0)) * K();
        return r;
    }
    // k is weight tap (c, i, j).
    __device__ KEntry entry(Index k) const {
        KEntry e;
        e.valid = k < K();
        const PlanePos<Index> tap = plane_pos(e.valid ? k : 0, g.kh, g.kw);
        e.a_off = k;
        e.dy = tap.y * g.dh;
        e.dx = tap.x * g.dw;
        e.b_off = (long long)tap.plane * g.h * g.w
                  + (Pointwise ? 0 : (long long)e.dy * g.w + e.dx);
        return e;
    }
    __device__ T a(const Row& r, const KEntry& e) const { return load_a(w, r, e); }
    __device__ T b(const Col& c, const KEntry& e) const {
        if (!c.valid || !e.valid) return zero_value<T>();
        if (Pointwise) return x[c.base + (Index)e.b_off];
        const int iy = c.y0 + e.dy, ix = c.x0 + e.dx;
        if (iy < 0 || iy >= g.h || ix < 0 || ix >= g.w) return zero_value<T>();
        return x[c.base + (Index)c.y0 * g.w + c.x0 + (Index)e.b_off];
    }
    template <typename A>
    __device__ void store(Index m, Index n, A v) const {
        if (m >= M() || n >= N()) return;
        const PlanePos<Index> at = plane_pos(n, g.ho, g.wo);
        const Index co = (Index)group * g.cout_g + m;
        if (bias != nullptr) v += to_acc(bias[co]);
        y[((at.plane * g.c_out + co) * g.ho + at.y) * g.wo + at.x] = Store<T>::from(v);
    }
};

// ---- grad of input -------------------------------------------------------------------------
template <typename T, typename Index, bool Pointwise>
struct BackwardInputProblem {
    const T* __restrict__ gy;
    const T* __restrict__ w;
    T* __restrict__ gx;
    ConvGeometry g;
    int group;

    static constexpr bool kBAlongK = false;  // B is contiguous along N (input columns)
    __device__ Index M() const { return g.cin_g; }
    __device__ Index N() const { return (Index)g.n * g.h * g.w; }
    __device__ Index K() const { return (Index)g.cout_g * g.kh * g.kw; }
    __device__ Index k_begin() const { return 0; }
    __device__ Index k_end() const { return K(); }

    struct Col { Index base; int y0, x0; bool valid; };
    struct Row { Index base; bool valid; };

    // Column n is input pixel (img, iy, ix); it receives gy[oy, ox] * w[i, j] wherever
    // oy*sh - pt + i*dh == iy, i.e. oy = (iy + pt - i*dh) / sh when that divides exactly.
    __device__ Col col(Index n) const {
        Col c;
        c.valid = n < N();
        const PlanePos<Index> at = plane_pos(c.valid ? n : 0, g.h, g.w);
        c.base = (at.plane * g.c_out + (Index)group * g.cout_g) * g.ho * g.wo;
        if (Pointwise) c.base += at.y * g.w + at.x;
        c.y0 = at.y + g.pt;
        c.x0 = at.x + g.pl;
        return c;
    }
    // A(m = c, k = (co, i, j)) = w[group*cout_g + co][c][i][j]: the row base holds the group
    // and c, the entry co and the tap.
    __device__ Row row(Index m) const {
        Row r;
        r.valid = m < M();
        r.base = ((Index)group * g.cout_g * g.cin_g + (r.valid ? m : 0)) * g.kh * g.kw;
        return r;
    }
    // k is (co, i, j): output channel of the group and weight tap.
    __device__ KEntry entry(Index k) const {
        KEntry e;
        e.valid = k < K();
        const PlanePos<Index> tap = plane_pos(e.valid ? k : 0, g.kh, g.kw);
        e.a_off = ((long long)tap.plane * g.cin_g * g.kh + tap.y) * g.kw + tap.x;
        e.dy = tap.y * g.dh;
        e.dx = tap.x * g.dw;
        e.b_off = (long long)tap.plane * g.ho * g.wo;
        return e;
    }
    __device__ T a(const Row& r, const KEntry& e) const { return load_a(w, r, e); }
    __device__ T b(const Col& c, const KEntry& e) const {
        if (!c.valid || !e.valid) return zero_value<T>();
        if (Pointwise) return gy[c.base + (Index)e.b_off];
        const int ty = c.y0 - e.dy, tx = c.x0 - e.dx;
        if (ty < 0 || tx < 0) return zero_value<T>();
        const int oy = ty / g.sh, ox = tx / g.sw;
        if (oy * g.sh != ty || ox * g.sw != tx || oy >= g.ho || ox >= g.wo) return zero_value<T>();
        return gy[c.base + (Index)e.b_off + (Index)oy * g.wo + ox];
    }
    template <typename A>
    __device__ void store(Index m, Index n, A v) const {
        if (m >= M() || n >= N()) return;
        const PlanePos<Index> at = plane_pos(n, g.h, g.w);
        gx[((at.plane * g.c_in + (Index)group * g.cin_g + m) * g.h + at.y) * g.w + at.x] =
            Store<T>::from(v);
    }
};

// ---- grad of weight ------------------------------------------------------------------------
// K (every output pixel of the batch) is long and M x N (the weight) small, so K is split
// into g.splits slices run by separate blocks. Each slice writes its fp32/fp64 partial to
// `partial`; conv2d_backward_weight_reduce then sums the slices in order. One slice writes
// the result directly.
template <typename T, typename Index>
struct BackwardWeightProblem {
    const T* __restrict__ gy;
    const T* __restrict__ x;
    T* __restrict__ gw;
    typename Acc<T>::type* __restrict__ partial;  // (splits, groups, M, N) when splits > 1
    ConvGeometry g;
    int group;
    int split;

    static constexpr bool kBAlongK = true;  // B is contiguous along K (output pixels)
    __device__ Index M() const { return g.cout_g; }
    __device__ Index N() const { return (Index)g.cin_g * g.kh * g.kw; }
    __device__ Index K() const { return (Index)g.n * g.ho * g.wo; }
    __device__ Index slice() const { return (K() + g.splits - 1) / g.splits; }
    __device__ Index k_begin() const { return split * slice(); }
    __device__ Index k_end() const { const Index e = k_begin() + slice(); return e < K() ? e : K(); }

    struct Col { Index base; int y0, x0; bool valid; };
    struct Row { Index base; bool valid; };

    // Column n is weight tap (c, i, j) of the group's input channel c.
    __device__ Col col(Index n) const {
        Col c;
        c.valid = n < N();
        const PlanePos<Index> tap = plane_pos(c.valid ? n : 0, g.kh, g.kw);
        c.base = ((Index)group * g.cin_g + tap.plane) * g.h * g.w;
        c.y0 = tap.y * g.dh - g.pt;
        c.x0 = tap.x * g.dw - g.pl;
        return c;
    }
    // A(m = co, k = (img, oy, ox)) = gy[img][group*cout_g + co][oy][ox].
    __device__ Row row(Index m) const {
        Row r;
        r.valid = m < M();
        r.base = ((Index)group * g.cout_g + (r.valid ? m : 0)) * g.ho * g.wo;
        return r;
    }
    // k is output pixel (img, oy, ox) of the batch.
    __device__ KEntry entry(Index k) const {
        KEntry e;
        e.valid = k < k_end();
        const PlanePos<Index> at = plane_pos(e.valid ? k : 0, g.ho, g.wo);
        e.a_off = ((long long)at.plane * g.c_out * g.ho + at.y) * g.wo + at.x;
        e.dy = at.y * g.sh;
        e.dx = at.x * g.sw;
        e.b_off = (long long)at.plane * g.c_in * g.h * g.w;
        return e;
    }
    __device__ T a(const Row& r, const KEntry& e) const { return load_a(gy, r, e); }
    __device__ T b(const Col& c, const KEntry& e) const {
        if (!c.valid || !e.valid) return zero_value<T>();
        const int iy = c.y0 + e.dy, ix = c.x0 + e.dx;
        if (iy < 0 || iy >= g.h || ix < 0 || ix >= g.w) return zero_value<T>();
        return x[c.base + (Index)e.b_off + (Index)iy * g.w + ix];
    }
    template <typename A>
    __device__ void store(Index m, Index n, A v) const {
        if (m >= M() || n >= N()) return;
        if (g.splits == 1) {
            gw[((Index)group * g.cout_g + m) * N() + n] = Store<T>::from(v);
        } else {
            partial[(((Index)split * g.groups + group) * M() + m) * N() + n] = v;
        }
    }
};

// Which (row, k) of A and (k, col) of B each thread stages into shared memory every tile,
// with the per-row and per-column facts its loads reuse across the whole K loop.
template <typename Problem, int BM, int BN, int BK, int THREADS>
struct LoadSlots {
    using Index = decltype(((const Problem*)nullptr)->M());
    static constexpr int LA = BM * BK / THREADS;  // A elements each thread loads per tile
    static constexpr int LB = BK * BN / THREADS;
    static_assert(LA * THREADS == BM * BK && LB * THREADS == BK * BN, "tile/thread mismatch");
    static_assert(BK <= THREADS, "one thread per K entry");
    typename Problem::Row rows[LA];
    typename Problem::Col cols[LB];
    int a_m[LA], a_k[LA], b_k[LB], b_n[LB];

    __device__ LoadSlots(const Problem& P, long long m0, long long n0, int tid) {
        for (int s = 0; s < LA; ++s) {
            const int e = tid + s * THREADS;
            a_k[s] = e % BK;
            a_m[s] = e / BK;
            rows[s] = P.row((Index)(m0 + a_m[s]));
        }
        for (int s = 0; s < LB; ++s) {
            const int e = tid + s * THREADS;
            if (Problem::kBAlongK) { b_k[s] = e % BK; b_n[s] = e / BK; }
            else { b_n[s] = e % BN; b_k[s] = e / BN; }
            cols[s] = P.col((Index)(n0 + b_n[s]));
        }
    }
};

// ---- CUDA-core main loop -------------------------------------------------------------------
// Block tile BM x BN, K step BK; each of the (BM/TM)*(BN/TN) threads owns a TM x TN patch of
// C, strided by BM/TM rows and BN/TN columns so that neighbouring threads touch neighbouring
// columns (conflict-free shared reads, coalesced stores). Tiles of A and B are staged in
// shared memory; each thread's global loads for the next tile are issued before the current
// tile's FMAs so their latency overlaps the math.
template <int BM, int BN, int BK, int TM, int TN, typename Problem, typename T>
__device__ __forceinline__ void gemm_simt(const Problem& P, long long m0, long long n0) {
    using A = typename Acc<T>::type;
    using Index = decltype(P.M());
    constexpr int THREADS = (BM / TM) * (BN / TN);
    using Slots = LoadSlots<Problem, BM, BN, BK, THREADS>;
    constexpr int LA = Slots::LA, LB = Slots::LB;

    __shared__ A As[BK][BM + 4];
    __shared__ A Bs[BK][BN + 4];
    __shared__ KEntry ktab[2][BK];

    const int tid = threadIdx.x;
    const int tx = tid % (BN / TN), ty = tid / (BN / TN);
    const Slots sl(P, m0, n0, tid);

    A acc[TM][TN];
    for (int i = 0; i < TM; ++i)
        for (int j = 0; j < TN; ++j) acc[i][j] = 0;

    const Index kb = P.k_begin(), ke = P.k_end();
    const int tiles = (int)((ke - kb + BK - 1) / BK);
    if (tid < BK) ktab[0][tid] = P.entry(kb + tid);
    __syncthreads();

    A ra[LA], rb[LB];
    for (int s = 0; s < LA; ++s)
        ra[s] = to_acc(P.a(sl.rows[s], ktab[0][sl.a_k[s]]));
    for (int s = 0; s < LB; ++s) rb[s] = to_acc(P.b(sl.cols[s], ktab[0][sl.b_k[s]]));

    for (int t = 0; t < tiles; ++t) {
        for (int s = 0; s < LA; ++s) As[sl.a_k[s]][sl.a_m[s]] = ra[s];
        for (int s = 0; s < LB; ++s) Bs[sl.b_k[s]][sl.b_n[s]] = rb[s];
        const int nb = (t + 1) & 1;
        const Index knext = kb + (Index)(t + 1) * BK;
        if (tid < BK && t + 1 < tiles) ktab[nb][tid] = P.entry(knext + tid);
        __syncthreads();
        if (t + 1 < tiles) {  // issue the next tile's loads before this tile's math
            for (int s = 0; s < LA; ++s)
                ra[s] = to_acc(P.a(sl.rows[s], ktab[nb][sl.a_k[s]]));
            for (int s = 0; s < LB; ++s) rb[s] = to_acc(P.b(sl.cols[s], ktab[nb][sl.b_k[s]]));
        }
#pragma unroll
        for (int kk = 0; kk < BK; ++kk) {
            A af[TM], bf[TN];
#pragma unroll
            for (int i = 0; i < TM; ++i) af[i] = As[kk][ty + i * (BM / TM)];
#pragma unroll
            for (int j = 0; j < TN; ++j) bf[j] = Bs[kk][tx + j * (BN / TN)];
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int j = 0; j < TN; ++j) acc[i][j] += af[i] * bf[j];
        }
        __syncthreads();
    }
    for (int i = 0; i < TM; ++i)
        for (int j = 0; j < TN; ++j)
            P.store((Index)(m0 + ty + i * (BM / TM)), (Index)(n0 + tx + j * (BN / TN)), acc[i][j]);
}

// ---- tensor-core main loop (float16 / bfloat16) --------------------------------------------
// Block tile 64 x 64, K step 32, four warps in a 2 x 2 grid, each owning 32 x 32 of C as
// 2 x 4 mma tiles of 16 x 8. A is staged row-major [m][k] and B as [n][k] so that every
// fragment register is one aligned 32-bit shared load; rows are padded by 8 halves, which
// puts the eight fragment rows of a load in eight different banks.
constexpr int MMA_BM = 64, MMA_BN = 64, MMA_BK = 32, MMA_THREADS = 128;

template <typename Problem, typename T>
__device__ __forceinline__ void gemm_mma(const Problem& P, long long m0, long long n0) {
    using Index = decltype(P.M());
    constexpr int BM = MMA_BM, BN = MMA_BN, BK = MMA_BK, THREADS = MMA_THREADS;
    using Slots = LoadSlots<Problem, BM, BN, BK, THREADS>;
    constexpr int LA = Slots::LA, LB = Slots::LB;

    __shared__ __align__(16) unsigned short As[BM][BK + 8];
    __shared__ __align__(16) unsigned short Bs[BN][BK + 8];
    __shared__ KEntry ktab[2][BK];

    const int tid = threadIdx.x;
    const int lane = tid % 32, warp = tid / 32;
    const int gq = lane / 4, tq = lane % 4;
    const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;
    const Slots sl(P, m0, n0, tid);

    float acc[2][4][4];
    for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 4; ++j)
            for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.f;

    const Index kb = P.k_begin(), ke = P.k_end();
    const int tiles = (int)((ke - kb + BK - 1) / BK);
    if (tid < BK) ktab[0][tid] = P.entry(kb + tid);
    __syncthreads();

    T ra[LA], rb[LB];
    for (int s = 0; s < LA; ++s) ra[s] = P.a(sl.rows[s], ktab[0][sl.a_k[s]]);
    for (int s = 0; s < LB; ++s) rb[s] = P.b(sl.cols[s], ktab[0][sl.b_k[s]]);

    for (int t = 0; t < tiles; ++t) {
        for (int s = 0; s < LA; ++s) As[sl.a_m[s]][sl.a_k[s]] = ra[s].bits;
        for (int s = 0; s < LB; ++s) Bs[sl.b_n[s]][sl.b_k[s]] = rb[s].bits;
        const int nb = (t + 1) & 1;
        const Index knext = kb + (Index)(t + 1) * BK;
        if (tid < BK && t + 1 < tiles) ktab[nb][tid] = P.entry(knext + tid);
        __syncthreads();
        if (t + 1 < tiles) {
            for (int s = 0; s < LA; ++s) ra[s] = P.a(sl.rows[s], ktab[nb][sl.a_k[s]]);
            for (int s = 0; s < LB; ++s) rb[s] = P.b(sl.cols[s], ktab[nb][sl.b_k[s]]);
        }
#pragma unroll
        for (int ks = 0; ks < BK; ks += 16) {
            unsigned af[2][4], bf[4][2];
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                const int r = wm + i * 16 + gq;
                af[i][0] = *reinterpret_cast<const unsigned*>(&As[r][ks + 2 * tq]);
                af[i][1] = *reinterpret_cast<const unsigned*>(&As[r + 8][ks + 2 * tq]);
                af[i][2] = *reinterpret_cast<const unsigned*>(&As[r][ks + 2 * tq + 8]);
                af[i][3] = *reinterpret_cast<const unsigned*>(&As[r + 8][ks + 2 * tq + 8]);
            }
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int c = wn + j * 8 + gq;
                bf[j][0] = *reinterpret_cast<const unsigned*>(&Bs[c][ks + 2 * tq]);
                bf[j][1] = *reinterpret_cast<const unsigned*>(&Bs[c][ks + 2 * tq + 8]);
            }
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) mma_16x8x16<T>(acc[i][j], af[i], bf[j]);
        }
        __syncthreads();
    }
    for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 4; ++j)
            for (int r = 0; r < 4; ++r) {
                const long long m = m0 + wm + i * 16 + gq + (r >= 2 ? 8 : 0);
                const long long n = n0 + wn + j * 8 + 2 * tq + (r & 1);
                P.store((Index)m, (Index)n, acc[i][j][r]);
            }
}

// Dispatch a Problem to the main loop its element type uses. Tile sizes only matter for the
// CUDA-core loop; the tensor-core loop has one shape.
template <typename T> struct UsesMma { static constexpr bool value = false; };
template <> struct UsesMma<half_t> { static constexpr bool value = true; };
template <> struct UsesMma<bfloat16_t> { static constexpr bool value = true; };

template <int BM, int BN, int BK, int TM, int TN, typename T, typename Problem>
__device__ __forceinline__ void run_gemm(const Problem& P) {
    if constexpr (UsesMma<T>::value) {
        gemm_mma<Problem, T>(P, (long long)blockIdx.y * MMA_BM, (long long)blockIdx.x * MMA_BN);
    } else {
        gemm_simt<BM, BN, BK, TM, TN, Problem, T>(P, (long long)blockIdx.y * BM,
                                                  (long long)blockIdx.x * BN);
    }
}

}  // namespace fastconv

using namespace fastconv;

// Grid: x over N tiles, y over M tiles, z over groups (and weight-gradient splits).
// Threads per block: (BM/TM)*(BN/TN), or MMA_THREADS for the 16-bit types.
template <typename T, typename Index, bool Pointwise, int BM, int BN, int BK, int TM, int TN>
__global__ void conv2d_forward_implicit_gemm(const T* __restrict__ x, const T* __restrict__ w,
                                             const T* __restrict__ bias, T* __restrict__ y,
                                             ConvGeometry g) {
    ForwardProblem<T, Index, Pointwise> P{x, w, bias, y, g, g.group_base + (int)blockIdx.z};
    run_gemm<BM, BN, BK, TM, TN, T>(P);
}

template <typename T, typename Index, bool Pointwise, int BM, int BN, int BK, int TM, int TN>
__global__ void conv2d_backward_input_implicit_gemm(const T* __restrict__ gy,
                                                    const T* __restrict__ w,
                                                    T* __restrict__ gx, ConvGeometry g) {
    BackwardInputProblem<T, Index, Pointwise> P{gy, w, gx, g, g.group_base + (int)blockIdx.z};
    run_gemm<BM, BN, BK, TM, TN, T>(P);
}

// blockIdx.z = local group * splits + split.
template <typename T, typename Index, int BM, int BN, int BK, int TM, int TN>
__global__ void conv2d_backward_weight_implicit_gemm(const T* __restrict__ gy,
                                                     const T* __restrict__ x,
                                                     T* __restrict__ gw,
                                                     typename Acc<T>::type* __restrict__ partial,
                                                     ConvGeometry g) {
    const int z = (int)blockIdx.z;
    BackwardWeightProblem<T, Index> P{gy, x, gw, partial, g,
                                                 g.group_base + z / g.splits, z % g.splits};
    run_gemm<BM, BN, BK, TM, TN, T>(P);
}

// gw[e] = sum over s of partial[s][e], s ascending: the fixed order that makes the split-K
// weight gradient deterministic. `count` = groups * (C_out/g) * (C_in/g*kH*kW) = gw.numel().
template <typename T, typename Index>
__global__ void conv2d_backward_weight_reduce(const typename Acc<T>::type* __restrict__ partial,
                                              T* __restrict__ gw, Index count, int splits) {
    for (Index e = global_thread_index<Index>(); e < count; e += grid_stride<Index>()) {
        typename Acc<T>::type sum = partial[e];
        for (int s = 1; s < splits; ++s) sum += partial[(Index)s * count + e];
        gw[e] = Store<T>::from(sum);
    }
}

// gb[c] = sum over (n, pixel) of gy[n, c, pixel]; one block per channel, block_sum tree.
template <typename T, typename Index, int THREADS>
__global__ void conv2d_backward_bias(const T* __restrict__ gy, T* __restrict__ gb, int n,
                                     int channels, Index hw) {
    using A = typename Acc<T>::type;
    __shared__ A scratch[THREADS];
    const int c = blockIdx.x;
    A sum = 0;
    const Index total = (Index)n * hw;
    for (Index e = threadIdx.x; e < total; e += THREADS) {
        const Index img = e / hw;
        sum += to_acc(gy[(img * channels + c) * hw + (e - img * hw)]);
    }
    sum = block_sum(sum, scratch);
    if (threadIdx.x == 0) gb[c] = Store<T>::from(sum);
}

// ---- depthwise (C_in/g == 1; C_out = mult * C_in) ------------------------------------------
// One thread per output element; the kH*kW weights of its channel come through L1.
template <typename T, typename Index>
__global__ void conv2d_forward_depthwise(const T* __restrict__ x, const T* __restrict__ w,
                                         const T* __restrict__ bias, T* __restrict__ y,
                                         ConvGeometry g) {
    using A = typename Acc<T>::type;
    const Index total = (Index)g.n * g.c_out * g.ho * g.wo;
    const int mult = g.cout_g;
    for (Index e = global_thread_index<Index>(); e < total; e += grid_stride<Index>()) {
        const PlanePos<Index> at = plane_pos(e, g.ho, g.wo);
        const int oy = at.y, ox = at.x;
        const Index nc = at.plane;
        const int co = (int)(nc % g.c_out);
        const Index img = nc / g.c_out;
        const T* plane = x + (img * g.c_in + co / mult) * g.h * g.w;
        const T* wk = w + (Index)co * g.kh * g.kw;
        A sum = 0;
        for (int i = 0; i < g.kh; ++i) {
            const int iy = input_coord(oy, i, g.sh, g.pt, g.dh);
            if (iy < 0 || iy >= g.h) continue;
            for (int j = 0; j < g.kw; ++j) {
                const int ix = input_coord(ox, j, g.sw, g.pl, g.dw);
                if (ix < 0 || ix >= g.w) continue;
                sum += to_acc(plane[(Index)iy * g.w + ix]) * to_acc(wk[i * g.kw + j]);
            }
        }
        if (bias != nullptr) sum += to_acc(bias[co]);
        y[e] = Store<T>::from(sum);
    }
}

// One thread per input element, gathering from every output it feeds (no scatter, no races).
// For depthwise layers with one output channel per group; conv2d_backward_input_direct's
// loop over output channels inside the taps ran this case 1.3x slower on an H100 (257 against
// 198 us, 32x256x28x28, 3x3), and a channel multiplier of 6 (LeNet's first layer) 2.3x faster.
template <typename T, typename Index>
__global__ void conv2d_backward_input_depthwise(const T* __restrict__ gy, const T* __restrict__ w,
                                                T* __restrict__ gx, ConvGeometry g) {
    using A = typename Acc<T>::type;
    const Index total = (Index)g.n * g.c_in * g.h * g.w;
    const int mult = g.cout_g;
    for (Index e = global_thread_index<Index>(); e < total; e += grid_stride<Index>()) {
        const PlanePos<Index> at = plane_pos(e, g.h, g.w);
        const int iy = at.y, ix = at.x;
        const Index nc = at.plane;
        const int c = (int)(nc % g.c_in);
        const Index img = nc / g.c_in;
        A sum = 0;
        for (int m = 0; m < mult; ++m) {
            const int co = c * mult + m;
            const T* plane = gy + (img * g.c_out + co) * g.ho * g.wo;
            const T* wk = w + (Index)co * g.kh * g.kw;
            for (int i = 0; i < g.kh; ++i) {
                const int ty = iy + g.pt - i * g.dh;
                if (ty < 0 || ty % g.sh) continue;
                const int oy = ty / g.sh;
                if (oy >= g.ho) continue;
                for (int j = 0; j < g.kw; ++j) {
                    const int tx = ix + g.pl - j * g.dw;
                    if (tx < 0 || tx % g.sw) continue;
                    const int ox = tx / g.sw;
                    if (ox >= g.wo) continue;
                    sum += to_acc(plane[(Index)oy * g.wo + ox]) * to_acc(wk[i * g.kw + j]);
                }
            }
        }
        gx[e] = Store<T>::from(sum);
    }
}

// One block per weight element (co, i, j): its threads stride over (n, oy, ox) and finish
// with the fixed block_sum tree.
template <typename T, typename Index, int THREADS>
__global__ void conv2d_backward_weight_depthwise(const T* __restrict__ gy,
                                                 const T* __restrict__ x, T* __restrict__ gw,
                                                 ConvGeometry g) {
    using A = typename Acc<T>::type;
    __shared__ A scratch[THREADS];
    const int taps = g.kh * g.kw;
    const int co = blockIdx.x / taps, r = blockIdx.x % taps;
    const int i = r / g.kw, j = r % g.kw;
    const int c = co / g.cout_g;
    const Index hw_out = (Index)g.ho * g.wo;
    const Index total = (Index)g.n * hw_out;
    A sum = 0;
    for (Index e = threadIdx.x; e < total; e += THREADS) {
        const Index img = e / hw_out;
        const int p = (int)(e - img * hw_out);
        const int oy = p / g.wo, ox = p % g.wo;
        const int iy = input_coord(oy, i, g.sh, g.pt, g.dh);
        const int ix = input_coord(ox, j, g.sw, g.pl, g.dw);
        if (iy < 0 || iy >= g.h || ix < 0 || ix >= g.w) continue;
        sum += to_acc(gy[(img * g.c_out + co) * hw_out + p]) *
               to_acc(x[(img * g.c_in + c) * g.h * g.w + (Index)iy * g.w + ix]);
    }
    sum = block_sum(sum, scratch);
    if (threadIdx.x == 0) gw[blockIdx.x] = Store<T>::from(sum);
}

// ---- grad of input with few input channels per group (C_in/g <= CB) ------------------------
// The implicit GEMM's M is C_in/g, so a layer with 1-8 input channels per group (an RGB stem,
// LeNet) would fill a 32- or 64-row tile with a few rows and waste the rest; a
// strided one would also multiply the zeros between its output taps. Here one thread per input
// pixel (img, group, iy, ix) holds all C_in/g of its gradients and gathers, for each tap that
// lands on an output pixel (the others skipped, not multiplied), every output channel's
// gradient times C_in/g weights (the same for the whole warp: broadcast loads through L1).
// No scatter, no races. CB is the accumulator block, a compile-time bound on C_in/g.
template <typename T, typename Index, int CB>
__global__ void conv2d_backward_input_direct(const T* __restrict__ gy, const T* __restrict__ w,
                                             T* __restrict__ gx, ConvGeometry g) {
    using A = typename Acc<T>::type;
    const int cin_g = g.cin_g, cout_g = g.cout_g, taps = g.kh * g.kw;
    const Index hw_out = (Index)g.ho * g.wo;
    const Index total = (Index)g.n * g.groups * g.h * g.w;
    for (Index e = global_thread_index<Index>(); e < total; e += grid_stride<Index>()) {
        const PlanePos<Index> at = plane_pos(e, g.h, g.w);  // plane = img * groups + group
        const int iy = at.y, ix = at.x;
        const Index img = at.plane / g.groups;
        const int group = (int)(at.plane - img * g.groups);
        const T* gy_group = gy + (img * g.c_out + (Index)group * cout_g) * hw_out;
        const T* w_group = w + (Index)group * cout_g * cin_g * taps;
        A acc[CB];
#pragma unroll
        for (int c = 0; c < CB; ++c) acc[c] = 0;
        for (int i = 0; i < g.kh; ++i) {
            const int ty = iy + g.pt - i * g.dh;
            if (ty < 0) break;  // ty falls as i grows
            if (ty % g.sh) continue;
            const int oy = ty / g.sh;
            if (oy >= g.ho) continue;
            for (int j = 0; j < g.kw; ++j) {
                const int tx = ix + g.pl - j * g.dw;
                if (tx < 0) break;
                if (tx % g.sw) continue;
                const int ox = tx / g.sw;
                if (ox >= g.wo) continue;
                const T* gp = gy_group + (Index)oy * g.wo + ox;
                const T* wc = w_group + i * g.kw + j;
                for (int co = 0; co < cout_g; ++co, gp += hw_out, wc += cin_g * taps) {
                    const A v = to_acc(*gp);
#pragma unroll
                    for (int c = 0; c < CB; ++c)  // CB == 1 (depthwise) needs no guard
                        if (CB == 1 || c < cin_g) acc[c] += v * to_acc(wc[c * taps]);
                }
            }
        }
        T* out = gx + ((img * g.c_in + (Index)group * cin_g) * g.h + iy) * g.w + ix;
        const Index plane = (Index)g.h * g.w;
#pragma unroll
        for (int c = 0; c < CB; ++c)
            if (CB == 1 || c < cin_g) out[(Index)c * plane] = Store<T>::from(acc[c]);
    }
}
