"""KServe v2 clients: the blocking client, the async load generator, and the `infer`/`stream`/`bench` commands.

May import lstm_onnx.protocol, lstm_onnx.protos, grpc and numpy; never lstm_onnx.server (a client runs
against any KServe v2 server), torch, model or export.
"""
