"""Build (once) and cache the embedded default: shapes-world shards, a CLIP tower and an LM."""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from vlm_lit.data.synthetic import (
    make_caption_pairs,
    make_synthetic_samples,
    make_synthetic_shards,
    world_text_corpus,
)
from vlm_lit.world.clip_pretrain import CLIP_MEAN, CLIP_STD, WORLD_CLIP_CFG, pretrain_clip
from vlm_lit.world.lm_pretrain import WORLD_LM_CFG, pretrain_lm, train_world_tokenizer

#: Bump when anything that changes the built files changes; old caches are then ignored.
WORLD_VERSION = 2

Profile = Literal["default", "micro"]

#: The "train" part is instruction-tuning data (LLaVA's second stage): mostly questions, a
#: little of every other kind (text-only and documents included, as the recipes mix them).
#: Captions are few because the loss is token-weighted: a caption has ~20 supervised tokens
#: and an answer 1-3, so the library's caption-heavy default mix (DEFAULT_TASK_WEIGHTS) spends
#: almost all of a short run's gradient on captions. Captions alone live in the "align" part.
INSTRUCTION_TASK_WEIGHTS: dict[str, float] = {
    "caption": 0.05,
    "vqa_color": 0.16,
    "vqa_count": 0.16,
    "vqa_position": 0.16,
    "vqa_exist": 0.16,
    "mc": 0.10,
    "multiturn": 0.07,
    "compare": 0.06,
    "document": 0.04,
    "text": 0.04,
}

# "micro" exists for tests and smoke runs: the same pipeline at a size that builds in seconds.
PROFILES: dict[str, dict[str, int]] = {
    "default": dict(
        train=20000,
        val=600,
        align=8000,
        clip_pairs=8000,
        clip_eval=256,
        clip_steps=300,
        clip_batch=128,
        lm_texts=12000,
        lm_steps=300,
        lm_batch=32,
    ),
    "micro": dict(
        train=96,
        val=32,
        align=32,
        clip_pairs=64,
        clip_eval=16,
        clip_steps=4,
        clip_batch=16,
        lm_texts=200,
        lm_steps=4,
        lm_batch=4,
    ),
}


#: Connector sizes matched to the world's tiny backbones (9 patches of width 128, LM width 128).
#: The 2-layer Q-Former cross-attends in both layers: with BLIP-2's every-other-layer default
#: only its first layer reads the image, and the default run's colour accuracy stayed at the
#: constant-answer rate (0.28, against 0.45 with both layers reading it; measured).
WORLD_CONNECTORS: dict[str, dict[str, Any]] = {
    "mlp": {},
    "qformer": {
        "num_queries": 16,
        "hidden_size": 128,
        "num_layers": 2,
        "num_heads": 4,
        "cross_attention_frequency": 1,
    },
    "flamingo": {
        "num_latents": 16,
        "resampler_depth": 1,
        "resampler_heads": 4,
        "xattn_heads": 4,
        "cross_attn_every": 1,
        "ff_mult": 2,
    },
}


@dataclass
class ShapesWorld:
    """Paths to a built world, in the form the model and DataModule arguments take."""

    root: str
    train_shards: list[str]
    align_shards: list[str]
    val_shards: list[str]
    clip_checkpoint: str
    clip_model_cfg: dict[str, Any]
    lm_dir: str
    report: dict[str, Any]

    def vision_spec(self) -> dict[str, Any]:
        """``--model.vision`` for this world's pretrained tower."""
        return {
            "backend": "open_clip",
            "model_cfg": self.clip_model_cfg,
            "pretrained": self.clip_checkpoint,
            "feature_layer": -1,
            "image_mean": list(CLIP_MEAN),
            "image_std": list(CLIP_STD),
        }

    def language_model_spec(self) -> dict[str, Any]:
        """``--model.language_model`` for this world's pretrained LM."""
        return {"path": self.lm_dir}

    def connector_spec(self, family: str) -> dict[str, Any]:
        """``--model.connector_kwargs`` sized for this world's width-128 backbones (the
        library defaults are BLIP-2 / OpenFlamingo scale, far too big for a CPU run)."""
        return copy.deepcopy(WORLD_CONNECTORS.get(family, {}))

    def shards(self, name: str) -> list[str]:
        """Shards of one part of the world: ``train`` (mixed tasks), ``align`` (captions
        only) or ``val``."""
        parts = {"train": self.train_shards, "align": self.align_shards, "val": self.val_shards}
        if name not in parts:
            raise ValueError(f"unknown shapes-world part {name!r}; valid: {sorted(parts)}")
        return parts[name]


def vlm_lit_home() -> Path:
    """``$VLM_LIT_HOME``, default ``~/.cache/vlm_lit``."""
    return Path(os.environ.get("VLM_LIT_HOME", Path.home() / ".cache" / "vlm_lit")).expanduser()


def _chat_text(sample: dict[str, Any], tokenizer: Any) -> str:
    """A sample's text with image parts removed, rendered the way the LM will later see it."""
    if "document" in sample:
        return " ".join(p["text"] for p in sample["document"] if p["type"] == "text")
    messages = []
    for m in sample["messages"]:
        content = m["content"]
        if not isinstance(content, str):
            content = "".join(p.get("text", "") for p in content if p["type"] == "text")
        messages.append({"role": m["role"], "content": content})
    return tokenizer.apply_chat_template(messages, tokenize=False)


def _progress():
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        transient=False,
    )


def _build(root: Path, sizes: dict[str, int], seed: int) -> dict[str, Any]:
    report: dict[str, Any] = {"world_version": WORLD_VERSION, "seed": seed, "sizes": sizes}
    start = time.perf_counter()
    with _progress() as bar:
        job = bar.add_task("shapes world: shards", total=3)
        make_synthetic_shards(
            root / "train",
            num_samples=sizes["train"],
            seed=seed,
            split="train",
            tasks=INSTRUCTION_TASK_WEIGHTS,
        )
        bar.advance(job)
        # caption-only shards for an alignment stage (LLaVA stage 1 trains on captions alone)
        make_synthetic_shards(
            root / "align",
            num_samples=sizes["align"],
            seed=seed + 1,
            split="train",
            tasks=["caption"],
        )
        bar.advance(job)
        make_synthetic_shards(root / "val", num_samples=sizes["val"], seed=seed, split="val")
        bar.advance(job)

        job = bar.add_task("shapes world: CLIP tower", total=sizes["clip_steps"])
        pairs = list(
            make_caption_pairs(sizes["clip_pairs"], seed=seed, split="train", image_size=64)
        )
        held_out = list(
            make_caption_pairs(sizes["clip_eval"], seed=seed, split="val", image_size=64)
        )
        clip = pretrain_clip(
            pairs,
            held_out,
            steps=sizes["clip_steps"],
            batch_size=sizes["clip_batch"],
            seed=seed,
            progress=lambda step, loss: bar.update(job, completed=step + 1),
        )
        (root / "clip").mkdir()
        torch.save(clip.state_dict, root / "clip" / "open_clip_shapes.pt")
        (root / "clip" / "model_cfg.json").write_text(json.dumps(WORLD_CLIP_CFG, indent=2))
        report["clip"] = {
            "image_to_text_top1": clip.image_to_text_top1,
            "eval_pairs": clip.eval_pairs,
            "seconds": round(clip.seconds, 1),
        }

        job = bar.add_task("shapes world: language model", total=sizes["lm_steps"])
        corpus = world_text_corpus(seed, sizes["lm_texts"])
        samples = make_synthetic_samples(sizes["lm_texts"], seed=seed + 1, split="train")
        tokenizer = train_world_tokenizer(corpus)
        texts = corpus + [_chat_text(s, tokenizer) for s in samples]
        lm = pretrain_lm(
            texts,
            tokenizer,
            steps=sizes["lm_steps"],
            batch_size=sizes["lm_batch"],
            seed=seed,
            progress=lambda step, loss: bar.update(job, completed=step + 1),
        )
        lm.model.save_pretrained(root / "lm")
        tokenizer.save_pretrained(root / "lm")
        report["lm"] = {
            "final_loss": round(lm.final_loss, 4),
            "seconds": round(lm.seconds, 1),
            "config": WORLD_LM_CFG,
            "vocab_size": len(tokenizer),
        }
    report["build_seconds"] = round(time.perf_counter() - start, 1)
    return report


def ensure_world(
    home: str | os.PathLike[str] | None = None, *, profile: Profile = "default", seed: int = 0
) -> ShapesWorld:
    """Return the cached world, building it first if needed (atomically: a crash mid-build
    leaves no half-built world behind, and a concurrent builder's result is reused)."""
    if profile not in PROFILES:
        raise ValueError(f"unknown world profile {profile!r}; valid: {sorted(PROFILES)}")
    base = Path(home) if home is not None else vlm_lit_home()
    root = base / f"shapes-world-v{WORLD_VERSION}-{profile}-seed{seed}"
    if not (root / "world.json").is_file():
        base.mkdir(parents=True, exist_ok=True)
        tmp = base / f".{root.name}.building-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            report = _build(tmp, PROFILES[profile], seed)
            (tmp / "world.json").write_text(json.dumps(report, indent=2))
            try:
                tmp.rename(root)
            except OSError:  # another process finished first: keep theirs
                if not (root / "world.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    report = json.loads((root / "world.json").read_text())
    return ShapesWorld(
        root=str(root),
        train_shards=sorted(str(p) for p in (root / "train").glob("*.tar")),
        align_shards=sorted(str(p) for p in (root / "align").glob("*.tar")),
        val_shards=sorted(str(p) for p in (root / "val").glob("*.tar")),
        clip_checkpoint=str(root / "clip" / "open_clip_shapes.pt"),
        clip_model_cfg=json.loads((root / "clip" / "model_cfg.json").read_text()),
        lm_dir=str(root / "lm"),
        report=report,
    )


__all__ = ["PROFILES", "WORLD_VERSION", "ShapesWorld", "ensure_world", "vlm_lit_home"]
