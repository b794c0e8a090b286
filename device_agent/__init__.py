"""The on-device side of quantune-edge.

Runs on the device with the standard library, numpy and a TFLite runtime (tflite-runtime or
ai-edge-litert) only: it must never import TensorFlow or quantune_edge.
"""
__version__ = "0.1.0"
