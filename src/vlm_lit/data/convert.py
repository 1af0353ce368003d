"""Command line: `python -m vlm_lit.data.convert {llava,img2dataset,mmc4} --help`."""

from __future__ import annotations

from jsonargparse import auto_cli

from vlm_lit.data.converters.common import ConversionSummary
from vlm_lit.data.converters.img2dataset import convert_img2dataset
from vlm_lit.data.converters.llava import convert_llava
from vlm_lit.data.converters.mmc4 import convert_mmc4

CONVERTERS = {"llava": convert_llava, "img2dataset": convert_img2dataset, "mmc4": convert_mmc4}

__all__ = ["CONVERTERS", "convert_img2dataset", "convert_llava", "convert_mmc4", "main"]


def main(args: list[str] | None = None) -> ConversionSummary:
    """Parse `args` (default: sys.argv), run the chosen converter, return its summary."""
    return auto_cli(CONVERTERS, args=args, as_positional=False)


if __name__ == "__main__":
    main()
