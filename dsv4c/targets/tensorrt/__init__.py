"""TensorRT target: ONNX (opset 22) with dsv4 plugin nodes, Triton plugin kernels, engine build where TensorRT exists."""
