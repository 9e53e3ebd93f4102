"""dsv4 C++ ONNX Runtime custom-op kernels (sources here, built by `python -m dsv4c.targets.cpu.kernels.build`)."""
