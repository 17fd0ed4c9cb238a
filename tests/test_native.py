"""The CUDA sources without a GPU: every native/*.cu compiles with nvcc for sm_80 and sm_90 and
exports each entry point cuda.py launches; the split-sequence attention formula against plain
softmax attention (NumPy float64); device='cuda' without a usable GPU is a one-line error."""

import glob
import os
import re
import shutil
import struct
import subprocess
import sys
import types
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import lowmoe
from lowmoe.backend import cuda
from lowmoe.cli.__main__ import main as cli_main
from lowmoe.load.config import KV_DTYPES, EngineConfig

from host_cupy import numpy_cupy

ARCHS = ("sm_80", "sm_90")
_GLOBAL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)')


def _sources():
    return {os.path.basename(p): open(p, encoding="utf-8").read() for p in sorted(glob.glob(os.path.join(cuda.NATIVE, "*.cu")))}


def test_kernel_table_lists_every_global_and_nothing_else():
    # No dead kernels: each extern "C" __global__ is launched from Python, and the table names no
    # entry point that the sources lack.
    found = {name: set(_GLOBAL.findall(text)) for name, text in _sources().items()}
    assert found == {name: set(fns) for name, fns in cuda.KERNELS.items()}
    for name, fns in cuda.KERNELS.items():
        assert len(set(fns)) == len(fns), name
        assert all(re.fullmatch(rf"[a-z_0-9]+_({'|'.join(cuda._DT)}|i32)", fn) for fn in fns), fns  # <op>_<dtype>


def test_source_keeps_line_numbers():
    # Compiler errors name the right file of native/ and the right line: after each #line directive
    # the compiled text is that file, line for line (its includes become empty lines), each header
    # once, before what includes it.
    for name in _sources():
        parts = re.split(r'^#line 1 "native/([\w.]+)"\n', cuda.source(name), flags=re.M)
        assert parts[0] == "" and parts[-2] == name, name
        files = parts[1::2]
        assert len(set(files)) == len(files) and cuda.HEADER in files, name
        for f, body in zip(files, parts[2::2]):
            text = open(os.path.join(cuda.NATIVE, f), encoding="utf-8").read()
            want = ["" if line.startswith("#include") else line for line in text.split("\n")]
            assert body.split("\n")[: len(want)] == want and set(body.split("\n")[len(want) :]) <= {""}, (name, f)
        assert "#include" not in cuda.source(name)


def _global_functions(cubin):
    """Names of the global FUNC symbols in an ELF64 file (a cubin): the kernels it exports."""
    with open(cubin, "rb") as f:
        elf = f.read()
    assert elf[:4] == b"\x7fELF" and elf[4] == 2, "not an ELF64 file"
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", elf, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * shentsize) for i in range(shnum)]
    names = set()
    for _, sh_type, _, _, offset, size, link, _, _, entsize in sections:
        if sh_type != 2:  # SHT_SYMTAB
            continue
        strtab = sections[link][4]
        for pos in range(offset, offset + size, entsize):
            st_name, st_info = struct.unpack_from("<IB", elf, pos)
            if st_info >> 4 == 1 and st_info & 0xF == 2:  # STB_GLOBAL, STT_FUNC
                end = elf.index(b"\0", strtab + st_name)
                names.add(elf[strtab + st_name : end].decode())
    return names


def _nvcc(src, arch, out):
    # What cupy.RawModule compiles (cuda.source: header inlined, #line directives), as a cubin.
    cmd = ["nice", "-n", "19", "nvcc", "-cubin", f"-arch={arch}", "-std=c++17", "-Werror", "all-warnings", "-o", out, src]
    return subprocess.run(cmd, capture_output=True, text=True)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_every_source_compiles_and_exports_its_entry_points(tmp_path):
    jobs = []
    for name in cuda.KERNELS:
        src = tmp_path / name
        src.write_text(cuda.source(name))
        jobs += [(name, arch, str(src), str(tmp_path / f"{name}.{arch}.cubin")) for arch in ARCHS]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda j: _nvcc(j[2], j[1], j[3]), jobs))
    for (name, arch, _, cubin), r in zip(jobs, results):
        assert r.returncode == 0, f"native/{name} for {arch}:\n{r.stderr}"
        assert r.stderr.strip() == "", f"native/{name} for {arch} warns:\n{r.stderr}"
        missing = set(cuda.KERNELS[name]) - _global_functions(cubin)
        assert not missing, f"native/{name} ({arch}) lacks {sorted(missing)}"


# ------------------------------------------------- the split-sequence attention, in float64


def _split_attention(q, k, v, L, chunk, sub):
    """attention.cu's algorithm for one query row: keys 0..L-1 in chunks of `chunk`, each walked
    in sub-chunks of `sub` with an online softmax -> partials (o, m, l); then attn_combine_f32.
    q f64[hd]; k, v f64[n >= L, hd]."""
    S = -(-(k.shape[0]) // chunk)  # some chunks may lie past L: they must count for nothing
    parts = []
    for s in range(S):
        m, l, o = -np.inf, 0.0, np.zeros(q.shape)
        for j0 in range(s * chunk, min(s * chunk + chunk, L), sub):
            sc = k[j0 : min(j0 + sub, s * chunk + chunk, L)] @ q / np.sqrt(q.size)
            mnew = max(m, sc.max())
            alpha = np.exp(m - mnew)
            p = np.exp(sc - mnew)
            l = l * alpha + p.sum()
            o = o * alpha + p @ v[j0 : j0 + len(p)]
            m = mnew
        parts.append((o, m, l))
    M = max(m for _, m, _ in parts)
    num = sum(np.exp(m - M) * o for o, m, _ in parts)
    den = sum(np.exp(m - M) * l for _, m, l in parts)
    return num / den


@pytest.mark.parametrize("L,chunk,sub", [(1, 64, 128), (37, 5, 3), (300, 128, 128), (1000, 77, 16), (129, 129, 128)])
def test_split_attention_formula_matches_softmax_attention(L, chunk, sub):
    g = np.random.default_rng([6, L, chunk])
    hd, n = 24, L + 2 * chunk  # keys past L exist (a KV cache's spare room) and must be ignored
    q = g.standard_normal(hd) * 3
    k, v = g.standard_normal((n, hd)), g.standard_normal((n, hd))
    s = k[:L] @ q / np.sqrt(hd)
    p = np.exp(s - s.max())
    ref = (p / p.sum()) @ v[:L]
    got = _split_attention(q, k, v, L, chunk, sub)
    assert np.allclose(got, ref, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------ no usable GPU


def _fresh_cupy(monkeypatch, module):
    """cuda.cupy() as on a machine where `import cupy` gives `module` (None: not installed)."""
    monkeypatch.setattr(cuda, "_cupy", None)
    monkeypatch.setitem(sys.modules, "cupy", module)


def _no_device_cupy():
    class CUDARuntimeError(RuntimeError):
        pass

    def count():
        raise CUDARuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")

    runtime = types.SimpleNamespace(getDeviceCount=count, CUDARuntimeError=CUDARuntimeError)
    return types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime))


@pytest.mark.parametrize("module,words", [(None, "needs CuPy: pip install"), (_no_device_cupy(), "cannot use a GPU")])
def test_device_cuda_without_gpu_is_a_one_line_error(monkeypatch, capsys, module, words):
    _fresh_cupy(monkeypatch, module)
    with pytest.raises(lowmoe.DeviceError, match=words) as e:
        lowmoe.Engine.from_pretrained(device="cuda")
    assert "\n" not in str(e.value)
    assert cli_main(["decode", "--device", "cuda", "--max-new-tokens", "2", "In the beginning"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowmoe decode: error: device 'cuda'") and err.count("\n") == 1 and words in err


def test_device_options():
    assert EngineConfig.from_options(env={}, device="cuda").device == "cuda"
    with pytest.raises(lowmoe.InputError, match="expected one of cpu, cuda"):
        EngineConfig.from_options(env={}, device="tpu")
    assert EngineConfig.from_options(env={"SHARPI_EXPERT_CACHE": "25%"}, device="cuda").expert_cache == "25%"
    assert EngineConfig.from_options(env={"SHARPI_CPU_MOE": "1"}, device="cuda").cpu_moe is True
    assert EngineConfig.from_options(env={"SHARPI_CPU_MOE": "0"}, device="cuda").cpu_moe is False


# ------------------------- every launch against its kernel's C signature, with NumPy as CuPy

_PARAM_DTYPE = {"float": np.float32, "Half": np.uint16, "BFloat": np.uint16, "int": np.int32, "long long": np.int64,
                **{f.upper(): np.uint8 for f in cuda._BLOCKS}}  # native/blocks.cuh: Q8_0 ... Q6_K


def _signatures():
    """{entry point: [(is_pointer, dtype), ...]} from the extern "C" declarations in native/."""
    sig = {}
    for text in _sources().values():
        for fn, params in re.findall(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)', text):
            parsed = []
            for p in params.split(","):
                words = p.replace("*", " * ").split()
                base = " ".join(w for w in words[:-1] if w not in ("const", "*"))
                parsed.append(("*" in words, np.dtype(_PARAM_DTYPE[base])))
            sig[fn] = parsed
    return sig


class _Launches:
    """Stands in for CuPy's kernels: checks each launch's arguments against the C signature
    (count, pointer vs scalar, element type, C-contiguous arrays) and its launch shape."""

    def __init__(self):
        self.sig = _signatures()
        self.count = {}

    def function(self, fn):
        def launch(grid, block, args, shared_mem=0):
            want = self.sig[fn]
            assert len(args) == len(want), f"{fn}: {len(args)} arguments for {len(want)} parameters"
            for i, (a, (pointer, dtype)) in enumerate(zip(args, want)):
                if pointer:
                    assert isinstance(a, np.ndarray) and a.dtype == dtype and a.flags.c_contiguous, f"{fn} arg {i}"
                else:
                    assert type(a) is dtype.type, f"{fn} arg {i}: {type(a).__name__} for {dtype}"
            assert all(isinstance(d, int) and d > 0 for d in grid + block) and np.prod(block) <= 1024, (fn, grid, block)
            assert len(grid) <= 3 and len(block) == 1 and block[0] % 32 == 0 and shared_mem <= 48 << 10, fn
            if fn == "attn_split_f32":
                assert block == (128,)  # the kernel's sub-chunk of 128 keys is one key per thread
            self.count[fn] = self.count.get(fn, 0) + 1

        return launch


def _models(request):
    """The bundled model (bf16), its Q4_K_M, the Mixtral test checkpoint's Q8_0 and Q4_K_M and the
    Qwen2-MoE one's Q8_0 (a shared expert of q8_0 and f16) from llama.cpp, and, with torch and
    transformers, every transformers-made checkpoint."""
    try:
        made = list(request.getfixturevalue("test_models").values())
    except pytest.skip.Exception:
        made = []
    gguf = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "gguf")
    files = [os.path.join(gguf, f) for f in ("default-q4_k_m.gguf", "mixtral_bf16_sharded-q8_0.gguf",
                                             "mixtral_bf16_sharded-q4_k_m.gguf", "qwen2_moe_bf16-q8_0.gguf")]
    return [lowmoe.DEFAULT_MODEL] + files + made, bool(made)


def test_every_launch_matches_its_kernel_signature(monkeypatch, request):
    # The whole GPU decoder (prefill, then decode steps) on every architecture, with the launches
    # checked instead of run: argument order and types, contiguous arrays, sane launch shapes.
    launches = _Launches()
    _fresh_cupy(monkeypatch, numpy_cupy(launches.function))
    monkeypatch.setattr(cuda, "_modules", {})
    monkeypatch.setattr(cuda, "_functions", {})
    monkeypatch.setattr(cuda, "POISON", True)
    paths, every_dtype = _models(request)
    for i, path in enumerate(paths):  # the KV cache in each dtype in turn
        with lowmoe.Engine.from_pretrained(path, device="cuda", kv_dtype=KV_DTYPES[i % len(KV_DTYPES)]) as engine:
            assert len(engine.generate([3, 4, 5, 6], 3, stop_at_eos=False).tokens) == 3
            engine.logits([7])
    never = {fn for fns in cuda.KERNELS.values() for fn in fns} - set(launches.count)
    blocks = tuple(f"_{b}" for b in cuda._BLOCKS)  # the GGUF files hold some of them: all are checked below
    if every_dtype:  # f32, f16 and bf16 checkpoints: every float entry point ran
        assert all(fn.endswith(blocks) for fn in never), never
    else:  # the bf16 bundled model alone: only the f32 / f16 weight variants may not have run
        assert all(fn.endswith(("_f32", "_f16") + blocks) for fn in never), never
    assert any(fn.endswith(blocks) for fn in launches.count)


def test_block_format_launches_match_their_kernels(monkeypatch):
    # Every GGUF block format through each op that takes weights (the decode and prefill expert
    # kernels too), with the launches checked against the C signatures: every such entry point.
    sys.path.insert(0, os.path.join(os.path.dirname(cuda.NATIVE), "tools"))
    from kernel_inputs import weights

    launches = _Launches()
    _fresh_cupy(monkeypatch, numpy_cupy(launches.function))
    monkeypatch.setattr(cuda, "_functions", {})
    g = np.random.default_rng(0)
    E, I, D, k = 4, 256, 512, 2
    for fmt in cuda._BLOCKS:
        w = weights(g, (3, D), fmt, 1.0)[0]
        cuda.linear(np.zeros((2, D), np.float32), w, fmt, np.empty((2, 3), np.float32))
        cuda.embed(np.array([0, 2]), w, fmt, np.empty((2, D), np.float32))
        gate, up = (weights(g, (E, I, D), fmt, 1.0)[0] for _ in range(2))
        down = weights(g, (E, D, I), fmt, 1.0)[0]
        for T in (1, 3):
            idx = np.zeros((T, k), np.int32)
            cuda.expert_rows(np.zeros((T, D), np.float32), gate, up, down, fmt, idx, np.empty((T * k, D), np.float32))
    want = {fn for fns in cuda.KERNELS.values() for fn in fns if fn.endswith(tuple(f"_{b}" for b in cuda._BLOCKS))}
    assert want <= set(launches.count), want - set(launches.count)


def test_gpu_expert_cache_launches_match_their_kernels(monkeypatch):
    # device 'cuda' with a GPU expert cache (slots on tests/fake_device.py, summed by
    # cuda_device.SlotSum through the expert kernels over slot ids, in groups at "min") and with
    # CPU-MoE: placement.py's wiring runs, with the launches checked. The router's launch writes
    # valid expert ids (3t + j mod E), since no kernel runs here.
    from fake_device import KernelDevice

    from lowmoe.tier import placement

    launches = _Launches()
    checked = launches.function

    def function(fn):
        launch = checked(fn)
        if fn != "router_topk_f32":
            return launch

        def route(grid, block, args, shared_mem=0):
            launch(grid, block, args, shared_mem)
            idx, w = args[4], args[5]
            T, k = idx.shape
            idx[:] = (3 * np.arange(T)[:, None] + np.arange(k)) % int(args[1])
            w[:] = 1.0 / k

        return route

    launches.function = function
    cp = numpy_cupy(launches.function)
    _fresh_cupy(monkeypatch, cp)
    monkeypatch.setattr(cuda, "_modules", {})
    monkeypatch.setattr(cuda, "_functions", {})
    monkeypatch.setattr(cuda, "POISON", True)  # NaN, not garbage, in the buffers no kernel writes

    monkeypatch.setattr(placement, "CupyDevice", lambda: KernelDevice(cp))
    for options, where in ((dict(expert_cache="25%", cpu_moe=False, miss_policy="wait"), "slots"),
                           (dict(expert_cache="min", cpu_moe=False, miss_policy="cpu"), "slots"),
                           (dict(cpu_moe=True), "host"), (dict(cpu_moe=True, expert_cache="25%"), "host")):
        launches.count = {}
        with lowmoe.Engine.from_pretrained(device="cuda", **options) as engine:
            stats = engine.generate([3, 4, 5, 6], 3, stop_at_eos=False).stats
            assert engine.model.where == where
        routed = launches.count.get("moe_gate_up_bf16", 0) + launches.count.get("moe_group_gate_up_bf16", 0)
        if where == "slots":
            # the routed experts were read (on demand, or hinted: with no kernel running, the refined
            # hint ranks NaN logits, experts 0, 1, ..., the ones the router's launch writes) and went
            # through the kernels
            assert stats["misses"] + stats["prefetched"] > 0 and routed > 8
            assert isinstance(engine.model.experts.tier.slab.gate, np.ndarray)
        else:
            assert routed == 0  # the CPU computed them
