"""The one rANS engine shared by every entropy-coded layout (``spec/entropy.md``).

* :mod:`nwcfmt.entropy.tables`: integer frequency tables (``PROB_BITS``-bit) from symbol counts, and the
  decoder's slot lookup tables. A decoder never rebuilds a table from floats.
* :mod:`nwcfmt.entropy.rans`: the stream format (independent lanes of a 32-bit-state rANS with 16-bit words),
  a numpy reference coder (the test oracle), and the dispatch to the native CPU coder (optional C extension,
  parallel over lanes on ``NWC_THREADS`` threads) and, for CUDA tensors, the Triton decoder.
"""

from nwcfmt.entropy.rans import Context, RansStream, decode, encode, encoded_bytes
from nwcfmt.entropy.tables import PROB_BITS, PROB_SCALE, cumulative, normalize_counts, slot_lookup

__all__ = [
    "PROB_BITS",
    "PROB_SCALE",
    "Context",
    "RansStream",
    "cumulative",
    "decode",
    "encode",
    "encoded_bytes",
    "normalize_counts",
    "slot_lookup",
]
