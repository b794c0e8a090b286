"""Reading and running models on the host: TFLite flatbuffers, ONNX graphs, layers, the TFLite runtime."""
