"""Tests of packrunner.graphs (the ONNX graph toolkit shared by builder and converter)."""
