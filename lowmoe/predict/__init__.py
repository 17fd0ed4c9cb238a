"""Predictors of the experts the next MoE layer will choose, one file each.

Each has `predict(layer, h, chosen) -> [(later MoE layer, ranked), ...]`: hints for the next MoE
layer and, where the predictor can look further (nextgate, oracle with lookahead 2), the one
after; [] after the last MoE layer. h f32[1, D] is layer `layer`'s residual stream after
attention, chosen int64[k] the experts its own gating just picked, ranked a later layer's
experts, most likely first. Predictions are hints only: they start reads, never change results.
"""


def next_moe_layers(cfg, distance=1):
    """{MoE layer: the MoE layer `distance` after it} for every MoE layer that has one."""
    layers = cfg.moe_layers
    return dict(zip(layers, layers[distance:]))
