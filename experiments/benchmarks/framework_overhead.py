"""Benchmark: Lightning ``Trainer`` loop vs a plain PyTorch loop over the same module and batches.

Both loops run the same ``VLMModule`` (its own loss, its own ``configure_optimizers``: AdamW
with per-component groups and the warmup-cosine schedule) on the same pre-built batches.
The Trainer runs with logging to nowhere, no checkpointing, no progress bar, no model summary
(what a benchmark would disable), but keeps the module's ``self.log`` calls. Only steps after
the warm-up of each run are timed (a callback stamps the batch boundaries), so ``fit``'s
set-up and tear-down are excluded. Rounds alternate plain / Lightning; the ratio is the
median of per-round steps/s ratios (Lightning / plain; goal >= 0.95).

    python experiments/benchmarks/framework_overhead.py [--quick] [--device cuda] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import _bench  # noqa: E402
import torch  # noqa: E402
from _models import QUICK, Size, build_ours, synthetic_batch, to_device  # noqa: E402


class StepClock:
    """Lightning callback: wall time from the start of batch ``warmup`` to the last batch end."""

    def __init__(self, warmup: int, device: str) -> None:
        self.warmup, self.device = warmup, device
        self.start = self.end = 0.0

    def as_callback(self) -> Any:
        import lightning as L

        clock = self

        class _Clock(L.Callback):
            def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, idx: int) -> None:
                if idx == clock.warmup:
                    _bench.sync(clock.device)
                    clock.start = time.perf_counter()

            def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
                _bench.sync(clock.device)
                clock.end = time.perf_counter()

        return _Clock()


class Batches:
    """The pre-built batches as one iterable (a bare list would be read as many loaders)."""

    def __init__(self, batches: list[dict[str, Any]]) -> None:
        self.batches = batches

    def __iter__(self) -> Any:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def lightning_run(
    module: Any, batches: list[dict[str, Any]], warmup: int, args: argparse.Namespace
) -> float:
    """Steps/s of the timed part of one ``Trainer.fit`` over ``batches``."""
    import lightning as L

    clock = StepClock(warmup, args.device)
    trainer = L.Trainer(
        accelerator=args.device,
        devices=1,
        max_steps=len(batches),
        max_epochs=1,
        precision="bf16-mixed" if args.dtype == "bf16" else "32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock.as_callback()],
        num_sanity_val_steps=0,
    )
    trainer.fit(module, train_dataloaders=Batches(batches))
    return (len(batches) - warmup) / (clock.end - clock.start)


def plain_run(
    module: Any, batches: list[dict[str, Any]], warmup: int, args: argparse.Namespace
) -> float:
    """Steps/s of the same steps written by hand: forward, backward, step, schedule, zero."""
    conf = module.configure_optimizers()
    optimizer, scheduler = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    module.train()
    amp = _bench.autocast(args)
    start = 0.0
    for i, batch in enumerate(batches):
        if i == warmup:
            _bench.sync(args.device)
            start = time.perf_counter()
        with amp:
            loss = module(batch).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    _bench.sync(args.device)
    return (len(batches) - warmup) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _bench.add_common_args(parser, "framework_overhead")
    parser.add_argument("--family", default="mlp")
    parser.add_argument("--steps", type=int, default=30, help="steps per run (incl. warm-up)")
    args = parser.parse_args(argv)
    _bench.setup_torch(args)
    size = QUICK if args.quick else Size()
    if args.quick:
        args.pairs, args.warmup, args.steps = 2, 2, 6
    torch.manual_seed(0)
    module = build_ours(args.family, size, "align", max_steps=10**6).to(args.device)
    batches = [
        to_device(synthetic_batch(module, size, seed=i), args.device) for i in range(args.steps)
    ]
    rates: dict[str, list[float]] = {"plain": [], "lightning": []}
    runs = {"plain": plain_run, "lightning": lightning_run}
    plain_run(module, batches[: args.warmup + 1], args.warmup, args)  # first-call costs
    for i in range(args.pairs):
        for name in ("plain", "lightning") if i % 2 == 0 else ("lightning", "plain"):
            rates[name].append(runs[name](module, batches, args.warmup, args))
    ratio = statistics.median(
        lt / pl for lt, pl in zip(rates["lightning"], rates["plain"], strict=True)
    )
    plain_s, light_s = (statistics.median(rates[k]) for k in ("plain", "lightning"))
    row = {
        "family": args.family,
        "steps_timed": args.steps - args.warmup,
        "rounds": args.pairs,
        "plain_steps_s": plain_s,
        "lightning_steps_s": light_s,
        "ratio": ratio,
        "overhead_ms_per_step": 1000 * (1 / light_s - 1 / plain_s),
    }
    _bench.print_table([row], list(row))
    print(f"Lightning / plain steps/s: median {ratio:.3f} (goal >= 0.95)")
    result = {
        "machine": _bench.machine_info(args),
        "size": size.__dict__,
        "rows": [row],
        "rates": rates,
    }
    return _bench.write_result(args.out, result)


if __name__ == "__main__":
    main()
