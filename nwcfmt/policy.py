"""Per-tensor codec policy: which codec (and config) encodes which tensor.

Resolution order for a tensor named ``name``:

1. ``exclude`` globs -> ``raw``;
2. the first matching rule of the policy (``{"match": GLOB, "codec": ID, "params": {...}}``);
3. tensors the default codec cannot hold (integer dtypes, for instance) -> ``raw``;
4. tensors with fewer than ``min_ndim`` dimensions (norms, biases) -> ``raw``;
5. names matching ``keep_raw`` -> ``raw`` when the default codec is exact; for lossy default codecs, these and
   embeddings and ``lm_head`` are kept exactly, by ``keep_exact`` (default ``lossless``: bit for bit and smaller,
   about 26.5 bits a weight for fp32 weights and 10.5 for bf16 ones, never larger than raw) when it holds the
   tensor, else ``raw``;
6. the default codec with its params.

A policy file is JSON with the keys ``codec``, ``params``, ``rules``, ``exclude``, ``keep_raw``, ``keep_exact`` and
``min_ndim`` (all optional; ``plan``, what ``nwc plan`` writes beside its rules, is read past)::

    {"codec": "lossless", "rules": [{"match": "*.embed_tokens.weight", "codec": "raw"}], "exclude": ["lm_head.*"]}
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch

from nwcfmt.codecs.base import Codec
from nwcfmt.codecs.registry import get_codec
from nwcfmt.errors import InputError

DEFAULT_KEEP_RAW = ("*norm*", "*.bias")
# Lossy codecs also leave embeddings and the output head alone by default (as GPTQ/AWQ checkpoints do).
DEFAULT_KEEP_RAW_LOSSY = ("*embed*", "lm_head.*", "*.lm_head.*")


@dataclass(frozen=True)
class Rule:
    match: str
    codec: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Policy:
    codec: str = "lossless"
    params: dict[str, Any] = field(default_factory=dict)
    rules: list[Rule] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    keep_raw: list[str] = field(default_factory=lambda: list(DEFAULT_KEEP_RAW))
    min_ndim: int = 2
    keep_exact: str = "lossless"  # how ``keep_raw`` tensors are stored: an exact codec (lossless or raw)
    _codecs: dict[tuple[str, str], Codec] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.keep_exact, str) or not get_codec(self.keep_exact).exact:
            raise InputError(f"keep_exact must name an exact codec (raw, lossless), not {self.keep_exact!r}")
        for codec_id, params in [(self.codec, self.params)] + [(r.codec, r.params) for r in self.rules]:
            self._instance(codec_id, params)  # fail early on unknown codecs or bad params

    def _instance(self, codec_id: str, params: dict[str, Any]) -> Codec:
        key = (codec_id, json.dumps(params, sort_keys=True))
        if key not in self._codecs:
            try:
                self._codecs[key] = get_codec(codec_id).from_config(params)
            except TypeError as exc:
                raise InputError(f"codec {codec_id!r}: invalid params {params} ({exc})") from None
        return self._codecs[key]

    def choose(self, name: str, tensor: torch.Tensor) -> Codec:
        """The codec instance that encodes ``tensor``."""
        if any(fnmatchcase(name, g) for g in self.exclude):
            return self._instance("raw", {})
        for rule in self.rules:
            if fnmatchcase(name, rule.match):
                return self._instance(rule.codec, rule.params)
        default = self._instance(self.codec, self.params)
        if not default.supports(tensor):
            return self._instance("raw", {})
        keep_raw = self.keep_raw if default.exact else [*self.keep_raw, *DEFAULT_KEEP_RAW_LOSSY]
        if tensor.dim() < self.min_ndim:
            return self._instance("raw", {})
        if any(fnmatchcase(name, g) for g in keep_raw):
            if default.exact:  # an exact default (raw, lossless) keeps them raw, as asked
                return self._instance("raw", {})
            exact = self._instance(self.keep_exact, {})
            return exact if exact.supports(tensor) else self._instance("raw", {})
        return default

    def to_dict(self) -> dict[str, Any]:
        """The policy as a policy file holds it (:meth:`from_dict` reads it back)."""
        return {
            "codec": self.codec,
            "params": dict(self.params),
            "rules": [{"match": r.match, "codec": r.codec, "params": dict(r.params)} for r in self.rules],
            "exclude": list(self.exclude),
            "keep_raw": list(self.keep_raw),
            "min_ndim": self.min_ndim,
            "keep_exact": self.keep_exact,
        }

    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides: Any) -> Policy:
        """Load a JSON policy file; keyword arguments override its top-level keys when not None."""
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: cannot read policy file ({exc})") from None
        return cls.from_dict(doc, source=str(path), **overrides)

    @classmethod
    def from_dict(cls, doc: Any, source: str = "policy", **overrides: Any) -> Policy:
        if not isinstance(doc, dict):
            raise InputError(f"{source}: a policy must be a JSON object")
        unknown = set(doc) - {"codec", "params", "rules", "exclude", "keep_raw", "keep_exact", "min_ndim", "plan"}
        if unknown:
            raise InputError(f"{source}: unknown policy key(s) {', '.join(sorted(unknown))}")
        try:
            rules = [Rule(r["match"], r["codec"], dict(r.get("params", {}))) for r in doc.get("rules", [])]
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{source}: each rule needs 'match' and 'codec' (and optional 'params')") from None
        kwargs: dict[str, Any] = {"rules": rules}
        for key in ("codec", "params", "exclude", "keep_raw", "keep_exact", "min_ndim"):
            if key in doc:
                kwargs[key] = doc[key]
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kwargs)
