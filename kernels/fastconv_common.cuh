// Shared helpers for every fastconv CUDA kernel.
//
// Compiled at run time by NVRTC (through CuPy), so no host or toolkit headers here: half
// precision is carried as raw bits and converted with PTX, which keeps the sources free of
// cuda_fp16.h/cuda_bf16.h and their include-path setup. The shape math mirrors
// fastconv/_args.py so that both engines agree on every output shape.
//
// FASTCONV_EMULATE is defined only by the test suite's CPU emulator (tests/cuda_emulator),
// which runs these kernels with one fiber per CUDA thread; it swaps the few PTX-only pieces
// for portable C++ with the same semantics.
#pragma once

namespace fastconv {

// Output length along one axis, as torch.nn defines it (see _args.out_size).
// ceil_mode is for pooling: the last window must start inside the input or left padding.
__host__ __device__ inline long long out_size(long long size, int kernel, int stride, int pad_lo,
                                              int pad_hi, int dilation, bool ceil_mode) {
    const long long span = size + pad_lo + pad_hi - (long long)dilation * (kernel - 1) - 1;
    if (span < 0) return 0;
    if (!ceil_mode) return span / stride + 1;
    long long out = (span + stride - 1) / stride + 1;
    if ((out - 1) * stride >= size + pad_lo) --out;
    return out;
}

// Geometry of a conv2d call, passed to kernels by value. The launcher fills it from a numpy
// structured dtype with the same field order (fastconv/cuda/_geometry.py): all int32, so the
// layout has no padding on either side.
struct ConvGeometry {
    int n, c_in, h, w;          // input (N, C_in, H, W)
    int c_out, ho, wo;          // output (N, C_out, Ho, Wo)
    int kh, kw;                 // kernel extent
    int sh, sw;                 // stride
    int pt, pl;                 // leading (top, left) padding; trailing pads only shape Ho, Wo
    int dh, dw;                 // dilation
    int groups, cin_g, cout_g;  // groups and channels per group
    int splits;                 // weight gradient: K-range splits (deterministic split-K)
    int group_base;             // first group of this launch (grids cap groups at 65535)
};

// Geometry of a pooling call; the same contract as ConvGeometry.
struct PoolGeometry {
    int planes, h, w;           // input (N*C, H, W)
    int ho, wo;                 // output
    int kh, kw, sh, sw, ph, pw, dh, dw;
    int count_include_pad;      // average pooling: count padding in the divisor
    int divisor;                // average pooling: divisor_override, 0 for none
};
static_assert(sizeof(ConvGeometry) == 20 * sizeof(int), "ConvGeometry must stay padding-free");
static_assert(sizeof(PoolGeometry) == 15 * sizeof(int), "PoolGeometry must stay padding-free");

// ---- number formats -------------------------------------------------------------------
// Half types are raw bits: distinct structs so templates can tell float16 from bfloat16.
struct half_t { unsigned short bits; };
struct bfloat16_t { unsigned short bits; };

// Accumulator type: fp32 for the 16-bit formats, otherwise the type itself.
template <typename T> struct Acc { using type = T; };
template <> struct Acc<half_t> { using type = float; };
template <> struct Acc<bfloat16_t> { using type = float; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(bfloat16_t v) {
    return __uint_as_float(((unsigned int)v.bits) << 16);
}
__device__ __forceinline__ float to_acc(half_t v) {
#ifdef FASTCONV_EMULATE
    return emulate::half_to_float(v.bits);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
    return f;
#endif
}

// Round an accumulator to the storage type (round to nearest even, as PyTorch does).
template <typename T> struct Store;
template <> struct Store<float> {
    __device__ __forceinline__ static float from(float v) { return v; }
};
template <> struct Store<double> {
    __device__ __forceinline__ static double from(double v) { return v; }
};
template <> struct Store<half_t> {
    __device__ __forceinline__ static half_t from(float v) {
        half_t h;
#ifdef FASTCONV_EMULATE
        h.bits = emulate::float_to_half(v);
#else
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(v));
#endif
        return h;
    }
};
template <> struct Store<bfloat16_t> {
    __device__ __forceinline__ static bfloat16_t from(float v) {
        bfloat16_t b;
#ifdef FASTCONV_EMULATE
        b.bits = emulate::float_to_bfloat16(v);
#else
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(b.bits) : "f"(v));
#endif
        return b;
    }
};

template <typename T> __device__ __forceinline__ T zero_value() { return Store<T>::from(0); }

// -infinity in the accumulator type: the identity of max.
template <typename A> __device__ __forceinline__ A neg_inf();
template <> __device__ __forceinline__ float neg_inf<float>() { return __uint_as_float(0xff800000u); }
template <> __device__ __forceinline__ double neg_inf<double>() {
    return __longlong_as_double((long long)0xfff0000000000000ULL);
}

// NaN test that the fast-math-free build keeps (x != x is true only for NaN).
template <typename A> __device__ __forceinline__ bool is_nan(A v) { return v != v; }

// ---- indexing ------------------------------------------------------------------------
// Index type: kernels are instantiated for int (every tensor below 2^31 elements, cheaper
// arithmetic) and long long (anything larger); the launcher picks one per call.
template <typename Index>
__device__ __forceinline__ Index global_thread_index() {
    return (Index)blockIdx.x * blockDim.x + threadIdx.x;
}

template <typename Index>
__device__ __forceinline__ Index grid_stride() {
    return (Index)blockDim.x * gridDim.x;
}

// Element e of a contiguous (planes, rows, cols) tensor as (plane, y, x).
template <typename Index>
struct PlanePos {
    Index plane;
    int y, x;
};
template <typename Index>
__device__ __forceinline__ PlanePos<Index> plane_pos(Index e, int rows, int cols) {
    PlanePos<Index> p;
    p.x = (int)(e % cols);
    p.y = (int)((e / cols) % rows);
    p.plane = e / ((Index)cols * rows);
    return p;
}

// Input row/column read by output position `o` and kernel tap `k` along one axis.
__host__ __device__ __forceinline__ int input_coord(int o, int k, int stride, int pad,
                                                    int dilation) {
    return o * stride - pad + k * dilation;
}

// ---- deterministic reductions -------------------------------------------------------------
// Sum of one value per thread over the block, in a fixed tree order: the same launch shape
// gives bitwise the same result every run (no atomics). Every thread must call it; the result
// is valid in thread 0. `scratch` holds blockDim.x values; blockDim.x is a power of two.
template <typename A>
__device__ __forceinline__ A block_sum(A value, A* scratch) {
    const int tid = threadIdx.x;
    scratch[tid] = value;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half /= 2) {
        if (tid < half) scratch[tid] += scratch[tid + half];
        __syncthreads();
    }
    const A total = scratch[0];
    __syncthreads();  // scratch may be reused by the caller's next call
    return total;
}

// ---- tensor cores ------------------------------------------------------------------------
// D = A * B + C for one 16x8x16 tile (mma.sync m16n8k16, fp32 accumulate), sm_80 and newer.
// Fragment layout per lane (g = lane / 4, t = lane % 4), from the PTX ISA:
//   a[0]: A[g][2t..2t+1]   a[1]: A[g+8][2t..2t+1]   a[2]: A[g][2t+8..]   a[3]: A[g+8][2t+8..]
//   b[0]: B[2t..2t+1][g]   b[1]: B[2t+8..2t+9][g]
//   c[0..1]: C[g][2t..2t+1]                          c[2..3]: C[g+8][2t..2t+1]
// Each a/b register packs two 16-bit values, the lower k in the low half.
template <typename T> struct MmaName;
template <> struct MmaName<half_t> { static constexpr int is_bf16 = 0; };
template <> struct MmaName<bfloat16_t> { static constexpr int is_bf16 = 1; };

template <typename T>
__device__ __forceinline__ void mma_16x8x16(float (&d)[4], const unsigned (&a)[4],
                                            const unsigned (&b)[2]) {
#ifdef FASTCONV_EMULATE
    emulate::mma_16x8x16(d, a, b, MmaName<T>::is_bf16);
#else
    if (MmaName<T>::is_bf16) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
#endif
}

}  // namespace fastconv
