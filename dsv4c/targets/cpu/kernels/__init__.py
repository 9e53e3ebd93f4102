"""dsv4 C++ ONNX Runtime custom-op kernels (sources here, built by `python -m dsv4c.targets.cpu.kernels.build`)."""

# The ONNX op types ops.cc registers (its `emplace_back` table; tests/test_op_coverage.py keeps the two equal).
# Ops not listed run as their ONNX function bodies (dsv4c.targets.coverage).
CPP_KERNELS = frozenset({"Fp8Linear", "Bf16Linear", "Fp8GroupedLinear", "MoeExperts", "FakeQuantFp8", "HadamardFp4",
                         "RmsNorm", "HeadRescale", "Rope", "SparseAttn", "IndexerTopK", "IndexerScores", "CompressPool",
                         "HcPre", "HcPost", "CacheWrite", "AllReduce", "AllGather", "PackKvFp8",
                         "PackFp4"})
