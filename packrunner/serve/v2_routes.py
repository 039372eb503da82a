"""Open Inference Protocol (KServe v2) REST routes."""

from __future__ import annotations

from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from packrunner._version import __version__
from packrunner.serve.errors import ErrorKind, Protocol, ServeError
from packrunner.serve.http_common import Call, Handler, endpoint
from packrunner.serve.sequences import (
    assemble_outputs,
    check_outputs,
    model_tensors,
    split_sequences,
)
from packrunner.serve.service import Service
from packrunner.serve.v2_codec import HEADER_LENGTH, encode_response, parse_request

__all__ = ["SERVER_NAME", "model_metadata", "server_metadata", "v2_routes"]

SERVER_NAME = "packrunner"
#: Platform string of the model metadata (OIP's convention for ONNX models).
PLATFORM = "onnx_onnxv1"


def server_metadata() -> dict[str, object]:
    """``GET /v2``."""
    return {"name": SERVER_NAME, "version": __version__, "extensions": ["binary_tensor_data"]}


def model_metadata(service: Service) -> dict[str, object]:
    """``GET /v2/models/{name}``: the per-sequence tensors, variable dims as -1."""
    inputs, outputs = model_tensors(service.model)
    return {
        "name": service.model.name,
        "versions": ["1"],
        "platform": PLATFORM,
        "inputs": [
            {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in inputs
        ],
        "outputs": [
            {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in outputs
        ],
    }


def _not_ready(service: Service) -> ServeError:
    return ServeError(
        ErrorKind.UNAVAILABLE, f"server is {service.engine.state.value}", retry_after_s=1
    )


async def _server(call: Call) -> Response:
    return JSONResponse(server_metadata())


async def _live(call: Call) -> Response:
    return JSONResponse({"live": True})


async def _ready(call: Call) -> Response:
    if not call.service.engine.ready:
        raise _not_ready(call.service)
    return JSONResponse({"ready": True})


def _check_model(call: Call) -> None:
    params = call.request.path_params
    call.service.check_model(params["model"], params.get("version"))


async def _model(call: Call) -> Response:
    _check_model(call)
    return JSONResponse(model_metadata(call.service))


async def _model_ready(call: Call) -> Response:
    _check_model(call)
    if not call.service.engine.ready:
        raise _not_ready(call.service)
    return JSONResponse({"name": call.service.model.name, "ready": True})


async def _infer(call: Call) -> Response:
    _check_model(call)
    service, model = call.service, call.service.model
    request = parse_request(call.body, call.request.headers.get(HEADER_LENGTH))
    samples, width = split_sequences(
        request.inputs,
        max_sequences=service.settings.max_client_batch_size,
        max_length=service.settings.input_limit,
    )
    requested = [name for name, _ in request.outputs] if request.outputs else None
    names = check_outputs(model, requested)
    binary_choice = dict(request.outputs or [])
    deadline = service.deadline(request.timeout_us * 1e-6 if request.timeout_us else None)
    results = await service.engine.run(samples, deadline)
    tensors = assemble_outputs(model, results, names, width)
    outputs = {}
    for name in names:
        choice = binary_choice.get(name)
        outputs[name] = (tensors[name], request.binary_default if choice is None else choice)
    body, json_length = encode_response(model.name, request.id, outputs)
    if json_length is None:
        return Response(body, media_type="application/json")
    return Response(
        body, media_type="application/octet-stream", headers={HEADER_LENGTH: str(json_length)}
    )


def v2_routes(service: Service) -> list[Route]:
    """The OIP REST routes (health open; metadata and inference behind the API key)."""

    def route(
        path: str,
        name: str,
        handler: Handler,
        *,
        methods: tuple[str, ...] = ("GET",),
        inference: bool = False,
        protected: bool = True,
    ) -> list[Route]:
        serve = endpoint(
            service, name, Protocol.V2, handler, inference=inference, protected=protected
        )
        paths = [path]
        if path.startswith("/v2/models/{model}"):
            suffix = path.removeprefix("/v2/models/{model}")
            paths.append(f"/v2/models/{{model}}/versions/{{version}}{suffix}")
        return [Route(p, serve, methods=list(methods)) for p in paths]

    return [
        *route("/v2", "v2_server_metadata", _server),
        *route("/v2/health/live", "v2_live", _live, protected=False),
        *route("/v2/health/ready", "v2_ready", _ready, protected=False),
        *route("/v2/models/{model}", "v2_model_metadata", _model),
        *route("/v2/models/{model}/ready", "v2_model_ready", _model_ready, protected=False),
        *route(
            "/v2/models/{model}/infer",
            "v2_infer",
            _infer,
            methods=("POST",),
            inference=True,
        ),
    ]
