"""lowmoe/load/gguf.py against the gguf package (gguf.GGUFWriter writes the files, gguf.GGUFReader
is the reference reader): metadata of every value type, each tensor's offset, shape, format and
bytes, split models, and bad files as one-line CheckpointErrors naming the file."""

import os

import numpy as np
import pytest

from lowmoe.errors import CheckpointError
from lowmoe.load.gguf import FORMATS, GGUF, OTHER_TYPES

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType


def _write(path, tensors, meta=(), arch="qwen3moe"):
    """tensors: [(name, ggml type, float32 values)], quantized by gguf itself where it can."""
    w = gguf.GGUFWriter(path, arch)
    for add, key, value in meta:
        getattr(w, add)(key, value)
    for name, kind, values in tensors:
        try:
            data = gguf.quants.quantize(values, kind)
        except NotImplementedError:  # gguf cannot quantize to every K-quant: any bytes of the size do here
            elems, block = gguf.GGML_QUANT_SIZES[kind]
            shape = values.shape[:-1] + (values.shape[-1] // elems * block,)
            data = np.random.default_rng(values.size).integers(0, 256, shape, np.uint8)
        w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _values(g, shape):
    return g.standard_normal(shape).astype(np.float32)


def test_the_format_table_is_ggmls():
    for kind, (name, elems, block) in FORMATS.items():
        assert Q(kind).name.lower() == name and gguf.GGML_QUANT_SIZES[Q(kind)] == (elems, block)
    for kind, name in OTHER_TYPES.items():
        assert Q(kind).name == name


def test_metadata_and_tensors_agree_with_gguf_reader(tmp_path):
    g = np.random.default_rng(0)
    tensors = [("f32", Q.F32, _values(g, (3, 5))), ("f16", Q.F16, _values(g, (4, 6))),
               ("bf16", Q.BF16, _values(g, (2, 8))), ("q8_0", Q.Q8_0, _values(g, (3, 64))),
               ("q4_0", Q.Q4_0, _values(g, (2, 32))), ("q5_1", Q.Q5_1, _values(g, (5, 96))),
               ("q4_k", Q.Q4_K, _values(g, (2, 256))), ("q6_k", Q.Q6_K, _values(g, (3, 512))),
               ("blk.0.ffn_gate_exps.weight", Q.Q8_0, _values(g, (4, 3, 64)))]
    meta = [("add_uint32", "u32", 7), ("add_int32", "i32", -7), ("add_float32", "f32", 0.5), ("add_bool", "b", True),
            ("add_uint64", "u64", 1 << 40), ("add_int64", "i64", -(1 << 40)), ("add_float64", "f64", 0.25),
            ("add_uint8", "u8", 255), ("add_int8", "i8", -1), ("add_uint16", "u16", 65535), ("add_int16", "i16", -2),
            ("add_string", "s", "grüß"), ("add_array", "tokens", ["a", "bb", ""]), ("add_array", "ints", [1, 2, 3])]
    path = _write(str(tmp_path / "m.gguf"), tensors, meta)
    ours, ref = GGUF(path), gguf.GGUFReader(path)
    for _, key, value in meta:
        assert ours.metadata[key] == pytest.approx(value) if isinstance(value, float) else ours.metadata[key] == value
    assert ours.metadata["general.architecture"] == "qwen3moe"
    assert set(ours.tensors) == {t.name for t in ref.tensors}
    for t in ref.tensors:
        info = ours.tensors[t.name]
        assert (info.offset, info.nbytes, info.ggml_type) == (t.data_offset, t.n_bytes, int(t.tensor_type))
        assert info.shape == tuple(int(n) for n in reversed(t.shape))
        assert np.array_equal(ours.read(t.name), np.asarray(t.data).view(np.uint8).reshape(-1))
    assert ours.tensors["blk.0.ffn_gate_exps.weight"].shape == (4, 3, 64)
    assert ours.tensors["q6_k"].format == "q6_k"


def test_a_split_model_reads_as_one(tmp_path):
    g = np.random.default_rng(1)
    parts = [[("a", Q.F32, _values(g, (2, 4)))], [("b", Q.Q8_0, _values(g, (2, 32))), ("c", Q.F16, _values(g, (3, 2)))]]
    for i, tensors in enumerate(parts):
        meta = [("add_uint16", "split.no", i), ("add_uint16", "split.count", 2), ("add_int32", "split.tensors.count", 3)]
        _write(str(tmp_path / f"m-{i + 1:05d}-of-00002.gguf"), tensors, meta)
    model = GGUF(str(tmp_path / "m-00001-of-00002.gguf"))
    assert set(model.tensors) == {"a", "b", "c"}
    assert model.tensors["c"].file.endswith("m-00002-of-00002.gguf")
    os.remove(tmp_path / "m-00002-of-00002.gguf")
    with pytest.raises(CheckpointError, match=r"m-00002-of-00002.gguf: not found \(.* is split into 2 files\)"):
        GGUF(str(tmp_path / "m-00001-of-00002.gguf"))


def _good(tmp_path):
    return _write(str(tmp_path / "m.gguf"), [("w", Q.Q8_0, _values(np.random.default_rng(2), (4, 64)))])


def _rewrite(path, edit):
    with open(path, "rb") as f:
        data = bytearray(f.read())
    with open(path, "wb") as f:
        f.write(edit(data))
    return path


@pytest.mark.parametrize("edit,message", [
    (lambda d: b"GGML" + d[4:], "not a GGUF file"),
    (lambda d: d[:4] + (1).to_bytes(4, "little") + d[8:], "GGUF version 1 is not supported"),
    (lambda d: d[:40], "truncated GGUF header"),
    (lambda d: d[:-20], "tensor 'w' ends at byte .* past the end of the file"),  # past the 16 bytes of padding
    (lambda d: b"", "truncated GGUF header"),
])
def test_a_bad_file_is_a_one_line_error(tmp_path, edit, message):
    path = _rewrite(_good(tmp_path), edit)
    with pytest.raises(CheckpointError, match=message) as err:
        GGUF(path)
    assert str(err.value).startswith(path) and "\n" not in str(err.value)


def test_an_unsupported_type_names_the_tensor_and_the_type(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "qwen3moe")
    w.add_tensor("blk.0.attn_q.weight", np.zeros((2, 136), np.uint8), raw_dtype=Q.IQ4_XS)  # 2 rows of 256
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="tensor 'blk.0.attn_q.weight' is IQ4_XS, which lowmoe does not support"):
        GGUF(str(tmp_path / "m.gguf"))


def test_a_missing_file_and_a_missing_tensor(tmp_path):
    with pytest.raises(CheckpointError, match="cannot read"):
        GGUF(str(tmp_path / "none.gguf"))
    with pytest.raises(CheckpointError, match="no tensor 'x'"):
        GGUF(_good(tmp_path)).read("x")
