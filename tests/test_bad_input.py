"""Bad input: the CLI prints one line naming the file or tensor and the problem and exits 2; the API
raises a typed lowmoe error; input files are never modified."""

import hashlib
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

import lowmoe
from lowmoe.cli.__main__ import main as cli
from tiny_model import CONFIG, write_tiny_model


def _digest(folder):
    h = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            h[name] = hashlib.sha256(f.read()).hexdigest()
    return h


def _run_cli(capsys, argv):
    code = cli(argv)
    out = capsys.readouterr()
    return code, out.err.strip()


def _expect_error(capsys, argv, *fragments):
    code, err = _run_cli(capsys, argv)
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for frag in fragments:
        assert frag in err, err
    return err


@pytest.fixture
def model(tmp_path):
    return write_tiny_model(str(tmp_path / "m"))


def _safetensors_path(model):
    return os.path.join(model, "model.safetensors")


def _header_len(path):
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


def test_valid_model_runs(model, capsys):
    code, _ = _run_cli(capsys, ["decode", model, "--prompt-ids", "1,2,3", "--max-new-tokens", "3", "--json"])
    assert code == 0


def test_missing_path(tmp_path, capsys):
    missing = str(tmp_path / "nope")
    _expect_error(capsys, ["decode", missing, "--prompt-ids", "1"], missing, "no such")
    with pytest.raises(lowmoe.ConfigError):
        lowmoe.Engine.from_pretrained(missing)


def test_folder_without_config(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    _expect_error(capsys, ["info", str(tmp_path / "empty")], "config.json", "not found")


def test_invalid_json(model, capsys):
    with open(os.path.join(model, "config.json"), "w") as f:
        f.write("{not json")
    before = _digest(model)
    _expect_error(capsys, ["decode", model, "--prompt-ids", "1"], "config.json", "invalid JSON")
    assert _digest(model) == before


def test_unsupported_architecture_lists_supported(tmp_path, capsys):
    m = write_tiny_model(str(tmp_path / "m"), {"model_type": "llama"})
    err = _expect_error(capsys, ["info", m], "config.json", "'llama'")
    for arch in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"):
        assert arch in err
    with pytest.raises(lowmoe.ConfigError):
        lowmoe.Engine.from_pretrained(m)


def test_sliding_window_enabled(tmp_path, capsys):
    m = write_tiny_model(str(tmp_path / "m"), {"use_sliding_window": True, "sliding_window": 8})
    _expect_error(capsys, ["info", m], "config.json", "sliding-window")


def test_header_length_past_end(model, capsys):
    path = _safetensors_path(model)
    with open(path, "r+b") as f:
        f.write(struct.pack("<Q", 10**9))
    before = _digest(model)
    _expect_error(capsys, ["decode", model, "--prompt-ids", "1"], path, "header length")
    assert _digest(model) == before
    with pytest.raises(lowmoe.CheckpointError):
        lowmoe.Engine.from_pretrained(model)


def test_garbage_header(model, capsys):
    path = _safetensors_path(model)
    n = _header_len(path)
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"\xff\x00garbage" * (n // 9))
    _expect_error(capsys, ["decode", model, "--prompt-ids", "1"], path, "corrupt")


def test_data_past_end(model, capsys):
    path = _safetensors_path(model)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    err = _expect_error(capsys, ["decode", model, "--prompt-ids", "1"], path, "past the end")
    assert "tensor" in err


def test_truncated_to_nothing(model, capsys):
    path = _safetensors_path(model)
    with open(path, "r+b") as f:
        f.truncate(3)
    _expect_error(capsys, ["info", model], path, "truncated")


def test_missing_tensor(tmp_path, capsys):
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    m = write_tiny_model(str(tmp_path / "m"), drop=[name])
    _expect_error(capsys, ["decode", m, "--prompt-ids", "1"], name, "missing")
    with pytest.raises(lowmoe.CheckpointError):
        lowmoe.Engine.from_pretrained(m)


def test_wrong_shape(tmp_path, capsys):
    name = "model.layers.0.self_attn.q_proj.weight"
    m = write_tiny_model(str(tmp_path / "m"), tensor_overrides={name: np.ones((5, 16), np.float32)})
    _expect_error(capsys, ["decode", m, "--prompt-ids", "1"], name, "shape [5, 16]", "expected [16, 16]")


def test_missing_shard(tmp_path, capsys):
    m = write_tiny_model(str(tmp_path / "m"))
    with open(os.path.join(m, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}, f)
    _expect_error(capsys, ["info", m], "model-00002-of-00002.safetensors", "missing")


def test_token_ids_outside_vocab(model, capsys):
    vocab = CONFIG["vocab_size"]
    _expect_error(capsys, ["decode", model, "--prompt-ids", f"1,{vocab}"], str(vocab), "vocabulary")
    _expect_error(capsys, ["decode", model, "--prompt-ids", "-1"], "-1", "vocabulary")
    engine = lowmoe.Engine.from_pretrained(model)
    with pytest.raises(lowmoe.InputError):
        engine.logits([0, vocab])
    with pytest.raises(lowmoe.InputError):
        engine.generate([vocab + 5], 2)


def test_empty_prompt(model, capsys):
    _expect_error(capsys, ["decode", model, "--prompt-ids", ""], "empty prompt")
    _expect_error(capsys, ["decode", model, "--prompt", ""], "empty prompt")
    with pytest.raises(lowmoe.InputError):
        lowmoe.Engine.from_pretrained(model).generate([], 2)


def test_bad_prompt_ids_syntax(model, capsys):
    _expect_error(capsys, ["decode", model, "--prompt-ids", "1,x"], "--prompt-ids")


def test_cli_subprocess_has_no_traceback(tmp_path):
    """The installed entry point itself: one line on stderr, exit status 2."""
    r = subprocess.run(
        [sys.executable, "-m", "lowmoe.cli", "decode", str(tmp_path / "absent"), "--prompt-ids", "1"],
        capture_output=True, text=True,
    )
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert str(tmp_path / "absent") in r.stderr


def test_corrupt_tokenizer(model, capsys):
    path = os.path.join(model, "tokenizer.json")
    with open(path, "w") as f:
        f.write('{"model": 42}')
    _expect_error(capsys, ["decode", model, "--prompt", "hi"], path, "tokenizer")


def test_text_prompt_without_tokenizer(model, capsys):
    _expect_error(capsys, ["decode", model, "--prompt", "hi"], "tokenizer.json", "token ids")


def test_unsupported_tensor_dtype(tmp_path, capsys):
    name = "model.norm.weight"
    m = write_tiny_model(str(tmp_path / "m"), tensor_overrides={name: np.ones(16, np.int64)})
    _expect_error(capsys, ["decode", m, "--prompt-ids", "1"], name, "dtype I64")


def test_invalid_index(model, capsys):
    with open(os.path.join(model, "model.safetensors.index.json"), "w") as f:
        f.write("[1, 2]")
    _expect_error(capsys, ["info", model], "model.safetensors.index.json", "weight_map")
