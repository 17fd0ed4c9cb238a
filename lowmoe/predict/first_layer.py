"""The first MoE layer's experts by token id, learned online.

Nothing before the first MoE layer predicts it well: its input is the token's embedding plus one
attention (or DeltaNet) layer, and the router on the embedding alone ranked poorly on two small
trained models (top-2 recall 0.47 and 0.16). Its routing depends mostly on the token itself, though:
a table of each token id's last routing there, fitted on half a text, had recall 0.95 / 0.91 on
the other half (71% of its tokens in the table). So every forward pass (prefill and decode) writes
the first MoE layer's choice for each of its tokens here, and a decode step's refinement
(model.Model._refine) puts the table's experts for the new token ahead of the router's ranking.
`lowmoe train-predictor` fits the table on its calibration text and saves it with the learned
predictor (predict/learned.py), so that a new engine starts from it rather than empty.
"""

import numpy as np


class TokenTable:
    def __init__(self, vocab_size, top_k, fitted=None):
        self.experts = np.full((vocab_size, top_k), -1, np.int32)  # [V, k]; -1: token not seen yet
        if fitted is not None:  # a table train-predictor fitted, int32 [V, k]
            self.experts[...] = fitted

    def update(self, tokens, idx):
        """tokens int64[T], idx int[T, k] the experts the first MoE layer chose for them (a token
        that occurs twice keeps its last routing)."""
        tokens = np.asarray(tokens)
        _, from_end = np.unique(tokens[::-1], return_index=True)  # each id's last occurrence, counted from the end
        last = len(tokens) - 1 - from_end
        self.experts[tokens[last]] = np.asarray(idx)[last]

    def rank(self, token, ranked):
        """The table's experts for `token` (if seen), then the rest of `ranked` (the router's
        ranking of every expert) in its order."""
        known = self.experts[token]
        if known[0] < 0:
            return ranked
        return np.concatenate([known, ranked[~np.isin(ranked, known)]])
