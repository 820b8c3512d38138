"""lstm_onnx.model: the PyTorch network, datasets, the training loop and the run-directory writer.

May import torch, numpy, safetensors and lstm_onnx.contract / lstm_onnx.errors; never export, server or client.
"""
