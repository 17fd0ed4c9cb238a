"""The slow tier (store.py) and the packed format (pack.py, `lowmoe pack`), checked against the
safetensors library's own view of the checkpoints: f32 (one file), f16 (sharded, MoE layers 1 and
3 only, blocks over 4 KiB) and the bundled bf16 model."""

import errno
import fcntl
import hashlib
import json
import os
import random
import shutil
import struct
import threading
from dataclasses import replace

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import lowmoe
import tiny_model
from lowmoe.load.checkpoint import Checkpoint
from lowmoe.cli.__main__ import main as cli
from lowmoe.load.config import load_model_config
from lowmoe.errors import CheckpointError, InputError
from lowmoe.tier.pack import pack_model
from lowmoe.tier.slots import ALIGN, Slab, aligned_empty
from lowmoe.tier.store import CheckpointStore, PackedStore, RamStore, is_packed, open_store
from lowmoe.load.weights import load_dense

KINDS = ["checkpoint", "packed", "ram", "ram-from-packed"]
MODELS = ["f32", "f16", "bf16"]


def _write_model(path, dtype, config_overrides, shards):
    """A tiny Qwen3-MoE checkpoint in `dtype`, split over `shards` files with an index."""
    cfg = dict(tiny_model.CONFIG, **config_overrides)
    ts = {k: v.astype(dtype) for k, v in tiny_model.tensors(cfg).items()}
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    weight_map = {}
    for i, names in enumerate(np.array_split(sorted(ts), shards)):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: ts[n] for n in names}, os.path.join(path, file))
        weight_map.update({n: file for n in names})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return path


def _raw_tensors(path):
    """{name: (dtype, shape, bytes)} of one safetensors file, from the header's offsets."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    header.pop("__metadata__", None)
    return {k: (v["dtype"], v["shape"], data[v["data_offsets"][0] : v["data_offsets"][1]]) for k, v in header.items()}


def _reference(model_dir):
    """{tensor name: bytes}: safe_open for F32/F16; raw bytes at the header's offsets for BF16
    (numpy has no bfloat16)."""
    out = {}
    for file in sorted(os.listdir(model_dir)):
        if not file.endswith(".safetensors"):
            continue
        path = os.path.join(model_dir, file)
        raw = _raw_tensors(path)
        with safe_open(path, "np") as f:
            for name in f.keys():
                out[name] = raw[name][2] if raw[name][0] == "BF16" else f.get_tensor(name).tobytes()
    return out


def _hashes(folder):
    return {n: hashlib.sha256(open(os.path.join(folder, n), "rb").read()).hexdigest() for n in sorted(os.listdir(folder))}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{name: (model dir, packed dir, reference bytes)}; inputs hashed before and after packing."""
    root = tmp_path_factory.mktemp("store")
    src = {
        "f32": tiny_model.write_tiny_model(str(root / "f32")),
        "f16": _write_model(str(root / "f16"), np.float16, dict(
            num_hidden_layers=4, decoder_sparse_step=2, hidden_size=32, moe_intermediate_size=40, head_dim=8), shards=3),
        "bf16": lowmoe.DEFAULT_MODEL,
    }
    out = {}
    for name, path in src.items():
        before = _hashes(path)
        packed = str(root / f"{name}_packed")
        pack_model(path, packed)
        assert _hashes(path) == before, "pack modified its input"
        out[name] = (path, packed, _reference(path))
    return out


def _open(kind, model_dir, packed_dir):
    folder = packed_dir if kind in ("packed", "ram-from-packed") else model_dir
    return open_store(kind.split("-")[0], folder, Checkpoint(folder), load_model_config(folder))


def _check_all(store, cfg, ref, dest):
    p = store.layout.part
    for layer in cfg.moe_layers:
        for e in range(cfg.num_experts):
            dest[:] = 0xAB
            n = store.read(layer, e, dest)
            assert n == (store.layout.block if isinstance(store, PackedStore) else 3 * p)
            for i, name in enumerate(cfg.expert_tensor_names(layer, e)):
                assert dest[i * p : (i + 1) * p].tobytes() == ref[name], (layer, e, name)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("model", MODELS)
def test_store_reads_the_checkpoint_bytes(models, model, kind):
    src, packed, ref = models[model]
    cfg = load_model_config(src)
    before = _hashes(src)
    store = _open(kind, src, packed)
    want_dtype = {"f32": "f32", "f16": "f16", "bf16": "bf16"}[model]
    assert (store.layout.dtype, store.layout.inter, store.layout.hidden) == (want_dtype, cfg.expert_intermediate, cfg.hidden_size)
    assert (store.layers, store.experts) == (cfg.moe_layers, cfg.num_experts)
    if model == "f16":
        assert cfg.moe_layers == [1, 3] and store.layout.block > ALIGN
    if isinstance(store, RamStore):
        assert store.nbytes == len(cfg.moe_layers) * cfg.num_experts * store.layout.block
    _check_all(store, cfg, ref, Slab(store.layout, 1).block(0))
    store.close()
    assert _hashes(src) == before and is_packed(packed) and not is_packed(src)


@pytest.mark.parametrize("model", MODELS)
def test_packed_folder_is_a_loadable_model(models, model):
    src, packed, ref = models[model]
    cfg = load_model_config(src)
    assert load_model_config(packed) == cfg
    for name in ("config.json", "tokenizer.json", "generation_config.json"):
        if os.path.exists(os.path.join(src, name)):
            assert open(os.path.join(packed, name), "rb").read() == open(os.path.join(src, name), "rb").read()
    assert sorted(os.listdir(packed)) == sorted(
        ["config.json", "dense.safetensors", "experts.bin", "experts.json"]
        + [n for n in ("tokenizer.json", "generation_config.json") if os.path.exists(os.path.join(src, n))]
    )

    # dense.safetensors: exactly the non-expert tensors, bytes and dtypes as stored; the safetensors
    # library loads it (torch for bf16)
    experts = {n for l in cfg.moe_layers for e in range(cfg.num_experts) for n in cfg.expert_tensor_names(l, e)}
    dense = os.path.join(packed, "dense.safetensors")
    src_ckpt, ckpt = Checkpoint(src), Checkpoint(packed)
    assert set(ckpt.tensors) == set(ref) - experts
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    loaded = load_file(dense)
    assert set(loaded) == set(ref) - experts
    for name, t in loaded.items():
        assert t.contiguous().view(torch.uint8).numpy().tobytes() == ref[name], name
        s, d = src_ckpt.tensors[name], ckpt.tensors[name]
        assert (d.dtype, d.shape, d.nbytes) == (s.dtype, s.shape, s.nbytes)
    if model == "bf16":  # a real model: the engine's dense loader reads the packed folder
        load_dense(ckpt, cfg)

    with open(os.path.join(packed, "experts.json")) as f:
        index = json.load(f)
    layout = CheckpointStore(src_ckpt, cfg).layout
    assert index == {"format": "lowmoe-packed", "version": 1, "dtype": layout.dtype, "inter": layout.inter,
                     "hidden": layout.hidden, "block": layout.block, "layers": cfg.moe_layers,
                     "experts": cfg.num_experts, "file": "experts.bin"}
    assert layout.block % ALIGN == 0
    blocks = np.fromfile(os.path.join(packed, "experts.bin"), np.uint8).reshape(-1, layout.block)
    assert len(blocks) == len(cfg.moe_layers) * cfg.num_experts
    assert not blocks[:, 3 * layout.part :].any()  # zero padding
    l, e = cfg.moe_layers[-1], cfg.num_experts - 1  # the last block is the last (layer, expert)
    assert blocks[-1, : layout.part].tobytes() == ref[cfg.expert_tensor_names(l, e)[0]]


def test_concurrent_reads(models):
    src, packed, ref = models["bf16"]
    cfg = load_model_config(src)
    keys = [(l, e) for l in cfg.moe_layers for e in range(cfg.num_experts)]
    for kind in KINDS[:3]:
        store = _open(kind, src, packed)
        p, errors = store.layout.part, []

        def reader(seed):
            slab, order = Slab(store.layout, 4), keys * 2
            random.Random(seed).shuffle(order)
            try:
                for i, (l, e) in enumerate(order):
                    dest = slab.block(i % 4)
                    store.read(l, e, dest)
                    names = cfg.expert_tensor_names(l, e)
                    assert all(dest[j * p : (j + 1) * p].tobytes() == ref[names[j]] for j in range(3)), (kind, l, e)
            except Exception as exc:  # surfaces in the main thread below
                errors.append(exc)

        threads = [threading.Thread(target=reader, args=(s,)) for s in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        store.close()
        assert not errors, errors[0]


def _direct_supported(path):
    """Whether the file system of `path` takes an O_DIRECT open and an aligned read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    try:
        os.preadv(fd, [aligned_empty(ALIGN)], 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


needs_o_direct = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")


@needs_o_direct
def test_direct_io_where_the_file_system_allows_it(models, tmp_path):
    src, packed, ref = models["f16"]
    cfg = load_model_config(src)
    folders = [packed]
    if os.path.isdir("/dev/shm"):  # tmpfs: refuses O_DIRECT before Linux 6.6
        folders.append(shutil.copytree(packed, f"/dev/shm/lowmoe-test-{os.getpid()}"))
    try:
        for folder in folders:
            store = PackedStore(folder)
            assert store.direct == _direct_supported(os.path.join(folder, "experts.bin")), folder
            _check_all(store, cfg, ref, Slab(store.layout, 1).block(0))
            store.close()
    finally:
        for folder in folders[1:]:
            shutil.rmtree(folder)


@needs_o_direct
@pytest.mark.parametrize("refused_at", ["open", "first read"])
def test_buffered_fallback_when_o_direct_is_refused(models, monkeypatch, refused_at):
    src, packed, ref = models["f16"]
    real_open, real_preadv = os.open, os.preadv

    def fake_open(path, flags, *a):
        if refused_at == "open" and flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    def fake_preadv(fd, bufs, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, bufs, offset)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "preadv", fake_preadv)
    store = PackedStore(packed)
    assert store.direct is False
    _check_all(store, load_model_config(src), ref, Slab(store.layout, 1).block(0))
    store.close()

    def eacces(path, flags, *a):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "open", eacces)  # any other error is not a reason to fall back
    with pytest.raises(CheckpointError, match="experts.bin: cannot open"):
        PackedStore(packed)


def test_bad_packed_folders_are_clear_errors(models, tmp_path):
    cfg = load_model_config(models["f16"][0])
    block = CheckpointStore(Checkpoint(models["f16"][0]), cfg).layout.block
    n = len(cfg.moe_layers) * cfg.num_experts

    def truncate(size):
        return lambda folder: os.truncate(os.path.join(folder, "experts.bin"), size)

    def index(text):
        return lambda folder: open(os.path.join(folder, "experts.json"), "w").write(text)

    good = json.load(open(os.path.join(models["f16"][1], "experts.json")))
    cases = [
        (truncate(n * block - 1), rf"experts\.bin: truncated: block {n - 1} \(layer 3, expert 3\) at byte offset {(n - 1) * block}"),
        (truncate(0), r"experts\.bin: truncated: block 0 \(layer 1, expert 0\) at byte offset 0 "),
        (lambda folder: os.remove(os.path.join(folder, "experts.bin")), r"experts\.bin: cannot open"),
        (index("{not json"), r"experts\.json: corrupt packed index \(not valid JSON\)"),
        (index("[1, 2]"), r"experts\.json: not a packed index"),
        (index(json.dumps(dict(good, version=2))), r"experts\.json: packed format version 2"),
        (index(json.dumps(dict(good, block=good["block"] + 1))), r"experts\.json: corrupt packed index"),
        (index(json.dumps({k: v for k, v in good.items() if k != "layers"})), r"experts\.json: corrupt packed index"),
        (index(json.dumps(dict(good, inter="40"))), r"experts\.json: corrupt packed index"),
    ]
    for i, (edit, message) in enumerate(cases):
        folder = shutil.copytree(models["f16"][1], str(tmp_path / f"bad{i}"))
        edit(folder)
        with pytest.raises(CheckpointError, match=message):
            PackedStore(folder)
        with pytest.raises(CheckpointError, match=message):
            open_store("packed", folder, Checkpoint(folder), cfg)


def test_store_choice_errors(models):
    src, packed, _ = models["f16"]
    cfg = load_model_config(src)
    with pytest.raises(CheckpointError, match=r"not a packed model \(no experts\.json\).*lowmoe pack"):
        open_store("packed", src, Checkpoint(src), cfg)
    with pytest.raises(CheckpointError, match="packed model keeps its experts in experts.bin"):
        open_store("checkpoint", packed, Checkpoint(packed), cfg)
    with pytest.raises(CheckpointError, match=r"experts\.json: packed experts .* do not match config\.json"):
        open_store("packed", packed, Checkpoint(packed), replace(cfg, num_experts=cfg.num_experts - 1))
    with pytest.raises(InputError, match="unknown expert store 'disk'"):
        open_store("disk", src, Checkpoint(src), cfg)


def test_mixed_expert_dtypes_are_an_error(tmp_path):
    name = "model.layers.1.mlp.experts.2.up_proj.weight"
    up = tiny_model.tensors(tiny_model.CONFIG)[name].astype(np.float16)
    path = tiny_model.write_tiny_model(str(tmp_path / "m"), tensor_overrides={name: up})
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: routed experts mix dtypes .*{name}: F16"):
        CheckpointStore(Checkpoint(path), load_model_config(path))


def test_short_reads_name_the_file_and_offset(models, tmp_path):
    # a file cut after the store was opened (validation at open cannot catch that)
    src = shutil.copytree(models["f32"][0], str(tmp_path / "src"))
    cfg, ckpt = load_model_config(src), Checkpoint(src)
    store = CheckpointStore(ckpt, cfg)
    last = max((ckpt.tensors[n].offset, l, e) for l in cfg.moe_layers for e in range(cfg.num_experts)
               for n in cfg.expert_tensor_names(l, e))
    os.truncate(os.path.join(src, "model.safetensors"), last[0] + 1)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: short read at offset {last[0]} \(1 of"):
        store.read(last[1], last[2], Slab(store.layout, 1).block(0))
    store.close()

    packed = shutil.copytree(models["f32"][1], str(tmp_path / "packed"))
    store = PackedStore(packed)
    os.truncate(store.path, store.layout.block)
    with pytest.raises(CheckpointError, match=rf"experts\.bin: short read at offset {store.layout.block} \(0 of"):
        store.read(cfg.moe_layers[0], 1, Slab(store.layout, 1).block(0))
    store.close()


def test_pack_refusals_and_interruption(models, tmp_path):
    src = models["f32"][0]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    (tmp_path / "file").write_text("x")
    for out in ("full", "file"):
        with pytest.raises(InputError, match="already exists and is not an empty folder"):
            pack_model(src, str(tmp_path / out))
    with pytest.raises(InputError, match="already packed"):
        pack_model(models["f32"][1], str(tmp_path / "again"))

    def stop(done, total):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pack_model(src, str(tmp_path / "out"), stop)
    assert sorted(os.listdir(tmp_path)) == ["file", "full"]  # no OUT, no temporary folder

    (tmp_path / "empty").mkdir()
    seen = []
    blocks, nbytes = pack_model(src, str(tmp_path / "empty"), lambda done, total: seen.append((done, total)))
    assert blocks == 8 and seen == [(i, 8) for i in range(1, 9)]
    assert nbytes == sum(os.path.getsize(tmp_path / "empty" / n) for n in ("dense.safetensors", "experts.bin"))
    assert sorted(os.listdir(tmp_path)) == ["empty", "file", "full"]


def test_pack_cli(models, tmp_path, capsys):
    src = models["bf16"][0]
    out = str(tmp_path / "out")
    assert cli(["pack", src, out]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"packed 128 expert blocks, ") and "MB/s" in lines[0]
    assert is_packed(out)

    assert cli(["pack", src, out]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.splitlines() == [f"lowmoe pack: error: {out}: already exists and is not an empty folder"]

    missing = str(tmp_path / "nope")
    assert cli(["pack", missing, str(tmp_path / "o2")]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"lowmoe pack: error: {missing}: no such model folder"]
    assert not os.path.exists(tmp_path / "o2")
