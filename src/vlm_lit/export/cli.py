"""``python -m vlm_lit.export``: a run or saved model -> a transformers Llava dir or a vlm_lit dir."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, get_args

from vlm_lit.export.inputs import ExportError, resolve_source
from vlm_lit.export.merge import ExportDtype, resolve_dtype

ExportFormat = Literal["hf-llava", "vlm-lit"]
ImageMode = Literal["pad", "resize"]


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ExportError(
            f"--out {out} exists and is not empty; pick a new directory or --overwrite"
        )


def export(
    source: str | Path,
    out: str | Path,
    *,
    format: ExportFormat,
    merge_lora: bool = False,
    dtype: ExportDtype = "float32",
    image_mode: ImageMode | None = None,
    verify: bool = True,
    overwrite: bool = False,
    log: Callable[[str], Any] = print,
) -> Path:
    """Export ``source`` (a run dir or a ``save_pretrained`` dir) to ``out``; returns ``out``.

    ``hf-llava`` always merges LoRA (Llava has no adapters); ``vlm-lit`` merges only with
    ``merge_lora``. ``image_mode`` (Llava processor) defaults to the run's
    ``data.image_mode``, else ``"pad"``. Every export gets a ``README.md`` model card.
    """
    from vlm_lit.export.model_card import write_model_card
    from vlm_lit.models.module import VLMModule

    if format not in get_args(ExportFormat):
        raise ExportError(f"unknown --format {format!r}; valid: {sorted(get_args(ExportFormat))}")
    torch_dtype = resolve_dtype(dtype)
    out_path = Path(out)
    _check_out_dir(out_path, overwrite)
    src = resolve_source(source)
    start = time.perf_counter()
    log(f"[export] loading {src.model_dir}")
    module = VLMModule.from_pretrained(src.model_dir).eval()
    log(f"[export] loaded {type(module).__name__} in {time.perf_counter() - start:.1f}s")
    if format == "hf-llava":
        from vlm_lit.export.hf_llava import check_llava_compatible, export_hf_llava

        check_llava_compatible(module)  # refuse before any work
        mode = image_mode or (src.run_config.get("data") or {}).get("image_mode") or "pad"
        log("[export] converting to LlavaForConditionalGeneration (LoRA merged in fp32)")
        facts = export_hf_llava(module, out_path, dtype=torch_dtype, image_mode=mode, verify=verify)
        if facts["max_abs_logit_diff_fp32"] is not None:
            log(f"[export] logits match vlm_lit: max |diff| {facts['max_abs_logit_diff_fp32']:.2e}")
    else:
        from vlm_lit.export.merge import export_vlm_lit

        if merge_lora:
            log("[export] merging LoRA adapters in fp32")
        facts = export_vlm_lit(module, out_path, merge=merge_lora, dtype=dtype)
        if merge_lora and not facts["merged"]:
            log("[export] note: the model has no LoRA adapter; nothing was merged")
    merged = facts.pop("merged")
    facts = {
        "format": format,
        "dtype": dtype,
        "LoRA merged (fp32)": f"yes, saved as {merged}" if merged else "no (no adapters)",
        **facts,
    }
    card = write_model_card(out_path, src, format, facts)
    log(f"[export] wrote {out_path} (model card {card.name}) in {time.perf_counter() - start:.1f}s")
    return out_path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vlm_lit.export",
        description=(
            "Export a vlm_lit run (RUN_DIR with model/) or a save_pretrained directory. "
            "hf-llava: an mlp-family model (CLIP/SigLIP or plain open_clip ViT tower, depth-2 "
            "MLP projector, no token reduction) as a transformers LlavaForConditionalGeneration "
            "+ LlavaProcessor directory, logits checked against vlm_lit. vlm-lit: the library's "
            "own save_pretrained directory, optionally with LoRA merged (fp32) and cast."
        ),
    )
    parser.add_argument("source", help="run directory or save_pretrained directory")
    parser.add_argument("--out", required=True, help="output directory (new or empty)")
    parser.add_argument("--format", required=True, choices=get_args(ExportFormat))
    parser.add_argument(
        "--merge-lora",
        action="store_true",
        help="vlm-lit: merge LoRA into the weights in fp32 (hf-llava always merges)",
    )
    parser.add_argument(
        "--dtype", default="float32", choices=get_args(ExportDtype), help="dtype of saved weights"
    )
    parser.add_argument(
        "--image-mode",
        default=None,
        choices=get_args(ImageMode),
        help="hf-llava processor: pad to square (LLaVA-1.5) or stretch; default: the run's "
        "data.image_mode, else pad",
    )
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="hf-llava: skip the fp32 logit comparison against vlm_lit",
    )
    parser.add_argument("--overwrite", action="store_true", help="allow a non-empty --out")
    return parser


def main(argv: list[str] | None = None) -> Path:
    """Parse ``argv`` and export; errors exit with status 2 and a one-line reason."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return export(
            args.source,
            args.out,
            format=args.format,
            merge_lora=args.merge_lora,
            dtype=args.dtype,
            image_mode=args.image_mode,
            verify=not args.no_verify,
            overwrite=args.overwrite,
        )
    except (ExportError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
