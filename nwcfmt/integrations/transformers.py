"""transformers support: ``from_pretrained`` loads NWC folders (``quant_method: "nwc"``) once nwcfmt is imported.

Loading goes through transformers' own conversion engine. For every stored tensor it reads the payload
segments (``name``, ``name::scale``, ...) onto the parameter's target device, unconverted; an
:class:`NwcWeightConverter` per parameter then checks them against the file's manifest and CRC-32 and
decodes them there, so on a GPU the packed codes cross PCIe and are dequantized by the Triton kernels.
The result is the dense tensor in the dtype transformers asked for: the model holds plain weights, and its
logits equal those of the folder rebuilt by ``nwc decode``.

transformers loads one tensor at a time and never builds the whole model in fp32 first; its worker threads
read the stored (compressed) bytes ahead of the decoding.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from nwcfmt.codecs.base import PRIMARY_SEGMENT
from nwcfmt.codecs.registry import get_codec
from nwcfmt.constants import FORMAT_VERSION, RESERVED_PREFIX, SEGMENT_SEPARATOR, SHARED_PREFIX
from nwcfmt.container.reader import NwcReader
from nwcfmt.errors import FormatError, InputError, UnsupportedError, UnsupportedVersionError

QUANT_METHOD = "nwc"
logger = logging.getLogger(__name__)
_SIMPLE_NAME = re.compile(r"^[A-Za-z0-9_]+$")


def register(registry: ModuleType | None = None) -> None:
    """Register :class:`NwcConfig` and :class:`NwcHfQuantizer` for ``quant_method: "nwc"`` (idempotent)."""
    if registry is None:
        from transformers.quantizers import auto as registry
    if QUANT_METHOD not in registry.AUTO_QUANTIZATION_CONFIG_MAPPING:
        registry.register_quantization_config(QUANT_METHOD)(NwcConfig)
    if QUANT_METHOD not in registry.AUTO_QUANTIZER_MAPPING:
        registry.register_quantizer(QUANT_METHOD)(NwcHfQuantizer)


class NwcConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of an NWC folder; the per-tensor truth is in each file's manifest.

    ``verify`` (default True) checks every segment's CRC-32 while loading.
    """

    def __init__(
        self,
        format_version: str = "1.0",
        codecs: Mapping[str, int] | None = None,
        bits_per_weight: float | None = None,
        verify: bool = True,
        **kwargs: Any,
    ) -> None:
        self.quant_method = QUANT_METHOD
        self.format_version = str(format_version)
        self.codecs = dict(codecs or {})
        self.bits_per_weight = bits_per_weight
        self.verify = bool(verify)
        for key, value in kwargs.items():  # informational fields (base_model...) survive a round trip
            setattr(self, key, value)

    def check_version(self) -> None:
        major = self.format_version.partition(".")[0]
        if not major.isdigit():
            raise FormatError(f"quantization_config.format_version {self.format_version!r} is not MAJOR.MINOR")
        if int(major) > FORMAT_VERSION[0]:
            raise UnsupportedVersionError(
                f"this checkpoint is NWC format {self.format_version}; this nwcfmt reads {FORMAT_VERSION[0]}.x "
                "(upgrade nwcfmt)"
            )


def _own_segments(record) -> set[str]:
    """A record's segments stored under its own name (not the shared ones of format-v1 6.2)."""
    return {seg for seg, ref in record.segments.items() if not ref.tensor.startswith(SHARED_PREFIX)}


def _segment_of(pattern: str) -> str:
    _, sep, segment = pattern.partition(SEGMENT_SEPARATOR)
    return segment if sep else PRIMARY_SEGMENT


def _build_converter_class() -> tuple[type, type]:
    """The converter and its marker op subclass transformers classes that are only imported when loading."""
    from transformers.core_model_loading import ConversionOps, WeightConverter

    class NwcDecode(ConversionOps):
        """Marks a converter whose tensors :class:`NwcWeightConverter` decodes (it needs the checkpoint keys)."""

        def convert(self, input_dict, source_patterns=None, target_patterns=None, **kwargs):
            raise NotImplementedError("NWC payloads are decoded by NwcWeightConverter.convert")

    class NwcWeightConverter(WeightConverter):
        """Collects one parameter's stored segments and decodes them with the quantizer's readers."""

        __slots__ = ("target_dtype",)

        def __init__(self, source_patterns, target_patterns, operations=None, force_cpu: bool = False) -> None:
            super().__init__(source_patterns, target_patterns, operations or [NwcDecode()], force_cpu)
            self.target_dtype = None

        def convert(self, layer_name, model=None, config=None, hf_quantizer=None, loading_info=None):
            collected = self.materialize_tensors()
            loaded = {_segment_of(pattern): tensors[0] for pattern, tensors in collected.items() if tensors}
            sources = self.layer_targets.get(layer_name, ())
            tensor = hf_quantizer.decode_parameter(layer_name, sources, loaded)
            if tensor.is_floating_point() and self.target_dtype is not None:
                tensor = tensor.to(self.target_dtype)
            return {layer_name: tensor}

    return NwcDecode, NwcWeightConverter


_CONVERTER_CLASSES: tuple[type, type] | None = None


def converter_class() -> type:
    global _CONVERTER_CLASSES
    if _CONVERTER_CLASSES is None:
        _CONVERTER_CLASSES = _build_converter_class()
    return _CONVERTER_CLASSES[1]


class NwcHfQuantizer(HfQuantizer):
    """Loads NWC checkpoints: decodes each tensor on its target device, in the requested dtype."""

    requires_calibration = False

    def __init__(self, quantization_config: NwcConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.readers: list[NwcReader] = []
        self.where: dict[str, NwcReader] = {}  # stored tensor name -> the reader of its file

    # -------------------------------------------------------------------------------- set-up hooks
    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if not self.pre_quantized:
            raise UnsupportedError(
                "nwcfmt loads NWC checkpoints; it does not quantize while loading. Make one with `nwc encode`."
            )
        self.quantization_config.check_version()

    def _process_model_before_weight_loading(self, model, checkpoint_files: Iterable[str] | None = None, **kwargs):
        files = [Path(f) for f in checkpoint_files or ()]
        if not files or any(f.suffix != ".safetensors" for f in files):
            raise InputError(f"an NWC model is stored in .safetensors files; found {[f.name for f in files]}")
        for path in files:
            reader = NwcReader(path)  # validates header and manifest; payloads are read lazily
            self.readers.append(reader)
            self.where.update(dict.fromkeys(reader.names, reader))
        ignored = set(model._keys_to_ignore_on_load_unexpected or ())
        model._keys_to_ignore_on_load_unexpected = ignored | {rf"(^|\.){re.escape(RESERVED_PREFIX)}"}
        return model

    def _segments_by_param(self) -> dict[str, set[str]]:
        """Last name component (``weight``, ``bias``...) -> the segment names stored under it."""
        out: dict[str, set[str]] = {}
        for name, reader in self.where.items():
            param = name.rpartition(".")[2]
            if not _SIMPLE_NAME.match(param):
                raise UnsupportedError(f"tensor {name!r}: its name cannot be matched by transformers' loader")
            out.setdefault(param, set()).update(_own_segments(reader.record(name)))
        return out

    def get_weight_conversions(self) -> list:
        if not self.pre_quantized:
            return []
        cls = converter_class()
        conversions = []
        for param, segments in sorted(self._segments_by_param().items()):
            extra = sorted(s for s in segments if s != PRIMARY_SEGMENT)
            sources = [param] + [f"{param}{SEGMENT_SEPARATOR}{s}" for s in extra]
            conversions.append(cls(sources, [param]))
        return conversions

    def update_weight_conversions(self, weight_conversions, model):
        from transformers.core_model_loading import WeightConverter

        encoded = [name for name, reader in self.where.items() if reader.record(name).codec != "raw"]
        for converter in weight_conversions:
            if not isinstance(converter, WeightConverter):
                continue
            clash = next((n for n in encoded if converter.compiled_sources.search(n)), None)
            if clash is not None:
                raise UnsupportedError(
                    f"{type(model).__name__} converts {clash!r} while loading (e.g. merging experts); nwcfmt cannot "
                    "decode through that yet. Run `nwc decode` and load the plain folder."
                )
        return list(weight_conversions) + self.get_weight_conversions()

    def get_new_dtype(self, converter, param, dtype):
        if isinstance(converter, converter_class()):
            converter.target_dtype = dtype  # stored bytes load as they are; the decoded tensor gets the dtype
            return None
        return super().get_new_dtype(converter, param, dtype)

    # ------------------------------------------------------------------------------------ decoding
    def decode_parameter(self, target: str, sources: Iterable[str], loaded: Mapping[str, torch.Tensor]):
        """Decode the stored tensor behind ``target`` from its loaded segments (CRC-checked against the file)."""
        stored = {key.partition(SEGMENT_SEPARATOR)[0] for key in sources}
        if len(stored) != 1:
            raise FormatError(f"{target}: checkpoint tensors {sorted(sources)} do not form one NWC tensor")
        name = stored.pop()
        reader = self.where.get(name)
        if reader is None:
            raise FormatError(f"{target}: {name!r} is in no NWC manifest of this checkpoint")
        record = reader.record(name)
        own = _own_segments(record)
        if set(loaded) != own:
            raise FormatError(f"{reader.path}: {name!r} loaded segments {sorted(loaded)}, expected {sorted(own)}")
        if own != set(record.segments):  # shared segments (a decoder network) come from the file, CRC-checked
            shared = reader.segments(name, verify=self.quantization_config.verify)
            loaded = {**{k: v for k, v in shared.items() if k not in own}, **loaded}
        device = loaded[PRIMARY_SEGMENT].device
        if device.type == "cpu":  # transformers' copies of the stored bytes: check and decode those
            on_cpu = loaded
            if self.quantization_config.verify:
                reader.verify_segments(name, on_cpu)
        else:  # the copies are on the device: check the file's bytes through the map (no copy)
            on_cpu = reader.segments(name, verify=self.quantization_config.verify)
        codec = get_codec(record.codec)
        if not codec.decodes_on_device(record):
            return reader.decode_segments(name, on_cpu, "cpu").to(device)
        reader.check_segments(name, on_cpu)  # on the CPU, before the device copies are trusted
        if record.codec == "raw":
            return loaded[PRIMARY_SEGMENT]  # already the value, in memory of its own (no map view)
        return reader.decode_segments(name, loaded, device)

    def _process_model_after_weight_loading(self, model, **kwargs):
        self.close()
        return model

    def close(self) -> None:
        for reader in self.readers:
            reader.close()
        self.readers.clear()
        self.where.clear()

    # ------------------------------------------------------------------------------- capabilities
    def is_serializable(self, safe_serialization: bool = True) -> bool:
        logger.warning(
            "A model loaded from an NWC checkpoint holds decoded (dense) weights and cannot be saved back as "
            "NWC. Save the original model and run `nwc encode`, or call `model.dequantize()` first to save the "
            "decoded weights as a plain checkpoint."
        )
        return False

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True

    def _dequantize(self, model, dtype=None):
        """The weights are dense already: forget the NWC converters so the model saves as a plain one."""
        cls = converter_class()
        conversions = getattr(model, "_weight_conversions", None) or []
        model._weight_conversions = [c for c in conversions if not isinstance(c, cls)]
        return model


def from_pretrained(name_or_path: str | Path, *args: Any, auto_class: Any = None, **kwargs: Any):
    """``from_pretrained`` with nwcfmt registered: ``AutoModelForCausalLM`` for causal LMs, else ``AutoModel``.

    ``auto_class`` picks another transformers auto class (or model class).
    """
    register()
    import transformers

    if auto_class is None:
        config = transformers.AutoConfig.from_pretrained(
            name_or_path, **{k: v for k, v in kwargs.items() if k in ("revision", "token", "cache_dir")}
        )
        causal = any(a.endswith("ForCausalLM") for a in getattr(config, "architectures", None) or ())
        auto_class = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    return auto_class.from_pretrained(name_or_path, *args, **kwargs)


if "transformers.quantizers.auto" in sys.modules:  # loaded while this module was importing it (see integrations)
    register(sys.modules["transformers.quantizers.auto"])
