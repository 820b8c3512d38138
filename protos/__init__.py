"""lstm_onnx.protos: generated gRPC stubs for the KServe v2 / Triton protocol, and their descriptor pool.

Imports only protobuf and grpc. Regenerate with `python -m lstm_onnx.protos.generate` (`make protos`).

The stubs register in `POOL`, not protobuf's default pool, because tritonclient registers the same
file and symbol names (`grpc_service.proto`, `inference.*`) there; a client and this server must be
importable in one process (tests, `lstm-onnx infer`).
"""
from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
