"""Data sources: parsing ``--data.train/val`` specs, counting shard samples, shard checks."""

from __future__ import annotations

import logging
import tarfile
import zlib
from dataclasses import dataclass
from typing import Any

from vlm_lit.data.tar_stream import expand_urls, open_url, pipe_urls

log = logging.getLogger(__name__)

SourceArg = list[dict[str, Any]] | dict[str, Any] | str | None
"""A shard spec string, one ``{"name", "shards", "weight"}`` dict, or a list of such dicts."""


@dataclass(frozen=True)
class Source:
    """One named data source: its expanded shard URLs and its mixing weight."""

    name: str
    urls: tuple[str, ...]
    weight: float = 1.0


@dataclass(frozen=True)
class EvalShard:
    """A validation shard with its source name, sample count and generation quota."""

    url: str
    source: str
    num_samples: int
    num_generate: int = 0


def refuse_pipe_sources(spec: SourceArg, *, default_name: str) -> None:
    """Raise ``ValueError`` naming ``allow_pipe`` and the URL if any source has a ``pipe:`` URL.

    A ``pipe:`` URL runs a shell command, so a config must not smuggle one in: this only
    looks at strings (brace lists and ``::`` joins included) and never opens or runs anything.
    """
    if spec is None:
        return
    items = [spec] if isinstance(spec, (str, dict)) else list(spec)
    for i, item in enumerate(items):
        shards = item.get("shards") if isinstance(item, dict) else item
        found = pipe_urls(shards) if isinstance(shards, (str, list, tuple)) else []
        if found:
            raise ValueError(
                f"data source #{i} ({default_name}) has shard URL {found[0]!r}: a 'pipe:' URL "
                "runs a shell command and is refused unless allowed; set --data.allow_pipe true "
                "(VLMDataModule(allow_pipe=True)) only for configs you trust"
            )


def parse_sources(spec: SourceArg, *, default_name: str, allow_pipe: bool = False) -> list[Source]:
    """Turn a CLI/YAML source spec into ``Source`` objects with expanded, existing URLs.

    ``pipe:`` URLs (they run a shell command) are refused unless ``allow_pipe``.
    """
    if spec is None:
        return []
    if not allow_pipe:
        refuse_pipe_sources(spec, default_name=default_name)
    items = [spec] if isinstance(spec, (str, dict)) else list(spec)
    sources: list[Source] = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            item = {"shards": item}
        unknown = sorted(set(item) - {"name", "shards", "weight"})
        if unknown or "shards" not in item:
            raise ValueError(
                f"data source #{i} ({default_name}) must have keys 'shards' and optionally "
                f"'name', 'weight'; got unknown {unknown} / keys {sorted(item)}"
            )
        name = str(item.get("name") or (default_name if len(items) == 1 else f"{default_name}{i}"))
        weight = float(item.get("weight", 1.0))
        if weight < 0:
            raise ValueError(f"data source {name!r}: weight must be >= 0, got {weight}")
        urls = tuple(expand_urls(item["shards"], allow_pipe=allow_pipe))
        if not urls:
            raise ValueError(f"data source {name!r}: shard spec {item['shards']!r} matched nothing")
        sources.append(Source(name, urls, weight))
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"{default_name} source names must be unique, got {names}")
    if sources and sum(s.weight for s in sources) <= 0:
        raise ValueError(f"{default_name} source weights sum to 0; give one a positive weight")
    return sources


def count_samples(url: str, *, allow_pipe: bool = False) -> int:
    """Number of samples (keys with a ``.json`` member) in one shard, from tar headers.

    Local tars are walked header to header; remote ones are streamed once. A ``pipe:`` URL
    (its shell command runs) is refused unless ``allow_pipe``.
    """
    keys: set[str] = set()
    try:
        with (
            open_url(url, allow_pipe=allow_pipe) as raw,
            tarfile.open(fileobj=raw, mode="r|*") as archive,
        ):
            for info in archive:
                folder, _, base = info.name.rpartition("/")
                stem, _, suffix = base.partition(".")
                if info.isfile() and suffix == "json":
                    keys.add(f"{folder}/{stem}")
                archive.members.clear()  # streaming: keep no TarInfo list
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        # A corrupt shard must not kill the run at setup: count what was readable; the
        # reader skips and counts the broken part (or raises in strict mode) later.
        log.warning("count_samples: %s is corrupt after %d sample(s): %s", url, len(keys), exc)
    return len(keys)


def check_shard_counts(sources: list[Source], world_size: int, num_workers: int) -> None:
    """Raise when a source has fewer shards than ranks x workers (some would read nothing)."""
    workers = max(num_workers, 1)
    need = world_size * workers
    for source in sources:
        if len(source.urls) < need:
            raise ValueError(
                f"train source {source.name!r} has {len(source.urls)} shard(s) but "
                f"{world_size} rank(s) x {workers} worker(s) = {need} readers need one each; "
                "write more, smaller shards (max_samples_per_shard) or lower --data.num_workers"
            )


def eval_shards(
    sources: list[Source], generation_subset: int | None, *, allow_pipe: bool = False
) -> list[EvalShard]:
    """Validation shards in a fixed order, with counts and per-shard generation quotas.

    ``generation_subset`` samples in total are flagged for generation-based evaluation,
    spread over shards in proportion to their size (largest remainder), so generation work
    is balanced across ranks instead of piling onto the first shard. None flags every sample.
    ``allow_pipe`` lets ``pipe:`` shards be counted (their commands run once here).
    """
    plain = [
        (url, s.name, count_samples(url, allow_pipe=allow_pipe)) for s in sources for url in s.urls
    ]
    total = sum(n for _, _, n in plain)
    wanted = total if generation_subset is None else min(generation_subset, total)
    exact = [wanted * n / total if total else 0.0 for _, _, n in plain]
    quotas = [int(x) for x in exact]
    by_remainder = sorted(range(len(plain)), key=lambda i: (quotas[i] - exact[i], i))
    for i in by_remainder[: wanted - sum(quotas)]:
        quotas[i] += 1
    return [EvalShard(u, name, n, q) for (u, name, n), q in zip(plain, quotas, strict=True)]
