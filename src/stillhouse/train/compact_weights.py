"""A frozen model's weights held in blocks of small integer codes, decoded exactly on use.

An online teacher converted from a GGUF (the built-in SmolLM2 teacher is Q4_1, with a Q8_0
embedding) is dequantised to fp32 when it is loaded: every block of 32 weights is then
`d * q + m` with an integer code `q` (0..15 for Q4_1; -127..127 and m = 0 for Q8_0) and two
per-block constants. Holding those codes instead of the fp32 values takes about a fifth of the
memory (0.75 or 1.25 bytes a weight instead of 4), and recomputing `d * q + m` in fp32 gives
back the very same floats, so the teacher's logits do not change by a single bit.

Nothing here trusts a file's labels: `encode` recovers the codes from the weights themselves
and keeps a tensor compact only if decoding gives back every value exactly (`torch.equal`);
anything else (norms, a model stored in real fp32 or bf16) stays as it is. The price is a
decode per forward pass (one layer's weight at a time; the vocabulary-sized LM head in slices
of rows), paid by `low_memory` training, which is where this is used (train/loop.py).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BLOCK = 32  # the block size of GGUF's Q4_0/Q4_1/Q8_0 formats
_SLICE = 4 * 1024 * 1024  # weights decoded at once by a large layer (16 MB of fp32)


@dataclass
class Packed:
    """A [rows, cols] weight as per-block codes: value = scale * code + offset, in fp32."""

    shape: tuple[int, int]
    codes: torch.Tensor  # [blocks, 16] uint8, two 4-bit codes a byte; or [blocks, 32] int8
    scale: torch.Tensor  # [blocks] fp32
    offset: torch.Tensor | None  # [blocks] fp32, None for symmetric (offset-free) codes

    def decode_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop of the weight, exactly as they were."""
        per_row = self.shape[1] // BLOCK
        b = slice(start * per_row, stop * per_row)
        codes = self.codes[b]
        if self.offset is None:
            q = codes.float()
        else:  # low nibble holds the even positions, high nibble the odd ones
            q = torch.stack([codes & 0xF, codes >> 4], -1).reshape(codes.size(0), BLOCK).float()
        w = self.scale[b, None] * q
        if self.offset is not None:
            w = w + self.offset[b, None]
        return w.reshape(stop - start, self.shape[1])

    def gather_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The rows at `ids` (any shape) -> [*ids.shape, cols]: an embedding lookup."""
        per_row = self.shape[1] // BLOCK
        blocks = (ids.reshape(-1, 1) * per_row + torch.arange(per_row)).reshape(-1)
        sub = Packed((ids.numel(), self.shape[1]), self.codes[blocks], self.scale[blocks],
                     None if self.offset is None else self.offset[blocks])
        return sub.decode_rows(0, ids.numel()).reshape(*ids.shape, self.shape[1])

    def decode(self) -> torch.Tensor:
        return self.decode_rows(0, self.shape[0])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.offset) if t is not None)


def _offset4(blocks: torch.Tensor) -> Packed:
    """Q4_1's shape: the block's minimum is the offset (its code is 0); the scale is the span
    over 15, which GGUF stores in fp16."""
    lo, hi = blocks.min(1).values, blocks.max(1).values
    scale = ((hi - lo) / 15).half().float()
    q = ((blocks - lo[:, None]) / scale.clamp(min=torch.finfo(torch.float32).tiny)[:, None]).round().clamp(0, 15)
    q = q.to(torch.uint8)
    return Packed((0, 0), q[:, 0::2] | (q[:, 1::2] << 4), scale, lo)


def _symmetric8(blocks: torch.Tensor) -> Packed:
    """Q8_0's shape: no offset; the largest magnitude is code 127 (scale * 127 is exact in fp32,
    so dividing by 127 gives the scale back)."""
    scale = blocks.abs().max(1).values / 127
    q = (blocks / scale.clamp(min=torch.finfo(torch.float32).tiny)[:, None]).round().clamp(-127, 127)
    return Packed((0, 0), q.to(torch.int8), scale, None)


def encode(weight: torch.Tensor) -> Packed | None:
    """The weight as block codes if some code reproduces it exactly, else None."""
    if weight.dtype != torch.float32 or weight.ndim != 2 or weight.size(1) % BLOCK:
        return None
    blocks = weight.detach().reshape(-1, BLOCK)
    for scheme in (_offset4, _symmetric8):
        packed = scheme(blocks)
        packed.shape = tuple(weight.shape)
        if torch.equal(packed.decode(), weight.detach()):
            return packed
    return None


class CompactLinear(torch.nn.Module):
    """nn.Linear over a `Packed` weight; large weights are decoded a slice of rows at a time."""

    def __init__(self, packed: Packed, bias: torch.Tensor | None):
        super().__init__()
        self.packed, self.bias = packed, bias
        self.out_features, self.in_features = packed.shape

    @property
    def weight(self) -> torch.Tensor:  # for code that reads it (shape checks); decodes it all
        return self.packed.decode()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = max(1, _SLICE // self.in_features)
        parts = [F.linear(x, self.packed.decode_rows(s, min(s + rows, self.out_features)))
                 for s in range(0, self.out_features, rows)]
        out = parts[0] if len(parts) == 1 else torch.cat(parts, -1)
        return out if self.bias is None else out + self.bias


class CompactEmbedding(torch.nn.Module):
    """nn.Embedding (no max_norm) over a `Packed` table: only the looked-up rows are decoded."""

    def __init__(self, packed: Packed, padding_idx: int | None):
        super().__init__()
        self.packed, self.padding_idx = packed, padding_idx
        self.num_embeddings, self.embedding_dim = packed.shape

    @property
    def weight(self) -> torch.Tensor:
        return self.packed.decode()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.packed.gather_rows(ids)


def compact(model: torch.nn.Module) -> dict:
    """Replace, in place, every linear layer and embedding of a frozen `model` whose weight has
    an exact block code by its compact form (a tied embedding and LM head share one copy).
    Returns {"layers": replaced, "bytes_before", "bytes_after"} over the replaced weights."""
    packed_of: dict[int, Packed | None] = {}
    stats = {"layers": 0, "bytes_before": 0, "bytes_after": 0}
    for name, module in list(model.named_modules()):
        if type(module) is torch.nn.Linear:
            make = lambda p, m=module: CompactLinear(p, None if m.bias is None else m.bias.detach())
        elif type(module) is torch.nn.Embedding and module.max_norm is None:
            make = lambda p, m=module: CompactEmbedding(p, m.padding_idx)
        else:
            continue
        w = module.weight
        if id(w) not in packed_of:
            packed_of[id(w)] = encode(w)
            if packed_of[id(w)] is not None:
                stats["bytes_before"] += w.numel() * w.element_size()
                stats["bytes_after"] += packed_of[id(w)].nbytes()
        if packed_of[id(w)] is None:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, make(packed_of[id(w)]))
        stats["layers"] += 1
    # the weights left (norms, biases) get memory of their own: while any tensor still points
    # into the safetensors file's memory map, every page of it read here stays resident
    for t in [*model.parameters(), *model.buffers()]:
        t.data = t.data.clone()
    gc.collect()  # the replaced modules can sit in reference cycles, holding their weights
    return stats
