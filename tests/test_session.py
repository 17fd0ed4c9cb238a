"""chat/session.py: a Session reuses the longest prefix its cache holds, and what it computes then is
bit for bit what a fresh prefill of the whole prompt computes, for an attention model (cut back
to any prefix) and a hybrid one (its recurrent state reused only when the cache holds a prefix
whole); generated tokens equal the engine's own decode."""

import numpy as np
import pytest

import lowmoe
from lowmoe.chat.session import Session, common_prefix

A = [5, 17, 300, 42, 9, 77, 100, 3]


def _fresh(path, ids):
    with lowmoe.Engine.from_pretrained(path) as e:
        return e.logits(ids)[-1]


@pytest.mark.parametrize("model", ["bundled", "qwen3_5_moe_f32"])
def test_reused_prefixes_compute_what_a_fresh_prefill_does(model, test_models):
    path = lowmoe.DEFAULT_MODEL if model == "bundled" else test_models[model]
    hybrid = model != "bundled"
    with lowmoe.Engine.from_pretrained(path) as e:
        s = Session(e)
        assert s.prefill(A) == 0
        generated = list(s.generate(6))
        assert generated == e.generate(A, 6, stop_at_eos=False).tokens
        longer = A + generated + [11, 12]  # the next turn: the reply back, then new tokens
        assert s.prefill(longer) == len(A) + 5  # all the cache holds: the last generated token was never run
        assert np.array_equal(s.logits, _fresh(path, longer))
        branch = A[:5] + [250, 251]
        assert s.prefill(branch) == (0 if hybrid else 5)  # a recurrent state cannot be cut back
        assert np.array_equal(s.logits, _fresh(path, branch))
        assert s.prefill(branch) == (0 if hybrid else len(branch) - 1)  # the same prompt: its last token runs again
        assert np.array_equal(s.logits, _fresh(path, branch))


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0
