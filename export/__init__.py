"""lstm_onnx.export: torch -> ONNX with explicit LSTM/GRU ops, graph rewrites, parity, verify, repository writer.

May import lstm_onnx.model, lstm_onnx.contract, onnx and onnxruntime (the torch side imported lazily);
never server or client. The torch-free weight audit lives in the subpackage `audit`.
"""
