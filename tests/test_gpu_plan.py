"""Planning for the GPU without a GPU: the VRAM budget (vram.py, `lowmoe info --vram-budget`), the
dense bytes the device holds, the CPU-MoE cost model (hybrid.py) and the engine options. Every
expected number is recomputed here from the config and the checkpoint header, not by the code
under test."""

import json

from dataclasses import replace

import pytest

import lowmoe
from lowmoe.load.weights import device_bytes
from lowmoe.load.checkpoint import Checkpoint
from lowmoe.cli.__main__ import main as cli
from lowmoe.load.config import EngineConfig, load_model_config
from lowmoe.errors import InputError
from lowmoe.tier.hybrid import Costs, choose_cpu_moe, misses_on_cpu
from lowmoe.tier.vram import plan_vram
from lowmoe.load.weights import load_dense

# The bundled model: 8 layers (all MoE) x 16 experts, top-4, D 256, I 96, 4 heads / 2 KV of 64,
# vocabulary 4096, bf16, tied embeddings.
SLOT = 3 * 96 * 256 * 2  # gate, up [96, 256], down [256, 96] bf16
KV_8K = 2 * 8 * (2 * 8192 * 64 * 2) + 2 * 8192 * 32 * 4  # f16 k and v per layer, RoPE f32 cos and sin
# 256 MiB + 4 bytes x (512 tokens x (4 D + (3 H + 2 KV) hd + E + k (I + D) + 2 k) + V)
WORK = 256 * 2**20 + 4 * (512 * (4 * 256 + (3 * 4 + 2 * 2) * 64 + 16 + 4 * (96 + 256) + 2 * 4) + 4096)


@pytest.fixture(scope="module")
def bundled():
    cfg = load_model_config(lowmoe.DEFAULT_MODEL)
    return cfg, load_dense(Checkpoint(lowmoe.DEFAULT_MODEL), cfg)


def header_dense_bytes():
    """From the safetensors header: every tensor but the routed experts, matrices as stored plus an
    f32 bias row each (the zeros the upload adds, or the bias itself), vectors as f32."""
    ckpt = Checkpoint(lowmoe.DEFAULT_MODEL)
    total = 0
    for name, t in ckpt.tensors.items():
        if ".experts." in name:
            continue
        total += t.nbytes + 4 * t.shape[0] if len(t.shape) == 2 else 4 * t.shape[0]
    return total


def test_device_bytes_counts_what_the_upload_allocates(bundled):
    cfg, dense = bundled
    assert device_bytes(dense) == header_dense_bytes()
    # by hand: embed (tied, once) + final norm + 8 x (2 norms, q/k norms, q k v o + router with bias rows)
    embed = 4096 * 256 * 2 + 4 * 4096
    layer = 2 * 1024 + 2 * 256 + (256 * 256 * 2 + 1024) * 2 + (128 * 256 * 2 + 512) * 2 + 16 * 256 * 2 + 64
    assert device_bytes(dense) == embed + 1024 + 8 * layer


def test_vram_plan_gives_the_rest_to_expert_slots(bundled):
    cfg, dense = bundled
    d = device_bytes(dense)
    fixed = d + KV_8K + WORK
    plan = plan_vram(str(fixed + 54 * SLOT + 100), cfg, d, SLOT, 8192, 4, "f16")
    assert (plan.dense, plan.kv, plan.workspace) == (d, KV_8K, WORK)
    more = 2 * 8 * (2 * 8192 * 64 * 2)  # an f32 cache: 2 more bytes an element
    f32 = plan_vram(str(fixed + more + 54 * SLOT + 100), cfg, d, SLOT, 8192, 4, "f32")
    assert (f32.kv, f32.cache.slots) == (KV_8K + more, 50)
    assert (plan.cache.slots, plan.cache.staging, plan.cache.slot_bytes) == (50, 4, SLOT)
    assert plan.describe()["vram_unplanned_bytes"] == 100
    assert plan_vram("1GiB", cfg, d, SLOT, 8192, 8, "f16").cache.slots == 128  # never more slots than experts
    kv_200 = 2 * 8 * (2 * 200 * 64 * 2) + 2 * 200 * 32 * 4
    small = plan_vram(str(fixed - KV_8K + kv_200 + 20 * SLOT), cfg, d, SLOT, 200, 4, "f16")
    assert small.cache.slots == 16  # a shorter context leaves more for slots


def test_too_small_a_vram_budget_names_the_minimum(bundled):
    cfg, dense = bundled
    d = device_bytes(dense)
    minimum = d + KV_8K + WORK + (4 + 8) * SLOT
    with pytest.raises(lowmoe.InputError, match=rf"minimum is .* \({minimum} bytes: dense weights") as e:
        plan_vram(str(minimum - 1), cfg, d, SLOT, 8192, 8, "f16")
    assert "\n" not in str(e.value) and "KV cache for 8192 tokens" in str(e.value)
    assert plan_vram(str(minimum), cfg, d, SLOT, 8192, 8, "f16").cache.slots == 4
    with pytest.raises(lowmoe.InputError, match="VRAM budget '12 apples'"):
        plan_vram("12 apples", cfg, d, SLOT, 8192, 8, "f16")


def test_info_prints_the_vram_plan(capsys):
    d = header_dense_bytes()
    budget = d + KV_8K + WORK + 40 * SLOT
    assert cli(["info", "--json", "--vram-budget", str(budget)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["vram_expert_slots"] == 36 and info["vram_staging_slots"] == 4
    assert (info["vram_dense_bytes"], info["vram_kv_cache_bytes"], info["vram_workspace_bytes"]) == (d, KV_8K, WORK)
    assert cli(["info", "--json", "--vram-budget", str(budget), "--context", "8000", "--lookahead", "2"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["vram_kv_context_tokens"] == 8000 and info["vram_staging_slots"] == 8
    kv = KV_8K // 8192 * 8000  # KV bytes are linear in the context
    assert info["vram_expert_slots"] == (budget - d - kv - WORK) // SLOT - 8 == 37
    assert cli(["info", "--vram-budget", "1MB"]) == 2
    err = capsys.readouterr().err
    assert "minimum is" in err and err.count("\n") == 1


# Exact binary fractions: one expert 1 MiB at 1 GiB/s moves in 2^-10 s (its copy alone at 4 GiB/s
# in 2^-12 s); the CPU takes 2^-12 s per expert and 2^-12 s for the round trip, so CPU-MoE costs
# 8 x 2^-12 + 2^-12 = 9 x 2^-12 s per layer.
COSTS = Costs(expert_bytes=2**20, transfer_bytes_s=2**30, copy_bytes_s=2**32, cpu_expert_s=2**-12, roundtrip_s=2**-12)


@pytest.mark.parametrize("hit_rate,gpu_s,cpu_wins", [
    (0.0, 8 * 2**-10, True),  # every expert copied: 8 ms vs 2.2 ms
    (0.5, 4 * 2**-10, True),
    (0.71875, 2.25 * 2**-10, False),  # GPU 9 x 2^-12 = CPU: a tie keeps the GPU
    (0.75, 2 * 2**-10, False),
    (1.0, 0.0, False),
])
def test_cpu_moe_decision_from_the_cost_model(hit_rate, gpu_s, cpu_wins):
    d = choose_cpu_moe(COSTS, 8, hit_rate)
    assert (d.gpu_cache_s, d.cpu_moe_s, d.cpu_moe) == (gpu_s, 9 * 2**-12, cpu_wins)
    assert ("CPU-MoE" if cpu_wins else "GPU expert cache") in d.describe().split(":")[0]


def test_faster_copies_or_a_slower_cpu_move_the_decision_to_the_gpu():
    assert choose_cpu_moe(COSTS, 8, 0.5).cpu_moe
    assert not choose_cpu_moe(replace(COSTS, transfer_bytes_s=2**32), 8, 0.5).cpu_moe  # 4x the bandwidth
    assert not choose_cpu_moe(replace(COSTS, cpu_expert_s=2**-9), 8, 0.5).cpu_moe  # 8x the CPU time


def test_misses_go_to_the_cpu_only_when_it_beats_the_copy():
    # the copy takes 2^-12 s: a CPU as fast is not faster; half the time is; a slow link moves it there
    assert not misses_on_cpu(COSTS)
    assert misses_on_cpu(replace(COSTS, cpu_expert_s=2**-13))
    assert misses_on_cpu(replace(COSTS, copy_bytes_s=2**31))


def test_miss_policy_options():
    assert EngineConfig.from_options(env={"SHARPI_MISS_POLICY": "cpu"}, device="cuda").miss_policy == "cpu"
    for options, words in ((dict(miss_policy="cpu"), "needs device 'cuda'"),
                           (dict(device="cuda", miss_policy="cpu", cpu_moe=True), "experts on the GPU"),
                           (dict(device="cuda", miss_policy="fast"), "expected one of wait, cpu, auto")):
        with pytest.raises(InputError, match=words):
            EngineConfig.from_options(env={}, **options)


def test_vram_options():
    c = EngineConfig.from_options(env={"SHARPI_VRAM_BUDGET": "12GiB"}, device="cuda")
    assert (c.vram_budget, c.max_context) == ("12GiB", 8192)
    assert EngineConfig.from_options(env={"SHARPI_VRAM_BUDGET": "12GiB"}, device="cuda", vram_budget="8GiB").vram_budget == "8GiB"
    for options, words in ((dict(vram_budget="12GiB"), "needs device 'cuda'"),
                           (dict(device="cuda", vram_budget="12GiB", expert_cache="25%"), "not both"),
                           (dict(device="cuda", vram_budget="12GiB", cpu_moe=True), "SHARPI_CPU_MOE=1"),
                           (dict(device="cuda", max_context=0), "max_context")):
        with pytest.raises(lowmoe.InputError, match=words):
            EngineConfig.from_options(env={}, **options)
    assert EngineConfig.from_options(env={"SHARPI_CPU_MOE": "1"}, device="cuda", expert_cache="25%").cpu_moe
