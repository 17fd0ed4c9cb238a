// Just enough of CUDA for the kernels in native/ to run as host C++ (g++ -std=c++20
// -ffp-contract=off -include tests/cuda_host.hpp), so that the tests can run them without a GPU:
// tests/cuda_host_experts.cpp checks the expert kernels' bits against lowmoe/backend/exact.py, and
// tests/host_cupy.py stands in for CuPy to check every kernel against float64.
//
// Every thread of a block is a fiber (ucontext) on the calling OS thread; the blocks of a grid run
// one after another. A warp shuffle is a barrier of its warp's 32 fibers, __syncthreads one of the
// whole block; a barrier that can never complete (threads of a block that returned early) aborts.
// __shared__ variables are static: one copy, shared by the block that is running. The f32
// intrinsics are plain IEEE operations, each rounded on its own (-ffp-contract=off keeps g++ from
// fusing them, as __fmul_rn keeps nvcc from it); expf and sqrtf are the host's.
#define LOWMOE_CUDA_HOST
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
    ucontext_t ctx;
    std::vector<char> stack;
    unsigned tid = 0;
    bool done = false;
    HostBarrier* waiting = nullptr;
    unsigned wait_gen = 0;
};

struct HostBlock {
    ucontext_t scheduler;
    std::vector<HostFiber> fibers;
    std::vector<HostBarrier> warp_bars;
    std::vector<unsigned long long> warp_vals;  // [32 per warp] shuffle exchange
    HostBarrier block_bar;
    HostFiber* current = nullptr;
    std::function<void()> body;
};
inline HostBlock* host_block;

inline void host_arrive(HostBarrier& b) {
    HostFiber* me = host_block->current;
    const unsigned gen = b.gen;
    if (++b.arrived == b.expected) {  // the last one releases the others
        b.arrived = 0;
        b.gen++;
        return;
    }
    me->waiting = &b;
    me->wait_gen = gen;
    swapcontext(&me->ctx, &host_block->scheduler);
}

inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float host_half_to_f32(unsigned short bits) { _Float16 h; std::memcpy(&h, &bits, 2); return (float)h; }

template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int o) {
    static_assert(sizeof(T) <= 8);
    const unsigned warp = threadIdx.x / 32, lane = threadIdx.x & 31;
    unsigned long long* vals = host_block->warp_vals.data() + 32 * warp;
    std::memcpy(&vals[lane], &v, sizeof(T));
    host_arrive(host_block->warp_bars[warp]);
    T r;
    std::memcpy(&r, &vals[lane ^ o], sizeof(T));
    host_arrive(host_block->warp_bars[warp]);
    return r;
}
inline void __syncthreads() { host_arrive(host_block->block_bar); }
inline int atomicAdd(int* p, int v) { const int old = *p; *p += v; return old; }  // fibers never interleave here

inline void host_fiber_main() {
    host_block->body();
    host_block->current->done = true;  // uc_link returns to the scheduler
}

// Runs body() as every thread of every block of `grid`, with `shared` bytes of dynamic shared memory.
inline void launch(dim3 grid, dim3 block, std::function<void()> body, size_t shared = 0) {
    static std::mutex one_at_a_time;  // the globals above belong to one launch
    std::lock_guard<std::mutex> lock(one_at_a_time);
    HostBlock b;
    b.body = std::move(body);
    b.fibers.resize(block.x);
    for (auto& f : b.fibers) f.stack.resize(64 << 10);
    b.warp_bars.resize((block.x + 31) / 32);
    for (unsigned w = 0; w < b.warp_bars.size(); w++) b.warp_bars[w].expected = min(32u, block.x - 32 * w);
    b.warp_vals.resize(32 * b.warp_bars.size());
    b.block_bar.expected = block.x;
    std::vector<char> smem(shared + 16);
    host_block = &b;
    dynamic_shared = smem.data();
    gridDim = grid;
    blockDim = block;
    for (unsigned bz = 0; bz < grid.z; bz++)
        for (unsigned by = 0; by < grid.y; by++)
            for (unsigned bx = 0; bx < grid.x; bx++) {
                blockIdx = {bx, by, bz};
                for (unsigned t = 0; t < block.x; t++) {
                    HostFiber& f = b.fibers[t];
                    f.tid = t;
                    f.done = false;
                    f.waiting = nullptr;
                    getcontext(&f.ctx);
                    f.ctx.uc_stack.ss_sp = f.stack.data();
                    f.ctx.uc_stack.ss_size = f.stack.size();
                    f.ctx.uc_link = &b.scheduler;
                    makecontext(&f.ctx, host_fiber_main, 0);
                }
                for (unsigned left = block.x; left > 0;) {
                    bool ran = false;
                    for (auto& f : b.fibers) {
                        if (f.done || (f.waiting != nullptr && f.waiting->gen == f.wait_gen)) continue;
                        f.waiting = nullptr;
                        b.current = &f;
                        threadIdx = {f.tid, 0, 0};
                        swapcontext(&b.scheduler, &f.ctx);
                        ran = true;
                        if (f.done) left--;
                    }
                    if (!ran) {
                        std::fprintf(stderr, "cuda_host: block (%u, %u, %u) waits at a barrier that cannot complete\n", bx, by, bz);
                        std::abort();
                    }
                }
            }
    host_block = nullptr;
}
