"""Backends that execute a validated grouped-matmul call (DESIGN.md section 4)."""

BACKENDS = ("reference", "cpu", "cuda", "npu")
