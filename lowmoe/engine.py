"""`Engine`: the public API. Owns the weights, the experts and a KV cache per call."""

import hashlib
import os
import time
from dataclasses import dataclass, field

import numpy as np

from .backend import backend, cpu
from .errors import ConfigError, InputError
from .load.config import EngineConfig
from .load.gguf import GGUF
from .load.gguf_tokenizer import gguf_tokenizer
from .load.model import dense_weights, open_model
from .load.weights import to_device
from .model import KVCache, Model
from .predict.history import History
from .predict.learned import Learned, predictor_file
from .predict.nextgate import NextGate
from .predict.oracle import Oracle
from .predict.pregate import PreGate, has_heads
from .sampling import check_params, sample
from .tier import vram
from .tier.experts import OffloadedExperts
from .tier.placement import place_experts
from .tier.store import is_packed, open_store

DEFAULT_MODEL = os.path.join(os.path.dirname(__file__), "models", "default")


@dataclass
class Context:
    """A prompt already run through the model: its KV cache, the logits f32[V] of its last token and
    the linear-attention layers' state at its end (KVCache.recurrent; empty without such layers).
    Every decode from it starts right after the prompt, so one Context serves many."""

    kv: KVCache
    logits: np.ndarray
    length: int
    recurrent: list = field(default_factory=list)


@dataclass
class Generation:
    tokens: list  # new token ids
    text: str  # decoded new tokens ("" without a tokenizer)
    stats: dict = field(default_factory=dict)


def load_tokenizer(model_dir):
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception on bad files
        raise ConfigError(f"{path}: cannot load tokenizer ({str(e).splitlines()[0]})") from None


def make_predictor(name, cfg, dense, model_dir, oracle_trace=None, lookahead=1):
    """name None: "pregate" when the checkpoint ships pre-gate heads, else "learned" when the
    model has a fitted predictor file (learned.predictor_file), else "nextgate"."""
    learned = predictor_file(model_dir)
    if name is None:
        name = "pregate" if has_heads(dense) else "learned" if os.path.isfile(learned) else "nextgate"
    if name == "oracle":
        return Oracle.from_trace(cfg, oracle_trace, lookahead)
    if name == "pregate":
        if not has_heads(dense):
            raise InputError(f"predictor 'pregate': {model_dir} has no model.layers.N.mlp.pre_gate.weight tensors")
        return PreGate(cfg, dense)
    if name == "learned":
        if not os.path.isfile(learned):
            raise InputError(f"predictor 'learned': {learned} not found; run `lowmoe train-predictor {model_dir}`")
        return Learned(cfg, learned, dense)
    if name == "nextgate":
        return NextGate(cfg, dense, lookahead)
    if name == "history":
        return History(cfg)
    return None


class Engine:
    def __init__(self, model_dir, cfg, options, model, tokenizer):
        self.model_dir = model_dir
        self.config = cfg
        self.options = options
        self.model = model
        self.tokenizer = tokenizer
        self.no_tokenizer = f"{model_dir}: no tokenizer.json"  # why there is none, for encode's error
        self.gguf_metadata = None  # a GGUF model's metadata (its chat template, for chat/)

    @classmethod
    def from_pretrained(cls, path=DEFAULT_MODEL, device="cpu", **options):
        """path: a Hugging Face model folder, a GGUF file (`name.gguf`, or the first of its splits; the
        tokenizer from its metadata, or a tokenizer.json beside it), or a folder `lowmoe pack` wrote.
        Options (each also a SHARPI_* variable, see SHARPI_ENV.md): expert_cache ("1.5GiB",
        "25%", "min"; default: every expert resident), storage ("checkpoint", "packed", "ram"),
        predictor ("pregate", "learned", "nextgate", "history", "none"; default: pregate if the
        checkpoint ships pre-gate heads, else learned if the model folder has
        moe_predictor.safetensors, else nextgate; "oracle" with oracle_trace, the `--trace` file of
        an earlier run of the same input: perfect hints, for benchmarks), lookahead (1 or 2 MoE
        layers; nextgate and oracle look 2 ahead, the others 1), refine (default True: with a predictor
        other than the oracle, each MoE layer's hint is ranked again by its own router on its input,
        before its token mixer), readers, read_timeout_s, cpu_moe.
        device "cuda" runs the model on the GPU (CuPy): every expert resident there when they fit;
        else vram_budget ("12GiB": dense weights, KV cache for max_context tokens, workspace, the
        rest expert slots) or expert_cache plans a GPU expert cache, and miss_policy ("wait", "cpu",
        "auto") says where its misses are computed; cpu_moe=True keeps the experts on the CPU (see
        tier/placement.py)."""
        options = EngineConfig.from_options(device=device, **options)
        ops = backend(options.device)  # DeviceError before loading anything when no GPU is usable
        path = os.fspath(path)
        ckpt, cfg = open_model(path)
        dense = dense_weights(ckpt, cfg)
        store = open_store(options.storage or ("packed" if is_packed(path) else "checkpoint"), path, ckpt, cfg)
        experts, where = place_experts(cfg, dense, store, options)
        predictor = None
        if isinstance(experts, OffloadedExperts):
            predictor = make_predictor(options.predictor, cfg, dense, path, options.oracle_trace, options.lookahead)
        weights = dense if ops is cpu else to_device(dense, ops.to_device)  # the CPU computes from the loaded arrays
        refine = options.refine and predictor is not None and not isinstance(predictor, Oracle)  # its hints are true
        model = Model(cfg, weights, experts, ops, predictor, where, refine)
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        engine = cls(path, cfg, options, model, load_tokenizer(folder))
        engine.gguf_metadata = ckpt.metadata if isinstance(ckpt, GGUF) else None
        if engine.tokenizer is None and isinstance(ckpt, GGUF):  # a tokenizer.json beside the file wins
            try:
                engine.tokenizer = gguf_tokenizer(ckpt.metadata, path)
            except ConfigError as e:
                engine.no_tokenizer = str(e)
        return engine

    def close(self):
        """Stops the reader threads and closes the slow tier's files."""
        self.model.experts.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def kv_cache(self, capacity):
        """An empty KVCache of `capacity` positions on the engine's device, in its KV dtype."""
        self._check_context(capacity)
        return KVCache(self.config, capacity, self.model.ops, self.options.kv_dtype)

    def _check_context(self, length):
        """With a VRAM budget the plan holds a KV cache of max_context positions: refuse more."""
        o = self.options
        if o.device == "cuda" and o.vram_budget is not None and length > o.max_context:
            raise InputError(f"{length} positions of context (the prompt and the new tokens) exceed max_context "
                             f"{o.max_context}, the KV cache the VRAM budget planned for; raise --max-context")

    def encode(self, text):
        if self.tokenizer is None:
            raise InputError(f"{self.no_tokenizer}; pass token ids instead of text")
        ids = self.tokenizer.encode(text).ids
        if not ids:
            raise InputError("empty prompt")
        return ids

    def decode(self, ids):
        return self.tokenizer.decode(list(ids)) if self.tokenizer is not None else ""

    def _check_ids(self, token_ids):
        ids = np.asarray(list(token_ids))
        if ids.size == 0:
            raise InputError("empty prompt: no token ids")
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise InputError("token ids must be a flat list of integers")
        bad = ids[(ids < 0) | (ids >= self.config.vocab_size)]
        if bad.size:
            raise InputError(f"token id {int(bad[0])} is outside the vocabulary [0, {self.config.vocab_size})")
        return ids.astype(np.int64)

    def logits(self, token_ids):
        """Full-sequence logits f32[T, vocab] for the given ids, from an empty context, computed
        vram.PREFILL_CHUNK tokens at a time (as prefill)."""
        ids = self._check_ids(token_ids)
        kv = self.kv_cache(len(ids))
        step = vram.PREFILL_CHUNK
        return np.concatenate([self.model.forward(ids[i : i + step], kv, all_logits=True) for i in range(0, len(ids), step)])

    def prefill(self, token_ids, room=0, chunk=None, progress=None):
        """Runs the prompt through the model -> a Context with KV room for `room` more tokens.
        `chunk` tokens at a time (default vram.PREFILL_CHUNK, the forward pass the VRAM plan's
        workspace holds; the same result: each position sees exactly the positions before it),
        calling progress(done, total) after each chunk."""
        ids = self._check_ids(token_ids)
        kv = self.kv_cache(len(ids) + room)
        step = chunk or vram.PREFILL_CHUNK
        for i in range(0, len(ids), step):
            logits = self.model.forward(ids[i : i + step], kv)
            if progress is not None:
                progress(min(i + step, len(ids)), len(ids))
        return Context(kv, logits[-1], len(ids), kv.recurrent())

    def stream(self, token_ids, max_new_tokens, temperature=0.0, top_p=1.0, top_k=0, seed=None,
               stop_at_eos=True, stats=None):
        """Yields new token ids one at a time. `stats`, if a dict, is filled with timings and, with
        an expert cache, its counters for the decode steps (hits, misses, bytes_read, stall_s...)."""
        check_params(temperature, top_p, top_k)
        if max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        stats = {} if stats is None else stats
        t0 = time.perf_counter()
        context = self.prefill(token_ids, max_new_tokens)
        stats.update(prefill_tokens=context.length, prefill_s=time.perf_counter() - t0)
        yield from self.stream_from(context, max_new_tokens, temperature, top_p, top_k, seed, stop_at_eos, stats)

    def stream_from(self, context, max_new_tokens, temperature=0.0, top_p=1.0, top_k=0, seed=None,
                    stop_at_eos=True, stats=None, forced=None):
        """Like `stream`, from a prefilled Context (which stays reusable: each decode from it
        writes its new positions after the prompt's). `forced` (token ids, at least max_new_tokens):
        each step takes its next id instead of sampling (decode along a given text, as benchmarks
        do), and stats["logits_sha256"] digests every step's logits."""
        check_params(temperature, top_p, top_k)
        if max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        digest = None
        if forced is not None:
            forced = self._check_ids(forced)
            if len(forced) < max_new_tokens:
                raise InputError(f"{len(forced)} forced token ids for {max_new_tokens} new tokens")
            digest = hashlib.sha256()
        rng = np.random.default_rng(seed)
        kv, logits = context.kv, context.logits[None]
        kv.length = context.length
        kv.restore(context.recurrent)
        self._check_context(context.length + max_new_tokens)
        kv.reserve(context.length + max_new_tokens)
        stats = {} if stats is None else stats
        stats.update(decode_tokens=0, decode_s=0.0)
        self.model.experts.reset_stats()  # expert cache stats cover the decode steps
        try:
            for n in range(max_new_tokens):
                token = int(forced[n]) if forced is not None else sample(logits[-1], temperature, top_p, top_k, rng)
                yield token
                if n + 1 == max_new_tokens or (stop_at_eos and token in self.config.eos_token_ids):
                    break
                t = time.perf_counter()
                self.model.experts.token = n
                logits = self.model.forward(np.array([token], np.int64), kv)
                stats["decode_s"] += time.perf_counter() - t
                stats["decode_tokens"] += 1
                if digest is not None:
                    digest.update(logits.tobytes())
        finally:
            stats.update(self.model.experts.stats())
            if digest is not None:
                stats["logits_sha256"] = digest.hexdigest()

    def generate(self, token_ids, max_new_tokens, temperature=0.0, top_p=1.0, top_k=0, seed=None,
                 stop_at_eos=True):
        stats = {}
        tokens = list(self.stream(token_ids, max_new_tokens, temperature, top_p, top_k, seed, stop_at_eos, stats))
        stats["prefill_tok_s"] = stats["prefill_tokens"] / stats["prefill_s"] if stats["prefill_s"] else 0.0
        stats["decode_tok_s"] = stats["decode_tokens"] / stats["decode_s"] if stats["decode_s"] else 0.0
        return Generation(tokens=tokens, text=self.decode(tokens), stats=stats)
