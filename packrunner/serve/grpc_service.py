"""Open Inference Protocol over gRPC (``inference.GRPCInferenceService``) on ``grpc.aio``.

ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata and ModelInfer; other RPCs
answer UNIMPLEMENTED. Inputs come as ``raw_input_contents`` or typed ``contents``; outputs always
go out as ``raw_output_contents`` (tritonclient's ``as_numpy`` reads only those). The client's
deadline joins the effective deadline; a cancelled RPC cancels the handler task, which withdraws
its samples. Overload is RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

import grpc
import grpc.aio
import numpy as np
import numpy.typing as npt

from packrunner.serve import oip_proto
from packrunner.serve.errors import ErrorKind, Protocol, ServeError
from packrunner.serve.sequences import (
    assemble_outputs,
    check_outputs,
    model_tensors,
    split_sequences,
)
from packrunner.serve.service import Service
from packrunner.serve.settings import ServeSettings
from packrunner.serve.v2_codec import DATATYPES, tensor_from_bytes
from packrunner.serve.v2_routes import PLATFORM, SERVER_NAME, server_metadata

__all__ = ["MAX_MESSAGE_BYTES", "add_inference_service", "server_options"]

logger = logging.getLogger("packrunner.serve")

#: Receive/send limit: tritonclient's channel allows 2 GiB; the default 4 MiB server limit would
#: refuse large multi-sequence requests that fit --payload-limit.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# Typed InferTensorContents field per OIP datatype.
_CONTENTS = {
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BOOL": "bool_contents",
}


def server_options(settings: ServeSettings) -> list[tuple[str, int]]:
    """Channel arguments of the ``grpc.aio`` server.

    Besides the message limits: gRPC core queues the calls that arrive faster than grpc.aio's
    serve loop picks them up, and beyond ``grpc.server.max_pending_requests`` (default 1000)
    drops them at random (random early detection, certain at the hard limit, default 3000).
    A dropped call never reaches the service and its client sees a bare CANCELLED (1,500 RPCs
    started at once on one channel lost ~2% that way). Admission is the service's job, with
    an explicit RESOURCE_EXHAUSTED, so core's limits are set beyond every request the service
    can hold or refuse: admitted requests plus queued sequences (each request has at least
    one), and the hard limit twice that.
    """
    pending = max(1000, settings.max_concurrent_requests + settings.max_queued_sequences)
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.server.max_pending_requests", pending),
        ("grpc.server.max_pending_requests_hard_limit", 2 * pending),
    ]


_Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
_Rpc = Callable[[Any, _Context], Awaitable[Any]]


def _parameter(value: Any) -> object:
    choice = value.WhichOneof("parameter_choice")
    return None if choice is None else getattr(value, choice)


def _decode_inputs(request: Any) -> dict[str, tuple[str, npt.NDArray[Any]]]:
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise ServeError(
            ErrorKind.VALIDATION,
            f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs",
        )
    inputs: dict[str, tuple[str, npt.NDArray[Any]]] = {}
    for index, tensor in enumerate(request.inputs):
        shape = list(tensor.shape)
        if tensor.datatype not in DATATYPES or any(d < 0 for d in shape):
            raise ServeError(
                ErrorKind.VALIDATION,
                f"input {tensor.name!r}: datatype {tensor.datatype!r} / shape {shape} invalid",
            )
        if raw:
            array = tensor_from_bytes(tensor.datatype, shape, raw[index], tensor.name)
        else:
            field = _CONTENTS.get(tensor.datatype)
            values = getattr(tensor.contents, field) if field else []
            try:
                array = np.asarray(values, DATATYPES[tensor.datatype]).reshape(shape)
            except ValueError:
                raise ServeError(
                    ErrorKind.VALIDATION,
                    f"input {tensor.name!r}: {len(values)} values do not fill shape {shape}",
                ) from None
        inputs[tensor.name] = (tensor.datatype, array)
    return inputs


class InferenceServicer:
    """The six core OIP RPCs over a :class:`Service`."""

    def __init__(self, service: Service) -> None:
        self._service = service
        self._messages = {
            name: oip_proto.message_class(name) for pair in oip_proto.RPCS.values() for name in pair
        }

    def _response(self, rpc: str, **fields: Any) -> Any:
        return self._messages[oip_proto.RPCS[rpc][1]](**fields)

    async def ServerLive(self, request: Any, context: _Context) -> Any:
        return self._response("ServerLive", live=True)

    async def ServerReady(self, request: Any, context: _Context) -> Any:
        return self._response("ServerReady", ready=self._service.engine.ready)

    async def ModelReady(self, request: Any, context: _Context) -> Any:
        self._service.check_model(request.name, request.version)
        return self._response("ModelReady", ready=self._service.engine.ready)

    async def ServerMetadata(self, request: Any, context: _Context) -> Any:
        meta = server_metadata()
        return self._response(
            "ServerMetadata", name=SERVER_NAME, version=meta["version"], extensions=[]
        )

    async def ModelMetadata(self, request: Any, context: _Context) -> Any:
        service = self._service
        service.check_model(request.name, request.version)
        inputs, outputs = model_tensors(service.model)
        response = self._response(
            "ModelMetadata", name=service.model.name, versions=["1"], platform=PLATFORM
        )
        for target, tensors in ((response.inputs, inputs), (response.outputs, outputs)):
            for tensor in tensors:
                target.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        return response

    async def ModelInfer(self, request: Any, context: _Context) -> Any:
        service = self._service
        service.check_model(request.model_name, request.model_version)
        with service.engine.admit():
            samples, width = split_sequences(
                _decode_inputs(request),
                max_sequences=service.settings.max_client_batch_size,
                max_length=service.settings.input_limit,
            )
            names = check_outputs(service.model, [o.name for o in request.outputs])
            timeout = None
            if "timeout" in request.parameters:
                timeout = _parameter(request.parameters["timeout"])
            limits = [context.time_remaining()]
            if isinstance(timeout, int) and timeout > 0:
                limits.append(timeout * 1e-6)
            results = await service.engine.run(samples, service.deadline(*limits))
        tensors = assemble_outputs(service.model, results, names, width)
        response = self._response("ModelInfer", model_name=service.model.name, id=request.id)
        for name in names:
            array = tensors[name]
            response.outputs.add(name=name, datatype="FP32", shape=array.shape)
            response.raw_output_contents.append(np.ascontiguousarray(array, "<f4").tobytes())
        return response

    def _wrap(self, rpc: str, method: _Rpc, protected: bool) -> _Rpc:
        service = self._service

        async def call(request: Any, context: _Context) -> Any:
            started = time.monotonic()
            failure: ServeError | None = None
            code = "OK"
            try:
                if protected:
                    metadata = dict(context.invocation_metadata() or ())
                    token = metadata.get("authorization")
                    if not service.authorized(token if isinstance(token, str) else None):
                        raise ServeError(ErrorKind.UNAUTHENTICATED, "missing or invalid API key")
                return await method(request, context)
            except ServeError as error:
                failure, code = error, error.kind.grpc_code.name
                await context.abort(error.kind.grpc_code, error.message)
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED.name
                raise
            except Exception as exc:
                if isinstance(exc, grpc.aio.AbortError):
                    raise
                logger.exception("unhandled error in %s", rpc)
                failure = ServeError(ErrorKind.BACKEND, f"internal error: {exc!r}")
                code = failure.kind.grpc_code.name
                await context.abort(failure.kind.grpc_code, failure.message)
            finally:
                service.record(rpc, Protocol.GRPC, code, started, failure, peer=context.peer())

        return call

    def handler(self) -> grpc.GenericRpcHandler:
        """The generic handler serving ``inference.GRPCInferenceService``."""
        handlers = {}
        open_rpcs = {"ServerLive", "ServerReady", "ModelReady"}
        for rpc, (request_name, response_name) in oip_proto.RPCS.items():
            method = self._wrap(rpc, getattr(self, rpc), protected=rpc not in open_rpcs)
            handlers[rpc] = grpc.unary_unary_rpc_method_handler(
                method,
                request_deserializer=self._messages[request_name].FromString,
                response_serializer=self._messages[response_name].SerializeToString,
            )
        return grpc.method_handlers_generic_handler(
            f"{oip_proto.PACKAGE}.{oip_proto.SERVICE}", handlers
        )


def add_inference_service(server: grpc.aio.Server, service: Service) -> None:
    """Register the OIP service on a ``grpc.aio`` server."""
    server.add_generic_rpc_handlers((InferenceServicer(service).handler(),))
