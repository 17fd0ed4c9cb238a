"""Predictors of the experts the next MoE layer will choose, one file each.

Each has `predict(layer, h, chosen) -> (next_layer, ranked)` or None after the last MoE layer:
h f32[1, D] is layer `layer`'s residual stream after attention, chosen int64[k] the experts its
own gating just picked, ranked the next MoE layer's experts, most likely first. Predictions are
hints only: they start reads, never change results.
"""


def next_moe_layers(cfg):
    """{MoE layer: the next MoE layer} for every MoE layer but the last."""
    layers = cfg.moe_layers
    return dict(zip(layers, layers[1:]))
