"""tools/gpu_counts.py's count of kernel launches and host syncs per decoded token, run on the CPU
stand-in for CuPy (tests/host_cupy.py: the kernels of native/ built for the host), against counts
derived from the decoder's structure (model.py's Model.forward, backend/cuda.py, tier/placement.py).
On a GPU, gpu_check reports the same counts for the same placements as rows of its table."""

import dataclasses
import os
import sys

import numpy as np
import pytest

import lowmoe
from lowmoe.backend import cuda


sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import gpu_counts  # noqa: E402  (tools/)

PROMPT = [5, 17, 300]
STEPS = 3


class DeviceArray(np.ndarray):
    """The stand-in's device arrays: NumPy's, told from host arrays as cupy.ndarray is on a GPU, so
    that gpu_counts.counting counts only real uploads and syncs (an asnumpy of a host array is none)."""


def _on_device(make):
    return lambda *args, **kwargs: make(*args, **kwargs).view(DeviceArray)


@pytest.fixture
def host_gpu(host_gpu, monkeypatch):
    """conftest's host stand-in for cupy, its arrays DeviceArray; no NaN fills (POISON), as
    gpu_check counts."""
    cp = host_gpu
    for name in ("empty", "full", "zeros", "ones", "arange", "asarray"):
        setattr(cp, name, _on_device(getattr(cp, name)))
    cp.ascontiguousarray = lambda a, dtype=None: np.require(a, dtype, "C")  # keeps the type, copies only when needed
    cp.ndarray = DeviceArray
    monkeypatch.setattr(cuda, "POISON", False)
    return cp


@pytest.fixture
def fake_copies(host_gpu, monkeypatch):
    """The GPU expert cache on tests/fake_device.py's streams, its expert sums the kernels'
    (cuda_device.SlotSum), launched from the decode thread as on a GPU. That thread cannot wait on
    a fake stream, so a copy lands as it is enqueued: else a kernel could read a slot before its
    copy, and NaN logits route to no expert (ids out of range)."""
    from fake_device import FakeDevice

    from lowmoe.tier import cuda_device, placement

    class Device(FakeDevice):
        def copy(self, dst, src, stream):
            np.copyto(dst, src)

        def expert_sum(self, slab, u, idx, w, rows, layout):
            return cuda_device.SlotSum(host_gpu, slab, u, idx, w, layout)

    monkeypatch.setattr(placement, "CupyDevice", Device)


def launches(cfg, where, refined=False):
    """lowmoe kernels one decoded token launches. Outside the layers: embed, the final norm and the
    lm_head linear. Per layer, attention: input norm, q, k and v linears, the q and k norms (when
    the architecture has them), RoPE of q and of k, the KV store, attention's split and combine
    kernels, the o linear; Gated DeltaNet: input norm, the qkv linear, the conv, the L2 norms of q and of k, the b
    and a linears, their gates, the delta rule, the z linear, the gated norm, the out linear. Then
    the MLP's input norm and, in a dense layer, expert_ffn: gate_up, down and combine (one token
    takes the GEMV kernels). In a MoE layer: the router linear, top-k, then the routed experts:
    gate_up, down and combine on the device ("resident", and "slots" in one group, as the cache
    has at least top_k slots), none on the GPU with CPU-MoE ("host"); a shared expert adds its
    gate's linear and an expert_ffn. With a predictor, each MoE layer's hint is refined first: a
    norm and the router's linear on the layer's input."""
    mixer = {"attention": 1 + 3 + (2 if cfg.qk_norm != "none" else 0) + 2 + 1 + 2 + 1, "linear": 12}
    routed = 0 if where == "host" else 3
    moe = 1 + 1 + routed + (1 + 3 if cfg.shared_expert_intermediate else 0)
    refine = 2 if refined else 0
    return 3 + sum(mixer[m] + 1 + (moe + refine if sparse else 3) for m, sparse in zip(cfg.layer_mixers, cfg.sparse_layers))


def cupy_kernels(cfg):
    """CuPy kernels lowmoe calls by name per decoded token (no POISON fills): each expert_ffn (a
    dense layer's MLP, a shared expert) fills its one expert's id and weight (zeros, ones); the
    shared expert's sigmoid gate takes an exp; clip_qkv clips q, k and v in every layer; a gated
    attention copies its query out of q_proj's output and takes its gate's exp."""
    ffns = sum(1 for sparse in cfg.sparse_layers if not sparse or cfg.shared_expert_intermediate)
    shared = len(cfg.moe_layers) if cfg.shared_expert_intermediate else 0
    gated = 2 * cfg.layer_mixers.count("attention") if cfg.attn_gate else 0
    return 2 * ffns + shared + (3 * cfg.num_layers if cfg.clip_qkv else 0) + gated


def syncs(cfg, label):
    """Host waits per decoded token: the logits; with an expert cache each MoE layer's expert ids
    (the policy runs on the host), and with a predictor its input, the layer's hidden state; with
    CPU-MoE each MoE layer's ids, u and w, a copy each; with a predictor also the refinement's router
    logits."""
    return 1 + {"resident": 0, "slots": 1, "slots nextgate": 3, "cpu-moe": 3}[label] * len(cfg.moe_layers)


def uploads(cfg, where):
    """Host-to-device copies per decoded token: the token id; per MoE layer, the slot ids of the
    cache's one group, or CPU-MoE's sum."""
    return 1 + (0 if where == "resident" else len(cfg.moe_layers))


def _counts(path, label):
    options, per_layer = gpu_counts.PLACEMENTS[label]
    with lowmoe.Engine.from_pretrained(path, device="cuda", **options) as e:
        per_step = gpu_counts.decode_counts(e, PROMPT, STEPS)
        cfg, where = e.config, e.model.where
    assert len(per_step) == STEPS and all(n == per_step[0] for n in per_step), per_step  # every step alike
    n = per_step[0]
    assert n["syncs"] == 1 + per_layer * len(cfg.moe_layers)  # gpu_check's own expectation, so its row passes
    return cfg, where, n


@pytest.mark.parametrize("label,where", [("resident", "resident"), ("slots", "slots"), ("slots nextgate", "slots"),
                                         ("cpu-moe", "host")])
def test_launches_and_syncs_per_token(host_gpu, fake_copies, label, where):
    """The bundled model (8 layers, all MoE, per-head q/k norm): 147 launches a token with the
    experts on the device (163 with nextgate's refined hints, 123 with CPU-MoE), 1 host sync in
    resident mode, 1 + 8 with an expert cache (1 + 3 x 8 with nextgate's hints and their
    refinement), 1 + 3 x 8 with CPU-MoE. No CuPy kernel is called by
    name: no clipping, no shared expert, every matrix has a bias on the device, no fills without
    POISON, and the q, k and last-row arrays are contiguous already."""
    cfg, got, n = _counts(lowmoe.DEFAULT_MODEL, label)
    assert got == where
    assert cupy_kernels(cfg) == 0
    assert n == dict(launches=launches(cfg, where, label == "slots nextgate"), cupy=0, uploads=uploads(cfg, where),
                     syncs=syncs(cfg, label))
    if where == "resident":
        assert n["syncs"] == 1


def test_launches_per_token_on_every_architecture(host_gpu, test_models):
    """Mixtral, Qwen2-MoE (dense layers, shared expert and its gate, qkv bias), Qwen3-MoE (a dense
    layer), OLMoE (full q/k norm, clip_qkv), Qwen3.5-MoE (Gated DeltaNet and gated attention),
    every expert resident: the derived counts."""
    for name, path in test_models.items():
        cfg, where, n = _counts(path, "resident")
        assert n == dict(launches=launches(cfg, where), cupy=cupy_kernels(cfg), uploads=1, syncs=1), name


def test_layout_model_counts(host_gpu, tmp_path):
    """gpu_check's Qwen3-30B-A3B layout model loads and counts as derived (128 experts, top 8,
    separate lm_head), here with 2 layers instead of 48 to stay fast on the stand-in."""
    path = gpu_counts.make_layout_model(str(tmp_path / "layout"), layers=2)
    cfg, where, n = _counts(path, "resident")
    assert (cfg.num_experts, cfg.top_k, len(cfg.moe_layers), cfg.tie_word_embeddings) == (128, 8, 2, False)
    assert n == dict(launches=launches(cfg, where), cupy=0, uploads=1, syncs=1)
    # At 48 layers, 867 lowmoe kernels: with CuPy's array operators (two residual adds a layer, not
    # counted) the "about 1,000 launches per token".
    assert launches(dataclasses.replace(cfg, num_layers=48, sparse_layers=(True,) * 48), where) == 3 + 18 * 48


def test_counting_counts_this_thread_and_restores_what_it_wrapped(host_gpu):
    """A reader thread's wait for its copy is not the decode's; the tier device's synchronize is
    wrapped on the instance and its class's method is back afterwards."""
    import threading

    class Dev:
        def synchronize(self, event=None):
            pass

    dev = Dev()
    launch, asnumpy = cuda._launch, host_gpu.asnumpy
    with gpu_counts.counting(dev) as n:
        cuda.to_host(cuda.to_device(np.ones(3, np.float32)))
        dev.synchronize()
        reader = threading.Thread(target=lambda: (dev.synchronize(), host_gpu.asnumpy(host_gpu.zeros(1))))
        reader.start()
        reader.join()
        assert cuda._launch is not launch
    assert (cuda._launch, host_gpu.asnumpy) == (launch, asnumpy) and "synchronize" not in vars(dev)
    assert n == dict(launches=0, cupy=0, uploads=1, syncs=2)
