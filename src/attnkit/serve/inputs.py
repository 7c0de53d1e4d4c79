"""Decoding and checking what a request carries: strings every store can keep, base64 PNG/JPEG images with
decompression-bomb limits."""

from __future__ import annotations

import base64
import binascii
import io

import torch
from torch import Tensor

__all__ = ["MAX_IMAGE_PIXELS", "InputError", "check_text", "decode_image"]

#: Largest image accepted, in pixels (width x height): 4096 x 4096. Anything larger is refused before decoding.
MAX_IMAGE_PIXELS = 4096 * 4096
_FORMATS = ("PNG", "JPEG")


class InputError(ValueError):
    """Bad request content; ``field`` names the request field (answered as 4xx JSON)."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.field, self.status = field, status


def check_text(field: str, value: str, *, what: str | None = None) -> str:
    """``value`` unchanged if it is Unicode text every store back end can keep.

    JSON may carry lone UTF-16 surrogates (``"\\ud800"``), which are not Unicode text (they cannot be encoded as
    UTF-8 for the tokenizer or the database), and NUL characters, which PostgreSQL refuses in text and JSON
    columns; both are refused before any work, on every back end alike.

    Args:
        field: the request field (the error's ``field``: ``text``, ``filename``, ``options.labels``, ``q``).
        value: the string to check.
        what: how the message names it (default ``field``; e.g. ``options.labels[2]``).

    Returns:
        ``value``.

    Raises:
        InputError: (status 422, ``field``) a lone surrogate or a NUL character, with its position.
    """
    what = field if what is None else what
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(value[exc.start])
        message = f"{what} is not valid Unicode: a lone surrogate U+{code:04X} at character {exc.start}"
        raise InputError(field, message) from None
    nul = value.find("\x00")
    if nul >= 0:
        raise InputError(field, f"{what} contains a NUL character (U+0000) at character {nul}; it cannot be stored")
    return value


def decode_image(
    b64: str, *, size: int, channels: int, invert_light: bool, max_pixels: int = MAX_IMAGE_PIXELS
) -> tuple[Tensor, bytes]:
    """``((channels, size, size) float32 in [0, 1], raw bytes)`` of a base64 PNG or JPEG.

    Grey images brighter than mid-grey are inverted when ``invert_light`` (dark ink on white paper becomes the
    ink-on-black convention the digit models were trained with). The header is read first: images over
    ``max_pixels`` are refused before their pixels are decompressed.

    Args:
        b64: base64 of the file's bytes, optionally a ``data:image/...;base64,`` URL.
        size: the square side the image is resized to, in pixels (bilinear).
        channels: 1 (grey, ``L``) or 3 (``RGB``).
        invert_light: invert grey images whose mean is over 0.5.
        max_pixels: the largest width x height accepted.

    Returns:
        ``(pixels, raw)``: ``(channels, size, size)`` float32 in ``[0, 1]``, and the decoded file bytes.

    Raises:
        InputError: (field ``image``) not base64, not a PNG/JPEG, truncated, or too many pixels.
    """
    from PIL import Image, UnidentifiedImageError

    text = b64.split(",", 1)[1] if b64.startswith("data:") and "," in b64 else b64
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InputError("image", "image must be base64-encoded PNG or JPEG bytes; it is not valid base64") from None
    try:
        with Image.open(io.BytesIO(raw)) as im:
            if im.format not in _FORMATS:
                raise InputError("image", f"image must be a PNG or JPEG, got {im.format or 'an unknown format'}")
            w, h = im.size
            if w * h > max_pixels:
                raise InputError(
                    "image",
                    f"image is {w}x{h} = {w * h} pixels; at most {max_pixels} are accepted (decompression bomb guard)",
                    status=413,
                )
            im.load()
            im = im.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BILINEAR)
            pixels = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).float() / 255.0
    except InputError:
        raise
    except Image.DecompressionBombError as exc:
        raise InputError("image", f"image refused as a decompression bomb ({exc})", status=413) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InputError("image", f"image is not a readable PNG or JPEG ({exc})") from None
    image = pixels.reshape(size, size, channels).permute(2, 0, 1).contiguous()
    if invert_light and channels == 1 and float(image.mean()) > 0.5:
        image = 1.0 - image
    return image, raw
