"""Stage 1, compile: ONNX to fused float32 and calibrated int8 TFLite, traced to the ONNX nodes, and the folder it writes."""
