"""Model and engine configuration.

`ModelConfig` turns a Hugging Face `config.json` into the few numbers and switches the decoder
needs. Architectures differ only in data here (tensor names, which layers are sparse, norms,
biases), never in subclasses. Keys that do not change the math are ignored.
"""

import json
import os
from dataclasses import dataclass, fields

from ..errors import ConfigError, InputError

SUPPORTED = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_next")

# Per architecture: (MoE block prefix, expert projection names (gate, up, down)).
_EXPERT_NAMES = {
    "mixtral": ("block_sparse_moe", ("w1", "w3", "w2")),
    "qwen2_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "olmoe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "qwen3_5_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "qwen3_next": ("mlp", ("gate_proj", "up_proj", "down_proj")),
}
_DEFAULT_THETA = {"mixtral": 1e6, "qwen2_moe": 1e4, "qwen3_moe": 1e4, "olmoe": 1e4, "qwen3_5_moe": 1e4, "qwen3_next": 1e4}
_DEFAULT_EPS = {"mixtral": 1e-5, "qwen2_moe": 1e-6, "qwen3_moe": 1e-6, "olmoe": 1e-5, "qwen3_5_moe": 1e-6,
                "qwen3_next": 1e-6}


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    num_experts: int
    top_k: int
    norm_topk_prob: bool
    expert_intermediate: int
    dense_intermediate: int  # MLP width of the dense (non-MoE) layers
    sparse_layers: tuple  # bool per layer: True where the MLP is a routed MoE block
    shared_expert_intermediate: int  # 0: no shared expert (Qwen2-MoE has one, with a sigmoid gate)
    qk_norm: str  # "none", "head" (Qwen3: RMSNorm over head_dim) or "full" (OLMoE: over all heads)
    clip_qkv: float  # 0.0: no clipping
    qkv_bias: bool
    o_bias: bool
    eos_token_ids: tuple
    # Qwen3.5 / 3.6-MoE (hybrid): the tensors' prefix ("model.language_model." in a multimodal
    # checkpoint), each layer's token mixer ("attention" or "linear": Gated DeltaNet), the DeltaNet
    # shapes (key heads, value heads, key dim, value dim, conv kernel), RoPE on the first rotary_dim
    # dims of a head (0: all), attention gated by a sigmoid of q_proj's second half, norms scaled by
    # (1 + w) (folded into the weights at load), and the value heads' order: transformers' groups
    # the Hv / Hk value heads of one key head (head j reads key head j // (Hv / Hk)); llama.cpp's
    # GGUF tiles them (head j reads key head j % Hk), and lowmoe computes in the file's order.
    prefix: str = "model."
    mixers: tuple = ()  # empty: every layer "attention"
    linear_shape: tuple = ()
    rotary_dim: int = 0
    attn_gate: bool = False
    norm_offset: bool = False
    tiled_value_heads: bool = False

    @property
    def moe_prefix(self):
        return _EXPERT_NAMES[self.model_type][0]

    @property
    def layer_mixers(self):
        """Each layer's token mixer: "attention" or "linear" (Gated DeltaNet)."""
        return self.mixers or ("attention",) * self.num_layers

    def expert_tensor_names(self, layer, expert):
        """(gate, up, down) tensor names of one routed expert; gate/up [I, D], down [D, I]."""
        prefix, (g, u, d) = _EXPERT_NAMES[self.model_type]
        base = f"{self.prefix}layers.{layer}.{prefix}.experts.{expert}."
        return base + g + ".weight", base + u + ".weight", base + d + ".weight"

    @property
    def moe_layers(self):
        return [i for i, s in enumerate(self.sparse_layers) if s]


def _get(cfg, path, key, kind, default=None):
    value = cfg.get(key, default)
    if value is None:
        raise ConfigError(f"{path}: missing key '{key}'")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{path}: '{key}' must be an integer, got {value!r}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(f"{path}: '{key}' must be a number, got {value!r}")
    return value


def _rope_theta(cfg, path, model_type):
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: 'rope_parameters' must be an object")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise ConfigError(f"{path}: rope type '{kind}' is not supported (only 'default')")
    theta = params.get("rope_theta", cfg.get("rope_theta", _DEFAULT_THETA[model_type]))
    return float(_get({"rope_theta": theta}, path, "rope_theta", float))


def _check_no_sliding_window(cfg, path, model_type):
    if model_type == "mixtral":
        enabled = cfg.get("sliding_window") is not None
    else:
        enabled = bool(cfg.get("use_sliding_window", False))
    if enabled:
        raise ConfigError(f"{path}: sliding-window attention is enabled; lowmoe supports full attention only")


def load_model_config(model_dir):
    """Reads `model_dir/config.json` into a ModelConfig, or raises ConfigError naming the file."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isdir(model_dir):
        raise ConfigError(f"{model_dir}: no such model folder")
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: not found (a model folder needs config.json)")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: invalid JSON ({e})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return parse_model_config(cfg, path)


def _hybrid(cfg, path):
    """(the text model's config, tensor prefix, hybrid fields) of a qwen3_5_moe(_text) or qwen3_next
    config.json: a multimodal checkpoint nests the text model in text_config and prefixes its tensors
    with model.language_model."""
    prefix = "model."
    if cfg["model_type"] == "qwen3_5_moe":
        text = cfg.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError(f"{path}: model_type 'qwen3_5_moe' without a 'text_config' object")
        cfg = {"tie_word_embeddings": cfg.get("tie_word_embeddings", False), **text}
        prefix = "model.language_model."
    layers = _get(cfg, path, "num_hidden_layers", int)
    kinds = cfg.get("layer_types")
    if kinds is None:
        interval = _get(cfg, path, "full_attention_interval", int, 4)
        kinds = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(layers)]
    if not isinstance(kinds, list) or len(kinds) != layers or set(kinds) - {"full_attention", "linear_attention"}:
        raise ConfigError(f"{path}: 'layer_types' must list 'full_attention' or 'linear_attention' for each of "
                          f"the {layers} layers")
    rope = cfg.get("rope_parameters") or {}  # M-RoPE (mrope_section) on text positions is plain RoPE
    heads = _get(cfg, path, "num_attention_heads", int)
    head_dim = cfg.get("head_dim") or _get(cfg, path, "hidden_size", int) // heads
    factor = float(rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.25)))
    shape = tuple(_get(cfg, path, k, int, d) for k, d in (("linear_num_key_heads", 16), ("linear_num_value_heads", 32),
                                                           ("linear_key_head_dim", 128), ("linear_value_head_dim", 128),
                                                           ("linear_conv_kernel_dim", 4)))
    if shape[1] % shape[0]:
        raise ConfigError(f"{path}: linear_num_value_heads {shape[1]} is not a multiple of linear_num_key_heads {shape[0]}")
    extra = dict(prefix=prefix, mixers=tuple("attention" if k == "full_attention" else "linear" for k in kinds),
                 linear_shape=shape, rotary_dim=int(head_dim * factor), attn_gate=True, norm_offset=True)
    return cfg, extra


def parse_model_config(cfg, path="config.json"):
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED:
        raise ConfigError(
            f"{path}: unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED)}"
        )
    hybrid = {}
    if model_type.startswith("qwen3_5_moe") or model_type == "qwen3_next":
        cfg, hybrid = _hybrid(cfg, path)
        model_type = model_type[: len("qwen3_5_moe")] if model_type.startswith("qwen3_5_moe") else model_type
    _check_no_sliding_window(cfg, path, model_type)
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{path}: hidden_act {act!r} is not supported (only 'silu')")

    hidden = _get(cfg, path, "hidden_size", int)
    layers = _get(cfg, path, "num_hidden_layers", int)
    heads = _get(cfg, path, "num_attention_heads", int)
    kv_heads = _get(cfg, path, "num_key_value_heads", int, heads)
    head_dim = cfg.get("head_dim") or hidden // heads
    experts = cfg.get("num_experts", cfg.get("num_local_experts"))
    experts = _get({"num_experts": experts}, path, "num_experts", int)
    top_k = _get(cfg, path, "num_experts_per_tok", int)
    if heads % kv_heads or not 0 < top_k <= experts:
        raise ConfigError(f"{path}: inconsistent heads ({heads}/{kv_heads}) or experts ({top_k} of {experts})")

    if model_type == "qwen3_5_moe":  # every layer sparse
        expert_inter = dense_inter = _get(cfg, path, "moe_intermediate_size", int)
        sparse = (True,) * layers
    elif model_type in ("qwen2_moe", "qwen3_moe", "qwen3_next"):
        expert_inter = _get(cfg, path, "moe_intermediate_size", int)
        dense_inter = _get(cfg, path, "intermediate_size", int)
        step = _get(cfg, path, "decoder_sparse_step", int, 1)
        dense_only = set(cfg.get("mlp_only_layers") or [])
        sparse = tuple(i not in dense_only and (i + 1) % step == 0 for i in range(layers))
    else:
        expert_inter = dense_inter = _get(cfg, path, "intermediate_size", int)
        sparse = (True,) * layers

    shared = 0
    if model_type == "qwen2_moe":
        shared = _get(cfg, path, "shared_expert_intermediate_size", int, 5632)
    elif model_type in ("qwen3_5_moe", "qwen3_next"):
        shared = _get(cfg, path, "shared_expert_intermediate_size", int)
    qkv_bias = {
        "mixtral": False,
        "qwen2_moe": bool(cfg.get("qkv_bias", True)),
        "qwen3_moe": bool(cfg.get("attention_bias", False)),
        "olmoe": bool(cfg.get("attention_bias", False)),
        "qwen3_5_moe": bool(cfg.get("attention_bias", False)),
        "qwen3_next": bool(cfg.get("attention_bias", False)),
    }[model_type]
    o_bias = model_type in ("qwen3_moe", "olmoe", "qwen3_5_moe", "qwen3_next") and qkv_bias
    eos = cfg.get("eos_token_id")
    eos = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))

    return ModelConfig(
        model_type=model_type,
        vocab_size=_get(cfg, path, "vocab_size", int),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(_get(cfg, path, "rms_norm_eps", float, _DEFAULT_EPS[model_type])),
        rope_theta=_rope_theta(cfg, path, model_type),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        num_experts=experts,
        top_k=top_k,
        norm_topk_prob=model_type in ("mixtral", "qwen3_5_moe") or bool(cfg.get("norm_topk_prob", model_type == "qwen3_next")),
        expert_intermediate=expert_inter,
        dense_intermediate=dense_inter,
        sparse_layers=sparse,
        shared_expert_intermediate=shared,
        qk_norm={"qwen3_moe": "head", "olmoe": "full", "qwen3_5_moe": "head", "qwen3_next": "head"}.get(model_type, "none"),
        clip_qkv=float(cfg.get("clip_qkv") or 0.0) if model_type == "olmoe" else 0.0,
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        eos_token_ids=eos,
        **hybrid,
    )


DEVICES = ("cpu", "cuda")
STORAGE_KINDS = ("checkpoint", "packed", "ram")
PREDICTORS = ("none", "nextgate", "history", "learned", "pregate", "oracle")
MISS_POLICIES = ("wait", "cpu", "auto")
KV_BYTES = {"f16": 2, "bf16": 2, "f32": 4}  # KV cache dtype -> bytes per element
KV_DTYPES = tuple(KV_BYTES)
# EngineConfig field -> environment variable; an option given to the API or CLI wins.
ENV_VARS = {"expert_cache": "SHARPI_EXPERT_CACHE", "storage": "SHARPI_STORAGE", "readers": "SHARPI_READERS",
            "cpu_moe": "SHARPI_CPU_MOE", "predictor": "SHARPI_MOE_PREDICTOR", "lookahead": "SHARPI_MOE_LOOKAHEAD",
            "vram_budget": "SHARPI_VRAM_BUDGET", "miss_policy": "SHARPI_MISS_POLICY", "refine": "SHARPI_MOE_REFINE",
            "kv_dtype": "SHARPI_KV_DTYPE"}


@dataclass(frozen=True)
class EngineConfig:
    """Run-time options. CLI flags and SHARPI_* variables map onto these fields."""

    device: str = "cpu"  # DEVICES; "cuda": the model on the GPU (model.py on backend/cuda.py)
    expert_cache: str = None  # budget ("1.5GiB", "25%", "min"); None: every expert resident
    vram_budget: str = None  # device "cuda": GPU bytes ("12GiB") to plan; the rest of the dense weights,
    # KV cache and workspace goes to expert slots (vram.py)
    max_context: int = 8192  # tokens of KV cache the VRAM plan reserves
    kv_dtype: str = "f16"  # KV_DTYPES: what the KV cache holds; f32 for comparisons with a float32 reference
    storage: str = None  # slow tier: "checkpoint", "packed", "ram"; None: packed if the folder is, else checkpoint
    readers: int = 1  # reader threads (one: concurrent large reads measured slower, see docs/performance.md)
    read_timeout_s: float = 30.0
    cpu_moe: bool = None  # experts computed on the CPU; None: on cpu the CPU, on cuda the GPU when every
    # expert fits there, else decided by a cost model (hybrid.py)
    miss_policy: str = None  # GPU expert cache, a decode miss whose copy is in flight: MISS_POLICIES; "wait"
    # for the copy, "cpu": compute it on the CPU from the pinned staging, "auto" (None): the cost model
    # picks (hybrid.misses_on_cpu); the output is the same either way (backend/exact.py)
    predictor: str = None  # hints for the expert cache: PREDICTORS; None: pregate if the checkpoint has
    # heads, else learned if fitted, else nextgate
    oracle_trace: str = None  # the `--trace` file of an earlier run of the same input, for "oracle"
    lookahead: int = 1  # MoE layers ahead that hints cover (1 or 2)
    refine: bool = True  # with a predictor: each MoE layer's hint ranked again by its own router on its
    # input, before its token mixer runs (model.Model._refine)

    @classmethod
    def from_options(cls, env=None, **options):
        env = os.environ if env is None else env
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise InputError(f"unknown engine option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        values = {k: v for k, v in options.items() if v is not None}
        for name, var in ENV_VARS.items():
            if name not in values and env.get(var, "") != "":
                values[name] = _from_env(name, var, env[var])
        if "predictor" not in options and env.get("SHARPI_MOE_PREDICT_PREFETCH") == "0":
            values["predictor"] = "none"
        c = cls(**values)
        if c.device not in DEVICES:
            raise InputError(f"device {c.device!r}: expected one of {', '.join(DEVICES)}")
        if c.storage is not None and c.storage not in STORAGE_KINDS:
            raise InputError(f"storage {c.storage!r}: expected one of {', '.join(STORAGE_KINDS)}")
        if c.predictor is not None and c.predictor not in PREDICTORS:
            raise InputError(f"predictor {c.predictor!r}: expected one of {', '.join(PREDICTORS)}")
        if (c.predictor == "oracle") != (c.oracle_trace is not None):
            raise InputError("predictor 'oracle' and oracle_trace (a trace file of an earlier run of the same "
                             "input) go together")
        if c.kv_dtype not in KV_DTYPES:
            raise InputError(f"KV cache dtype {c.kv_dtype!r}: expected one of {', '.join(KV_DTYPES)}")
        if c.miss_policy is not None:
            if c.miss_policy not in MISS_POLICIES:
                raise InputError(f"miss policy {c.miss_policy!r}: expected one of {', '.join(MISS_POLICIES)}")
            if c.device != "cuda" or c.cpu_moe:
                raise InputError("a miss policy (--miss-policy / SHARPI_MISS_POLICY) chooses where the GPU expert "
                                 "cache computes a miss: it needs device 'cuda' and experts on the GPU")
        if c.lookahead not in (1, 2):
            raise InputError(f"lookahead must be 1 or 2, got {c.lookahead}")
        if c.readers < 1:
            raise InputError(f"readers must be >= 1, got {c.readers}")
        if c.vram_budget is not None:
            if c.device != "cuda":
                raise InputError("a VRAM budget (--vram-budget / SHARPI_VRAM_BUDGET) plans GPU memory: it needs "
                                 "device 'cuda'")
            if c.expert_cache is not None:
                raise InputError("give the GPU expert cache either a VRAM budget (--vram-budget) or an expert cache "
                                 "budget (--expert-cache), not both")
            if c.cpu_moe:
                raise InputError("SHARPI_CPU_MOE=1 keeps the experts on the CPU: a VRAM budget for expert slots does "
                                 "not apply (unset one of them)")
        if c.max_context < 1:
            raise InputError(f"max_context must be >= 1, got {c.max_context}")
        if c.device == "cpu" and c.cpu_moe is False:
            raise InputError("SHARPI_CPU_MOE=0 asks for the GPU expert path: use device 'cuda' (--device cuda), "
                             "or unset it / set 1 (experts on the CPU)")
        return c


def _from_env(name, var, text):
    if name in ("cpu_moe", "refine"):
        if text not in ("0", "1"):
            raise InputError(f"{var}={text!r}: expected 0 or 1")
        return text == "1"
    if name in ("readers", "lookahead"):
        try:
            return int(text)
        except ValueError:
            raise InputError(f"{var}={text!r}: expected an integer") from None
    return text
