"""Format constants in one place (the gguf-py way)."""

from __future__ import annotations

import torch

MANIFEST_KEY = "nwc"
FORMAT_NAME = "nwc"
FORMAT_VERSION = (1, 0)
FORMAT_VERSION_STR = f"{FORMAT_VERSION[0]}.{FORMAT_VERSION[1]}"

# Features a writer may list in `required_features` / `optional_features`. A reader refuses a file whose
# required features are not all in KNOWN_FEATURES.
# "shared_segments" (format 1.1): tensors named SHARED_PREFIX... may be claimed by several records of one file
# (a neural codec's decoder network, stored once per file).
SHARED_SEGMENTS = "shared_segments"
KNOWN_FEATURES: frozenset[str] = frozenset({SHARED_SEGMENTS})
SHARED_PREFIX = "__nwc_shared__."
SHARED_FORMAT_VERSION = (1, 1)  # the minor version that introduced shared segments

ALIGNMENT = 64
PAD_PREFIX = "__nwc_pad__."
# An empty U8 tensor that model-folder writers add so that a loader which does not know NWC (transformers
# without `import nwcfmt`) names the fix in its report of unexpected keys. Readers ignore it (spec format-v1 6.5).
LOADER_NOTICE = (
    "__nwc_notice__: NWC-compressed weights; run `import nwcfmt` before from_pretrained (pip install nwcfmt)"
)
RESERVED_PREFIX = "__nwc_"
SEGMENT_SEPARATOR = "::"  # non-primary segments are stored as f"{name}::{segment}"

# Safety limits applied while reading (every size read from a file is bounded before allocation).
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_TENSOR_ELEMENTS = 1 << 36
MAX_DIMS = 8
MAX_CHUNK_ELEMENTS = 1 << 24

# safetensors dtype names <-> torch dtypes
ST_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
):
    if hasattr(torch, _attr):
        ST_TO_TORCH[_name] = getattr(torch, _attr)
TORCH_TO_ST: dict[torch.dtype, str] = {v: k for k, v in ST_TO_TORCH.items()}

# Manifest dtype names (torch spelling) <-> torch dtypes
DTYPE_NAMES: dict[str, torch.dtype] = {str(d).removeprefix("torch."): d for d in ST_TO_TORCH.values()}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def element_size(st_dtype: str) -> int:
    return ST_TO_TORCH[st_dtype].itemsize
