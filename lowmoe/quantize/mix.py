"""Which format each tensor of a GGUF gets for a `lowmoe quantize --type`: llama.cpp's rules
(`llama_tensor_get_type` in its src/llama-quant.cpp), so a file named Q4_K_M has the size and
quality that name means.

- Left as they are (f32): vectors (norms, biases), the routers (`ffn_gate_inp`), the DeltaNet conv.
- `q4_k_m` / `q5_k_m`: Q4_K / Q5_K, with Q6_K for `attn_v` (and a fused `attn_qkv`) and `ffn_down`
  (experts, shared expert and dense) on the layers `use_more_bits` picks (the first and last
  eighth, and every third between); `output` (the lm_head, or the embedding where it is tied) in
  Q6_K. With 8 experts (Mixtral) `attn_v` and `attn_k` are Q8_0 and, in q4_k_m, `attn_output`
  Q5_K. The untied embedding stays at the base type, as llama.cpp does.
- `q6_k`, `q8_0`: that type everywhere, `output` Q6_K (Q8_0 in q8_0).
- `q4_k`: Q4_K everywhere, `output` included (llama-quantize --pure).
- `bf16`: every matrix in bf16.
A K type needs rows of a multiple of 256: otherwise Q4_K falls back to Q5_0, Q5_K to Q5_1, Q6_K
to Q8_0 (an `output` to Q8_0), and a row that is not a multiple of 32 either to f16, as in llama.cpp.
"""

import re

# --type -> (base format, general.file_type: llama.cpp's LLAMA_FTYPE_MOSTLY_*)
TYPES = {"q8_0": ("q8_0", 7), "q4_k_m": ("q4_k", 15), "q5_k_m": ("q5_k", 17), "q6_k": ("q6_k", 18),
         "q4_k": ("q4_k", 14), "bf16": ("bf16", 32)}
_FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}
_LAYER = re.compile(r"blk\.(\d+)\.")


def use_more_bits(i, n):
    """llama.cpp's choice of layers that get more bits: the first and last eighth, every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def quantizable(name, shape):
    """Whether llama.cpp would quantize this tensor (else it keeps f32). Its dimensions are ggml's:
    outer 1s do not count (Qwen2-MoE's shared-expert gate [1, D] is a vector)."""
    dims = len(shape) - next((i for i, n in enumerate(shape) if n != 1), len(shape) - 1)
    return (dims >= 2 and name.endswith("weight") and "_norm.weight" not in name
            and "ffn_gate_inp.weight" not in name and "ssm_conv1d" not in name)


def choose(tensors, kind, num_layers, num_experts):
    """tensors [(GGUF name, shape outermost first)] in file order -> {name: format}."""
    base, _ = TYPES[kind]
    tied = not any(name == "output.weight" for name, _ in tensors)
    n_v = sum(_is_v(name) for name, _ in tensors)
    i_v = 0
    out = {}
    for name, shape in tensors:
        if not quantizable(name, shape):
            out[name] = "f32"
            continue
        fmt = base
        if base != "bf16" and kind != "q4_k":
            fmt, i_v = _rule(name, kind, base, tied, num_layers, num_experts, i_v, n_v)
        out[name] = _fit(fmt, shape[-1], name == "output.weight" or (tied and name == "token_embd.weight"))
    return out


def _is_v(name):
    return "attn_v.weight" in name or "attn_qkv.weight" in name


def _rule(name, kind, base, tied, num_layers, num_experts, i_v, n_v):
    """llama_tensor_get_type_impl for the mixes above -> (format, attn_v counter after this tensor)."""
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        return ("q8_0" if base == "q8_0" else "q6_k"), i_v
    if _is_v(name):
        fmt = base
        if kind in ("q4_k_m", "q5_k_m") and use_more_bits(i_v, n_v):
            fmt = "q6_k"
        if num_experts == 8:
            fmt = "q8_0"  # llama.cpp: "bumping this to Q8_0 trades just ~128MB" on Mixtral
        return fmt, i_v + 1
    if "attn_k.weight" in name and num_experts == 8:
        return "q8_0", i_v
    if "ffn_down" in name and kind in ("q4_k_m", "q5_k_m"):
        layer = int(_LAYER.match(name).group(1))
        return ("q6_k" if use_more_bits(layer, num_layers) else base), i_v
    if "attn_output.weight" in name and kind == "q4_k_m" and num_experts == 8:
        return "q5_k", i_v
    return base, i_v


def _block(fmt):
    """Elements per block of a format (gguf's sizes)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES[GGMLQuantizationType[fmt.upper()]][0]


def _fit(fmt, cols, output):
    """The format itself where rows of `cols` fit its blocks, else llama.cpp's fallback."""
    if cols % _block(fmt) == 0:
        return fmt
    fmt = "q8_0" if output else _FALLBACK.get(fmt, fmt)
    return fmt if cols % _block(fmt) == 0 else "f16"
