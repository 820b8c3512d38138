"""The protocol layer that server and client share: tensor codec (protobuf <-> numpy), datatypes, error kinds.

May import lstm_onnx.protos, numpy and grpc (for the status codes); never lstm_onnx.server or lstm_onnx.client.
"""
