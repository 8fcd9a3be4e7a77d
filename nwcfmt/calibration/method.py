"""The contract between the calibration pipeline and a calibrated encoder (gptq, flexround, lrq, ...).

The pipeline (:mod:`nwcfmt.calibration.pipeline`) runs the model one decoder block at a time. For each
block it gathers a :class:`BlockData` (the block's inputs, computed by the already quantized earlier
blocks; optionally the full-precision block's outputs; the Hessian of every Linear's input) and calls the
encoder's :meth:`BlockQuantizer.quantize_block`. The encoder returns, per Linear, a :class:`LinearResult`:
the record the file will store (in any codec's layout) and the weight a decoder rebuilds from it. The
pipeline never looks inside the record: it checks it with the codec's own ``validate``/``check``, loads the
weight into the block (so the next block's inputs come from the quantized model) and hands the record to
the writer. Group-quant codecs build their results with :meth:`GroupQuantCodec.result
<nwcfmt.codecs.quant.GroupQuantCodec.result>`; any codec can pair ``encode_tensor`` with
:func:`~nwcfmt.container.writer.decode_encoded`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from nwcfmt.codecs.base import Codec, EncodedTensor
from nwcfmt.distributed import INLINE, Executor


@dataclass
class LinearResult:
    """One encoded Linear weight ``[rows, cols]``.

    ``encoded``: exactly what the file stores for it (its codec's segments, params and ``shared`` mapping);
    ``weight``: fp32 ``[rows, cols]``, what the codec's decoder rebuilds from ``encoded`` before rounding to
    the checkpoint's dtype (the pipeline loads it, rounded, into the block).
    """

    encoded: EncodedTensor
    weight: torch.Tensor
    stats: dict[str, float] = field(default_factory=dict)  # e.g. layer-wise loss before/after, for logs


@dataclass
class BlockData:
    """What an encoder sees of one decoder block."""

    index: int  # block number, 0-based
    inputs: list[torch.Tensor]  # per calibration batch: the block's hidden-state input [batch, seq, hidden]
    kwargs: dict[str, Any]  # the block's other forward arguments (attention mask, position embeddings...)
    targets: list[torch.Tensor] | None  # full-precision block outputs for ``inputs`` (when requested)
    hessians: dict[str, torch.Tensor]  # Linear name within the block -> H = 2/N sum x x^T, fp32 [cols, cols]
    tokens: int = 0  # N, the number of input rows behind each Hessian
    shared_claims: int = 0  # records of this codec in the block's output file (its shared segments are amortised
    # over them)
    executor: Executor = INLINE  # runs the block's independent per-Linear work (owner ranks under torchrun)
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)  # Linear name -> the checkpoint's dtype
    codecs: dict[str, Codec] = field(default_factory=dict)  # Linear name -> its codec and config (per-Linear keys)

    def codec_for(self, name: str, default: Codec) -> Codec:
        """The codec (with this Linear's own config) that encodes Linear ``name``; ``default`` when not given."""
        return self.codecs.get(name, default)


class BlockQuantizer(Protocol):
    """A calibrated encoder. ``codec`` carries its config (bits, group_size, ...), labels the stored tensors and
    decodes them; the pipeline uses it only through the :class:`~nwcfmt.codecs.base.Codec` interface."""

    codec: Codec
    needs_targets: bool  # whether BlockData.targets must be computed (block-output reconstruction)
    # Optional: ``per_linear_keys``, the config keys a policy may set per Linear (``data.codecs`` then holds each
    # Linear's codec); an encoder without it takes one config for every Linear.

    def quantize_block(
        self, block: torch.nn.Module, linears: dict[str, torch.nn.Linear], data: BlockData
    ) -> dict[str, LinearResult]:
        """Quantize the given Linears of ``block`` (fp32, on the CPU). May run ``block`` forward/backward, but
        must leave its weights as it found them: the pipeline loads the results' weights itself."""
        ...


def require_hessians(linears: dict[str, torch.nn.Linear], data: BlockData, codec_id: str) -> None:
    """EncodeError unless ``data`` holds the Hessian of every Linear of ``linears``."""
    from nwcfmt.errors import EncodeError

    for name in linears:
        if name not in data.hessians:
            raise EncodeError(f"{codec_id}: block {data.index} has no Hessian for {name!r}")
