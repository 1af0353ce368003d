"""Export trained models: transformers Llava directories, merged vlm_lit directories, model cards."""

from vlm_lit.export.cli import export
from vlm_lit.export.hf_llava import check_llava_compatible, export_hf_llava, to_llava
from vlm_lit.export.inputs import ExportError, ExportSource, resolve_source
from vlm_lit.export.merge import export_vlm_lit, merge_module_lora

__all__ = [
    "ExportError",
    "ExportSource",
    "check_llava_compatible",
    "export",
    "export_hf_llava",
    "export_vlm_lit",
    "merge_module_lora",
    "resolve_source",
    "to_llava",
]
