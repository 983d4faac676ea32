// max_pool2d and avg_pool2d, forward and backward, NCHW (planes = N*C), with every option
// of torch.nn.functional: stride, padding, dilation (max), ceil_mode, return_indices,
// count_include_pad, divisor_override.
//
// Forward: one thread per output element. Backward: one thread per input element, gathering
// from the windows that cover it in output order, so there are no scattered writes, no
// atomics and no races even when windows overlap, and the sums run in the same order as
// PyTorch's CUDA kernels. Accumulation is fp32 for the 16-bit formats.
#include "fastconv_common.cuh"

namespace fastconv {

// First output window (along one axis) whose span [o*s - pad, o*s - pad + extent) covers
// input coordinate i, where extent = dilation*(kernel-1)+1; and one past the last.
__device__ __forceinline__ int first_window(int i, int pad, int extent, int stride) {
    return (i + pad < extent) ? 0 : (i + pad - extent) / stride + 1;
}
__device__ __forceinline__ int end_window(int i, int pad, int stride, int out) {
    const int e = (i + pad) / stride + 1;
    return e < out ? e : out;
}

// Does window o (along one axis) hold an input element: a tap start + t*d in [0, size) for
// some t < k, where start = o*s - pad?
__device__ __forceinline__ bool window_holds_input(int o, int size, int k, int s, int pad, int d) {
    const int start = o * s - pad;
    const int t0 = start >= 0 ? 0 : (-start + d - 1) / d;
    return t0 < k && start + t0 * d < size;
}

// Average pooling's divisor for window (oy, ox), as PyTorch computes it: the window clipped
// to the padded input counts for count_include_pad, the window clipped to the input
// otherwise. Returns 0 for a window with no input element (its output is 0).
__device__ __forceinline__ int avg_divisor(const PoolGeometry& g, int oy, int ox, int& y0, int& y1,
                                           int& x0, int& x1) {
    y0 = oy * g.sh - g.ph;
    x0 = ox * g.sw - g.pw;
    y1 = y0 + g.kh < g.h + g.ph ? y0 + g.kh : g.h + g.ph;
    x1 = x0 + g.kw < g.w + g.pw ? x0 + g.kw : g.w + g.pw;
    const int padded = (y1 - y0) * (x1 - x0);
    y0 = y0 > 0 ? y0 : 0;
    x0 = x0 > 0 ? x0 : 0;
    y1 = y1 < g.h ? y1 : g.h;
    x1 = x1 < g.w ? x1 : g.w;
    if (y0 >= y1 || x0 >= x1) return 0;
    if (g.divisor) return g.divisor;
    return g.count_include_pad ? padded : (y1 - y0) * (x1 - x0);
}

}  // namespace fastconv

using namespace fastconv;

// The argmax a max pooling records, by the type Arg it is stored as: void, none; long long,
// the flat index into H*W (return_indices); unsigned char or int, the winning tap's row-major
// number within its window (all the gradient needs, in one byte up to 256 taps).
template <typename Arg>
struct ArgKind {
    static constexpr bool any = true, flat = false;
};
template <>
struct ArgKind<void> {
    static constexpr bool any = false, flat = false;
};
template <>
struct ArgKind<long long> {
    static constexpr bool any = true, flat = true;
};

// y, indices: (planes, Ho, Wo). Taps in row-major window order; a larger value or a NaN
// replaces the running max, so NaN propagates and the index is the last NaN's. The index
// starts at the window's first in-bounds tap, as in PyTorch (it stays there for an all -inf
// window).
template <typename T, typename Index, typename Arg>
__global__ void max_pool2d_forward(const T* __restrict__ x, T* __restrict__ y,
                                   Arg* __restrict__ indices, PoolGeometry g) {
    using A = typename Acc<T>::type;
    const Index total = (Index)g.planes * g.ho * g.wo;
    for (Index e = global_thread_index<Index>(); e < total; e += grid_stride<Index>()) {
        const PlanePos<Index> at = plane_pos(e, g.ho, g.wo);
        const int oy = at.y, ox = at.x;
        const Index p = at.plane;
        const int ys = oy * g.sh - g.ph, xs = ox * g.sw - g.pw;
        int y0 = ys, x0 = xs;
        const int ye = min(ys + (g.kh - 1) * g.dh + 1, g.h);
        const int xe = min(xs + (g.kw - 1) * g.dw + 1, g.w);
        while (y0 < 0) y0 += g.dh;
        while (x0 < 0) x0 += g.dw;
        const T* plane = x + p * g.h * g.w;
        A best = neg_inf<A>();
        long long arg = (long long)y0 * g.w + x0;
        int tap = ((y0 - ys) / g.dh) * g.kw + (x0 - xs) / g.dw;
        T best_raw = Store<T>::from(best);
        for (int iy = y0, ty = (y0 - ys) / g.dh; iy < ye; iy += g.dh, ++ty) {
            for (int ix = x0, tx = (x0 - xs) / g.dw; ix < xe; ix += g.dw, ++tx) {
                const T raw = plane[(Index)iy * g.w + ix];
                const A v = to_acc(raw);
                if (v > best || is_nan(v)) {
                    best = v;
                    best_raw = raw;
                    arg = (long long)iy * g.w + ix;
                    tap = ty * g.kw + tx;
                }
            }
        }
        y[e] = best_raw;
        if constexpr (ArgKind<Arg>::flat) indices[e] = arg;
        else if constexpr (ArgKind<Arg>::any) indices[e] = (Arg)tap;
    }
}

// gx (planes, H, W) from gy and the forward's indices (flat or window), both (planes, Ho, Wo).
template <typename T, typename Index, typename Arg>
__global__ void max_pool2d_backward(const T* __restrict__ gy, const Arg* __restrict__ indices,
                                    T* __restrict__ gx, PoolGeometry g) {
    using A = typename Acc<T>::type;
    const Index total = (Index)g.planes * g.h * g.w;
    for (Index e = global_thread_index<Index>(); e < total; e += grid_stride<Index>()) {
        const PlanePos<Index> at = plane_pos(e, g.h, g.w);
        const int iy = at.y, ix = at.x;
        const Index p = at.plane;
        const long long me = (long long)iy * g.w + ix;
        const int oy0 = first_window(iy, g.ph, (g.kh - 1) * g.dh + 1, g.sh);
        const int oy1 = end_window(iy, g.ph, g.sh, g.ho);
        const int ox0 = first_window(ix, g.pw, (g.kw - 1) * g.dw + 1, g.sw);
        const int ox1 = end_window(ix, g.pw, g.sw, g.wo);
        const Index base = p * g.ho * g.wo;
        A sum = 0;
        for (int oy = oy0; oy < oy1; ++oy) {
            const int ty = iy - (oy * g.sh - g.ph);
            if (!ArgKind<Arg>::flat && ty % g.dh) continue;  // between two taps of the window
            for (int ox = ox0; ox < ox1; ++ox) {
                const Index o = base + (Index)oy * g.wo + ox;
                if constexpr (ArgKind<Arg>::flat) {
                    if (indices[o] == me) sum += to_acc(gy[o]);
                } else {
                    const int tx = ix - (ox * g.sw - g.pw);
                    if (tx % g.dw == 0 && (int)indices[o] == (ty / g.dh) * g.kw + tx / g.dw)
                        sum += to_acc(gy[o]);
                }
            }
        }
        gx[e] = Store<T>::from(sum);
    }
}

// *bad = 1 if some window that holds an input element has an index naming no input element:
// flat, outside [0, H*W); window, a tap number outside [0, kh*kw) or a tap in the padding.
// The gather kernels skip such an index (they never write through one), so without this check
// it would be a silent wrong gradient. Every thread that finds one stores the same 1: no
// atomics needed. T is the gradient's type, which only picks the module.
template <typename T, typename Index, typename Arg>
__global__ void max_pool2d_bad_indices(const Arg* __restrict__ indices, int* __restrict__ bad,
                                       PoolGeometry g) {
    const Index total = (Index)g.planes * g.ho * g.wo;
    for (Index e = global_thread_index<Index>(); e < total; e += grid_stride<Index>()) {
        const PlanePos<Index> at = plane_pos(e, g.ho, g.wo);
        if (!window_holds_input(at.y, g.h, g.kh, g.sh, g.ph, g.dh) ||
            !window_holds_input(at.x, g.w, g.kw, g.sw, g.pw, g.dw))
            continue;  // sends no gradient: its index is never read
        bool wrong;
        if constexpr (ArgKind<Arg>::flat) {
            const long long i = indices[e];
            wrong = i < 0 || i >= (long long)g.h * g.w;
        } else {
            const int t = (int)indices[e];
            if (t < 0 || t >= g.kh * g.kw) {
                wrong = true;
            } else {
                const int iy = at.y * g.sh - g.ph + (t / g.kw) * g.dh;
                const int ix = at.x * g.sw - g.pw + (t % g.kw) * g.dw;
                wrong = iy < 0 || iy >= g.h || ix < 0 || ix >= g.w;
            }
        }
        if (wrong) *bad = 1;
    }
}

// ggy (planes, Ho, Wo) = ggx (planes, H, W) gathered at the forward's indices: the gradient of
// max_pool2d_backward with respect to its gy (double backward). A window wholly in the padding
// sent its gradient nowhere, so it gets 0; so does an index naming no input element (never
// read).
template <typename T, typename Index, typename Arg>
__global__ void max_pool2d_double_backward(const T* __restrict__ ggx,
                                           const Arg* __restrict__ indices,
                                           T* __restrict__ ggy, PoolGeometry g) {
    const Index total = (Index)g.planes * g.ho * g.wo;
    const long long plane = (long long)g.h * g.w;
    for (Index e = global_thread_index<Index>(); e < total; e += grid_stride<Index>()) {
        const PlanePos<Index> at = plane_pos(e, g.ho, g.wo);
        long long i = -1;
        if constexpr (ArgKind<Arg>::flat) {
            i = indices[e];
        } else {
            const int t = (int)indices[e];
            if (t >= 0 && t < g.kh * g.kw) {
                const int iy = at.y * g.sh - g.ph + (t / g.kw) * g.dh;
                const int ix = at.x * g.sw - g.pw + (t % g.kw) * g.dw;
                if (iy >= 0 && iy < g.h && ix >= 0 && ix < g.w) i = (long long)iy * g.w + ix;
            }
        }
        T v = zero_value<T>();
        if (i >= 0 && i < plane && window_holds_input(at.y, g.h, g.kh, g.sh, g.ph, g.dh) &&
            window_holds_input(at.x, g.w, g.kw, g.sw, g.pw, g.dw))
            v = ggx[at.plane * (Index)plane + (Index)i];
        ggy[e] = v;
    }
}

template <typename T, typename Index>
__global__ void avg_pool2d_forward(const T* __restrict__ x, T* __restrict__ y, PoolGeometry g) {
    using A = typename Acc<T>::type;
    const Index total = (Index)g.planes * g.ho * g.wo;
    for (Index e = global_thread_index<Index>(); e < total; e += grid_stride<Index>()) {
        const PlanePos<Index> at = plane_pos(e, g.ho, g.wo);
        const int oy = at.y, ox = at.x;
        const Index p = at.plane;
        int y0, y1, x0, x1;
        const int div = avg_divisor(g, oy, ox, y0, y1, x0, x1);
        if (div == 0) {
            y[e] = zero_value<T>();
            continue;
        }
        const T* plane = x + p * g.h * g.w;
        A sum = 0;
        for (int iy = y0; iy < y1; ++iy)
            for (int ix = x0; ix < x1; ++ix) sum += to_acc(plane[(Index)iy * g.w + ix]);
        y[e] = Store<T>::from(sum / (A)div);
    }
}

template <typename T, typename Index>
__global__ void avg_pool2d_backward(const T* __restrict__ gy, T* __restrict__ gx, PoolGeometry g) {
    using A = typename Acc<T>::type;
    const Index total = (Index)g.planes * g.h * g.w;
    for (Index e = global_thread_index<Index>(); e < total; e += grid_stride<Index>()) {
        const PlanePos<Index> at = plane_pos(e, g.h, g.w);
        const int iy = at.y, ix = at.x;
        const Index p = at.plane;
        const int oy0 = first_window(iy, g.ph, g.kh, g.sh), oy1 = end_window(iy, g.ph, g.sh, g.ho);
        const int ox0 = first_window(ix, g.pw, g.kw, g.sw), ox1 = end_window(ix, g.pw, g.sw, g.wo);
        const Index base = p * g.ho * g.wo;
        A sum = 0;
        for (int oy = oy0; oy < oy1; ++oy)
            for (int ox = ox0; ox < ox1; ++ox) {
                int y0, y1, x0, x1;
                const int div = avg_divisor(g, oy, ox, y0, y1, x0, x1);
                if (div == 0) continue;
                sum += to_acc(gy[base + (Index)oy * g.wo + ox]) / (A)div;
            }
        gx[e] = Store<T>::from(sum);
    }
}
