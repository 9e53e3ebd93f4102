"""The CANN target (Huawei Ascend 950 / 910B): target.py (check / lower / build), executor.py (CPU emulation of
the bundle, pyACL for built .om models), mapping.py (dsv4 op -> CANN operator table with sources), lowering.py
(the ONNX rewrite), requant.py (weight conversion and its measured error), reference.py (reference
implementations of the CANN nodes), atc_onnx_ops.txt (ONNX operators ATC parses)."""
