"""ONNX step-graph export, onnxruntime policy wrapper, parity check and latency benchmark.

Imports only ``policies`` from this project (docs/design.md §1). ``export.runtime`` and
``export.bench`` import neither torch nor gymnasium: they run on edge devices with only
numpy and onnxruntime installed.
"""
