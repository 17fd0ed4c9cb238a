"""`lowmoe quantize`: the files it writes hold, per tensor, the formats llama.cpp's llama-quantize
chose for the same checkpoints (tests/data/gguf, written by llama.cpp), the metadata its converter
wrote, weights that gguf's own dequantizer reads back within each format's error, and lowmoe
decodes them as transformers does on their dequantized weights. The importance matrix of --calib
equals one recorded by transformers' forward hooks. Bad input is a one-line error, exit 2, and
nothing is left behind."""

import os

import numpy as np
import pytest

import lowmoe
from lowmoe.cli.__main__ import main as cli
from lowmoe.load.gguf import GGUF
from lowmoe.quantize import write
from lowmoe.quantize.write import quantize_model

from test_gguf_engine import DATA, PROMPT, VARIANTS, _dequantized_transformers, _run

gguf = pytest.importorskip("gguf")
KINDS = ("q8_0", "q4_k_m")
# Relative RMS error of a tensor's weights read back, by format: what each format's rounding leaves
# on these small trained or random matrices (measured: q8_0 0.004, q5_0 0.04, q4_k 0.09, q6_k 0.02),
# with room; a wrong layout or scale reads back as noise of the weights' own size (about 1).
ERROR = {"f32": 0.0, "f16": 0.0005, "bf16": 0.004, "q8_0": 0.008, "q6_k": 0.04, "q5_0": 0.07, "q5_1": 0.07, "q5_k": 0.07, "q4_k": 0.14}


@pytest.fixture(scope="module")
def written(test_models, tmp_path_factory):
    """{(model name, kind): path of the GGUF lowmoe wrote} for the bundled model and the test
    checkpoints that llama.cpp's files in tests/data/gguf were made from."""
    out, tmp = {}, tmp_path_factory.mktemp("quantized")
    models = dict({v: test_models[v] for v in VARIANTS}, default=lowmoe.DEFAULT_MODEL)
    for name, path in models.items():
        for kind in KINDS + ("bf16",):
            out[name, kind] = str(tmp / f"{name}-{kind}.gguf")
            quantize_model(path, out[name, kind], kind)
    return out, models


def _formats(path):
    """{name: (ggml type, shape)}, outer 1s dropped: llama-quantize writes a [1, D] tensor as [D]."""
    return {name: (t.ggml_type, t.shape[1:] if len(t.shape) > 1 and t.shape[0] == 1 else t.shape)
            for name, t in GGUF(path).tensors.items()}


@pytest.mark.parametrize("name", VARIANTS + ("default",))
def test_each_tensor_gets_the_format_llama_quantize_gives_it(written, name):
    files, _ = written
    theirs = _formats(os.path.join(DATA, f"{name}-q4_k_m.gguf"))
    assert _formats(files[name, "q4_k_m"]) == theirs
    if name != "default":  # llama.cpp's converter wrote their Q8_0 and bf16 files
        for kind in ("q8_0", "bf16"):
            assert _formats(files[name, kind]) == _formats(os.path.join(DATA, f"{name}-{kind}.gguf"))


@pytest.mark.parametrize("name", VARIANTS)
def test_metadata_is_llama_cpps_converters(written, name):
    """Every `{arch}.*` key the converter wrote, with its value; general.file_type and the
    quantization version as llama-quantize sets them."""
    files, _ = written
    ours = GGUF(files[name, "q4_k_m"]).metadata
    theirs = GGUF(os.path.join(DATA, f"{name}-q4_k_m.gguf")).metadata
    arch = theirs["general.architecture"]
    assert ours["general.architecture"] == arch
    keys = [k for k in theirs if k.startswith(arch + ".") and k != f"{arch}.expert_weights_norm"]
    assert {k: ours.get(k) for k in keys} == {k: theirs[k] for k in keys}
    for k in ("general.file_type", "general.quantization_version"):
        assert ours[k] == theirs[k]
    reader = gguf.GGUFReader(files[name, "q4_k_m"])  # gguf's own reader takes the file whole
    assert {t.name for t in reader.tensors} == set(GGUF(files[name, "q4_k_m"]).tensors)
    assert set(theirs) - {"general.name", "general.size_label", "general.type"} <= set(reader.fields) | {
        k for k in theirs if k.startswith("tokenizer.")}


def test_the_tokenizer_is_the_converters():
    """The bundled model's vocabulary, merges, token types and special ids as llama.cpp's converter
    wrote them (tests/data/gguf/default-tokenizer.gguf)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.gguf")
        quantize_model(lowmoe.DEFAULT_MODEL, path, "q8_0")
        ours = GGUF(path).metadata
    theirs = GGUF(os.path.join(DATA, "default-tokenizer.gguf")).metadata
    keys = [k for k in theirs if k.startswith("tokenizer.")]
    assert keys and {k: ours.get(k) for k in keys} == {k: theirs[k] for k in keys}


@pytest.mark.parametrize("kind", KINDS + ("bf16",))
@pytest.mark.parametrize("name", VARIANTS + ("default",))
def test_every_tensor_reads_back_within_its_formats_error(written, name, kind):
    """gguf.quants.dequantize of each tensor against the checkpoint's weights (in the file's order:
    Mixtral's q and k rows permuted as llama.cpp's converter does)."""
    from lowmoe.load.checkpoint import Checkpoint
    from lowmoe.load.config import load_model_config
    from lowmoe.quantize.hf_gguf import plan

    files, models = written
    model = GGUF(files[name, kind])
    source = {t.name: t for t in plan(Checkpoint(models[name]), load_model_config(models[name]))}
    assert set(source) == set(model.tensors)
    for tname, info in model.tensors.items():
        x = source[tname].load()
        raw = model.read(tname)
        y = raw.view(np.float32).reshape(info.shape) if info.format == "f32" else \
            gguf.quants.dequantize(raw.reshape(*info.shape[:-1], -1), gguf.GGMLQuantizationType(info.ggml_type))
        err = np.linalg.norm(y - x) / max(np.linalg.norm(x), 1e-30)
        assert err <= ERROR[info.format], (tname, info.format, err)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", VARIANTS + ("default",))
def test_lowmoe_decodes_its_files_as_transformers_on_their_dequantized_weights(written, name, kind):
    import torch

    files, models = written
    hf = _dequantized_transformers(models[name], files[name, kind])
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        want = hf(torch.tensor([PROMPT])).logits[0].numpy()
        greedy = hf.generate(torch.tensor([PROMPT]), max_new_tokens=32, do_sample=False)[0, len(PROMPT):].tolist()
    with lowmoe.Engine.from_pretrained(files[name, kind], kv_dtype="f32") as e:
        logits, tokens = _run(e)
    assert np.abs(logits - want).max() <= 1e-4 * np.abs(want).max()
    assert tokens == greedy


def test_the_importance_matrix_is_the_mean_squared_input_of_each_matrix():
    """collect() against transformers' float32 model of the bundled checkpoint, with forward hooks:
    the mean over tokens of x^2, per input column, of each attention projection and the lm_head;
    for each expert, over the tokens its router sent it (top-k of the router's logits, here), of its
    input and of its down projection's input silu(gate x) * (up x)."""
    import torch
    import transformers

    from lowmoe.quantize.imatrix import collect

    ids = list(range(5, 300, 3))
    hf = transformers.AutoModelForCausalLM.from_pretrained(lowmoe.DEFAULT_MODEL, dtype=torch.float32).eval()
    inputs = {}

    def hook(name):
        def record(module, args):
            inputs[name] = args[0].reshape(-1, args[0].shape[-1]).double().numpy()
        return record

    for i, layer in enumerate(hf.model.layers):
        for x, g in (("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v"), ("o", "attn_output")):
            getattr(layer.self_attn, f"{x}_proj").register_forward_pre_hook(hook(f"blk.{i}.{g}.weight"))
        layer.mlp.register_forward_pre_hook(hook(i))
    hf.lm_head.register_forward_pre_hook(hook("token_embd.weight"))  # tied: the embedding is the output
    with torch.no_grad():
        hf(torch.tensor([ids]))
    with lowmoe.Engine.from_pretrained(kv_dtype="f32") as e:
        got = collect(e, ids)
        cfg = e.config
    want = {name: (x * x).mean(0) for name, x in inputs.items() if isinstance(name, str)}
    for i, layer in enumerate(hf.model.layers):
        u = inputs[i]  # [T, D] the MLP's input
        router = layer.mlp.gate.weight.detach().double().numpy()
        top = np.argsort(-(u @ router.T), 1, kind="stable")[:, : cfg.top_k]
        gate_up = layer.mlp.experts.gate_up_proj.detach().double().numpy()  # [E, 2I, D]
        for role in ("gate", "up", "down"):
            want[f"blk.{i}.ffn_{role}_exps.weight"] = []
        for ex in range(cfg.num_experts):
            x = u[(top == ex).any(1)]
            g, up = np.split(x @ gate_up[ex].T, 2, axis=1)
            h = g / (1 + np.exp(-g)) * up
            for role, a in (("gate", x), ("up", x), ("down", h)):
                want[f"blk.{i}.ffn_{role}_exps.weight"].append((a * a).mean(0) if len(a) else None)
    for name, w in want.items():
        if isinstance(w, list):  # experts that saw no token get their layer's mean (not checked)
            seen = [e for e, r in enumerate(w) if r is not None]
            assert len(seen) > cfg.num_experts // 2
            np.testing.assert_allclose(got[name][seen], np.stack([w[e] for e in seen]), rtol=2e-3, atol=1e-6)
        else:
            np.testing.assert_allclose(got[name], w, rtol=2e-3, atol=1e-7)


def test_cli_writes_a_file_and_refuses_bad_input(tmp_path, tmp_path_factory, capsys):
    from lowmoe.tier.pack import pack_model

    packed = str(tmp_path_factory.mktemp("packed") / "p")
    pack_model(lowmoe.DEFAULT_MODEL, packed)
    out = str(tmp_path / "m.gguf")
    assert cli(["quantize", lowmoe.DEFAULT_MODEL, out, "--type", "q8_0"]) == 0
    assert "bits per weight" in capsys.readouterr().out
    before = os.path.getsize(out)
    cases = [([lowmoe.DEFAULT_MODEL, out, "--type", "q8_0"], "exists; pass --force"),
             ([lowmoe.DEFAULT_MODEL, str(tmp_path / "x.gguf"), "--type", "q3_k"], "unknown --type"),
             ([str(tmp_path / "missing"), str(tmp_path / "x.gguf"), "--type", "q8_0"], "no such model folder"),
             ([lowmoe.DEFAULT_MODEL, str(tmp_path / "no" / "x.gguf"), "--type", "q8_0"], "does not exist"),
             ([lowmoe.DEFAULT_MODEL, str(tmp_path), "--type", "q8_0"], "is a folder"),
             ([os.path.join(DATA, "olmoe_bf16-bf16.gguf"), str(tmp_path / "x.gguf"), "--type", "q8_0"], "already a GGUF"),
             ([packed, str(tmp_path / "x.gguf"), "--type", "q8_0"], "`lowmoe pack` wrote")]
    for argv, message in cases:
        assert cli(["quantize", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
    assert os.path.getsize(out) == before and sorted(os.listdir(tmp_path)) == ["m.gguf"]
    assert cli(["quantize", lowmoe.DEFAULT_MODEL, out, "--type", "q4_k_m", "--force"]) == 0
    assert os.path.getsize(out) != before


def test_a_failure_midway_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = []

    def fail_on_third(x, fmt, weights=None):
        calls.append(fmt)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(x, fmt, weights)

    real = write.kquants.quantize
    monkeypatch.setattr(write.kquants, "quantize", fail_on_third)
    with pytest.raises(KeyboardInterrupt):
        quantize_model(lowmoe.DEFAULT_MODEL, str(tmp_path / "m.gguf"), "q4_k_m")
    assert os.listdir(tmp_path) == []


def test_a_hybrid_model_is_written_as_llama_cpps_converter_writes_it(test_models, tmp_path):
    """Qwen3.5-MoE: the same tensors, shapes and `qwen35moe.*` metadata as the converter's f32 file
    of the same checkpoint (tests/data/gguf), values equal to its within bf16's rounding (the 1 + w
    norms, -exp(A_log), the squeezed conv and the DeltaNet's value heads in tiled order included);
    its Q4_K_M has llama-quantize's formats and decodes as the f32 GGUF of its dequantized weights."""
    out = str(tmp_path / "hybrid.gguf")
    quantize_model(test_models["qwen3_5_moe_f32"], out, "bf16")
    ours, theirs = GGUF(out), GGUF(os.path.join(DATA, "qwen3_5_moe_f32-f32.gguf"))
    keys = [k for k in theirs.metadata if k.startswith("qwen35moe.")]
    assert {k: ours.metadata.get(k) for k in keys} == {k: theirs.metadata[k] for k in keys}
    assert {n: t.shape for n, t in ours.tensors.items()} == {n: t.shape for n, t in theirs.tensors.items()}
    for name, info in ours.tensors.items():
        want = theirs.read(name).view(np.float32).reshape(info.shape)
        raw = ours.read(name)
        if info.format == "f32":
            np.testing.assert_allclose(raw.view(np.float32).reshape(info.shape), want, rtol=1e-6, err_msg=name)
        else:
            got = gguf.quants.dequantize(raw.reshape(*info.shape[:-1], -1), gguf.GGMLQuantizationType.BF16)
            np.testing.assert_allclose(got, want, rtol=2**-8, atol=0, err_msg=name)
    quantize_model(test_models["qwen3_5_moe_f32"], out, "q4_k_m", force=True)
    assert _formats(out) == _formats(os.path.join(DATA, "qwen3_5_moe_f32-q4_k_m.gguf"))  # llama-quantize's
    twin = _dequantized_twin(out, str(tmp_path / "twin.gguf"))
    with lowmoe.Engine.from_pretrained(twin, kv_dtype="f32") as e:
        want_logits, want = _run(e)
    with lowmoe.Engine.from_pretrained(out, kv_dtype="f32") as e:
        logits, tokens = _run(e)
    assert tokens == want and np.abs(logits - want_logits).max() <= 1e-4 * np.abs(want_logits).max()


def _dequantized_twin(path, out):
    """The GGUF `path` with every tensor dequantized by gguf into f32, metadata as it is: the float
    reference of a file whose architecture transformers' dequantizing loader (test_gguf_engine)
    does not cover. lowmoe's f32 path on the converter's own files is held to transformers there."""
    from lowmoe.load.gguf import TensorInfo, read_file
    from lowmoe.load.gguf_write import write_gguf

    entries = []
    _, tensors = read_file(path, entries)
    model, raw, infos, offset = GGUF(path), out + ".f32", [], 0
    with open(raw, "wb") as f:
        for name, info in tensors.items():
            data = model.read(name)  # the stored bytes, uint8
            if info.format != "f32":
                data = gguf.quants.dequantize(data.reshape(*info.shape[:-1], -1), gguf.GGMLQuantizationType(info.ggml_type))
                data = np.ascontiguousarray(data, np.float32).view(np.uint8).reshape(-1)
            f.write(data.tobytes())
            infos.append((name, TensorInfo(raw, offset, data.size, info.shape, 0)))
            offset += data.size
    with open(out, "wb") as f:
        write_gguf(f, entries, infos)
    return out
