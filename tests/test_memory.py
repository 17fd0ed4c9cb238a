"""Host memory stays inside the plan: a model whose experts are far larger than its expert cache
decodes with a peak resident set (VmHWM, measured in a fresh process) of at most the plan (dense
weights + cache and staging slots + KV cache) above what the process held before loading it, while
the same model with every expert resident peaks at least its expert bytes above it. (Measured: 58.0
MB above for a 57.6 MB plan, against 404 MB resident.)"""

import json
import subprocess
import sys

from safetensors.numpy import save_file

from tiny_model import CONFIG, tensors, write_tiny_model

BIG = dict(CONFIG, hidden_size=256, moe_intermediate_size=2048, num_experts=32, head_dim=32)  # 6 MiB f32 experts
SLACK = 64 << 20  # activations, read bookkeeping, allocator rounding
SCRIPT = r"""
import json, os, sys
import lowmoe
from lowmoe.tier.host_memory import peak_rss_bytes, reset_peak

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

warm, path, budget = sys.argv[1:]
for options in ({}, {"expert_cache": "min"}):  # the f32 kernels of both paths compiled or loaded first
    with lowmoe.Engine.from_pretrained(warm, **options) as e:
        e.generate([3, 4, 5], 3, stop_at_eos=False)
base = rss()
reset_peak()
with lowmoe.Engine.from_pretrained(path, **({} if budget == "resident" else {"expert_cache": budget})) as e:
    e.generate(list(range(3, 35)), 16, stop_at_eos=False)
    cache = 0 if budget == "resident" else e.model.experts.plan.nbytes
print(json.dumps({"growth": peak_rss_bytes() - base, "cache": cache}))
"""


def _growth(warm, path, budget):
    out = subprocess.run([sys.executable, "-c", SCRIPT, warm, path, budget], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out)


def test_peak_memory_stays_inside_the_plan(tmp_path):
    warm = write_tiny_model(str(tmp_path / "warm"))
    big = tmp_path / "big"
    big.mkdir()
    with open(big / "config.json", "w") as f:
        json.dump(BIG, f)
    ts = tensors(BIG)
    save_file(ts, str(big / "model.safetensors"))
    experts = sum(t.nbytes for name, t in ts.items() if ".experts." in name)
    dense = sum(t.nbytes for name, t in ts.items() if ".experts." not in name)
    kv = 2 * 2 * BIG["num_key_value_heads"] * 48 * BIG["head_dim"] * 2  # 2 layers, k and v, 48 positions of f16
    del ts
    cached = _growth(warm, str(big), "10%")
    plan = dense + cached["cache"] + kv
    assert experts > plan + 4 * SLACK  # holding the experts would show
    assert cached["growth"] <= plan + SLACK, (cached, plan)
    resident = _growth(warm, str(big), "resident")
    assert resident["growth"] >= experts, resident
