"""Remake the GGUF test files in tests/data/gguf/ with llama.cpp's own converter.

    ../shared/tools/llamacpp.sh DIR          # once: llama.cpp's source (DIR/src) and tools (DIR/bin)
    python tools/make_test_ggufs.py DIR [OUTDIR]

The checkpoints are tools/make_test_models.py's (the same seeds, so the same weights): Mixtral,
OLMoE and Qwen2-MoE (its variant whose every layer is sparse: the converter cannot express the
Qwen MoE checkpoints' dense layers), and Qwen3.5-MoE (`--outtype f32 --no-mtp` only, into
OUTDIR/qwen3_5_moe_f32-f32.gguf, and its llama-quantize Q4_K_M into OUTDIR/qwen3_5_moe_f32-q4_k_m.gguf),
each given a byte-level BPE tokenizer trained on a little
text (the converter needs a vocabulary, and refuses a word-level one for OLMoE and Qwen2-MoE), then
converted by `convert_hf_to_gguf.py --outtype bf16` and `--outtype q8_0` into
OUTDIR/<variant>-<outtype>.gguf (OUTDIR defaults to tests/data/gguf), and the bf16 file quantized by
`llama-quantize ... Q4_K_M` into OUTDIR/<variant>-q4_k_m.gguf (rows shorter than 256 weights fall
back to the 32-weight formats, as in every Q4_K_M of an MoE's small matrices); and from the
bundled model, its Q4_K_M (Q4_K, Q6_K, Q8_0 and Q5_0, the experts' down in Q8_0 or Q5_0 by layer)
into OUTDIR/default-q4_k_m.gguf and the tokenizer metadata the converter writes, alone, into
OUTDIR/default-tokenizer.gguf. Last, llama.cpp's greedy continuation of a prompt by the bundled
model's Q4_K_M (`llama-simple -n 32`), its bytes as it printed them, into OUTDIR/llama_greedy.json.
The tests read the committed files; neither CI nor the tests need llama.cpp.
"""

import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("mixtral_bf16_sharded", "olmoe_bf16", "qwen2_moe_bf16")
# Qwen3.5-MoE (qwen35moe): f32 keeps the converter's -exp(A_log) and added 1s exact; no MTP layers.
HYBRID = "qwen3_5_moe_f32"
GREEDY = "llama_greedy.json"
PROMPT = "In the beginning God created the heaven and the earth."  # tokens inside every test vocabulary
OUTTYPES = ("bf16", "q8_0")


def main(argv):
    llama, outdir = argv[0], argv[1] if len(argv) > 1 else os.path.join(ROOT, "tests", "data", "gguf")
    src = os.path.join(llama, "src")
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import make_test_models

    os.makedirs(outdir, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.path.join(src, "gguf-py"))
    with tempfile.TemporaryDirectory() as tmp:
        path = make_test_models.make_models(tmp, [HYBRID])[HYBRID]
        bpe_tokenizer(path)
        out = os.path.join(outdir, f"{HYBRID}-f32.gguf")
        _convert(src, env, path, "f32", out, "--no-mtp")
        print(out, os.path.getsize(out))
        quantized = os.path.join(outdir, f"{HYBRID}-q4_k_m.gguf")  # llama-quantize's mix, for `lowmoe quantize`'s tests
        subprocess.run([os.path.join(llama, "bin", "llama-quantize"), out, quantized, "Q4_K_M"], check=True, capture_output=True)
        print(quantized, os.path.getsize(quantized))
        for name, path in make_test_models.make_models(tmp, list(VARIANTS)).items():
            bpe_tokenizer(path)
            for outtype in OUTTYPES:
                out = os.path.join(outdir, f"{name}-{outtype}.gguf")
                _convert(src, env, path, outtype, out)
                print(out, os.path.getsize(out))
            out = os.path.join(outdir, f"{name}-q4_k_m.gguf")
            subprocess.run([os.path.join(llama, "bin", "llama-quantize"), os.path.join(outdir, f"{name}-bf16.gguf"), out,
                            "Q4_K_M"], check=True, capture_output=True)
            print(out, os.path.getsize(out))
        out = os.path.join(outdir, "default-tokenizer.gguf")
        bundled = _convert(src, env, os.path.join(ROOT, "lowmoe", "models", "default"), "bf16", os.path.join(tmp, "default.gguf"))
        tokenizer_only(bundled, out)
        print(out, os.path.getsize(out))
        out = os.path.join(outdir, "default-q4_k_m.gguf")
        subprocess.run([os.path.join(llama, "bin", "llama-quantize"), bundled, out, "Q4_K_M"], check=True, capture_output=True)
        print(out, os.path.getsize(out))
    # The trained model only: the random test models' top logits are so close that llama.cpp's 8-bit
    # activations pick other tokens after a few steps (their reference is transformers on the
    # dequantized weights, in the tests).
    r = subprocess.run([os.path.join(llama, "bin", "llama-simple"), "-m", out, "-n", "32", PROMPT], capture_output=True,
                       check=True)
    assert r.stdout.startswith(PROMPT.encode()) and r.stdout.endswith(b"\n"), r.stdout[:200]
    with open(os.path.join(outdir, GREEDY), "w", encoding="utf-8") as fh:  # the bytes of its tokens' pieces, as printed
        json.dump({"file": os.path.basename(out), "prompt": PROMPT, "tokens": 32,
                   "continuation_hex": r.stdout[len(PROMPT) : -1].hex()}, fh, indent=1)
        fh.write("\n")
    return 0


def bpe_tokenizer(path):
    """A byte-level BPE tokenizer.json in the checkpoint folder `path`, trained on PROMPT-like text,
    with at most the model's vocab_size tokens (the converter pads the rest)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        vocab = json.load(f)["vocab_size"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [PROMPT, "And the earth was without form, and void; and darkness was upon the face of the deep."] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(os.path.join(path, "tokenizer.json"))


def _convert(src, env, path, outtype, out, *flags):
    r = subprocess.run([sys.executable, os.path.join(src, "convert_hf_to_gguf.py"), path, "--outtype", outtype,
                        "--outfile", out, *flags], env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{path} --outtype {outtype}: the converter failed:\n{r.stderr[-3000:]}")
    return out


def tokenizer_only(path, out):
    """A GGUF with no tensors and only the tokenizer.ggml.* metadata of `path`, as the converter wrote
    it: the bundled model's vocabulary, small enough to commit (its weights are in the package)."""
    import gguf

    sys.path.insert(0, ROOT)
    from lowmoe.load.gguf import read_file

    meta, _ = read_file(path)
    w = gguf.GGUFWriter(out, meta["general.architecture"])
    for key, value in meta.items():
        if key.startswith("tokenizer.ggml."):
            w.add_array(key, value) if isinstance(value, list) else w.add_key_value(key, value, _type(value))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()


def _type(value):
    import gguf

    return gguf.GGUFValueType.STRING if isinstance(value, str) else gguf.GGUFValueType.UINT32


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
