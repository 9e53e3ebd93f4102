"""dsv4 custom ops (see registry.py). Importing this package registers `torch.ops.dsv4.*`."""

from dsv4c.graphs.ops.registry import OPS, OpDef, decode_fp4, decode_fp8, round_bf16

__all__ = ["OPS", "OpDef", "decode_fp4", "decode_fp8", "round_bf16"]
