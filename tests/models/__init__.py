"""Tests of packrunner.models (BERT ONNX graph builder)."""
