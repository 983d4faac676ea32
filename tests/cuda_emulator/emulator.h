// A CPU emulator for fastconv's CUDA kernels, for tests on machines without a GPU.
//
// The kernel sources are compiled as plain C++ with this header in front. Each CUDA thread of
// a block runs as a fiber (ucontext) on one OS thread; __syncthreads() parks a fiber until
// every live thread of its block has arrived, so shared memory, barriers and the tile loops
// run with real CUDA semantics, deterministically. Blocks run one after another, which is
// what makes `__shared__` as function-static storage correct. mma.sync is emulated from the
// fragment layout the kernels document (fastconv_common.cuh): the lanes of a warp publish
// their registers, meet at a warp barrier and each computes its own outputs.
//
// What this cannot check: timing, occupancy, memory coalescing, and whether the PTX fragment
// layout matches the hardware. Those need a GPU (bench/gpu_check.py).
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <utility>
#include <vector>
#include <type_traits>

#define FASTCONV_EMULATE 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

namespace fcemu {

inline dim3 cur_thread, cur_block, block_dim, grid_dim;

enum State { RUNNABLE, AT_BLOCK_BARRIER, AT_WARP_BARRIER, DONE };

struct Fiber {
    ucontext_t ctx;
    State state;
    dim3 tid;
};

constexpr size_t kStack = 256 * 1024;
inline ucontext_t scheduler;
inline std::vector<Fiber> fibers;
inline std::vector<std::vector<char>> stacks;
inline int current = 0;
inline void (*body)(void*) = nullptr;
inline void* body_arg = nullptr;
inline char error[512] = {0};

inline void yield_as(State s) {
    fibers[current].state = s;
    swapcontext(&fibers[current].ctx, &scheduler);
}

inline void fiber_entry() {
    body(body_arg);
    fibers[current].state = DONE;
    // uc_link returns to the scheduler.
}

inline int linear_tid() { return (int)(cur_thread.x + block_dim.x * (cur_thread.y + block_dim.y * cur_thread.z)); }

// Run one block to completion. Returns false (with `error` set) on a deadlock: a barrier that
// some live threads never reach.
inline bool run_block() {
    const int n = (int)(block_dim.x * block_dim.y * block_dim.z);
    fibers.assign(n, Fiber{});
    if ((int)stacks.size() < n) stacks.resize(n);
    for (int i = 0; i < n; ++i) {
        if (stacks[i].empty()) stacks[i].resize(kStack);
        Fiber& f = fibers[i];
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = stacks[i].data();
        f.ctx.uc_stack.ss_size = kStack;
        f.ctx.uc_link = &scheduler;
        makecontext(&f.ctx, fiber_entry, 0);
        f.state = RUNNABLE;
        f.tid.x = i % block_dim.x;
        f.tid.y = (i / block_dim.x) % block_dim.y;
        f.tid.z = i / (block_dim.x * block_dim.y);
    }
    for (;;) {
        bool ran = false;
        for (int i = 0; i < n; ++i) {
            if (fibers[i].state != RUNNABLE) continue;
            current = i;
            cur_thread = fibers[i].tid;
            swapcontext(&scheduler, &fibers[i].ctx);
            ran = true;
        }
        int live = 0, at_block = 0;
        for (int i = 0; i < n; ++i) {
            live += fibers[i].state != DONE;
            at_block += fibers[i].state == AT_BLOCK_BARRIER;
        }
        if (live == 0) return true;
        bool released = false;
        if (at_block == live) {  // exited threads count as arrived, as on the GPU
            for (auto& f : fibers)
                if (f.state == AT_BLOCK_BARRIER) f.state = RUNNABLE;
            released = true;
        }
        for (int w = 0; w * 32 < n; ++w) {
            int wl = 0, ww = 0;
            for (int i = w * 32; i < n && i < w * 32 + 32; ++i) {
                wl += fibers[i].state != DONE;
                ww += fibers[i].state == AT_WARP_BARRIER;
            }
            if (ww > 0 && ww == wl) {
                for (int i = w * 32; i < n && i < w * 32 + 32; ++i)
                    if (fibers[i].state == AT_WARP_BARRIER) fibers[i].state = RUNNABLE;
                released = true;
            }
        }
        if (!ran && !released) {
            std::snprintf(error, sizeof error,
                          "deadlock in block (%u,%u,%u): %d live threads, %d at __syncthreads",
                          cur_block.x, cur_block.y, cur_block.z, live, at_block);
            return false;
        }
    }
}

template <typename F, typename... A, size_t... I>
void invoke(F f, void** args, std::index_sequence<I...>) {
    f(*static_cast<std::decay_t<A>*>(args[I])...);
}

template <typename... A>
struct Call {
    void (*fn)(A...);
    void** args;
    static void run(void* self) {
        auto* c = static_cast<Call*>(self);
        invoke<void (*)(A...), A...>(c->fn, c->args, std::index_sequence_for<A...>{});
    }
};

// Launch `fn` over the grid; `args[i]` points at the bytes of argument i, as cuLaunchKernel
// takes them. Returns 0, or 1 with `error` set.
template <typename... A>
int launch(void (*fn)(A...), const unsigned* grid, const unsigned* block, void** args) {
    error[0] = 0;
    grid_dim = dim3{grid[0], grid[1], grid[2]};
    block_dim = dim3{block[0], block[1], block[2]};
    Call<A...> call{fn, args};
    body = &Call<A...>::run;
    body_arg = &call;
    for (unsigned z = 0; z < grid[2]; ++z)
        for (unsigned y = 0; y < grid[1]; ++y)
            for (unsigned x = 0; x < grid[0]; ++x) {
                cur_block = dim3{x, y, z};
                if (!run_block()) return 1;
            }
    return 0;
}

inline void syncthreads() { yield_as(AT_BLOCK_BARRIER); }
inline void syncwarp() { yield_as(AT_WARP_BARRIER); }

}  // namespace fcemu

#define threadIdx (::fcemu::cur_thread)
#define blockIdx (::fcemu::cur_block)
#define blockDim (::fcemu::block_dim)
#define gridDim (::fcemu::grid_dim)
inline void __syncthreads() { fcemu::syncthreads(); }

inline float __uint_as_float(unsigned v) { float f; std::memcpy(&f, &v, 4); return f; }
inline double __longlong_as_double(long long v) { double d; std::memcpy(&d, &v, 8); return d; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

namespace fastconv {
namespace emulate {

inline float half_to_float(unsigned short bits) {
    _Float16 h;
    std::memcpy(&h, &bits, 2);
    return (float)h;
}
inline unsigned short float_to_half(float v) {
    const _Float16 h = (_Float16)v;  // round to nearest even
    unsigned short bits;
    std::memcpy(&bits, &h, 2);
    return bits;
}
inline unsigned short float_to_bfloat16(float v) {
    unsigned u;
    std::memcpy(&u, &v, 4);
    if (std::isnan(v)) return (unsigned short)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    return (unsigned short)(u >> 16);
}

inline unsigned mma_a[32][32][4];  // [warp][lane][register]
inline unsigned mma_b[32][32][2];

inline float lane_half(unsigned reg, int high, int bf16) {
    const unsigned short bits = (unsigned short)(high ? reg >> 16 : reg & 0xffffu);
    if (bf16) return __uint_as_float(((unsigned)bits) << 16);
    return half_to_float(bits);
}

// One m16n8k16 mma for the calling lane, from the registers every lane of its warp holds.
inline void mma_16x8x16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], int bf16) {
    const int t = fcemu::linear_tid(), warp = t / 32, lane = t % 32;
    for (int r = 0; r < 4; ++r) mma_a[warp][lane][r] = a[r];
    for (int r = 0; r < 2; ++r) mma_b[warp][lane][r] = b[r];
    fcemu::syncwarp();
    const int g = lane / 4, q = lane % 4;
    for (int r = 0; r < 4; ++r) {
        const int row = g + (r >= 2 ? 8 : 0), col = 2 * q + (r & 1);
        float sum = d[r];
        for (int k = 0; k < 16; ++k) {
            const int la = (row % 8) * 4 + (k % 8) / 2, ra = (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
            const int lb = col * 4 + (k % 8) / 2, rb = k >= 8 ? 1 : 0;
            sum += lane_half(mma_a[warp][la][ra], k % 2, bf16) *
                   lane_half(mma_b[warp][lb][rb], k % 2, bf16);
        }
        d[r] = sum;
    }
    fcemu::syncwarp();  // every lane has read the registers before any lane overwrites them
}

}  // namespace emulate
}  // namespace fastconv
