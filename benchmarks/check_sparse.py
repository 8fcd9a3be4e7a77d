"""Check an NWC folder's sparse tensors: each decodes to exactly its stored pattern, and ``from_pretrained`` loads
the same weights.

    python benchmarks/check_sparse.py FOLDER        # prints the number of sparse tensors checked

For every ``sparse`` record: the mask decoded from the file keeps ``nnz`` elements (and ``N`` of every ``M``), every
pruned element decodes to exactly +0, and the parameter that ``nwcfmt.from_pretrained`` loads is bit-identical to
``reader.decode``. Exits non-zero with a message otherwise. ``bench_sparse.py`` runs it on every sparse folder it
makes (with ``nwc verify``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import nwcfmt
from nwcfmt.codecs.mask import decode_mask, mask_layout
from nwcfmt.codecs.sparse import VALUES_PREFIX
from nwcfmt.sources import find_weight_files


def check(folder: Path) -> int:
    model = nwcfmt.from_pretrained(folder, dtype=torch.float32)
    params = {name: p.detach() for name, p in model.named_parameters()}
    checked = 0
    for file in find_weight_files(folder):
        with nwcfmt.open(file) as reader:
            for name in reader.names:
                record = reader.record(name)
                if record.codec != "sparse":
                    continue
                segments = reader.segments(name)
                mask = {k: v for k, v in segments.items() if not k.startswith(VALUES_PREFIX)}
                layout = mask_layout(record.params, record.shape, name)
                keep = decode_mask(layout, mask, torch.device("cpu"), name)
                dense = reader.decode(name).reshape(keep.shape)
                if not bool((dense[~keep] == 0).all()) or bool(torch.signbit(dense[~keep]).any()):
                    raise SystemExit(f"{name}: a pruned element does not decode to +0")
                if layout.pattern.structured:
                    groups = (dense != 0).view(layout.rows, -1, layout.pattern.m).sum(-1)
                    if bool((groups > layout.pattern.n).any()):
                        raise SystemExit(f"{name}: more than {layout.pattern.n} of {layout.pattern.m} non-zero")
                loaded = params.get(name) if name in params else params.get(name.removeprefix("model."))
                if loaded is None or not torch.equal(loaded.reshape(keep.shape), dense.float()):
                    raise SystemExit(f"{name}: from_pretrained does not load what the file decodes to")
                checked += 1
    return checked


if __name__ == "__main__":
    print(check(Path(sys.argv[1])))
