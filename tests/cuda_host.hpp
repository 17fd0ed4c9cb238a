// Just enough of CUDA for native/common.cuh, expert_gemv.cu and expert_gemm.cu to run as host C++
// (g++ -std=c++20 -ffp-contract=off -include tests/cuda_host.hpp), so that tests/test_native.py can
// check, without a GPU, that the kernels' source computes exactly what lowmoe/backend/exact.py
// computes. Every thread of a block is an OS thread: warp shuffles and __syncthreads are barriers.
// The arithmetic intrinsics are plain IEEE f32 operations, as on the GPU (each rounded on its own:
// -ffp-contract=off keeps g++ from fusing them, as __fmul_rn keeps nvcc from it).
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __device__
#define __global__
#define __forceinline__ inline
#define __shared__

using std::min;

struct uint4 { unsigned x, y, z, w; };
struct dim3 { unsigned x = 1, y = 1, z = 1; };

inline dim3 blockDim, gridDim;
inline int sm[1 << 16];  // the dynamic shared memory of moe_sort_i32 (`extern __shared__ int sm[]`)
inline thread_local dim3 threadIdx, blockIdx;

struct WarpLink {
    std::barrier<>* bar;
    float* vals;  // [32]
};
inline thread_local WarpLink warp_link;
inline thread_local std::barrier<>* block_bar;

inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float host_half_to_f32(unsigned short bits) { _Float16 h; std::memcpy(&h, &bits, 2); return (float)h; }

inline float __shfl_xor_sync(unsigned, float v, int o) {
    const int lane = threadIdx.x & 31;
    warp_link.vals[lane] = v;
    warp_link.bar->arrive_and_wait();
    const float r = warp_link.vals[lane ^ o];
    warp_link.bar->arrive_and_wait();
    return r;
}
inline void __syncthreads() { block_bar->arrive_and_wait(); }
inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }

// Runs body() as every thread of every block of `grid`: block.x OS threads walk the blocks in
// step (a barrier after each block), so threads are made once per launch.
template <typename F>
void launch(dim3 grid, dim3 block, F body) {
    gridDim = grid;
    blockDim = block;
    const unsigned warps = block.x / 32;
    std::barrier<> sync(block.x), done(block.x);
    std::vector<std::unique_ptr<std::barrier<>>> wbars;
    for (unsigned w = 0; w < warps; w++) wbars.push_back(std::make_unique<std::barrier<>>(32));
    std::vector<float> vals(32 * warps);
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < block.x; t++)
        threads.emplace_back([&, t] {
            threadIdx = {t, 0, 0};
            warp_link = {wbars[t / 32].get(), vals.data() + 32 * (t / 32)};
            block_bar = &sync;
            for (unsigned bz = 0; bz < grid.z; bz++)
                for (unsigned by = 0; by < grid.y; by++)
                    for (unsigned bx = 0; bx < grid.x; bx++) {
                        blockIdx = {bx, by, bz};
                        body();
                        done.arrive_and_wait();
                    }
        });
    for (auto& th : threads) th.join();
}
