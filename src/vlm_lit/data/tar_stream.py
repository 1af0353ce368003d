"""Streaming tar reading for shards: URL expansion, grouping by key, truncation detection."""

from __future__ import annotations

import gzip
import os
import struct
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


_BLOCK = tarfile.BLOCKSIZE
_FILE, _DIRECTORY, _OTHER = "file", "directory", "other"
_NO_DATA_TYPES = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, dirs, fifos: no data
_MAX_EXTENDED_BYTES = 1 << 20  # a pax or GNU long-name header larger than this is corrupt


def _number(field: bytes) -> int:
    """A numeric header field: NUL/space-terminated octal, or GNU base-256."""
    if field[:1] in (b"\x80", b"\xff"):
        value = int.from_bytes(field[1:], "big")
        return value - 256 ** (len(field) - 1) if field[0] == 0xFF else value
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise tarfile.ReadError(f"invalid number field {field!r}") from None


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    """The `path` and `size` of a pax header's `"<length> <keyword>=<value>\\n"` records,
    and a `GNU.sparse` key if any record is about sparse files (nothing else is kept)."""
    records: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:  # NUL padding may follow the last record
        space = data.find(b" ", pos)
        length = int(data[pos:space]) if data[pos:space].isdigit() else 0
        record = data[space + 1 : pos + length]
        if space < 0 or length < 1 or pos + length > len(data) or record[-1:] != b"\n":
            raise tarfile.ReadError(f"malformed pax record at byte {pos} of its header")
        keyword, equals, value = record[:-1].partition(b"=")
        if not equals:
            raise tarfile.ReadError(f"malformed pax record at byte {pos} of its header")
        if keyword in (b"path", b"size"):
            records[keyword] = value
        elif keyword.startswith(b"GNU.sparse."):
            records[b"GNU.sparse"] = b""
        pos += length
    return records


class _TarReader:
    """Streaming tar reader: ustar/GNU headers, pax and GNU long names, checksums verified.

    Lean on purpose (``tarfile``'s per-member cost was the reader's largest): ``next()``
    returns ``(name, size, kind)`` with kind file / directory / other, or None at a clean
    end-of-archive block; ``read()`` returns the current file's data, which is otherwise
    skipped. A short read, bad checksum or malformed header raises ``tarfile.ReadError``,
    so a truncated or garbled shard is never mistaken for a complete one. Sparse members
    are "other" (never read).
    """

    def __init__(self, source: IO[bytes]) -> None:
        self.source = source
        self.offset = 0  # bytes consumed so far
        self._pending = 0  # unread data + padding of the current member
        self._size = 0
        self._global: dict[bytes, bytes] = {}

    def _fill(self, size: int) -> bytes:
        """Up to ``size`` bytes: fewer only at the end of the stream."""
        data = self.source.read(size)
        while len(data) < size:
            more = self.source.read(size - len(data))
            if not more:
                break
            data += more
        return data

    def _read(self, size: int) -> bytes:
        data = self._fill(size)
        if len(data) < size:
            raise tarfile.ReadError(f"unexpected end of data at byte {self.offset + len(data)}")
        self.offset += size
        return data

    def _skip(self, size: int) -> None:
        while size > 0:
            chunk = self.source.read(min(size, 1 << 20))
            if not chunk:
                raise tarfile.ReadError(f"unexpected end of data at byte {self.offset}")
            size -= len(chunk)
            self.offset += len(chunk)

    def _header(self) -> bytes | None:
        block = self._fill(_BLOCK)
        if not block and self.offset == 0:
            return None  # an empty stream: an archive without members
        if len(block) < _BLOCK:
            # tarfile would stop here silently; a missing end-of-archive block is what tells
            # a truncated shard from a complete one.
            raise tarfile.ReadError(f"no end-of-archive block at byte {self.offset}")
        self.offset += _BLOCK
        if block.count(0) == _BLOCK:
            return None
        stored = _number(block[148:156])
        unsigned = sum(block) - sum(block[148:156]) + 256
        if stored != unsigned and stored != sum(struct.unpack("148b8x356b", block)) + 256:
            raise tarfile.ReadError(f"bad header checksum at byte {self.offset - _BLOCK}")
        return block

    def next(self) -> tuple[str, int, str] | None:
        """The next member's ``(name, size, kind)``; None once the archive ends cleanly."""
        if self._pending:  # the previous member's data was not read
            self._skip(self._pending)
            self._pending = 0
        local: dict[bytes, bytes] = {}
        long_name: bytes | None = None
        extended = False  # a pax / long-name header is waiting for its member
        while True:
            block = self._header()
            if block is None:
                if extended:
                    raise tarfile.ReadError("archive ends after an extended header")
                return None
            kind, size = block[156:157], _number(block[124:136])
            if size < 0:
                raise tarfile.ReadError(f"negative member size at byte {self.offset - _BLOCK}")
            if kind in (b"x", b"g", b"L", b"K"):
                if size > _MAX_EXTENDED_BYTES:
                    raise tarfile.ReadError(f"{size}-byte extended header")
                data = self._read(size)
                self._skip(-size % _BLOCK)
                if kind == b"L":
                    long_name = data.split(b"\0", 1)[0]
                elif kind != b"K":
                    (self._global if kind == b"g" else local).update(_pax_records(data))
                extended = True
                continue
            break
        if kind == b"S":  # old GNU sparse: extension blocks follow while "isextended" is set
            more = block[482]
            while more:
                extension = self._read(_BLOCK)
                more = extension[504]
        pax = {**self._global, **local}
        if b"path" in pax:
            name = pax[b"path"]
        elif long_name is not None:
            name = long_name
        else:
            name = block[:100].split(b"\0", 1)[0]
            prefix = block[345:500].split(b"\0", 1)[0]
            if prefix and kind != b"S":
                name = prefix + b"/" + name
        if b"size" in pax:
            if not pax[b"size"].isdigit():
                raise tarfile.ReadError(f"invalid pax size {pax[b'size']!r}")
            size = int(pax[b"size"])
        text = name.decode("utf-8", "surrogateescape")
        if kind in (b"0", b"7") or (kind == b"\0" and not text.endswith("/")):
            member = _OTHER if b"GNU.sparse" in pax else _FILE
        elif kind in (b"5", b"\0"):
            member, text = _DIRECTORY, text.rstrip("/")
        else:
            member = _OTHER
        carries_data = kind not in _NO_DATA_TYPES and member != _DIRECTORY
        self._size = size
        self._pending = size + (-size % _BLOCK) if carries_data else 0
        return text, size, member

    def read(self) -> bytes:
        """The data of the member ``next()`` returned last (call once, for a file)."""
        size, pending, self._pending = self._size, self._pending, 0
        if size > 1 << 20:  # large: no second copy to cut the padding off
            data = self._read(size)
            self._skip(pending - size)
            return data
        data = self._read(pending)  # small: data and padding in one read call
        return data if pending == size else data[:size]


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
        archive = _TarReader(source)
        while (member := archive.next()) is not None:
            name, size, kind = member
            split = _split_name(name) if kind == _FILE else None
            if split is None:
                if kind != _DIRECTORY:
                    sink.problem(url, None, "ignored_member", f"unusable member {name!r}")
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
                sink.problem(url, key, "ignored_member", f"{name!r} is never decoded")
                continue
            limit = limits.max_json_bytes if ext in TEXT_EXTENSIONS else limits.max_member_bytes
            if size > limit:
                reason = {"json": "json_too_large", "txt": "text_too_large"}.get(
                    ext, "member_too_large"
                )
                bad = bad or (reason, f"{name!r} is {size} bytes > {limit}")
                continue
            if suffix in members:
                bad = bad or ("duplicate_key", f"member {name!r} appears twice")
                continue
            if bad is None:
                members[suffix] = archive.read()
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
