"""The Open Inference Protocol gRPC schema, built at import time into a private descriptor pool.

Why not generated ``*_pb2.py`` modules: the protocol's package is ``inference`` (it is part of
every RPC path, ``/inference.GRPCInferenceService/ModelInfer``, so it cannot be renamed), and
``tritonclient.grpc`` registers the same ``inference.*`` symbols in protobuf's *default* pool.
Generated stubs would collide with it in one process (``duplicate symbol
'inference.ServerLiveRequest'``) and would tie the server to the protobuf version that generated
them. Describing the messages here and loading them into a pool of our own avoids both: the wire
format is identical (the tests compare every field with tritonclient's own descriptors), the
server and tritonclient live in one process, and any protobuf >= 4.21 works.

Only the six RPCs of the OIP core are described; everything else answers UNIMPLEMENTED.
"""

from __future__ import annotations

from typing import Any, Final

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

__all__ = ["PACKAGE", "RPCS", "SERVICE", "message_class"]

PACKAGE: Final = "inference"
SERVICE: Final = "GRPCInferenceService"

_F = descriptor_pb2.FieldDescriptorProto
_SCALARS: Final = {
    "bool": _F.TYPE_BOOL,
    "int32": _F.TYPE_INT32,
    "int64": _F.TYPE_INT64,
    "uint32": _F.TYPE_UINT32,
    "uint64": _F.TYPE_UINT64,
    "float": _F.TYPE_FLOAT,
    "double": _F.TYPE_DOUBLE,
    "string": _F.TYPE_STRING,
    "bytes": _F.TYPE_BYTES,
}

# message name -> fields (name, number, type, "repeated" | "map" | "" | oneof name). A type that
# is not a scalar names a message of this file. Field numbers are the protocol's.
_PARAMS: Final = ("parameters", 4, "InferParameter", "map")
_MESSAGES: Final[dict[str, list[tuple[str, int, str, str]]]] = {
    "ServerLiveRequest": [],
    "ServerLiveResponse": [("live", 1, "bool", "")],
    "ServerReadyRequest": [],
    "ServerReadyResponse": [("ready", 1, "bool", "")],
    "ModelReadyRequest": [("name", 1, "string", ""), ("version", 2, "string", "")],
    "ModelReadyResponse": [("ready", 1, "bool", "")],
    "ServerMetadataRequest": [],
    "ServerMetadataResponse": [
        ("name", 1, "string", ""),
        ("version", 2, "string", ""),
        ("extensions", 3, "string", "repeated"),
    ],
    "ModelMetadataRequest": [("name", 1, "string", ""), ("version", 2, "string", "")],
    "ModelMetadataResponse.TensorMetadata": [
        ("name", 1, "string", ""),
        ("datatype", 2, "string", ""),
        ("shape", 3, "int64", "repeated"),
    ],
    "ModelMetadataResponse": [
        ("name", 1, "string", ""),
        ("versions", 2, "string", "repeated"),
        ("platform", 3, "string", ""),
        ("inputs", 4, "ModelMetadataResponse.TensorMetadata", "repeated"),
        ("outputs", 5, "ModelMetadataResponse.TensorMetadata", "repeated"),
    ],
    "ModelInferRequest.InferInputTensor": [
        ("name", 1, "string", ""),
        ("datatype", 2, "string", ""),
        ("shape", 3, "int64", "repeated"),
        _PARAMS,
        ("contents", 5, "InferTensorContents", ""),
    ],
    "ModelInferRequest.InferRequestedOutputTensor": [
        ("name", 1, "string", ""),
        ("parameters", 2, "InferParameter", "map"),
    ],
    "ModelInferRequest": [
        ("model_name", 1, "string", ""),
        ("model_version", 2, "string", ""),
        ("id", 3, "string", ""),
        _PARAMS,
        ("inputs", 5, "ModelInferRequest.InferInputTensor", "repeated"),
        ("outputs", 6, "ModelInferRequest.InferRequestedOutputTensor", "repeated"),
        ("raw_input_contents", 7, "bytes", "repeated"),
    ],
    "ModelInferResponse.InferOutputTensor": [
        ("name", 1, "string", ""),
        ("datatype", 2, "string", ""),
        ("shape", 3, "int64", "repeated"),
        _PARAMS,
        ("contents", 5, "InferTensorContents", ""),
    ],
    "ModelInferResponse": [
        ("model_name", 1, "string", ""),
        ("model_version", 2, "string", ""),
        ("id", 3, "string", ""),
        _PARAMS,
        ("outputs", 5, "ModelInferResponse.InferOutputTensor", "repeated"),
        ("raw_output_contents", 6, "bytes", "repeated"),
    ],
    "InferParameter": [
        ("bool_param", 1, "bool", "parameter_choice"),
        ("int64_param", 2, "int64", "parameter_choice"),
        ("string_param", 3, "string", "parameter_choice"),
        ("double_param", 4, "double", "parameter_choice"),
        ("uint64_param", 5, "uint64", "parameter_choice"),
    ],
    "InferTensorContents": [
        ("bool_contents", 1, "bool", "repeated"),
        ("int_contents", 2, "int32", "repeated"),
        ("int64_contents", 3, "int64", "repeated"),
        ("uint_contents", 4, "uint32", "repeated"),
        ("uint64_contents", 5, "uint64", "repeated"),
        ("fp32_contents", 6, "float", "repeated"),
        ("fp64_contents", 7, "double", "repeated"),
        ("bytes_contents", 8, "bytes", "repeated"),
    ],
}

#: RPC name -> (request message, response message).
RPCS: Final = {
    name: (f"{name}Request", f"{name}Response")
    for name in (
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
    )
}


def _field(
    owner: descriptor_pb2.DescriptorProto,
    owner_name: str,
    spec: tuple[str, int, str, str],
) -> None:
    name, number, kind, label = spec
    field = owner.field.add(name=name, number=number, json_name=_camel(name))
    if kind in _SCALARS:
        field.type = _SCALARS[kind]
    else:
        field.type = _F.TYPE_MESSAGE
        field.type_name = f".{PACKAGE}.{kind}"
    field.label = _F.LABEL_REPEATED if label in ("repeated", "map") else _F.LABEL_OPTIONAL
    if label == "map":
        # A proto3 map is a repeated nested "<Name>Entry" message flagged map_entry.
        entry_name = "".join(part.title() for part in name.split("_")) + "Entry"
        entry = owner.nested_type.add(name=entry_name)
        entry.options.map_entry = True
        entry_qualified = f"{owner_name}.{entry_name}"
        _field(entry, entry_qualified, ("key", 1, "string", ""))
        _field(entry, entry_qualified, ("value", 2, kind, ""))
        field.type_name = f".{PACKAGE}.{entry_qualified}"
    elif label not in ("", "repeated"):
        oneofs = [o.name for o in owner.oneof_decl]
        if label not in oneofs:
            owner.oneof_decl.add(name=label)
            oneofs.append(label)
        field.oneof_index = oneofs.index(label)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto(
        name="packrunner/open_inference_grpc.proto", package=PACKAGE, syntax="proto3"
    )
    messages: dict[str, descriptor_pb2.DescriptorProto] = {}
    # Outer messages first so nested ones can be attached to them.
    for qualified in sorted(_MESSAGES, key=lambda q: q.count(".")):
        outer, _, inner = qualified.rpartition(".")
        parent = messages[outer].nested_type if outer else proto.message_type
        messages[qualified] = parent.add(name=inner)
    for qualified, fields in _MESSAGES.items():
        for spec in fields:
            _field(messages[qualified], qualified, spec)
    service = proto.service.add(name=SERVICE)
    for rpc, (request, response) in RPCS.items():
        service.method.add(
            name=rpc, input_type=f".{PACKAGE}.{request}", output_type=f".{PACKAGE}.{response}"
        )
    return proto


_POOL: Final = descriptor_pool.DescriptorPool()
_POOL.Add(_file_descriptor())


def message_class(name: str) -> Any:
    """The message class of ``inference.<name>`` (e.g. ``"ModelInferRequest"``)."""
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{PACKAGE}.{name}"))
