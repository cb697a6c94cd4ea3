"""Dense bit packing of unsigned integer codes (any width 1..16), vectorised in torch.

Codes are laid out little-endian within each byte (first code in the lowest bits) when the
width divides 8, and as a plain MSB-first bit stream otherwise.  Storage is exact up to the
final partial byte, which is what the bit accounting in :class:`QuantizedTensor` assumes.
"""

from __future__ import annotations

import torch

from q2lab.errors import ConfigError, CorruptFileError


def packed_nbytes(numel: int, bits: int) -> int:
    return -(-numel * bits // 8)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``codes`` (values in ``[0, 2**bits)``) into a 1-D uint8 tensor."""
    if not 1 <= bits <= 16:
        raise ConfigError(f"cannot pack {bits}-bit codes (supported: 1..16)")
    flat = codes.reshape(-1).to(torch.int32)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"codes out of range for {bits} bits")
    if 8 % bits == 0:
        per = 8 // bits
        pad = (-flat.numel()) % per
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        shifts = torch.arange(per, device=flat.device, dtype=torch.int32) * bits
        return (flat.view(-1, per) << shifts).sum(1).to(torch.uint8)
    bit_idx = torch.arange(bits - 1, -1, -1, device=flat.device, dtype=torch.int32)
    stream = ((flat.unsqueeze(1) >> bit_idx) & 1).reshape(-1)
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], device=flat.device, dtype=torch.int32)
    return (stream.view(-1, 8) * weights).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a 1-D int32 tensor of ``numel`` codes."""
    if packed.dtype != torch.uint8 or packed.numel() != packed_nbytes(numel, bits):
        raise CorruptFileError(
            f"packed codes hold {packed.numel()} bytes of {packed.dtype}, "
            f"expected {packed_nbytes(numel, bits)} uint8 for {numel} {bits}-bit codes"
        )
    p = packed.to(torch.int32)
    if 8 % bits == 0:
        per = 8 // bits
        shifts = torch.arange(per, device=p.device, dtype=torch.int32) * bits
        return ((p.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(-1)[:numel]
    stream = ((p.unsqueeze(1) >> torch.arange(7, -1, -1, device=p.device, dtype=torch.int32)) & 1).reshape(-1)
    stream = stream[: numel * bits].view(numel, bits)
    weights = 1 << torch.arange(bits - 1, -1, -1, device=p.device, dtype=torch.int32)
    return (stream * weights).sum(1)
