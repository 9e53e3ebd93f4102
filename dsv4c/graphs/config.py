"""DeepSeek-V4 model configuration.

Field names are the Hugging Face `config.json` names of the official checkpoints, so a config round-trips
through `config.json` unchanged. Presets: the two published models (`v4-flash`, `v4-pro`, exact values from
their `config.json`), a ~1B real-shaped model for CPU work (`mini-1b`) and two tiny test models that keep every
code path (SWA-only, CSA + indexer, HCA, hash-routed MoE, MTP) alive in a few MB.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """An invalid model configuration; the message names the offending field."""


@dataclass(frozen=True)
class YarnScaling:
    factor: float = 16.0
    original_max_position_embeddings: int = 65536
    beta_fast: int = 32
    beta_slow: int = 1


@dataclass(frozen=True)
class QuantizationConfig:
    """The checkpoint's storage format (`quantization_config` + `expert_dtype`)."""

    dense: str = "fp8"  # "fp8" (e4m3, 128x128 ue8m0 blocks) or "bf16"
    experts: str = "fp4"  # "fp4" (e2m1, 1x32 ue8m0 blocks), "fp8" or "bf16"


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 4096
    num_hidden_layers: int = 43
    num_nextn_predict_layers: int = 1
    num_attention_heads: int = 64
    num_key_value_heads: int = 1
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    sliding_window: int = 128
    # One entry per layer plus one per MTP layer: 0 = sliding window only, 4 = CSA, anything else = HCA.
    compress_ratios: tuple[int, ...] = (0, 0) + (4, 128) * 20 + (4, 0)
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_scaling: YarnScaling = field(default_factory=YarnScaling)
    max_position_embeddings: int = 1048576
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    n_routed_experts: int = 256
    num_experts_per_tok: int = 6
    n_shared_experts: int = 1
    moe_intermediate_size: int = 2048
    num_hash_layers: int = 3
    scoring_func: str = "sqrtsoftplus"
    routed_scaling_factor: float = 1.5
    norm_topk_prob: bool = True
    swiglu_limit: float = 10.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    bos_token_id: int = 0
    eos_token_id: int = 1
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)

    # ---- derived quantities -------------------------------------------------------------------------
    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.qk_rope_head_dim

    @property
    def hc_mix_dim(self) -> int:  # (2 + n) * n: n pre weights, n post weights, n*n comb
        return (2 + self.hc_mult) * self.hc_mult

    def layer_ratio(self, layer: int) -> int:
        """Compression ratio of main layer `layer` (0..L-1) or MTP layer (L..L+M-1)."""
        return self.compress_ratios[layer]

    def is_hash_layer(self, layer: int) -> bool:
        return layer < self.num_hash_layers

    def validate(self) -> "ModelConfig":
        """Raise ConfigError naming the first inconsistent field."""

        def need(cond: bool, name: str, why: str) -> None:
            if not cond:
                raise ConfigError(f"config field `{name}`={getattr(self, name)!r}: {why}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                     "q_lora_rank", "o_groups", "o_lora_rank", "sliding_window", "n_routed_experts",
                     "num_experts_per_tok", "moe_intermediate_size", "hc_mult", "hc_sinkhorn_iters"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name, "must be a positive integer")
        need(self.num_key_value_heads == 1, "num_key_value_heads", "DeepSeek-V4 has one shared K=V head")
        need(self.qk_rope_head_dim % 2 == 0 and 0 < self.qk_rope_head_dim < self.head_dim, "qk_rope_head_dim",
             "must be even and smaller than head_dim")
        need(self.nope_head_dim % 64 == 0, "head_dim",
             f"head_dim - qk_rope_head_dim = {self.nope_head_dim} must be a multiple of 64 (FP8 KV blocks)")
        need(self.num_attention_heads % self.o_groups == 0, "o_groups",
             f"must divide num_attention_heads={self.num_attention_heads}")
        need(len(self.compress_ratios) == self.num_hidden_layers + self.num_nextn_predict_layers,
             "compress_ratios", f"needs num_hidden_layers + num_nextn_predict_layers = "
             f"{self.num_hidden_layers + self.num_nextn_predict_layers} entries, got {len(self.compress_ratios)}")
        need(all(isinstance(r, int) and r >= 0 for r in self.compress_ratios), "compress_ratios",
             "entries must be non-negative integers")
        need(all(r == 0 for r in self.compress_ratios[self.num_hidden_layers:]), "compress_ratios",
             "MTP layers (the trailing entries) are sliding-window only: their ratio must be 0")
        need(self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok",
             f"cannot exceed n_routed_experts={self.n_routed_experts}")
        need(self.n_shared_experts == 1, "n_shared_experts", "DeepSeek-V4 has exactly one shared expert")
        need(0 <= self.num_hash_layers <= self.num_hidden_layers, "num_hash_layers",
             "must lie in [0, num_hidden_layers]")
        need(self.scoring_func == "sqrtsoftplus", "scoring_func", "only 'sqrtsoftplus' is DeepSeek-V4")
        if any(r == 4 for r in self.compress_ratios):
            need(self.index_head_dim % 32 == 0 and self.index_head_dim & (self.index_head_dim - 1) == 0,
                 "index_head_dim", "must be a power of two >= 32 (Hadamard + FP4 blocks of 32)")
            need(self.index_head_dim >= self.qk_rope_head_dim, "index_head_dim", "must be at least qk_rope_head_dim")
            need(self.index_topk > 0 and self.index_n_heads > 0, "index_topk", "indexer sizes must be positive")
        if self.quantization.dense == "fp8":
            for name in ("hidden_size", "q_lora_rank"):
                need(getattr(self, name) % 128 == 0, name, "must be a multiple of 128 for FP8 activation blocks")
            need(self.o_groups * self.o_lora_rank % 128 == 0, "o_lora_rank",
                 "o_groups * o_lora_rank must be a multiple of 128 for FP8 activation blocks")
        if self.quantization.experts in ("fp4", "fp8"):
            need(self.moe_intermediate_size % 128 == 0, "moe_intermediate_size",
                 "must be a multiple of 128 for FP8 activation blocks")
        need(self.quantization.dense in ("fp8", "bf16"), "quantization", "dense must be fp8 or bf16")
        need(self.quantization.experts in ("fp4", "fp8", "bf16"), "quantization", "experts must be fp4, fp8 or bf16")
        return self

    # ---- official config.json ---------------------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "architectures": ["DeepseekV4ForCausalLM"],
            "model_type": "deepseek_v4",
        }
        for f in dataclasses.fields(self):
            if f.name in ("rope_scaling", "quantization"):
                continue
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        d["rope_scaling"] = {"type": "yarn", **dataclasses.asdict(self.rope_scaling)}
        d.update(hidden_act="silu", topk_method="noaux_tc", tie_word_embeddings=False, attention_bias=False,
                 attention_dropout=0.0, torch_dtype="bfloat16")
        if self.quantization.dense == "fp8":
            d["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                        "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
        if self.quantization.experts == "fp4":
            d["expert_dtype"] = "fp4"
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for k, v in d.items():
            if k in known and k not in ("rope_scaling", "quantization"):
                kwargs[k] = tuple(v) if isinstance(v, list) else v
        if "model_type" in d and d["model_type"] != "deepseek_v4":
            raise ConfigError(f"{source}: `model_type` is {d['model_type']!r}, expected 'deepseek_v4'")
        rs = d.get("rope_scaling") or {}
        if rs:
            kwargs["rope_scaling"] = YarnScaling(
                factor=float(rs.get("factor", 16.0)),
                original_max_position_embeddings=int(rs.get("original_max_position_embeddings", 65536)),
                beta_fast=int(rs.get("beta_fast", 32)), beta_slow=int(rs.get("beta_slow", 1)))
        qc = d.get("quantization_config")
        dense = "fp8" if qc and qc.get("quant_method") == "fp8" else "bf16"
        if qc and qc.get("scale_fmt", "ue8m0") != "ue8m0":
            raise ConfigError(f"{source}: `quantization_config.scale_fmt`={qc.get('scale_fmt')!r}; only ue8m0 "
                              "(e8m0 scales, as DeepSeek ships V4) is supported")
        expert_dtype = d.get("expert_dtype") or (qc or {}).get("expert_dtype")
        experts = "fp4" if expert_dtype == "fp4" else dense
        kwargs["quantization"] = QuantizationConfig(dense=dense, experts=experts)
        if "compress_ratios" not in kwargs:
            raise ConfigError(f"{source}: missing `compress_ratios` (official DeepSeek-V4 config field)")
        try:
            cfg = cls(**kwargs)
        except TypeError as e:  # pragma: no cover - defensive
            raise ConfigError(f"{source}: {e}") from e
        return cfg.validate()

    @classmethod
    def from_json_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config.json not found") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        return cls.from_hf_dict(d, source=str(path))

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes).validate()


# ---- presets -------------------------------------------------------------------------------------------
V4_FLASH = ModelConfig()

V4_PRO = ModelConfig(
    hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536, o_groups=16,
    compress_ratios=(128, 128) + (4, 128) * 29 + (4, 0), index_topk=1024, n_routed_experts=384,
    moe_intermediate_size=3072, routed_scaling_factor=2.5)

# Tiny: 4 layers + MTP covering SWA-only (0), CSA with indexer (4) and HCA (128, needs >= 128 tokens to emit),
# one hash-routed MoE layer. FP8 dims are multiples of 128, nope = 64, 2 heads per o-group.
TINY = ModelConfig(
    vocab_size=1024, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, head_dim=128,
    q_lora_rank=128, o_groups=2, o_lora_rank=64, sliding_window=16, compress_ratios=(0, 4, 128, 4, 0),
    index_n_heads=4, index_head_dim=64, index_topk=8, n_routed_experts=8, num_experts_per_tok=2,
    moe_intermediate_size=128, num_hash_layers=1, routed_scaling_factor=1.5)

# A second tiny shape: HCA with a short ratio (16) so compressed entries appear in short prompts, more heads,
# a wider window, two hash layers and top-3 routing.
TINY_B = ModelConfig(
    vocab_size=1024, hidden_size=384, num_hidden_layers=5, num_attention_heads=8, head_dim=128,
    q_lora_rank=256, o_groups=4, o_lora_rank=32, sliding_window=24, compress_ratios=(4, 16, 4, 0, 16, 0),
    index_n_heads=2, index_head_dim=128, index_topk=5, n_routed_experts=6, num_experts_per_tok=3,
    moe_intermediate_size=256, num_hash_layers=2, routed_scaling_factor=2.5)

# ~0.9B parameters with the real per-head shapes (head_dim 512, rope 64, 8 heads per o-group, window 128,
# CSA/HCA ratios 4/128, real vocabulary): what the real model's kernels see, at a size a CPU can run.
MINI_1B = ModelConfig(
    hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, q_lora_rank=256, o_groups=2,
    o_lora_rank=256, compress_ratios=(0, 0, 4, 128, 4, 128, 4, 128, 0), index_n_heads=16, index_topk=128,
    n_routed_experts=48, moe_intermediate_size=512, num_hash_layers=2)

PRESETS: dict[str, ModelConfig] = {
    "v4-flash": V4_FLASH, "v4-pro": V4_PRO, "mini-1b": MINI_1B, "tiny": TINY, "tiny-b": TINY_B,
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name].validate()
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}") from None
