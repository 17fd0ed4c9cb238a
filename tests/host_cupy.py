"""Stand-ins for CuPy in the tests, with NumPy arrays as device memory.

`numpy_cupy(function)` answers what lowmoe's GPU code asks of cupy; `function(name)` gives each
kernel launch. `HostKernels.function` runs the kernels themselves on the CPU: each native/*.cu file,
exactly as cuda.source hands it to NVRTC, is built by g++ on tests/cuda_host.hpp into a shared
library, with a wrapper per entry point that launches it over the grid (every GPU thread a fiber).
Slow, but it is the kernels' own source that runs, without a GPU. A launch the GPU would refuse
(too many threads, too large a grid, too much shared memory) is refused here too.
"""

import ctypes
import math
import os
import re
import subprocess
import types

import numpy as np

from lowmoe.backend import cuda

HERE = os.path.dirname(os.path.abspath(__file__))
_ENTRY = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)')
_SCALAR = {"int": ctypes.c_int32, "float": ctypes.c_float, "long long": ctypes.c_int64}
# g++'s names of function-local statics: _ZZ<length><function>E<variable>; in a built file, these are
# the kernels' __shared__ arrays (cuda_host.hpp: `#define __shared__ static`).
_LOCAL_STATIC = re.compile(r"^[0-9a-f]+ ([0-9a-f]+) \w _ZZ(\d+)(\w+)$", re.M)

# The launch limits of the GPUs lowmoe targets, sm_80 (A100) and sm_90 (H100, H200), the smaller
# where they differ: a kernel must launch on both. The driver refuses a launch over any of them.
MAX_GRID = (2**31 - 1, 65535, 65535)  # blocks along grid.x, .y, .z
MAX_BLOCK = (1024, 1024, 64)  # threads along block.x, .y, .z
MAX_THREADS = 1024  # threads in a block
SHARED = 48 << 10  # static + dynamic shared memory of a block, unless the kernel opts in to more
SHARED_OPTIN = 163 << 10  # the most it can opt in to (sm_90: 227 KiB)


class CUDADriverError(RuntimeError):
    """What CuPy raises when the driver refuses a launch (cupy.cuda.driver.CUDADriverError)."""


def numpy_cupy(function):
    """A module that answers what lowmoe's GPU code asks of cupy, with NumPy arrays."""
    module = types.SimpleNamespace(get_function=function, compile=lambda: None)
    device = types.SimpleNamespace(attributes={"MultiProcessorCount": 132}, mem_info=(80 << 30, 80 << 30))
    runtime = types.SimpleNamespace(getDeviceCount=lambda: 1, CUDARuntimeError=RuntimeError)
    cuda_ns = types.SimpleNamespace(runtime=runtime, Device=lambda: device,
                                    compiler=types.SimpleNamespace(CompileException=RuntimeError))
    # asarray and asnumpy copy, as moving data between host and device does: a kernel writing in
    # place must not write into the caller's host array.
    return types.SimpleNamespace(
        cuda=cuda_ns, RawModule=lambda code, options: module, asnumpy=lambda a: np.array(a),
        asarray=lambda a, dtype=None: np.array(a, dtype=dtype),
        **{f: getattr(np, f) for f in ("empty", "full", "zeros", "ones", "exp", "clip", "arange", "ascontiguousarray")})


def _params(text):
    """[(C type, name, is pointer)] of a parameter list."""
    out = []
    for p in text.split(","):
        words = p.replace("*", " * ").split()
        out.append((" ".join(words[:-1]), words[-1], "*" in words))
    return out


class HostKernels:
    """The kernels of native/ built for the host in `build_dir`, one library per file."""

    def __init__(self, build_dir):
        self.dir = build_dir
        self.libs = {}  # file -> ctypes.CDLL
        self.static_shared = {}  # entry point -> bytes of the __shared__ arrays in its body

    def _library(self, name):
        lib = self.libs.get(name)
        if lib is not None:
            return lib
        src = cuda.source(name)
        wrappers = []
        for fn, params in _ENTRY.findall(src):
            ps = _params(params)
            wrappers.append(
                f'extern "C" void host_{fn}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned long shared, '
                f'{params}) {{\n    launch({{gx, gy, gz}}, {{bx, 1, 1}}, [&] {{ {fn}({", ".join(p[1] for p in ps)}); }}, shared);\n}}')
        path = os.path.join(self.dir, name + ".cpp")
        with open(path, "w", encoding="utf-8") as f:
            f.write(src + "\n" + "\n".join(wrappers) + "\n")
        so = os.path.join(self.dir, name + ".so")
        cmd = ["g++", "-std=c++20", "-O1", "-ffp-contract=off", "-fPIC", "-shared", "-Wall", "-Werror",
               "-Wno-unknown-pragmas", "-include", os.path.join(HERE, "cuda_host.hpp"), path, "-o", so]
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, f"native/{name} as host C++:\n{r.stderr}"
        lib = ctypes.CDLL(so)
        entries = [fn for fn, _ in _ENTRY.findall(src)]
        self.static_shared.update(dict.fromkeys(entries, 0))
        nm = subprocess.run(["nm", "-S", "--defined-only", so], capture_output=True, text=True, check=True).stdout
        for size, length, rest in _LOCAL_STATIC.findall(nm):
            fn = rest[: int(length)]
            assert fn in entries, f"native/{name}: a __shared__ array in {fn}, not in a kernel's body (uncounted)"
            self.static_shared[fn] += int(size, 16)
        for fn, params in _ENTRY.findall(src):
            f = getattr(lib, f"host_{fn}")
            f.argtypes = [ctypes.c_uint] * 4 + [ctypes.c_ulong] + [
                ctypes.c_void_p if ptr else _SCALAR[ctype] for ctype, _, ptr in _params(params)]
            f.restype = None
        self.libs[name] = lib
        return lib

    def function(self, fn):
        name = next(n for n, fns in cuda.KERNELS.items() if fn in fns)
        return HostFunction(fn, getattr(self._library(name), f"host_{fn}"), self.static_shared[fn])


class HostFunction:
    """One kernel, launched as a CuPy Function is: f(grid, block, args, shared_mem=0), on the CPU.
    max_dynamic_shared_size_bytes is CuPy's opt-in (cudaFuncAttributeMaxDynamicSharedMemorySize),
    by default what 48 KiB leaves after the kernel's static shared memory."""

    def __init__(self, name, run, static_shared):
        self.name, self.run, self.static_shared = name, run, static_shared
        self._dynamic = SHARED - static_shared

    def _refuse(self, what):
        raise CUDADriverError(f"CUDA_ERROR_INVALID_VALUE: invalid argument ({self.name}: {what})")

    @property
    def max_dynamic_shared_size_bytes(self):
        return self._dynamic

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, n):
        if not 0 <= n <= SHARED_OPTIN - self.static_shared:
            self._refuse(f"max_dynamic_shared_size_bytes {n} + {self.static_shared} static > {SHARED_OPTIN}")
        self._dynamic = n

    def __call__(self, grid, block, args, shared_mem=0):
        grid = tuple(grid) + (1,) * (3 - len(grid))
        block = tuple(block) + (1,) * (3 - len(block))
        if not all(1 <= n <= most for n, most in zip(grid, MAX_GRID)):
            self._refuse(f"grid {grid}, at most {MAX_GRID}")
        if not all(1 <= n <= most for n, most in zip(block, MAX_BLOCK)) or math.prod(block) > MAX_THREADS:
            self._refuse(f"block {block}, at most {MAX_THREADS} threads")
        if not 0 <= shared_mem <= self._dynamic:
            self._refuse(f"{shared_mem} bytes of dynamic shared memory > max_dynamic_shared_size_bytes "
                         f"{self._dynamic} ({self.static_shared} static; {SHARED} in all unless opted in)")
        assert block[1:] == (1, 1), f"{self.name}: the stand-in runs 1-D blocks only"
        values = [a.ctypes.data if isinstance(a, np.ndarray) else a.item() for a in args]
        self.run(*grid, block[0], shared_mem, *values)
