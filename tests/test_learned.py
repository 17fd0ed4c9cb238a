"""The learned predictor: fitting recovers a planted routing, bad files are clear errors, and a
model folder with a fitted file picks it by default without changing any output."""

import shutil

import numpy as np
import pytest
from safetensors.numpy import save_file

import lowmoe
from lowmoe.cli.__main__ import main as cli
from lowmoe.errors import CheckpointError, InputError
from lowmoe.predict import learned

PROMPT = [5, 17, 300, 42, 9, 77, 1000, 3, 12, 250, 8, 64]


def test_fit_recovers_planted_routing():
    rng = np.random.default_rng(0)
    D, E, k = 32, 16, 4
    A = rng.standard_normal((E, D)).astype(np.float32)

    def sample(n):
        u = learned.normalise(rng.standard_normal((n, D)).astype(np.float32), 1e-6)
        return u, np.argsort(-(u @ A.T), axis=1)[:, :k]  # top-k is scale-free: same as on raw h

    u, chosen = sample(4000)
    w, b = learned.fit(u, chosen, np.zeros((E, D), np.float32), np.zeros(E, np.float32))
    assert learned.topk_recall(w, b, *sample(2000)) >= 0.9


@pytest.fixture(scope="module")
def cfg():
    return lowmoe.Engine.from_pretrained().config


def _dense(cfg):
    from lowmoe.load.checkpoint import Checkpoint
    from lowmoe.load.weights import load_dense

    return load_dense(Checkpoint(lowmoe.DEFAULT_MODEL), cfg)


def _layers(cfg):
    E, D = cfg.num_experts, cfg.hidden_size
    return {n: (np.zeros((E, D), np.float32), np.zeros(E, np.float32)) for n in cfg.moe_layers[:-1]}


def test_bad_file_names_file_and_tensor(cfg, tmp_path):
    good = tmp_path / "good.safetensors"
    learned.save(good, cfg, _layers(cfg))
    assert set(learned.Learned(cfg, good, _dense(cfg)).layers) == set(cfg.moe_layers[:-1])

    meta = {"model_type": cfg.model_type, "hidden_size": str(cfg.hidden_size), "num_experts": str(cfg.num_experts)}
    tensors = {f"predictor.layers.{n}.{s}": t for n, (w, b) in _layers(cfg).items() for s, t in (("weight", w), ("bias", b))}
    wrong = dict(tensors, **{"predictor.layers.1.weight": np.zeros((cfg.num_experts, 7), np.float32)})
    missing = {name: t for name, t in tensors.items() if name != "predictor.layers.2.bias"}
    for case, ts, tensor in (("wrong", wrong, "predictor.layers.1.weight"), ("missing", missing, "predictor.layers.2.bias")):
        path = tmp_path / f"{case}.safetensors"
        save_file(ts, str(path), metadata=meta)
        with pytest.raises(CheckpointError, match=f"{path}.*{tensor}"):
            learned.Learned(cfg, path, _dense(cfg))
    bad_table = tmp_path / "table.safetensors"
    first = np.full((cfg.vocab_size, cfg.top_k), cfg.num_experts, np.int32)  # an expert id past the last
    learned.save(bad_table, cfg, _layers(cfg), first)
    with pytest.raises(CheckpointError, match=f"{bad_table}.*{learned.FIRST}"):
        learned.Learned(cfg, bad_table, _dense(cfg))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=str(junk)):
        learned.Learned(cfg, junk, _dense(cfg))


def test_explicit_learned_without_file_is_one_line_error(tmp_path):
    model = shutil.copytree(lowmoe.DEFAULT_MODEL, tmp_path / "model")
    with pytest.raises(InputError, match=str(model / learned.FILENAME)):
        lowmoe.Engine.from_pretrained(model, expert_cache="25%", predictor="learned")


def test_trained_file_is_default_and_changes_no_output(tmp_path):
    model = shutil.copytree(lowmoe.DEFAULT_MODEL, tmp_path / "model")
    assert cli(["train-predictor", str(model), "--tokens", "200"]) == 0
    assert (model / learned.FILENAME).is_file()
    with lowmoe.Engine.from_pretrained(model) as e:
        reference = e.generate(PROMPT, 16, stop_at_eos=False).tokens
    for budget in ("min", "25%"):
        for lookahead in (1, 2):
            with lowmoe.Engine.from_pretrained(model, expert_cache=budget, lookahead=lookahead) as e:
                assert isinstance(e.model.predictor, learned.Learned)
                gen = e.generate(PROMPT, 16, stop_at_eos=False)
            assert gen.tokens == reference
            assert gen.stats["prefetched"] > 0


def test_a_fitted_layer_worse_than_nextgate_online_gives_way_to_it(cfg, tmp_path):
    """One layer's map ranks the experts backwards: after one token scored, that layer's hints are
    nextgate's top-k; the other layers, which hold nextgate itself, are neither changed nor scored."""
    from lowmoe.predict.nextgate import NextGate

    dense = _dense(cfg)
    layers = {n: learned.nextgate_init(cfg, dense, n) for n in cfg.moe_layers[:-1]}
    bad = cfg.moe_layers[2]
    layers[bad] = (-layers[bad][0], -layers[bad][1])
    path = tmp_path / "predictor.safetensors"
    learned.save(path, cfg, layers)
    p, plain = learned.Learned(cfg, path, dense), NextGate(cfg, dense)
    assert set(p.nextgate) == {bad}
    rng, k = np.random.default_rng(3), cfg.top_k
    truth = {}  # the experts each layer "chooses": nextgate's top-k from the layer before
    for token in range(3):
        for layer in cfg.moe_layers:
            h = rng.standard_normal((1, cfg.hidden_size)).astype(np.float32)
            chosen = truth.get(layer, np.arange(k))
            got = p.predict(layer, h, chosen)
            want = plain.predict(layer, h, chosen)
            if not want:
                assert got == []
                continue
            (nxt, ranked), (_, ranked_plain) = got[0], want[0]
            truth[nxt] = ranked_plain[:k]
            same = set(ranked[:k].tolist()) == set(ranked_plain[:k].tolist())
            assert same == (layer != bad or token > 0), (token, layer)


def test_the_fitted_token_table_starts_the_first_layers_hints(tmp_path):
    """train-predictor saves the first MoE layer's routing of each calibration token; an engine
    with the file starts from that table, so the first layer's hints are right from the first
    decode step on text like the calibration's, where an engine without it starts empty (measured:
    first-layer recall 0.92 against 0.81 along the calibration text)."""
    model = shutil.copytree(lowmoe.DEFAULT_MODEL, tmp_path / "model")
    calib = tmp_path / "calib.txt"
    with lowmoe.Engine.from_pretrained(model) as e:
        text = e.decode(e.generate(PROMPT, 120, stop_at_eos=False).tokens)
    calib.write_text(text, encoding="utf-8")
    assert cli(["train-predictor", str(model), "--calib", str(calib), "--tokens", "120"]) == 0
    cfg = lowmoe.Engine.from_pretrained(model).config
    _, first = learned.load(str(model / learned.FILENAME), cfg)
    with lowmoe.Engine.from_pretrained(model) as e:
        ids = e.encode(text)[:120]
    seen = np.unique(ids)
    assert (first[seen] >= 0).all() and (np.delete(first, seen, axis=0) == -1).all()
    recall = {}
    for name, options in (("fitted", {}), ("empty", dict(predictor="nextgate"))):
        with lowmoe.Engine.from_pretrained(model, expert_cache="25%", **options) as e:
            if name == "fitted":
                assert np.array_equal(e.model.first.experts, first)
            stats = {}
            list(e.stream_from(e.prefill(ids[:1], 40), 40, stats=stats, forced=ids[1:41]))  # along the calibration text
            recall[name] = stats["per_layer"][0]["topk_recall"]
    assert recall["fitted"] > recall["empty"], recall
