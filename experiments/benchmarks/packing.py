"""Benchmark: supervised tokens/s and padding, packed rows vs padded batches, on a skewed mix.

The mix is 80 % short VQA samples (one image, a 10-20 token question, a 1-3 token answer) and
20 % long multi-turn conversations (one image, 4-8 turns, 150-450 tokens, answers
supervised), as in LLaVA's instruction data. The same samples are trained once per round
both ways: padded batches of ``--batch-size`` samples in stream order (right padding to the
longest), and rows packed first-fit-decreasing up to ``--max-length`` text tokens,
``--rows`` rows per batch (``vlm_lit.data.packing``). Both use the same plain-model forward
(with ``segment_ids`` / ``position_ids`` for the packed batches), the same global-token-mean
loss and AdamW. Rounds alternate padded / packed; the reported speed-up is the median of
per-round ratios of supervised tokens/s. Padding fraction = padded positions / all positions
of the LM sequences (after ``<image>`` expansion).

    python experiments/benchmarks/packing.py [--quick] [--device cuda] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import _bench  # noqa: E402
import torch  # noqa: E402
from _models import QUICK, Size, build_ours, to_device, trainable  # noqa: E402

from vlm_lit.data.collate import batch_examples, collate_examples  # noqa: E402
from vlm_lit.data.packing import collate_packed, pack_examples  # noqa: E402
from vlm_lit.models.loss import count_supervised, summed_cross_entropy  # noqa: E402


def skewed_examples(
    n: int, image_id: int, vocab: int, size: Size, long_max: int, seed: int = 0
) -> list[dict[str, Any]]:
    """``n`` token-level examples: 80 % short VQA, 20 % long conversations (one image each)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids, labels = [rng.randrange(3, vocab), image_id], [-100, -100]
        if rng.random() < 0.8:
            turns = [(rng.randint(10, 20), rng.randint(1, 3))]
        else:
            turns = [(rng.randint(10, 30), rng.randint(15, 60)) for _ in range(rng.randint(4, 8))]
        for question, answer in turns:
            if len(ids) + question + answer > long_max:
                break
            q = [rng.randrange(3, vocab) for _ in range(question)]
            a = [rng.randrange(3, vocab) for _ in range(answer)]
            ids += q + a
            labels += [-100] * question + a
        out.append(
            {
                "input_ids": torch.tensor(ids),
                "labels": torch.tensor(labels),
                "pixel_values": torch.randn(1, 3, size.image, size.image, generator=gen),
                "key": f"s{i}",
                "source": "mix",
            }
        )
    return out


def lm_positions(batch: dict[str, Any], k: int) -> tuple[int, int]:
    """(real, total) positions of the LM sequence after each <image> becomes k tokens."""
    images_per_row = torch.bincount(
        batch["image_sample_index"], minlength=batch["input_ids"].shape[0]
    )
    real_per_row = batch["attention_mask"].sum(1) + (k - 1) * images_per_row
    return int(real_per_row.sum()), int(real_per_row.max()) * batch["input_ids"].shape[0]


def make_epoch(module: Any, batches: list[dict[str, Any]], args: argparse.Namespace) -> Any:
    """A closure training one pass over ``batches``; returns nothing (time it)."""
    optimizer = torch.optim.AdamW(trainable(module), lr=1e-5)
    amp = _bench.autocast(args)

    def epoch() -> None:
        for batch in batches:
            extra = {k: batch[k] for k in ("segment_ids", "position_ids") if k in batch}
            with amp:
                out = module.model(
                    batch["input_ids"],
                    batch["attention_mask"],
                    batch["pixel_values"],
                    batch["image_sample_index"],
                    batch["labels"],
                    **extra,
                )
                loss = summed_cross_entropy(out.logits, out.labels)
                loss = loss / count_supervised(out.labels).clamp(min=1)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return epoch


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _bench.add_common_args(parser, "packing")
    parser.add_argument("--family", default="mlp")
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8, help="padded: samples per batch")
    parser.add_argument("--rows", type=int, default=2, help="packed: rows per batch")
    parser.add_argument("--max-length", type=int, default=512, help="packed row length")
    args = parser.parse_args(argv)
    _bench.setup_torch(args)
    size = QUICK if args.quick else Size()
    if args.quick:
        args.samples, args.pairs, args.warmup, args.max_length = 12, 1, 1, 160
    torch.manual_seed(0)
    module = build_ours(args.family, size, "align").to(args.device)
    module.train()
    image_id = module.model.image_token_id
    examples = skewed_examples(args.samples, image_id, min(image_id, 300), size, args.max_length)
    collate = {"pad_token_id": module.tokenizer.pad_token_id, "image_size": size.image}
    padded = [collate_examples(g, **collate) for g in batch_examples(examples, args.batch_size)]
    packed = [
        collate_packed(rows, **collate)
        for rows in pack_examples(examples, args.rows, args.max_length, buffer_size=len(examples))
    ]
    k = module.model.tokens_per_image
    stats = {}
    for name, batches in (("padded", padded), ("packed", packed)):
        real, total = map(sum, zip(*(lm_positions(b, k) for b in batches), strict=True))
        stats[name] = {
            "batches": len(batches),
            "padding_fraction": 1 - real / total,
            "supervised": sum(int(b["num_supervised_tokens"]) for b in batches),
        }
    assert stats["padded"]["supervised"] == stats["packed"]["supervised"], stats
    epochs = {
        name: make_epoch(module, [to_device(b, args.device) for b in batches], args)
        for name, batches in (("padded", padded), ("packed", packed))
    }
    times = _bench.alternate(epochs, args.pairs, args.warmup, args.device)
    tokens = stats["padded"]["supervised"]
    rows = []
    for name in ("padded", "packed"):
        rows.append(
            {
                "layout": name,
                **stats[name],
                "epoch_s": statistics.median(times[name]),
                "supervised_tok_s": tokens / statistics.median(times[name]),
            }
        )
    speedup = _bench.median_ratio(times["padded"], times["packed"])
    _bench.print_table(rows, list(rows[0]))
    print(f"packed / padded supervised tokens/s: median x{speedup:.2f} (goal >= 1.3)")
    lengths = [int(e["input_ids"].numel()) for e in examples]
    result = {
        "machine": _bench.machine_info(args),
        "size": size.__dict__,
        "samples": args.samples,
        "text_lengths": {
            "min": min(lengths),
            "median": statistics.median(lengths),
            "max": max(lengths),
        },
        "batch_size": args.batch_size,
        "rows": args.rows,
        "max_length": args.max_length,
        "results": rows,
        "speedup": speedup,
    }
    return _bench.write_result(args.out, result)


if __name__ == "__main__":
    main()
