"""`lowmoe info` and `lowmoe --help`, checked against the safetensors library's own view."""

import json
import subprocess
import sys

import numpy as np
from safetensors import safe_open

import lowmoe
from lowmoe.cli.__main__ import main as cli


def test_info_counts_dense_and_expert_bytes(capsys):
    assert cli(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    dense = experts = 0
    with safe_open(f"{lowmoe.DEFAULT_MODEL}/model.safetensors", "np") as f:
        for name in f.keys():
            t = f.get_slice(name)
            nbytes = 2 * int(np.prod(t.get_shape()))  # the bundled model is bf16
            if ".experts." in name:
                experts += nbytes
            else:
                dense += nbytes
    assert (info["dense_bytes"], info["expert_bytes"]) == (dense, experts)
    assert (info["layers"], info["experts_per_layer"], info["experts_per_token"]) == (8, 16, 4)
    assert cli(["info"]) == 0
    assert "expert bytes" in capsys.readouterr().out


def test_help_lists_commands():
    r = subprocess.run([sys.executable, "-m", "lowmoe.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "decode" in r.stdout and "info" in r.stdout
