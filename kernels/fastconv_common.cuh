// Shared helpers for every fastconv CUDA kernel.
//
// Compiled at run time by NVRTC (through CuPy), so only device code and CUDA built-ins here:
// no host standard headers. The math mirrors fastconv/_args.py so that both engines agree on
// every output shape.
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

// Window geometry of a conv or pooling op along H and W, passed to kernels by value.
// pad_top/pad_left are the leading pads; the trailing ones only affect the output size.
struct Window2d {
    int kh, kw;          // kernel extent
    int sh, sw;          // stride
    int pad_top, pad_left;
    int dh, dw;          // dilation
    int ho, wo;          // output size
};

// Input row/column read by output position `o` and kernel tap `k` along one axis.
__host__ __device__ inline int input_coord(int o, int k, int stride, int pad, int dilation) {
    return o * stride - pad + k * dilation;
}

// Index type: kernels are instantiated for int (tensors below 2^31 elements, cheaper
// arithmetic) and long long (anything larger); the launcher picks one.
template <typename Index>
__device__ inline Index global_thread_index() {
    return (Index)blockIdx.x * blockDim.x + threadIdx.x;
}

template <typename Index>
__device__ inline Index grid_stride() {
    return (Index)blockDim.x * gridDim.x;
}

}  // namespace fastconv
