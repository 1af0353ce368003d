"""Fail at start, naming the path, when a backbone file or directory is missing or unreadable.

Runs before anything else (the CLI calls it before building the embedded world or any data),
so a typo in ``--model.vision``/``--model.language_model`` costs seconds, not a data pass.
"""

from __future__ import annotations

import os
from typing import Any

# (spec name, key, kind): where local paths live in the backbone specs.
_PATH_KEYS: tuple[tuple[str, str, str], ...] = (
    ("vision", "pretrained", "file"),
    ("vision", "path", "dir"),
    ("language_model", "path", "dir"),
    ("language_model", "tokenizer", "dir"),
)


def check_backbone_paths(
    vision: dict[str, Any] | None, language_model: dict[str, Any] | None
) -> None:
    """Raise ``FileNotFoundError`` / ``PermissionError`` naming the flag and the path.

    Checks ``vision.pretrained`` (a file), ``vision.path``, ``language_model.path`` and a
    string ``language_model.tokenizer`` (directories). Remote URLs are not checked here.
    """
    specs = {"vision": vision or {}, "language_model": language_model or {}}
    for spec_name, key, kind in _PATH_KEYS:
        value = specs[spec_name].get(key) if isinstance(specs[spec_name], dict) else None
        if not isinstance(value, str | os.PathLike) or "://" in str(value):
            continue
        path = os.fspath(value)
        flag = f"--model.{spec_name} {key}"
        exists = os.path.isfile(path) if kind == "file" else os.path.isdir(path)
        if not exists:
            raise FileNotFoundError(
                f"{flag}: {kind} not found: {path}; fix the path (nothing was loaded yet)"
            )
        readable = os.access(path, os.R_OK | (os.X_OK if kind == "dir" else 0))
        if readable and kind == "file":
            try:
                with open(path, "rb") as handle:
                    readable = len(handle.read(1)) == 1
            except OSError:
                readable = False
        if not readable:
            raise PermissionError(
                f"{flag}: {path} is empty or not readable by this process; check the file "
                "and its permissions"
            )
