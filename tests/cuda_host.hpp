// Just enough of CUDA for the kernels in native/ to run as host C++ (g++ -std=c++20
// -ffp-contract=off -include tests/cuda_host.hpp), so that the tests can run them without a GPU
// (tests/host_cupy.py builds them and stands in for CuPy; tests/test_host_gpu.py).
//
// Every thread of a block is a fiber on the calling OS thread; the fibers walk the blocks of the
// grid in step (a barrier after each block). A warp shuffle is a barrier of its warp's 32 fibers,
// __syncthreads one of the whole block; a barrier that can never complete (threads of a block that
// returned early) aborts.
// __shared__ variables are static: one copy, shared by the block that is running. The f32
// intrinsics are plain IEEE operations, each rounded on its own (-ffp-contract=off keeps g++ from
// fusing them, as __fmul_rn keeps nvcc from it); expf and sqrtf are the host's.
#define LOWMOE_CUDA_HOST
#include <setjmp.h>
#include <ucontext.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <vector>

#define __device__
#define __global__
#define __forceinline__ inline
#define __shared__ static

using std::max;
using std::min;

struct uint4 { unsigned x, y, z, w; };
struct dim3 { unsigned x = 1, y = 1, z = 1; };

inline dim3 blockDim, gridDim, threadIdx, blockIdx;
inline char* dynamic_shared;  // the running launch's dynamic shared memory (common.cuh DYNAMIC_SHARED)

struct HostBarrier {
    unsigned expected = 0, arrived = 0, gen = 0;
};

struct HostFiber {
    jmp_buf jb;
    ucontext_t start;
    std::vector<char> stack;
    unsigned tid = 0, block = 0;
    bool started = false, done = false;
    HostBarrier* waiting = nullptr;
    unsigned wait_gen = 0;
};

struct HostLaunch {
    jmp_buf scheduler;
    std::vector<HostFiber> fibers;
    std::vector<HostBarrier> warp_bars;
    std::vector<unsigned long long> warp_vals;  // [32 per warp] shuffle exchange
    HostBarrier block_bar, end_bar;
    HostFiber* current = nullptr;
    std::function<void()> body;
    dim3 grid;
};
inline HostLaunch* host_launch;

inline void host_set_indices(const HostFiber& f) {
    const dim3 g = host_launch->grid;
    threadIdx = {f.tid, 0, 0};
    blockIdx = {f.block % g.x, f.block / g.x % g.y, f.block / (g.x * g.y)};
}

// Switches with _setjmp / _longjmp, which leave the signal mask alone (swapcontext makes a system
// call each time); ucontext only starts a fiber on its stack.
inline void host_arrive(HostBarrier& b) {
    HostFiber* me = host_launch->current;
    const unsigned gen = b.gen;
    if (++b.arrived == b.expected) {  // the last one releases the others
        b.arrived = 0;
        b.gen++;
        return;
    }
    me->waiting = &b;
    me->wait_gen = gen;
    if (!_setjmp(me->jb)) _longjmp(host_launch->scheduler, 1);
    host_set_indices(*me);
}

inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned i; std::memcpy(&i, &f, 4); return i; }
inline float host_half_to_f32(unsigned short bits) { _Float16 h; std::memcpy(&h, &bits, 2); return (float)h; }
inline unsigned short host_f32_to_half(float x) { _Float16 h = (_Float16)x; unsigned short b; std::memcpy(&b, &h, 2); return b; }

template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int o) {
    static_assert(sizeof(T) <= 8);
    const unsigned warp = threadIdx.x / 32, lane = threadIdx.x & 31;
    unsigned long long* vals = host_launch->warp_vals.data() + 32 * warp;
    std::memcpy(&vals[lane], &v, sizeof(T));
    host_arrive(host_launch->warp_bars[warp]);
    T r;
    std::memcpy(&r, &vals[lane ^ o], sizeof(T));
    host_arrive(host_launch->warp_bars[warp]);
    return r;
}
inline void __syncthreads() { host_arrive(host_launch->block_bar); }
inline void __syncwarp(unsigned = 0xffffffffu) { host_arrive(host_launch->warp_bars[threadIdx.x / 32]); }
inline int atomicAdd(int* p, int v) { const int old = *p; *p += v; return old; }  // fibers never interleave here

inline void host_fiber_main() {
    HostLaunch* L = host_launch;
    HostFiber* f = L->current;
    const unsigned blocks = L->grid.x * L->grid.y * L->grid.z;
    for (f->block = 0; f->block < blocks; f->block++) {  // every thread walks the blocks in step
        host_set_indices(*f);
        L->body();
        host_arrive(L->end_bar);
    }
    f->done = true;
    _longjmp(L->scheduler, 1);
}

// The globals above belong to one launch. At namespace scope, so that the only function-local
// statics of a built file are the kernels' __shared__ arrays (tests/host_cupy.py counts them).
inline std::mutex host_one_launch;

// Runs body() as every thread of every block of `grid`, with `shared` bytes of dynamic shared memory
// (tests/host_cupy.py refuses a launch over the GPU's limits before it gets here).
inline void launch(dim3 grid, dim3 block, std::function<void()> body, size_t shared = 0) {
    std::lock_guard<std::mutex> lock(host_one_launch);
    HostLaunch L;
    L.body = std::move(body);
    L.grid = grid;
    L.fibers.resize(block.x);
    L.warp_bars.resize((block.x + 31) / 32);
    for (unsigned w = 0; w < L.warp_bars.size(); w++) L.warp_bars[w].expected = min(32u, block.x - 32 * w);
    L.warp_vals.resize(32 * L.warp_bars.size());
    L.block_bar.expected = L.end_bar.expected = block.x;
    std::vector<char> smem(shared + 16);
    host_launch = &L;
    dynamic_shared = smem.data();
    gridDim = grid;
    blockDim = block;
    for (unsigned t = 0; t < block.x; t++) {
        HostFiber& f = L.fibers[t];
        f.tid = t;
        f.stack.resize(64 << 10);
        getcontext(&f.start);
        f.start.uc_stack.ss_sp = f.stack.data();
        f.start.uc_stack.ss_size = f.stack.size();
        f.start.uc_link = nullptr;  // fibers end by jumping back
        makecontext(&f.start, host_fiber_main, 0);
    }
    ucontext_t unused;
    for (volatile unsigned left = block.x; left > 0;) {
        volatile bool ran = false;
        for (auto& f : L.fibers) {
            if (f.done || (f.waiting != nullptr && f.waiting->gen == f.wait_gen)) continue;
            f.waiting = nullptr;
            L.current = &f;
            ran = true;
            if (!_setjmp(L.scheduler)) {
                if (f.started) {
                    host_set_indices(f);
                    _longjmp(f.jb, 1);
                }
                f.started = true;
                swapcontext(&unused, &f.start);
            }
            if (f.done) left = left - 1;
        }
        if (!ran) {
            std::fprintf(stderr, "cuda_host: a barrier cannot complete (threads of a block returned early?)\n");
            std::abort();
        }
    }
    host_launch = nullptr;
}
