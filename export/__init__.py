"""Export: a training checkpoint -> self-describing, verified ONNX encoder and decoder graphs.

`export.onnx_export.export_checkpoint` is the library entry point; `aae-export` wraps it.
"""
