"""Streaming tar reading for shards: URL expansion, grouping by key, truncation detection."""

from __future__ import annotations

import gzip
import os
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO
from urllib.parse import urlparse

from braceexpand import braceexpand

from vlm_lit.data.safe_decode import ALLOWED_EXTENSIONS, TEXT_EXTENSIONS, DecodeLimits

# OK, SampleCounter and ShardError are re-exported: other modules import them from here.
from vlm_lit.data.shard_errors import OK, ProblemSink, SampleCounter, ShardError

__all__ = [
    "OK",
    "ProblemSink",
    "SampleCounter",
    "ShardError",
    "expand_urls",
    "iter_groups",
    "open_url",
    "pipe_urls",
]


def _is_pipe(url: str) -> bool:
    # urlparse, like webdataset's gopen, lowercases the scheme and strips leading blanks:
    # " pipe:..." or "PIPE:..." would reach its shell too, so they count as pipes here.
    return url.startswith("pipe:") or urlparse(url).scheme == "pipe"


def _is_local(url: str) -> bool:
    scheme = urlparse(url).scheme
    return scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt")


def _local_path(url: str) -> str:
    return urlparse(url).path if url.startswith("file:") else url


def _spec_urls(spec: str | Sequence[str]) -> Iterator[str]:
    """The URLs a spec names before directories are listed: ``::`` split, braces expanded.

    A ``pipe:`` item or part is kept whole (its command may contain ``::`` or braces).
    """
    for item in [spec] if isinstance(spec, str) else list(spec):
        item = str(item)
        for part in [item] if _is_pipe(item) else item.split("::"):
            yield from [part] if _is_pipe(part) else braceexpand(part)


def pipe_urls(spec: str | Sequence[str]) -> list[str]:
    """The ``pipe:`` URLs in a shard spec (inside brace lists and ``::`` joins too).

    Pure string work: nothing is opened or run, so it can vet a config before anything else.
    """
    return [url for url in _spec_urls(spec) if _is_pipe(url)]


def expand_urls(spec: str | Sequence[str], *, allow_pipe: bool = False) -> list[str]:
    """Expand a shard spec to a list of URLs.

    Accepts a path or URL, brace ranges (`"d/shard-{000000..000006}.tar"`), several specs
    joined by `"::"`, a directory (its `*.tar` / `*.tar.gz` files, sorted) or a list of any
    of these. Local files must exist. A `pipe:` URL runs a shell command, so one anywhere in
    the spec raises `ValueError` before anything is opened unless `allow_pipe=True`.
    """
    found_pipes = pipe_urls(spec)
    if found_pipes and not allow_pipe:  # checked before any file is looked at
        raise ValueError(
            f"refusing shard URL {found_pipes[0]!r}: 'pipe:' runs a shell command; pass "
            "allow_pipe=True only for specs you trust"
        )
    urls: list[str] = []
    for url in _spec_urls(spec):
        if _is_local(url) and Path(_local_path(url)).is_dir():
            found = sorted(Path(_local_path(url)).glob("*.tar"))
            found += sorted(Path(_local_path(url)).glob("*.tar.gz"))
            urls.extend(str(p) for p in found)
        else:
            urls.append(url)
    missing = [u for u in urls if _is_local(u) and not Path(_local_path(u)).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} shard file(s) not found, e.g. {missing[:3]}; check the shard spec"
        )
    return urls


def open_url(url: str, *, allow_pipe: bool = False) -> IO[bytes]:
    """Open a shard for binary reading: local path, `file:`, remote via webdataset's gopen."""
    if _is_pipe(url) and not allow_pipe:
        raise ValueError(f"refusing {url!r}: pass allow_pipe=True to run pipe: commands")
    if _is_local(url):
        return open(_local_path(url), "rb")
    from webdataset.gopen import gopen  # remote schemes (http via curl, gs, ...) only

    return gopen(url, "rb")


class _TailReader:
    """Pass-through reader that remembers the bytes it returned last, to inspect the end."""

    def __init__(self, raw: IO[bytes], keep: int = 1 << 16) -> None:
        self.raw, self.keep = raw, keep
        self.pos = 0
        self.tail = bytearray()

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.pos += len(data)
        self.tail += data
        if len(self.tail) > self.keep:
            del self.tail[: -self.keep]
        return data

    def block_at(self, offset: int, size: int = tarfile.BLOCKSIZE) -> bytes:
        """Bytes `[offset, offset + size)` of the stream (shorter if the stream ended)."""
        while self.pos < offset + size and self.read(offset + size - self.pos):
            pass
        start = offset - (self.pos - len(self.tail))
        return bytes(self.tail[max(start, 0) : max(start, 0) + size]) if start >= 0 else b""


class _Prefixed:
    """Reader that replays already-consumed leading bytes, then continues with `raw`."""

    def __init__(self, head: bytes, raw: IO[bytes]) -> None:
        self.head, self.raw = head, raw

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.raw.read(size)
        if size < 0:
            data, self.head = self.head + self.raw.read(), b""
            return data
        data, self.head = self.head[:size], self.head[size:]
        return data if len(data) == size else data + self.raw.read(size - len(data))


def _split_name(name: str) -> tuple[str, str] | None:
    """`"dir/key.0.png"` -> `("dir/key", "0.png")`; None when there is no key or suffix."""
    name = name.removeprefix("./")
    dirname, _, base = name.rpartition("/")
    stem, dot, suffix = base.partition(".")
    if not stem or not dot or not suffix:
        return None
    return (f"{dirname}/{stem}" if dirname else stem), suffix


def iter_groups(
    url: str, sink: ProblemSink, limits: DecodeLimits, *, allow_pipe: bool = False
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield `(key, {suffix: bytes})` per complete sample group of one shard.

    Members with a non-whitelisted extension are never read. A group is yielded only after
    the next key starts or the archive ends cleanly, so a truncated tail never leaks out.
    Duplicate keys, oversized members and tar corruption are reported through `sink`.
    """
    try:
        raw = open_url(url, allow_pipe=allow_pipe)
    except OSError as exc:
        sink.problem(url, None, "unreadable_shard", str(exc))
        return
    seen: set[str] = set()
    key: str | None = None
    members: dict[str, bytes] = {}
    bad: tuple[str, str] | None = None
    try:
        head = raw.read(2)
        source: IO[bytes] = _Prefixed(head, raw)  # type: ignore[assignment]
        if head == b"\x1f\x8b":  # gzip magic: decompress first so tar offsets line up
            source = gzip.GzipFile(fileobj=source, mode="rb")  # type: ignore[arg-type]
        tail = _TailReader(source)
        try:
            archive = tarfile.open(fileobj=tail, mode="r|")  # type: ignore[call-overload]
        except tarfile.ReadError as exc:
            reason = "empty_shard" if tail.pos == 0 else "bad_tar"
            sink.problem(url, None, reason, f"not a readable tar: {exc}")
            return
        for info in archive:
            archive.members.clear()  # streaming: do not keep every TarInfo in memory
            split = _split_name(info.name) if info.isfile() else None
            if split is None:
                if not info.isdir():
                    sink.problem(url, None, "ignored_member", f"unusable member {info.name!r}")
                continue
            member_key, suffix = split
            if member_key != key:
                if key is not None:
                    if bad is None:
                        yield key, members
                    else:
                        sink.problem(url, key, *bad)
                key, members, bad = member_key, {}, None
                if member_key in seen:
                    bad = ("duplicate_key", "key appears twice in this shard")
                seen.add(member_key)
            ext = suffix.rsplit(".", 1)[-1].lower()
            if ext not in ALLOWED_EXTENSIONS:
                sink.problem(url, key, "ignored_member", f"{info.name!r} is never decoded")
                continue
            limit = limits.max_json_bytes if ext in TEXT_EXTENSIONS else limits.max_member_bytes
            if info.size > limit:
                reason = {"json": "json_too_large", "txt": "text_too_large"}.get(
                    ext, "member_too_large"
                )
                bad = bad or (reason, f"{info.name!r} is {info.size} bytes > {limit}")
                continue
            if suffix in members:
                bad = bad or ("duplicate_key", f"member {info.name!r} appears twice")
                continue
            if bad is None:
                members[suffix] = archive.extractfile(info).read()  # type: ignore[union-attr]
        end = tail.block_at(archive.offset)
        if len(end) < tarfile.BLOCKSIZE or any(end):
            # tarfile stops silently on a short or garbled header; the missing end-of-archive
            # block is what tells a truncated shard from a complete one.
            raise tarfile.ReadError(f"no end-of-archive marker at byte {archive.offset}")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        sink.problem(url, key, "bad_tar", f"truncated or corrupt tar ({exc}); rest skipped")
        return
    finally:
        raw.close()
    if key is None:
        sink.problem(url, None, "empty_shard", "the shard has no members")
    elif bad is None:
        yield key, members
    else:
        sink.problem(url, key, *bad)
