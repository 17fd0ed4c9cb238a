"""Stand-ins for CuPy in the tests, with NumPy arrays as device memory.

`numpy_cupy(function)` answers what lowmoe's GPU code asks of cupy; `function(name)` gives each
kernel launch. `HostKernels.function` runs the kernels themselves on the CPU: each native/*.cu file,
exactly as cuda.source hands it to NVRTC, is built by g++ on tests/cuda_host.hpp into a shared
library, with a wrapper per entry point that launches it over the grid (every GPU thread a fiber).
Slow, but it is the kernels' own source that runs, without a GPU.
"""

import ctypes
import os
import re
import subprocess
import types

import numpy as np

from lowmoe.backend import cuda

HERE = os.path.dirname(os.path.abspath(__file__))
_ENTRY = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)')
_SCALAR = {"int": ctypes.c_int32, "float": ctypes.c_float, "long long": ctypes.c_int64}


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
        for fn, params in _ENTRY.findall(src):
            f = getattr(lib, f"host_{fn}")
            f.argtypes = [ctypes.c_uint] * 4 + [ctypes.c_ulong] + [
                ctypes.c_void_p if ptr else _SCALAR[ctype] for ctype, _, ptr in _params(params)]
            f.restype = None
        self.libs[name] = lib
        return lib

    def function(self, fn):
        name = next(n for n, fns in cuda.KERNELS.items() if fn in fns)
        f = getattr(self._library(name), f"host_{fn}")

        def launch(grid, block, args, shared_mem=0):
            grid = tuple(grid) + (1,) * (3 - len(grid))
            values = [a.ctypes.data if isinstance(a, np.ndarray) else a.item() for a in args]
            f(*grid, block[0], shared_mem, *values)

        return launch
