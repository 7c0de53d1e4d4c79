"""Shared builders of the serve tests: a PNG as base64, a complete store record, an endpoint held at a gate."""

from __future__ import annotations

import base64
import io
import threading
import time
import uuid


def png_b64(pixels) -> str:
    """Base64 PNG of a ``(H, W)`` uint8 array."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def record(model="minilm", text="hello world", created=None, **over):
    now = time.time() if created is None else created
    row = {
        "id": uuid.uuid4().hex,
        "created_at": now,
        "finished_at": now + 0.01,
        "model": model,
        "model_kind": "text",
        "weights_sha256": "ab" * 32,
        "attnkit_version": "0.1.0",
        "method": "rollout",
        "options": {"top_k": 5},
        "input_kind": "text",
        "input_text": text,
        "input_image": None,
        "input_filename": None,
        "input_sha256": "cd" * 32,
        "prediction": {"label": "sports", "score": 0.5},
        "explanation": {"tokens": ["[CLS]", "hello"], "scores": [0.5, 0.5]},
        "attention": b"\x00\x01\xff",
        "attention_meta": {"shape": [1, 1, 2, 2]},
        "stats": {"head_entropy": 0.5, "sink_mass": 0.3, "rollout_concentration": 0.2, "confidence": 0.5},
        "timings": {"forward_ms": 1.0},
        "latency_ms": 10.0,
    }
    row.update(over)
    return row


class Gate:
    """Wraps an endpoint so its explanations wait until released (to fill the queue deterministically)."""

    def __init__(self, inner):
        self.inner, self.release, self.entered = inner, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def explain(self, *args):
        self.entered.set()
        assert self.release.wait(30)
        return self.inner.explain(*args)
