"""Greedy tokens and logits of every model and device path, recorded before a refactor and compared
after it: a change of structure must not change a single bit.

    python tools/outputs.py record FILE.npz [MODEL_DIR ...]
    python tools/outputs.py compare FILE.npz [MODEL_DIR ...]

MODEL_DIR defaults to the bundled model; add the checkpoints of tools/make_test_models.py. Each
model runs on the CPU (every expert resident; a 25% expert cache with nextgate) and on the CPU
stand-in for the GPU (tests/host_cupy.py: the CUDA sources built for the host; every expert
resident on the device; a 25% GPU expert cache on tests/fake_device.py's copy stream, misses on the
CPU; CPU-MoE). `compare` exits 1 naming each run whose tokens or logits differ in any bit.
"""

import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import lowmoe  # noqa: E402

PROMPT = [5, 17, 300, 42, 9, 77, 100, 3]  # inside the test models' 384-token vocabulary
RUNS = {  # name -> (device, options)
    "cpu": ("cpu", {}),
    "cpu-cache": ("cpu", dict(expert_cache="25%", predictor="nextgate")),
    "gpu": ("cuda", {}),
    "gpu-slots": ("cuda", dict(expert_cache="25%", miss_policy="cpu", cpu_moe=False)),
    "gpu-cpu-moe": ("cuda", dict(cpu_moe=True)),
}


def host_gpu(build_dir):
    """Makes device 'cuda' the host stand-in: CuPy answered by NumPy, kernels built for the host,
    the GPU expert cache's device tests/fake_device.KernelDevice (the real kernels)."""
    from fake_device import KernelDevice
    from host_cupy import HostKernels, numpy_cupy

    from lowmoe.backend import cuda
    from lowmoe.tier import placement

    cp = numpy_cupy(HostKernels(build_dir).function)
    sys.modules["cupy"] = cp
    cuda._cupy = None
    placement.CupyDevice = lambda: KernelDevice(cp, delay_s=0.005, seed=4)


def outputs(path):
    result = {}
    with tempfile.TemporaryDirectory() as build:
        host_gpu(build)
        for run, (device, options) in RUNS.items():
            with lowmoe.Engine.from_pretrained(path, device=device, **options) as e:
                gen = e.generate(PROMPT, 8, stop_at_eos=False)
                result[f"{run}/tokens"] = np.array(gen.tokens, np.int64)
                result[f"{run}/logits"] = e.logits(PROMPT + gen.tokens[:4])
    return result


def main(argv):
    mode, file, *models = argv
    models = models or [lowmoe.DEFAULT_MODEL]
    got = {}
    for path in models:
        name = os.path.basename(os.path.normpath(path))
        for key, value in outputs(path).items():
            got[f"{name}/{key}"] = value
    if mode == "record":
        np.savez(file, **got)
        print(f"{file}: {len(got)} arrays")
        return 0
    with np.load(file) as want:
        bad = [k for k in want.files if k not in got or not np.array_equal(want[k].view(np.uint8), got[k].view(np.uint8))]
    for k in bad:
        print(f"differs: {k}")
    print(f"{len(got)} arrays compared, {len(bad)} differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
