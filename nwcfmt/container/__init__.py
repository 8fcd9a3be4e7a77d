"""The NWC container: manifest, reader, writer and low-level safetensors I/O."""

from nwcfmt.container.manifest import Manifest, SegmentRef, TensorRecord
from nwcfmt.container.reader import NwcReader
from nwcfmt.container.writer import NwcWriter

__all__ = ["Manifest", "NwcReader", "NwcWriter", "SegmentRef", "TensorRecord"]
