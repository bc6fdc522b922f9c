"""A document cache: one artifact's facts and its ragged prefix, read-only once built.

A :class:`DocumentCache` is what a loaded document *is*: the manifest, the logical
length, the prompt template and the pristine :class:`~kvforge.attention.RaggedCache`
prefix. It holds no question state; every question runs in a :meth:`fork` of the
prefix (shared tensors, its own suffix), so one cache serves any number of questions,
one after the other or at the same time, and none leaks into the next.

The decoder that runs questions over one or many caches is :mod:`kvforge.decoder`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .artifact import Artifact
from .attention import RaggedCache
from .errors import ResourceLimitError
from .model import Template
from .ragged import CompressedKV


@dataclass
class DocumentCache:
    """An artifact with its ragged prefix, ready to be forked per question.

    compute_dtype: the model's dtype (the prefix stays in its storage dtype; attention casts a layer when it
    attends); device: where the prefix tensors live (the model's device).
    resident: ``"float"`` holds keys and values as the artifact's reader gave them (a quantized document
    dequantized on load); ``"codes"`` holds a quantized document's stored codes and dequantizes a head's
    slice when it attends (same values, bit for bit), so int8 / int4 save memory too; the artifact must
    have been read with ``keep_codes=True``, and its float keys and values are released.
    """

    artifact: Artifact
    compute_dtype: torch.dtype = torch.float32
    device: torch.device | str | None = None
    resident: str = "float"
    prefix: RaggedCache = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.resident not in ("float", "codes"):
            raise ValueError(f"resident must be 'float' or 'codes', got {self.resident!r}")
        kv, codes = self.artifact.kv, self.artifact.codes if self.resident == "codes" else None
        moving = self.device is not None and kv.lengths.device != torch.device(self.device)
        if codes is not None:
            codes = [c.to(self.device) for c in codes] if moving else codes
            kv = CompressedKV(kv.lengths, kv.positions, [], [], kv.beta)  # the codes hold keys and values
            self.artifact = replace(self.artifact, kv=kv, codes=codes)
        if moving:
            move = lambda ts: [t.to(self.device) for t in ts]  # noqa: E731
            kv = CompressedKV(kv.lengths, kv.positions, move(kv.keys), move(kv.values),
                              move(kv.beta) if kv.beta is not None else None)
        self.prefix = RaggedCache(kv, self.logical_length, compute_dtype=self.compute_dtype, codes=codes)

    @classmethod
    def for_model(cls, artifact: Artifact, lm, resident: str = "float") -> "DocumentCache":
        """The cache of ``artifact`` in the dtype and on the device of ``lm``'s weights."""
        p = next(lm.model.parameters())
        return cls(artifact, compute_dtype=p.dtype, device=p.device, resident=resident)

    # -- facts --------------------------------------------------------------------------------
    @property
    def manifest(self) -> dict:
        return self.artifact.manifest

    @property
    def doc_id(self) -> str:
        return self.manifest["document"]["id"]

    @property
    def logical_length(self) -> int:
        return self.artifact.logical_length

    @property
    def max_context(self) -> int:
        return int(self.manifest["model"]["max_context"])

    @property
    def template(self) -> Template:
        t = self.manifest["template"]
        return Template(t["doc_prefix"], t["question_prefix"], t["question_suffix"], t["bos_token_id"])

    @property
    def kept_entries(self) -> int:
        return int(self.manifest["compression"]["kept_entries"])

    @property
    def kept_tokens(self) -> float:
        """Kept entries per (layer, head): the physical length an average head holds."""
        m = self.manifest["model"]
        return self.kept_entries / (m["num_layers"] * m["num_kv_heads"])

    def resident_bytes(self) -> int:
        """Bytes the document's prefix holds in memory (as stored; no question suffix)."""
        return self.prefix.resident_bytes()

    # -- questions ----------------------------------------------------------------------------
    def fork(self) -> RaggedCache:
        """A fresh transformers ``Cache`` of this document: shares the prefix, owns its suffix."""
        return self.prefix.fork()

    def check_fits(self, n_tokens: int, what: str = "the question") -> None:
        """Refuse ``n_tokens`` more tokens when they (plus one to answer) do not fit in the model's context."""
        if self.logical_length + n_tokens >= self.max_context:
            raise ResourceLimitError(
                f"{what} ({n_tokens} tokens) does not fit after the document "
                f"({self.logical_length} tokens) in the model's context of {self.max_context}"
            )
