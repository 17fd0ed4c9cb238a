"""Experts out of core: output identical to the all-resident run whatever the budget, the slow
tier or the I/O timing; faults surface as clear errors in bounded time; memory stays in budget."""

import json
import os
import random
import threading
import time

import numpy as np
import pytest

import lowmoe
from lowmoe.tier.budget import plan_cache
from lowmoe.cli.__main__ import main as cli
from lowmoe.load.config import EngineConfig
from lowmoe.tier.pack import pack_model

BUDGETS = ["min", "10%", "25%", "50%", "100%"]
PROMPT = [5, 17, 300, 42, 9, 77, 1000, 3, 12, 250, 8, 64]
NEW = 16


def _run(engine, prompt):
    """(greedy tokens, full-sequence logits, generation stats) of one engine."""
    gen = engine.generate(prompt, NEW, stop_at_eos=False)
    return gen.tokens, engine.logits(prompt + gen.tokens[:4]), gen.stats


@pytest.fixture(scope="module")
def bundled_packed(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("packed") / "default")
    pack_model(lowmoe.DEFAULT_MODEL, out)
    return out


@pytest.fixture(scope="module")
def bundled_reference():
    with lowmoe.Engine.from_pretrained() as e:
        return _run(e, PROMPT)


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("storage", ["checkpoint", "packed", "ram"])
def test_bundled_model_identical_for_every_budget_and_storage(budget, storage, bundled_packed, bundled_reference):
    path = bundled_packed if storage == "packed" else lowmoe.DEFAULT_MODEL
    with lowmoe.Engine.from_pretrained(path, expert_cache=budget, storage=storage) as e:
        tokens, logits, stats = _run(e, PROMPT)
    ref_tokens, ref_logits, _ = bundled_reference
    assert tokens == ref_tokens
    assert np.array_equal(logits, ref_logits)  # bit-identical, not merely close
    assert stats["hits"] + stats["prefetched"] + stats["misses"] == (NEW - 1) * 8 * 4  # steps x MoE layers x top-4
    if budget in ("min", "10%"):
        assert stats["misses"] > 0 and stats["bytes_read"] > 0


@pytest.mark.parametrize("kv_dtype", ["f16", "bf16", "f32"])
def test_output_is_the_same_for_every_budget_and_predictor_at_each_kv_dtype(kv_dtype):
    with lowmoe.Engine.from_pretrained(kv_dtype=kv_dtype) as e:
        ref_tokens, ref_logits, _ = _run(e, PROMPT)
    for options in (dict(expert_cache="min", predictor="none"), dict(expert_cache="25%", predictor="nextgate"),
                    dict(expert_cache="min", predictor="history")):
        with lowmoe.Engine.from_pretrained(kv_dtype=kv_dtype, **options) as e:
            tokens, logits, _ = _run(e, PROMPT)
        assert tokens == ref_tokens and np.array_equal(logits, ref_logits), options


@pytest.mark.parametrize("name", ["mixtral_f32", "mixtral_bf16_sharded", "qwen2_moe_f32", "qwen2_moe_bf16",
                                  "qwen3_moe_f32", "qwen3_moe_f16_sharded", "olmoe_f32", "olmoe_bf16",
                                  "qwen3_5_moe_f32", "qwen3_5_moe_bf16"])
def test_parity_checkpoints_identical_for_every_budget_and_storage(name, test_models, tmp_path):
    path = test_models[name]
    packed = str(tmp_path / "packed")
    pack_model(path, packed)
    with lowmoe.Engine.from_pretrained(path) as e:
        ref = _run(e, [5, 6, 7, 8, 9])
    runs = [(path, b, "checkpoint") for b in BUDGETS] + [(packed, "min", "packed"), (path, "min", "ram")]
    for model, budget, storage in runs:
        try:
            e = lowmoe.Engine.from_pretrained(model, expert_cache=budget, storage=storage)
        except lowmoe.InputError as err:  # 10% of 8 experts is less than one layer's top-k
            assert budget == "10%" and "minimum" in str(err)
            continue
        with e:
            got = _run(e, [5, 6, 7, 8, 9])
        assert got[0] == ref[0], (budget, storage)
        assert np.array_equal(got[1], ref[1]), (budget, storage)


def test_stats_count_every_expert_use():
    with lowmoe.Engine.from_pretrained(expert_cache="min", predictor="none") as e:
        _, _, stats = _run(e, PROMPT)
        cfg = e.config
        part = e.model.experts.slab.layout.part
    uses = (NEW - 1) * len(cfg.moe_layers) * cfg.top_k  # decode steps x MoE layers x experts per token
    assert stats["hits"] + stats["misses"] == uses
    assert stats["bytes_read"] == stats["misses"] * 3 * part
    assert len(stats["per_layer"]) == len(cfg.moe_layers)
    assert sum(s["misses"] for s in stats["per_layer"]) == stats["misses"]
    assert stats["stall_s"] >= 0 and 0 <= stats["cache_hit_rate"] <= 1


class FlakyStore:
    """Wraps a store: random delays, and the reads listed in `fail` raise once (transient)."""

    def __init__(self, store, fail=(), delay_s=0.003, always_fail=False, hang=None):
        self.store, self.layout = store, store.layout
        self.fail, self.delay_s, self.always_fail, self.hang = set(fail), delay_s, always_fail, hang
        self.rng = random.Random(0)
        self.lock = threading.Lock()

    def read(self, layer, expert, dest):
        time.sleep(self.rng.random() * self.delay_s)
        if self.hang is not None:
            self.hang.wait()
        with self.lock:
            once = (layer, expert) in self.fail
            self.fail.discard((layer, expert))
        if once or self.always_fail:
            raise OSError(5, "Input/output error (injected)")
        return self.store.read(layer, expert, dest)

    def close(self):
        self.store.close()


def _with_store(engine, wrap):
    tier = engine.model.experts.tier
    tier.store = wrap(tier.store)
    return engine


def test_random_delays_and_a_transient_failure_give_identical_output(bundled_reference):
    cfg = lowmoe.Engine.from_pretrained().config
    fail = {(layer, e) for layer in cfg.moe_layers for e in range(0, cfg.num_experts, 3)}
    with lowmoe.Engine.from_pretrained(expert_cache="10%") as e:
        _with_store(e, lambda s: FlakyStore(s, fail=fail))
        tokens, logits, stats = _run(e, PROMPT)
    assert tokens == bundled_reference[0]
    assert np.array_equal(logits, bundled_reference[1])
    assert stats["read_retries"] > 0


def test_a_read_that_keeps_failing_is_a_clear_error():
    with lowmoe.Engine.from_pretrained(expert_cache="min") as e:
        _with_store(e, lambda s: FlakyStore(s, always_fail=True))
        t0 = time.perf_counter()
        with pytest.raises(lowmoe.StorageError, match="failed twice"):
            e.generate(PROMPT, 4)
        assert time.perf_counter() - t0 < 10


def test_a_hung_read_times_out_and_the_engine_refuses_further_work():
    hang = threading.Event()
    with lowmoe.Engine.from_pretrained(expert_cache="min", read_timeout_s=0.3) as e:
        _with_store(e, lambda s: FlakyStore(s, hang=hang))
        t0 = time.perf_counter()
        with pytest.raises(lowmoe.StorageError, match="did not finish within"):
            e.generate(PROMPT, 4)
        assert time.perf_counter() - t0 < 10
        with pytest.raises(lowmoe.StorageError, match="reload the engine"):
            e.generate(PROMPT, 4)
        hang.set()


def test_truncated_packed_store_is_detected(tmp_path):
    out = str(tmp_path / "p")
    pack_model(lowmoe.DEFAULT_MODEL, out)
    path = os.path.join(out, "experts.bin")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 4096)
    with pytest.raises(lowmoe.CheckpointError, match="experts.bin"):
        lowmoe.Engine.from_pretrained(out, expert_cache="25%")


@pytest.mark.parametrize("budget", ["1.2MB", "1.5MiB", "2.5MiB", "10%", "min"])
def test_memory_stays_inside_the_budget(budget):
    with lowmoe.Engine.from_pretrained(expert_cache=budget) as e:
        experts = e.model.experts
        plan = experts.plan
        assert experts.slab.nbytes == plan.nbytes == (plan.slots + plan.staging) * plan.slot_bytes
        if budget[-1] == "B":
            limit = {"1.2MB": 1.2e6, "1.5MiB": 1.5 * 2**20, "2.5MiB": 2.5 * 2**20}[budget]
            assert experts.slab.nbytes <= limit
        e.generate(PROMPT, 6)
        assert len(experts.cache) <= plan.slots


def test_budget_parsing_and_minimum():
    cfg = lowmoe.Engine.from_pretrained().config  # 8 MoE layers x 16 experts, top-4
    block = 147456  # bytes per expert slot of the bundled model
    assert plan_cache("min", cfg, block).slots == 4
    assert plan_cache("25%", cfg, block).slots == 32
    assert plan_cache("100%", cfg, block).slots == 128
    assert plan_cache("1GiB", cfg, block).slots == 128  # never more slots than experts
    assert plan_cache("2MB", cfg, block).slots == 2_000_000 // block - 4
    assert plan_cache("10%", cfg, block).fraction == 13 / 128
    with pytest.raises(lowmoe.InputError, match=r"minimum is 1\.12 MiB \(1179648 bytes"):
        plan_cache("1MB", cfg, block)
    for bad in ("lots", "0%", "150%", "12XB"):
        with pytest.raises(lowmoe.InputError, match="expert cache budget"):
            plan_cache(bad, cfg, block)


def test_environment_maps_onto_engine_config():
    env = {"SHARPI_EXPERT_CACHE": "25%", "SHARPI_STORAGE": "ram", "SHARPI_READERS": "3", "SHARPI_CPU_MOE": "1"}
    c = EngineConfig.from_options(env=env)
    assert (c.expert_cache, c.storage, c.readers, c.cpu_moe) == ("25%", "ram", 3, True)
    assert EngineConfig.from_options(env=env, expert_cache="min", readers=1).expert_cache == "min"  # option wins
    with pytest.raises(lowmoe.InputError, match="GPU expert path"):
        EngineConfig.from_options(env={"SHARPI_CPU_MOE": "0"})
    assert EngineConfig.from_options(env={}).kv_dtype == "f16"
    assert EngineConfig.from_options(env={"SHARPI_KV_DTYPE": "bf16"}).kv_dtype == "bf16"
    assert EngineConfig.from_options(env={"SHARPI_KV_DTYPE": "bf16"}, kv_dtype="f32").kv_dtype == "f32"
    for var, bad, words in (("SHARPI_CPU_MOE", "yes", "SHARPI_CPU_MOE"), ("SHARPI_READERS", "two", "SHARPI_READERS"),
                            ("SHARPI_STORAGE", "tape", "storage"), ("SHARPI_KV_DTYPE", "f8", "KV cache dtype 'f8'")):
        with pytest.raises(lowmoe.InputError, match=words):
            EngineConfig.from_options(env={var: bad})


def test_cli_budget_plan_and_stats(capsys):
    assert cli(["info", "--expert-cache", "25%", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["cache_slots"], info["staging_slots"], info["fraction_cached"]) == (32, 4, 0.25)
    kv = 8 * 2 * 2 * 64 * 2  # bytes a position: 8 layers, k and v, 2 KV heads of 64, f16
    rope = 2 * 8192 * 32 * 4  # the cos and sin tables, f32 [8192, 32]
    assert info["host_plan_bytes"] == info["dense_bytes"] + (32 + 4) * 147456 + 8192 * kv + rope
    assert cli(["decode", "--prompt-ids", "5,6,7", "--max-new-tokens", "4", "--expert-cache", "min", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"hits", "misses", "bytes_read", "stall_s", "per_layer"} <= set(out)
    assert cli(["decode", "--prompt-ids", "5", "--expert-cache", "100KB"]) == 2
    assert "minimum" in capsys.readouterr().err
