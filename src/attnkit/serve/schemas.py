"""Request and response bodies of the HTTP API (pydantic models; they also make the OpenAPI schema)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ExplainOptions", "ExplainRequest", "ExplainResponse", "Page", "RecordSummary"]


class ExplainOptions(BaseModel):
    """Method options."""

    model_config = ConfigDict(extra="forbid")

    layer: int | None = Field(None, description="layer for method raw (default: the last); negative counts back")
    head: int | None = Field(None, ge=0, description="head for method raw (default: the mean of the heads)")
    labels: list[str] | None = Field(
        None, min_length=1, max_length=64, description="text models: labels to match the sentence embedding against"
    )
    top_k: int = Field(5, ge=1, le=100, description="how many classes / labels to return")


class ExplainRequest(BaseModel):
    """``POST /v1/explain``: exactly one of ``text`` or ``image``."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(..., max_length=128, description="served model name (GET /v1/health lists them)")
    method: str = Field("rollout", description="raw | rollout | relevance | flow")
    text: str | None = Field(None, description="the input text (text models)")
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
        ..., description="text: tokens and scores; image: grid (Gh, Gw) heatmap over the patches and image_size"
    )
    timings: dict[str, float] = Field(..., description="milliseconds: queue, forward, explain, store, total")


class RecordSummary(BaseModel):
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
    items: list[RecordSummary]
    page: int
    page_size: int
    total: int
    next_page: int | None
