"""Request and response bodies of the HTTP API (pydantic models; they also make the OpenAPI schema)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ExplainOptions", "ExplainRequest", "ExplainResponse", "Page", "RecordSummary"]


class ExplainOptions(BaseModel):
    """Method options.

    ``layer`` and ``head`` select the map of method ``raw`` (the summarising token's attention row, or the class
    token's for images). ``rollout``, ``flow`` and ``relevance`` combine every layer and head and do not use them,
    but they are checked against the model for every method (out of range: 422 naming ``options.layer`` /
    ``options.head``) and kept in the record's options.
    """

    model_config = ConfigDict(extra="forbid")

    layer: int | None = Field(
        None,
        description="method raw: the layer whose map is shown (default: the last; negative counts back from it); "
        "checked but unused by rollout, flow and relevance",
    )
    head: int | None = Field(
        None,
        ge=0,
        description="method raw: the head whose map is shown (default: the mean over heads); checked but unused by "
        "rollout, flow and relevance",
    )
    labels: list[str] | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="text models: labels to match the sentence embedding against (no NUL characters)",
    )
    top_k: int = Field(5, ge=1, le=100, description="how many classes / labels to return")


class ExplainRequest(BaseModel):
    """``POST /v1/explain``: exactly one of ``text`` or ``image``."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(..., max_length=128, description="served model name (GET /v1/health lists them)")
    method: str = Field("rollout", description="raw | rollout | relevance | flow")
    text: str | None = Field(None, description="the input text (text models; no NUL characters)")
    image: str | None = Field(None, description="base64 PNG or JPEG, optionally a data: URL (image models)")
    filename: str | None = Field(None, max_length=255, description="the image's file name, kept for the audit trail")
    options: ExplainOptions = Field(default_factory=ExplainOptions)


class ExplainResponse(BaseModel):
    """The prediction, the explanation and where the record is kept."""

    id: str = Field(..., description="record id: GET /v1/explanations/{id}")
    model: str
    method: str
    created_at: str = Field(..., description="ISO 8601, UTC")
    prediction: dict[str, Any]
    explanation: dict[str, Any] = Field(
        ...,
        description="text: tokens and scores; image: grid (Gh, Gw) heatmap over the patches and image_size. The "
        "answer always carries the real tokens; a record stored under --no-store-inputs labels them #0, #1, ...",
    )
    timings: dict[str, float] = Field(..., description="milliseconds: queue, forward, explain, store, total")


class RecordSummary(BaseModel):
    """One entry of ``GET /v1/explanations`` (no maps, no per-token data; ``input_preview``: the text's start)."""

    seq: int
    id: str
    created_at: str
    model: str
    model_kind: str
    method: str
    input_kind: str
    input_filename: str | None
    input_preview: str | None
    label: str | None
    score: float | None
    latency_ms: float


class Page(BaseModel):
    """A page of ``GET /v1/explanations``; ``next_page`` is ``None`` on the last one."""

    items: list[RecordSummary]
    page: int
    page_size: int
    total: int
    next_page: int | None
