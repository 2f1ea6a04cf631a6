"""TGI's service routes: health checks and GET /info."""
from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from tgserve.api.shared.errors import ApiError, envelope_response
from tgserve.api.shared.schemas import ErrorResponse
from tgserve.api.shared.state import ServerState, get_state
from tgserve.api.shared.version import server_version
from tgserve.api.tgi.schemas import Info

router = APIRouter(tags=["Text Generation Inference"])

ROUTER_NAME = "text-generation-router"  # what TGI clients expect in /info
VALIDATION_WORKERS = 2  # TGI's default; tgserve tokenizes in asyncio worker threads instead


@router.get("/health", responses={503: {"model": ErrorResponse}})
async def health(state: ServerState = Depends(get_state)) -> Response:
    """200 with an empty body while the engine is healthy, else 503 in TGI's envelope."""
    if state.engine.is_healthy:
        return Response(status_code=200)
    return envelope_response(ApiError(503, "healthcheck", "unhealthy"))


# TGI answers health checks on these paths too (SageMaker's /ping, and GET /).
router.add_api_route("/ping", health, methods=["GET"], include_in_schema=False)
router.add_api_route("/", health, methods=["GET"], include_in_schema=False)


@router.get("/info", response_model=Info)
async def info(state: ServerState = Depends(get_state)) -> Response:
    """The served model and the server's limits, with TGI's keys."""
    engine = state.engine
    model, config = engine.model_info, engine.config
    body = Info(
        model_id=model.model_id,
        model_sha=model.model_sha,
        model_dtype=model.model_dtype,
        model_device_type=model.model_device_type,
        model_pipeline_tag=None,  # not known yet: ModelInfo carries no hub pipeline tag
        max_concurrent_requests=config.max_concurrent_requests,
        max_best_of=config.max_best_of,
        max_stop_sequences=config.max_stop_sequences,
        max_input_tokens=state.limits.max_input_tokens,
        max_total_tokens=state.limits.max_total_tokens,
        validation_workers=VALIDATION_WORKERS,
        max_client_batch_size=config.max_client_batch_size,
        router=ROUTER_NAME,
        version=server_version(),
        sha=None,
        docker_label=None,
        quantization=model.quantization,
        speculate=config.speculate or 0,
        num_shard=model.num_shard,
    )
    return JSONResponse(body.model_dump())
