import importlib.util
import os

import pytest

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
