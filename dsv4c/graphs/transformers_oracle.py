"""Hugging Face transformers' independent DeepSeek-V4 (`DeepseekV4ForCausalLM`) on one of our official-format
checkpoints: the differential oracle of the tests and the baseline of benchmarks/decode_cpu.py.

transformers names the layer layout differently (layer_types / compress_rates / mlp_layer_types /
partial_rotary_factor) and dequantizes FP8/FP4 weights on load; it runs fp32 without activation quantization or
QAT simulation, so compare it with `Numerics.plain()` on our side. transformers is a test/benchmark dependency,
imported only here.
"""

from __future__ import annotations

import json
from pathlib import Path


def transformers_config(checkpoint: Path):
    """Our config.json (official field names) -> transformers' DeepseekV4Config."""
    from transformers import DeepseekV4Config

    d = json.loads((Path(checkpoint) / "config.json").read_text())
    ratios = d.pop("compress_ratios")[: d["num_hidden_layers"]]
    kind = {0: "sliding_attention", 4: "compressed_sparse_attention"}
    d["layer_types"] = [kind.get(r, "heavily_compressed_attention") for r in ratios]
    d["compress_rates"] = {"compressed_sparse_attention": 4,
                           "heavily_compressed_attention": max([r for r in ratios if r not in (0, 4)] or [128])}
    hash_layers = ["hash_moe"] * d.pop("num_hash_layers") + ["moe"] * d["num_hidden_layers"]
    d["mlp_layer_types"] = hash_layers[: d["num_hidden_layers"]]
    d["partial_rotary_factor"] = d.pop("qk_rope_head_dim") / d["head_dim"]
    return DeepseekV4Config(**d)


def load_transformers_model(checkpoint: Path):
    """transformers' model in fp32 with the checkpoint's FP8/FP4 weights dequantised on load."""
    import torch
    from transformers import DeepseekV4ForCausalLM, FineGrainedFP8Config

    model = DeepseekV4ForCausalLM.from_pretrained(
        checkpoint, config=transformers_config(checkpoint), quantization_config=FineGrainedFP8Config(dequantize=True),
        dtype=torch.float32)
    return model.float().eval()
