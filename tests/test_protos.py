"""Our .proto files are wire-compatible with Triton's (tritonclient's descriptors), and the stubs are current."""
from __future__ import annotations

import filecmp

import pytest


def _fields(message):
    return {f.name: (f.number, f.type, f.is_repeated,
                     f.message_type.full_name if f.message_type else None,
                     f.enum_type.full_name if f.enum_type else None) for f in message.fields}


def _walk(message):
    yield message
    for nested in message.nested_types:
        yield from _walk(nested)


@pytest.mark.parametrize("module", ["grpc_service_pb2", "model_config_pb2"])
def test_every_message_matches_tritonclient_field_for_field(module):
    import importlib

    ours = importlib.import_module(f"protos.{module}").DESCRIPTOR
    theirs = importlib.import_module(f"tritonclient.grpc.{module.replace('grpc_', '')}").DESCRIPTOR
    assert ours.package == theirs.package == "inference"
    checked = 0
    for top in ours.message_types_by_name.values():
        for message in _walk(top):
            other = theirs.pool.FindMessageTypeByName(message.full_name)
            assert _fields(message) == _fields(other), message.full_name
            checked += 1
    for enum in ours.enum_types_by_name.values():
        other = theirs.pool.FindEnumTypeByName(enum.full_name)
        assert {v.name: v.number for v in enum.values} == {v.name: v.number for v in other.values}
    assert checked > 20


def test_service_methods_match_tritonclient():
    from tritonclient.grpc import service_pb2

    from lstm_onnx.protos import grpc_service_pb2

    ours = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in ours.methods:
        other = theirs.methods_by_name[method.name]
        assert (method.input_type.full_name, method.output_type.full_name,
                method.client_streaming, method.server_streaming) == (
            other.input_type.full_name, other.output_type.full_name, other.client_streaming, other.server_streaming)
    assert {"ModelInfer", "ModelStreamInfer", "ModelConfig", "ModelStatistics", "RepositoryIndex"} <= set(
        ours.methods_by_name)


def test_generated_stubs_are_up_to_date(tmp_path):
    from lstm_onnx.protos.generate import HERE, generate_stubs

    for path in generate_stubs(tmp_path):
        assert filecmp.cmp(path, HERE / path.name, shallow=False), f"{path.name} is stale: run python -m protos.generate"
