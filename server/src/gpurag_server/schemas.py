"""The HTTP contract: request and response bodies of every endpoint, and the error body.

These shapes are stable (version 1): the web console builds on ``/v1/rag`` and ``/v1/status``.
Add optional fields only; never rename or remove one. Every 4xx/5xx body is an `ErrorBody`::

    {"error": {"type": "invalid_request", "message": "k must be <= 50; got 500",
               "errors": [{"field": "k", "problem": "must be <= 50; got 500"}]}}
"""

from __future__ import annotations

import math
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from gpurag.errors import InvalidInputError

SCHEMA_VERSION = 1

_M = TypeVar("_M", bound=BaseModel)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- errors ------------------------------------------------------------------------------------


class FieldProblem(BaseModel):
    """One thing wrong with a request: the field (dotted path, ``body`` for the whole) and the problem."""

    field: str
    problem: str


class ErrorDetail(BaseModel):
    """``type`` is one of: invalid_request, unauthorized, not_found, payload_too_large, overloaded,
    deadline_exceeded, node_failed, internal."""

    type: str
    message: str
    errors: list[FieldProblem] = Field(default_factory=list)


class ErrorBody(BaseModel):
    """The body of every error response."""

    error: ErrorDetail


class RequestInvalidError(InvalidInputError):
    """A request that fails validation: answered 4xx with the problems, never sent to a node."""

    def __init__(self, problems: list[FieldProblem], status: int = 422) -> None:
        super().__init__("; ".join(f"{p.field} {p.problem}" for p in problems))
        self.problems = problems
        self.status = status


def problems_from(exc: ValidationError) -> list[FieldProblem]:
    """Turn pydantic's errors into (field, problem) pairs."""
    problems = []
    for error in exc.errors(include_url=False):
        field = ".".join(str(part) for part in error["loc"]) or "body"
        kind = error["type"]
        if kind == "missing":
            problem = "is required"
        elif kind == "extra_forbidden":
            problem = "is not a known field"
        elif kind == "json_invalid":
            field, problem = "body", f"is not valid JSON ({error.get('ctx', {}).get('error', error['msg'])})"
        else:
            got = error.get("input")
            shown = repr(got) if not isinstance(got, dict | list) else type(got).__name__
            problem = f"{error['msg'][0].lower()}{error['msg'][1:]}; got {shown[:80]}"
        problems.append(FieldProblem(field=field, problem=problem))
    return problems


def parse(model: type[_M], body: bytes) -> _M:
    """Validate ``body`` (JSON bytes) as ``model``; a `RequestInvalidError` naming each bad field otherwise."""
    if not body.strip():
        raise RequestInvalidError([FieldProblem(field="body", problem="is empty; expected a JSON object")])
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        malformed = any(error["type"] == "json_invalid" for error in exc.errors())
        raise RequestInvalidError(problems_from(exc), status=400 if malformed else 422) from None


# --- /v1/rag and /rag --------------------------------------------------------------------------


class RagRequest(_Strict):
    """``POST /v1/rag`` and ``POST /rag``: a question and how many passages to retrieve."""

    query: StrictStr
    k: StrictInt | None = Field(default=None, description="Passages to retrieve; default: the top_k setting.")
    stream: StrictBool = Field(
        default=False,
        description="``/v1/rag`` only: answer with server-sent events, `token` events with the answer's text as it "
        "is generated (a `reset` event replaces the text so far), then one `done` event holding the RagResponse, "
        "or one `error` event holding the ErrorBody and its HTTP status.",
    )


class Source(BaseModel):
    """A passage the answer came from."""

    id: int
    score: float
    text: str
    source: str


class RagTimings(BaseModel):
    """Seconds: queue_wait_s in the head node's queue, compute_s on the node (its whole batch), total_s end to end."""

    queue_wait_s: float
    compute_s: float
    total_s: float
    embed_s: float | None = None
    search_s: float | None = None
    generate_s: float | None = None


class RagResponse(BaseModel):
    """``POST /v1/rag``: the answer, its sources (best first), timings, and where it ran."""

    query: str
    answer: str
    sources: list[Source]
    timings: RagTimings
    node: str
    batch_size: int


class SeedRagResponse(BaseModel):
    """``POST /rag``: the seed's shape."""

    query: str
    result: str


# --- /v1/search --------------------------------------------------------------------------------


class SearchRequest(_Strict):
    """``POST /v1/search``: either ``texts`` (embedded by the node) or ``vectors`` of the corpus's dimension."""

    texts: list[StrictStr] | None = None
    vectors: list[list[float]] | None = None
    k: StrictInt | None = None


class SearchHit(BaseModel):
    """The passages found for one query, best first."""

    ids: list[int]
    scores: list[float]
    texts: list[str]
    sources: list[str]


class SearchResponse(BaseModel):
    """One `SearchHit` per text or vector, in order."""

    results: list[SearchHit]


# --- /v1/embeddings (OpenAI's shape) -----------------------------------------------------------


class EmbeddingsRequest(_Strict):
    """OpenAI's ``POST /v1/embeddings`` request."""

    input: StrictStr | list[StrictStr]
    model: StrictStr | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = None
    user: StrictStr | None = None


class EmbeddingItem(BaseModel):
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str
    index: int


class EmbeddingsUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    """OpenAI's ``/v1/embeddings`` response."""

    object: Literal["list"] = "list"
    data: list[EmbeddingItem]
    model: str
    usage: EmbeddingsUsage


# --- /v1/status --------------------------------------------------------------------------------


class NodeStatus(BaseModel):
    """One compute node. ``state``: starting, ready, draining, stopped, dead."""

    name: str
    provider: str
    state: str
    in_flight: int
    batches_done: int
    items_done: int
    started_s_ago: float


class QueueStatus(BaseModel):
    """The head node's queue; rates are requests/s over the last few seconds."""

    length: int
    capacity: int
    in_flight: int
    arrival_rate: float
    completion_rate: float
    wait_p50_s: float
    wait_p99_s: float


class Decision(BaseModel):
    """One autoscaler decision: when (seconds since the server started), inputs, counts, reason."""

    time_s: float
    queue_length: int
    arrival_rate: float
    busy_nodes: int
    old: int
    new: int
    reason: str


class AutoscalerStatus(BaseModel):
    enabled: bool
    policy: str
    min_nodes: int
    max_nodes: int
    interval_s: float
    decisions: list[Decision]


class StatusResponse(BaseModel):
    """``GET /v1/status``: the whole server at a glance (the web console polls it)."""

    version: int = SCHEMA_VERSION
    uptime_s: float
    ready: bool
    workload: str
    dispatcher: str
    node_provider: str
    max_batch_size: int
    max_wait_s: float
    queue: QueueStatus
    nodes: list[NodeStatus]
    autoscaler: AutoscalerStatus
    requests: dict[str, int] = Field(description="Responses sent, by HTTP status code.")


def finite_vectors(vectors: list[list[float]], dim: int | None) -> None:
    """Raise `RequestInvalidError` if a vector has the wrong dimension or a non-finite value."""
    problems = []
    for i, vector in enumerate(vectors):
        if dim is not None and len(vector) != dim:
            problems.append(FieldProblem(field=f"vectors.{i}", problem=f"has dimension {len(vector)}; expected {dim}"))
        elif not all(math.isfinite(x) for x in vector):
            problems.append(
                FieldProblem(field=f"vectors.{i}", problem="holds NaN or infinity; expected finite numbers")
            )
    if problems:
        raise RequestInvalidError(problems)


def openapi_schema() -> dict[str, Any]:
    """The OpenAPI 3.1 document served at ``/openapi.json``."""
    models: dict[str, type[BaseModel]] = {
        m.__name__: m
        for m in (
            RagRequest,
            RagResponse,
            SeedRagResponse,
            SearchRequest,
            SearchResponse,
            EmbeddingsRequest,
            EmbeddingsResponse,
            StatusResponse,
            ErrorBody,
        )
    }
    components: dict[str, Any] = {}
    for name, model in models.items():
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        components[name] = schema

    def ref(name: str) -> dict[str, Any]:
        return {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}}

    errors = {code: {"description": text, **ref("ErrorBody")} for code, text in _ERROR_CODES.items()}

    def post(request: str, response: str, summary: str) -> dict[str, Any]:
        return {
            "post": {
                "summary": summary,
                "requestBody": {"required": True, **ref(request)},
                "responses": {"200": {"description": "OK", **ref(response)}, **errors},
            }
        }

    return {
        "openapi": "3.1.0",
        "info": {"title": "gpurag server", "version": str(SCHEMA_VERSION)},
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/rag": post("RagRequest", "RagResponse", "Answer a question from the corpus"),
            "/rag": post("RagRequest", "SeedRagResponse", "Answer a question (the seed's shape)"),
            "/v1/search": post("SearchRequest", "SearchResponse", "Search the corpus by texts or vectors"),
            "/v1/embeddings": post("EmbeddingsRequest", "EmbeddingsResponse", "OpenAI-compatible embeddings"),
            "/v1/status": {
                "get": {"summary": "Nodes, queue, policy, decisions", "responses": {"200": ref("StatusResponse")}}
            },
            "/healthz": {"get": {"summary": "Alive", "security": [], "responses": {"200": {"description": "OK"}}}},
            "/readyz": {
                "get": {"summary": "A node is ready", "security": [], "responses": {"200": {"description": "OK"}}}
            },
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "OK"}}}},
        },
    }


_ERROR_CODES = {
    "400": "Malformed JSON or body",
    "401": "Missing or wrong bearer key",
    "413": "Body larger than max_body_bytes",
    "422": "A field is missing, of the wrong type or out of range",
    "500": "The node failed on this request",
    "503": "Queue full (Retry-After set) or a node died twice under this request",
    "504": "The request's deadline passed",
}
