"""Benchmark: training-step time of each vlm_lit family vs the transformers class of the same design.

Pairs (same vision / LM / connector sizes, same batch, same trainable set, AdamW on both):
``mlp`` vs ``LlavaForConditionalGeneration`` (CLIP + Llama, every weight copied: identical
model), ``qformer`` vs ``Blip2ForConditionalGeneration`` (Llama LM; Q-Former, queries,
projection and LM copied; BLIP-2's own ViT is a different architecture, random), ``flamingo``
vs ``IdeficsForVisionText2Text`` (CLIP-like ViT and the Llama decoder copied; perceiver and
gated cross-attention are different implementations, random). The reference gets its inputs
the way its processor prepares them (``<image>`` expanded to K tokens beforehand); vlm_lit
gets one placeholder per image and expands it inside the step. Steps alternate A/B; the
reported ratio is the median of per-pair ratios (vlm_lit / reference, < 1 = vlm_lit faster).
Peak memory: one fresh subprocess per (family, preset, side) (see ``_bench.peak_memory``).

    python experiments/benchmarks/step_throughput.py [--quick] [--device cuda] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import _bench  # noqa: E402
import torch  # noqa: E402
from _models import (  # noqa: E402
    QUICK,
    Size,
    build_ours,
    lm_config,
    synthetic_batch,
    to_device,
    trainable,
    vision_spec,
    vlm_step,
)
from torch import nn  # noqa: E402

REFERENCE = {
    "mlp": "LlavaForConditionalGeneration",
    "qformer": "Blip2ForConditionalGeneration",
    "flamingo": "IdeficsForVisionText2Text",
}
# (vlm_lit prefix, reference prefix) for weight copying, per family.
COPY_RULES: dict[str, list[tuple[str, str]]] = {
    "mlp": [
        ("model.vision.model.", "model.vision_tower."),
        ("model.connector.proj.0.", "model.multi_modal_projector.linear_1."),
        ("model.connector.proj.2.", "model.multi_modal_projector.linear_2."),
        ("model.language_model.model.", "model.language_model."),
        ("model.language_model.lm_head.", "lm_head."),
    ],
    "qformer": [
        ("model.connector.query_tokens", "query_tokens"),
        ("model.connector.qformer.", "qformer."),
        ("model.connector.proj.", "language_projection."),
        ("model.connector.image_norm.", "vision_model.post_layernorm."),
        ("model.language_model.", "language_model."),
    ],
    "flamingo": [
        ("model.vision.model.", "model.vision_model."),
        ("model.language_model.model.", "model."),
        ("model.language_model.lm_head.", "lm_head."),
    ],
}
# Reference parameters that play the connector's role (trained under every preset).
CONNECTOR_PREFIXES = {
    "mlp": ("model.multi_modal_projector.",),
    "qformer": ("query_tokens", "qformer.", "language_projection.", "vision_model.post_layernorm"),
    "flamingo": ("model.perceiver_resampler.", "model.gated_cross_attn_layers."),
}
LM_PREFIXES = {
    "mlp": ("model.language_model.", "lm_head."),
    "qformer": ("language_model.",),
    "flamingo": ("model.layers.", "model.embed_tokens.", "model.norm.", "lm_head."),
}


def reference_config(family: str, size: Size, vocab: int, image_id: int) -> Any:
    """The transformers config of the reference class, sized like ``build_ours``."""
    import transformers as tf

    v = vision_spec(size, -1)["config"]
    text = tf.LlamaConfig(
        **{k: x for k, x in lm_config(size).items() if k != "model_type"},
        vocab_size=vocab,
        pad_token_id=0,
    )
    if family == "mlp":
        vision = tf.CLIPVisionConfig(**{k: x for k, x in v.items() if k != "model_type"})
        return tf.LlavaConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=image_id,
            image_seq_length=size.patches,
            vision_feature_layer=-2,
        )
    if family == "qformer":
        vision = tf.Blip2VisionConfig(
            hidden_size=size.v_width,
            intermediate_size=4 * size.v_width,
            num_hidden_layers=size.v_layers,
            num_attention_heads=size.v_heads,
            image_size=size.image,
            patch_size=size.patch,
        )
        qformer = tf.Blip2QFormerConfig(
            hidden_size=size.v_width,
            num_hidden_layers=2,
            num_attention_heads=size.v_heads,
            intermediate_size=4 * size.v_width,
            encoder_hidden_size=size.v_width,
            cross_attention_frequency=2,
        )
        return tf.Blip2Config(
            vision_config=vision.to_dict(),
            qformer_config=qformer.to_dict(),
            text_config=text.to_dict(),
            num_query_tokens=size.queries,
            image_token_index=image_id,
        )
    vision = tf.models.idefics.configuration_idefics.IdeficsVisionConfig(
        embed_dim=size.v_width,
        image_size=size.image,
        patch_size=size.patch,
        num_hidden_layers=size.v_layers,
        num_attention_heads=size.v_heads,
        intermediate_size=4 * size.v_width,
    )
    perceiver = tf.models.idefics.configuration_idefics.IdeficsPerceiverConfig(
        use_resampler=True,
        resampler_n_latents=size.queries,
        resampler_depth=2,
        resampler_n_heads=size.lm_heads,
        resampler_head_dim=size.lm_width // size.lm_heads,
    )
    return tf.IdeficsConfig(
        vocab_size=vocab,
        additional_vocab_size=0,
        hidden_size=size.lm_width,
        intermediate_size=text.intermediate_size,
        num_hidden_layers=size.lm_layers,
        num_attention_heads=size.lm_heads,
        cross_layer_interval=1,
        use_resampler=True,
        vision_config=vision.to_dict(),
        perceiver_config=perceiver.to_dict(),
        freeze_text_layers=False,
        freeze_vision_layers=False,
        rms_norm_eps=1e-6,
        pad_token_id=0,
    )


def build_reference(family: str, ours: nn.Module, size: Size, attn: str) -> tuple[nn.Module, str]:
    """Build the reference, copy what maps from ``ours`` and mirror its trainable set."""
    import transformers as tf

    lm = ours.model.language_model
    vocab = lm.get_input_embeddings().weight.shape[0]
    config = reference_config(family, size, vocab, ours.model.image_token_id)
    config._attn_implementation = attn
    ref = getattr(tf, REFERENCE[family])(config)
    ref_state = ref.state_dict()
    copied, total = 0, len(ref_state)
    mapped: dict[str, str] = {}
    with torch.no_grad():
        for name, tensor in ours.state_dict().items():
            for src, dst in COPY_RULES[family]:
                if name.startswith(src):
                    target = dst + name[len(src) :]
                    if target in ref_state and ref_state[target].shape == tensor.shape:
                        ref_state[target].copy_(tensor)
                        mapped[name] = target
                        copied += 1
                    break
    trained_lm = all(
        p.requires_grad
        for n, p in ours.named_parameters()
        if n.startswith("model.language_model.model.layers.")
    )
    train_prefixes = CONNECTOR_PREFIXES[family] + (LM_PREFIXES[family] if trained_lm else ())
    ours_trainable = {mapped.get(n) for n, p in ours.named_parameters() if p.requires_grad}
    for name, param in ref.named_parameters():
        param.requires_grad_(name.startswith(train_prefixes) or name in ours_trainable)
    note = f"{copied}/{total} reference tensors copied from vlm_lit"
    return ref, note


def expand_images(batch: dict[str, Any], image_id: int, k: int) -> dict[str, torch.Tensor]:
    """The processor's job for Llava / BLIP-2: each ``<image>`` becomes K image tokens."""
    rows = []
    for ids, labels, mask in zip(
        batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True
    ):
        reps = torch.where(ids == image_id, k, 1)
        rows.append(
            (
                ids.repeat_interleave(reps),
                labels.repeat_interleave(reps).clone(),
                mask.repeat_interleave(reps),
            )
        )
        rows[-1][1][ids.repeat_interleave(reps) == image_id] = -100
    return {
        "input_ids": torch.stack([r[0] for r in rows]),
        "labels": torch.stack([r[1] for r in rows]),
        "attention_mask": torch.stack([r[2] for r in rows]),
    }


def reference_inputs(
    family: str, batch: dict[str, Any], image_id: int, size: Size
) -> dict[str, torch.Tensor]:
    if family in ("mlp", "qformer"):
        k = size.patches if family == "mlp" else size.queries
        return {**expand_images(batch, image_id, k), "pixel_values": batch["pixel_values"]}
    seen = (batch["input_ids"] == image_id).long().cumsum(1) * batch["attention_mask"]
    return {
        "input_ids": batch["input_ids"],
        "labels": batch["labels"],
        "attention_mask": batch["attention_mask"],
        "pixel_values": batch["pixel_values"][:, None],  # (B, 1, 3, H, W)
        "image_attention_mask": (seen > 0).long()[:, :, None],
    }  # (B, T, 1)


def count_step_flops(step: Any) -> int:
    """Matmul / attention FLOPs of one training step (``FlopCounterMode``)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def make_sides(
    family: str,
    preset: str,
    size: Size,
    args: argparse.Namespace,
    which: tuple[str, ...] = ("vlm_lit", "reference"),
) -> dict[str, Any]:
    """Build both models on the same inputs; return per side a step function and metadata."""
    torch.manual_seed(0)
    ours = build_ours(family, size, preset).to(args.device)
    ours.train()
    batch = to_device(synthetic_batch(ours, size), args.device)
    amp = _bench.autocast(args)
    sides: dict[str, Any] = {"tokens": int(batch["num_supervised_tokens"])}
    if "reference" in which:
        ref, note = build_reference(family, ours, size, "sdpa")
        ref = ref.to(args.device).train()
        ref_in = to_device(
            reference_inputs(family, batch, ours.model.image_token_id, size), args.device
        )
        ref_opt = torch.optim.AdamW(trainable(ref), lr=1e-4)

        def ref_step() -> float:
            with amp:
                loss = ref(**ref_in).loss
            loss.backward()
            ref_opt.step()
            ref_opt.zero_grad(set_to_none=True)
            return float(loss.detach())

        sides["reference"] = ref_step
        sides["note"] = note
        if "vlm_lit" in which:  # not in a memory child: no extra forward before it measures
            with torch.no_grad(), amp:
                sides["loss_reference"] = float(ref(**ref_in).loss)
                sides["loss_vlm_lit"] = float(ours(batch).loss)
        sides["trainable_reference"] = sum(p.numel() for p in trainable(ref))
    if "vlm_lit" in which:
        opt = torch.optim.AdamW(trainable(ours), lr=1e-4)
        sides["vlm_lit"] = lambda: vlm_step(ours, opt, batch, amp)
        sides["trainable_vlm_lit"] = sum(p.numel() for p in trainable(ours))
    return sides


def child(payload: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Peak memory of one side in this fresh process: 3 steps after the build."""
    size = Size(**payload["size"])
    sides = make_sides(payload["family"], payload["preset"], size, args, (payload["side"],))
    step = sides[payload["side"]]
    with _bench.peak_memory(args.device) as mem:
        for _ in range(3):
            step()
    return mem


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _bench.add_common_args(parser, "step_throughput")
    parser.add_argument("--families", nargs="+", default=["mlp", "qformer", "flamingo"])
    parser.add_argument("--presets", nargs="+", default=["align", "full"])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    _bench.setup_torch(args)
    if args.child:
        result = child(json.loads(args.child), args)
        print(json.dumps(result))
        return result
    size = QUICK if args.quick else Size()
    if args.quick:
        args.pairs, args.warmup, args.no_memory = min(args.pairs, 2), 1, True
    rows = []
    for family in args.families:
        for preset in args.presets:
            sides = make_sides(family, preset, size, args)
            # FLOPs are load-independent: they say how much of a time ratio is extra work.
            flops = {k: count_step_flops(sides[k]) for k in ("vlm_lit", "reference")}
            times = _bench.alternate(
                {k: sides[k] for k in ("vlm_lit", "reference")},
                args.pairs,
                args.warmup,
                args.device,
            )
            ours_t, ref_t = (statistics.median(times[k]) for k in ("vlm_lit", "reference"))
            row = {
                "family": family,
                "reference": REFERENCE[family],
                "preset": preset,
                "vlm_lit_ms": 1000 * ours_t,
                "reference_ms": 1000 * ref_t,
                "ratio": _bench.median_ratio(times["vlm_lit"], times["reference"]),
                "flop_ratio": flops["vlm_lit"] / flops["reference"],
                "vlm_lit_tok_s": sides["tokens"] / ours_t,
                "reference_tok_s": sides["tokens"] / ref_t,
                "trainable_vlm_lit": sides["trainable_vlm_lit"],
                "trainable_reference": sides["trainable_reference"],
                "identical": sides["note"],
                "loss_vlm_lit": sides["loss_vlm_lit"],
                "loss_reference": sides["loss_reference"],
            }
            if not args.no_memory:
                for side in ("vlm_lit", "reference"):
                    payload = {
                        "family": family,
                        "preset": preset,
                        "side": side,
                        "size": size.__dict__,
                    }
                    mem = _bench.run_child(__file__, payload, args)
                    row[f"{side}_peak_mb"] = mem["peak_mb"]
                row["memory_method"] = mem["method"]
            rows.append(row)
            del sides
    columns = [
        "family",
        "preset",
        "vlm_lit_ms",
        "reference_ms",
        "ratio",
        "flop_ratio",
        "vlm_lit_tok_s",
        "reference_tok_s",
    ]
    if not args.no_memory:
        columns += ["vlm_lit_peak_mb", "reference_peak_mb"]
    _bench.print_table(rows, columns)
    for r in rows:
        print(
            f"{r['family']}/{r['preset']} vs {r['reference']}: {r['identical']}; step-0 "
            f"loss {r['loss_vlm_lit']:.5f} vs {r['loss_reference']:.5f}"
        )
    result = {
        "machine": _bench.machine_info(args),
        "size": size.__dict__,
        "pairs": args.pairs,
        "warmup": args.warmup,
        "rows": rows,
    }
    return _bench.write_result(args.out, result)


if __name__ == "__main__":
    main()
