import importlib.util
import os
import shutil
import sys

import pytest

from lowmoe.backend import cuda

from host_cupy import HostKernels, numpy_cupy

_MAKER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "make_test_models.py")


@pytest.fixture(scope="session")
def test_models(tmp_path_factory):
    """{variant name: checkpoint dir} for every variant of tools/make_test_models.py, built once
    per session with transformers; skips when transformers or torch is not installed."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("make_test_models", _MAKER)
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    return maker.make_models(str(tmp_path_factory.mktemp("lowmoe_test_models")))


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    """native/*.cu built for the host (tests/host_cupy.py), once per test module."""
    if shutil.which("g++") is None:
        pytest.skip("g++ not installed")
    return HostKernels(str(tmp_path_factory.mktemp("host_kernels")))


@pytest.fixture
def host_gpu(kernels, monkeypatch):
    """cupy is the host stand-in running `kernels`; buffers no kernel writes hold NaN."""
    cp = numpy_cupy(kernels.function)
    monkeypatch.setattr(cuda, "_cupy", None)
    monkeypatch.setitem(sys.modules, "cupy", cp)
    monkeypatch.setattr(cuda, "_modules", {})
    monkeypatch.setattr(cuda, "_functions", {})
    monkeypatch.setattr(cuda, "POISON", True)
    return cp
