"""Pairwise additive masking of the FedAvg all-reduce (Bonawitz et al., CCS 2017, without dropouts).

On torch.distributed a FedAvg round is one all-reduce of the processes' weighted sums, and gloo's
collectives forward one process's own values to a neighbour in their first step. With masking,
every pair of processes ``u < v`` agrees on a secret for the round (an X25519 Diffie-Hellman
exchange of fresh public keys over the process group, HKDF-SHA256), each process adds to a
fixed-point encoding of its sum the masks ``PRG(s_uv)`` for its higher peers and subtracts them for
its lower peers (ChaCha20 keystreams, arithmetic modulo 2**64), and the masks cancel exactly in the
sum. Every vector a peer receives is uniformly masked; the sum itself is revealed, as it must be.

The set of processes whose sites finished the round is agreed before masking, so a failed site
does not break the cancellation; a process that dies during the collective fails the round.
Threat model: honest-but-curious peers. torch.distributed has no authentication, so an active
attacker on the network (who could swap public keys) is out of scope.

Fixed point: ``FRACTION_BITS`` fractional bits; each process rounds its sum to a multiple of
``2**-FRACTION_BITS``, so the decoded sum differs from the exact one by at most
``world_size * 2**-(FRACTION_BITS + 1)`` per coordinate (:func:`quantization_bound`); values must
stay below ``2**(63 - FRACTION_BITS)`` in magnitude (about 5.5e11).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from torch import Tensor

__all__ = [
    "FRACTION_BITS",
    "RoundKeys",
    "decode",
    "encode",
    "mask",
    "mask_stream",
    "quantization_bound",
]

FRACTION_BITS = 24
_LIMIT = 2.0 ** (63 - FRACTION_BITS)


def encode(values: Tensor) -> Tensor:
    """Fixed-point int64 encoding (``round(x * 2**FRACTION_BITS)``).

    Example:
        >>> decode(encode(torch.tensor([1.5, -0.25], dtype=torch.float64))).tolist()
        [1.5, -0.25]
    """
    values = values.to(torch.float64)
    if values.numel() and float(values.abs().max()) >= _LIMIT:
        raise ValueError(
            f"Masked aggregation encodes values below {_LIMIT:.3g} in magnitude; got {values.abs().max()}."
        )
    return torch.round(values * 2.0**FRACTION_BITS).to(torch.int64)


def decode(values: Tensor) -> Tensor:
    """Inverse of :func:`encode` (the sum of encodings decodes to the sum of values)."""
    return values.to(torch.float64) / 2.0**FRACTION_BITS


def quantization_bound(world_size: int) -> float:
    """Largest difference, per coordinate, between a decoded masked sum and the exact sum.

    Example:
        >>> quantization_bound(2) == 2**-24
        True
    """
    return world_size * 2.0 ** -(FRACTION_BITS + 1)


def mask_stream(key: bytes, round_idx: int, numel: int) -> Tensor:
    """``numel`` pseudo-random int64 values from a 32-byte key: a ChaCha20 keystream (nonce: the round).

    Example:
        >>> a, b = mask_stream(bytes(32), 0, 4), mask_stream(bytes(32), 1, 4)
        >>> a.dtype, a.shape, bool((a == mask_stream(bytes(32), 0, 4)).all()), bool((a == b).all())
        (torch.int64, torch.Size([4]), True, False)
    """
    nonce = int(round_idx).to_bytes(16, "little")
    encryptor = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
    # The keystream is written straight into the tensor (update_into wants room for one more block).
    out = torch.empty(numel + 64 // 8, dtype=torch.int64)
    written = encryptor.update_into(bytes(8 * numel), out.numpy().data.cast("B"))
    assert written == 8 * numel
    return out[:numel]


def mask(encoded: Tensor, rank: int, pair_keys: Mapping[int, bytes], round_idx: int) -> Tensor:
    """``encoded + sum_{v > rank} PRG(s_uv) - sum_{v < rank} PRG(s_vu)`` modulo 2**64.

    Example:
        >>> keys = {(0, 1): bytes([1]) * 32, (0, 2): bytes([2]) * 32, (1, 2): bytes([3]) * 32}
        >>> peers = lambda r: {v: keys[min(r, v), max(r, v)] for v in range(3) if v != r}
        >>> x = [torch.tensor([5, -7]), torch.tensor([1, 2]), torch.tensor([0, 3])]
        >>> masked = [mask(x[r], r, peers(r), round_idx=0) for r in range(3)]
        >>> (masked[0] + masked[1] + masked[2]).tolist()  # the masks cancel in the sum
        [6, -2]
    """
    out = encoded.clone()
    for peer, key in sorted(pair_keys.items()):
        stream = mask_stream(key, round_idx, encoded.numel())
        if peer > rank:
            out.add_(stream)
        else:
            out.sub_(stream)
    return out


class RoundKeys:
    """A fresh X25519 key pair for one round, and the pairwise secrets derived from it."""

    def __init__(self) -> None:
        self._private = X25519PrivateKey.generate()

    def public_bytes(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return self._private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def shared_key(self, peer_public: bytes, round_idx: int, low: int, high: int) -> bytes:
        """The 32-byte secret shared with a peer (HKDF over the X25519 secret, bound to the round and pair)."""
        secret = self._private.exchange(X25519PublicKey.from_public_bytes(peer_public))
        info = f"lightning_fedseg masked all-reduce round {round_idx} ranks {low}-{high}".encode()
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)
