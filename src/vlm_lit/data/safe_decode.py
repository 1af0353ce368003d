"""Whitelisted, bounded decoders for untrusted shard members (json, txt, png/jpeg/webp)."""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from typing import Any

from PIL import Image

# Only these final extensions are ever read from a shard; everything else (.pyd, .pickle,
# .pth, .npy, ...) is skipped without reading its bytes, so nothing is unpickled or loaded.
TEXT_EXTENSIONS = frozenset({"json", "txt"})
IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp"})
ALLOWED_EXTENSIONS = TEXT_EXTENSIONS | IMAGE_EXTENSIONS
# PIL is restricted to these decoders so a ".png" member cannot reach an exotic plugin.
PIL_FORMATS = ("PNG", "JPEG", "WEBP")
ROLES = frozenset({"system", "user", "assistant"})


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds that turn decompression and JSON bombs into counted skips instead of OOMs."""

    max_image_pixels: int = 64_000_000
    """Largest declared width * height accepted before any pixel is decoded."""
    max_json_bytes: int = 8 << 20
    """Largest json/txt member read, in bytes."""
    max_json_depth: int = 64
    """Deepest container nesting accepted in a JSON member."""
    max_member_bytes: int = 64 << 20
    """Largest member of any kind read, in bytes."""


class DecodeProblem(ValueError):
    """A member could not be decoded; `.reason` is the counter key (e.g. "bad_image")."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def decode_image(data: bytes, limits: DecodeLimits = DecodeLimits()) -> Image.Image:
    """Decode PNG/JPEG/WebP bytes fully (mode unchanged); refuse oversized or corrupt images.

    The declared size is checked against ``max_image_pixels`` from the header, before any
    pixel is decoded.
    """
    try:
        with warnings.catch_warnings():
            # The explicit pixel bound below replaces PIL's global bomb heuristic.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
            width, height = image.size
            if width * height > limits.max_image_pixels:
                raise DecodeProblem(
                    "image_too_large",
                    f"declared {width}x{height} exceeds max_image_pixels={limits.max_image_pixels}",
                )
            image.load()
    except DecodeProblem:
        raise
    except Image.DecompressionBombError as exc:
        raise DecodeProblem("image_too_large", str(exc)) from None
    except Exception as exc:  # PIL raises many unrelated types on corrupt data
        raise DecodeProblem("bad_image", f"{type(exc).__name__}: {exc}") from None
    return image


def decode_text(data: bytes, limits: DecodeLimits = DecodeLimits()) -> str:
    """Decode a UTF-8 text member within the size bound."""
    if len(data) > limits.max_json_bytes:
        raise DecodeProblem("text_too_large", f"{len(data)} bytes > {limits.max_json_bytes}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeProblem("invalid_text", str(exc)) from None


def json_depth(obj: Any, limit: int) -> int:
    """Container nesting depth of `obj` (scalar 0, `{}` 1), computed without recursion.

    Stops early once `limit` is exceeded, so a wide-and-deep document costs little.
    """
    best, stack = 0, [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        best = max(best, depth)
        if best > limit:
            return best
        stack.extend((child, depth + 1) for child in children)
    return best


def decode_json(data: bytes, limits: DecodeLimits = DecodeLimits()) -> Any:
    """Parse a JSON member within the size and nesting bounds."""
    if len(data) > limits.max_json_bytes:
        raise DecodeProblem("json_too_large", f"{len(data)} bytes > {limits.max_json_bytes}")
    try:
        obj = json.loads(data.decode("utf-8"))
    except RecursionError:
        raise DecodeProblem("json_too_deep", "nesting exceeds the parser's limit") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise DecodeProblem("invalid_json", str(exc)) from None
    # Nesting can be no deeper than the number of opening brackets (those inside strings
    # only over-count), so the common shallow document skips the walk.
    limit = limits.max_json_depth
    if data.count(b"[") + data.count(b"{") > limit and json_depth(obj, limit) > limit:
        raise DecodeProblem("json_too_deep", f"nesting deeper than {limits.max_json_depth}")
    return obj


def _check_parts(parts: Any, where: str) -> int:
    """Validate a list of content parts; return its number of image parts."""
    if not isinstance(parts, list):
        raise DecodeProblem("invalid_schema", f"{where} must be a list of parts")
    images = 0
    for i, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            images += 1
        elif kind != "text" or not isinstance(part.get("text"), str):
            raise DecodeProblem(
                "invalid_schema",
                f"{where}[{i}] must be {{'type': 'image'}} or {{'type': 'text', 'text': str}}",
            )
    return images


def count_image_parts(obj: dict[str, Any]) -> int:
    """Validate a sample's `messages` / `document` structure and count its image parts."""
    has_messages, has_document = "messages" in obj, "document" in obj
    if has_messages == has_document:
        raise DecodeProblem("invalid_schema", "exactly one of 'messages' / 'document' is required")
    if has_document:
        return _check_parts(obj["document"], "document")
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise DecodeProblem("invalid_schema", "'messages' must be a non-empty list")
    images = 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise DecodeProblem("invalid_schema", f"messages[{i}] needs a role in {sorted(ROLES)}")
        content = message.get("content")
        if not isinstance(content, str):
            images += _check_parts(content, f"messages[{i}].content")
    return images
