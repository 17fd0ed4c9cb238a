// The expert kernels of native/ run on host threads (tests/cuda_host.hpp), for tests/test_native.py:
//   cuda_host_experts DIR DTYPE E I D K T
// reads DIR/{x,gate,up,down,idx,w}.bin (x f32[T, D]; gate, up [E, I, D] and down [E, D, I] as
// stored; idx int32[T, K], entries < 0 skipped; w f32[T, K]) and writes DIR/y_decode.bin (each token
// through the decode kernels), DIR/y_prefill.bin (all tokens through the grouped kernels), both
// f32[T * K, D] starting as NaN, and DIR/out.bin (moe_combine_f32 of y_prefill, f32[T, D]).
#include <cstdio>
#include <cstdlib>
#include <string>

#include "expert_gemm.cu"
#include "expert_gemv.cu"

static std::vector<char> load(const std::string& path, size_t n) {
    std::vector<char> b(n);
    FILE* f = std::fopen(path.c_str(), "rb");
    if (!f || std::fread(b.data(), 1, n, f) != n) { std::fprintf(stderr, "cannot read %s\n", path.c_str()); std::exit(2); }
    std::fclose(f);
    return b;
}

static void save(const std::string& path, const std::vector<float>& v) {
    FILE* f = std::fopen(path.c_str(), "wb");
    std::fwrite(v.data(), sizeof(float), v.size(), f);
    std::fclose(f);
}

template <typename W, typename GateUp, typename Down, typename GroupGateUp, typename GroupDown>
static void run(const std::string& dir, int E, int I, int D, int K, int T, GateUp gate_up, Down down,
                GroupGateUp group_gate_up, GroupDown group_down) {
    const size_t nw = (size_t)E * I * D;
    auto xb = load(dir + "/x.bin", 4ul * T * D), gb = load(dir + "/gate.bin", sizeof(W) * nw),
         ub = load(dir + "/up.bin", sizeof(W) * nw), db = load(dir + "/down.bin", sizeof(W) * nw),
         ib = load(dir + "/idx.bin", 4ul * T * K), wb = load(dir + "/w.bin", 4ul * T * K);
    const float* x = (const float*)xb.data();
    const W *gate = (const W*)gb.data(), *up = (const W*)ub.data(), *dn = (const W*)db.data();
    const int* idx = (const int*)ib.data();
    const float nan = std::nanf("");
    std::vector<float> yd((size_t)T * K * D, nan), yp((size_t)T * K * D, nan), h((size_t)T * K * I, nan), out((size_t)T * D, nan);
    for (int t = 0; t < T; t++) {
        const float* xt = x + (size_t)t * D;
        const int* it = idx + (size_t)t * K;
        float* yt = yd.data() + (size_t)t * K * D;
        launch({(unsigned)((I + 7) / 8), (unsigned)K, 1}, {256, 1, 1}, [&] { gate_up(xt, it, gate, up, h.data(), D, I); });
        launch({(unsigned)((D + 7) / 8), (unsigned)K, 1}, {256, 1, 1}, [&] { down(h.data(), it, dn, yt, D, I); });
    }
    const int n = T * K;
    std::vector<int> offsets(E + 1), order(n, -1);
    launch({1, 1, 1}, {1024, 1, 1}, [&] { moe_sort_i32(idx, n, E, offsets.data(), order.data()); }, 8 * E);
    launch({(unsigned)((I + 7) / 8), (unsigned)E, 1}, {256, 1, 1},
           [&] { group_gate_up(x, order.data(), offsets.data(), gate, up, h.data(), K, D, I); });
    launch({(unsigned)((D + 7) / 8), (unsigned)E, 1}, {256, 1, 1},
           [&] { group_down(h.data(), order.data(), offsets.data(), dn, yp.data(), D, I); });
    launch({(unsigned)((D + 255) / 256), (unsigned)T, 1}, {256, 1, 1},
           [&] { moe_combine_f32(yp.data(), (const float*)wb.data(), out.data(), K, D); });
    save(dir + "/y_decode.bin", yd);
    save(dir + "/y_prefill.bin", yp);
    save(dir + "/out.bin", out);
}

int main(int argc, char** argv) {
    if (argc != 8) { std::fprintf(stderr, "usage: %s DIR DTYPE E I D K T\n", argv[0]); return 2; }
    const std::string dir = argv[1], dt = argv[2];
    const int E = std::atoi(argv[3]), I = std::atoi(argv[4]), D = std::atoi(argv[5]), K = std::atoi(argv[6]), T = std::atoi(argv[7]);
    if (dt == "f32") run<float>(dir, E, I, D, K, T, moe_gate_up_f32, moe_down_f32, moe_group_gate_up_f32, moe_group_down_f32);
    else if (dt == "f16") run<Half>(dir, E, I, D, K, T, moe_gate_up_f16, moe_down_f16, moe_group_gate_up_f16, moe_group_down_f16);
    else run<BFloat>(dir, E, I, D, K, T, moe_gate_up_bf16, moe_down_bf16, moe_group_gate_up_bf16, moe_group_down_bf16);
    return 0;
}
