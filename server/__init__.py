"""lstm_onnx.server: a Triton-layout model repository served over KServe v2 gRPC with Triton's extensions.

Runtime, scheduler/batcher, sequence store, servicers, metrics and settings. May import lstm_onnx.protos,
lstm_onnx.protocol, lstm_onnx.contract, onnx, onnxruntime, grpcio and numpy; never torch, model, export or
client, so the server image installs without torch.
"""
