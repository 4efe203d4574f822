"""Masking keys nobody can swap: each site signs its round public key with its provisioned identity.

Pairwise masking (:mod:`.masking`) agrees a secret with every peer from per-round X25519 public
keys. Over a hub (NVIDIA FLARE) the hub relays those keys, so an unauthenticated exchange would
let a malicious hub hand each site a key of its own and unmask every sum (a man in the middle).
Here each site signs ``(job, round, its index, its public key)`` with the private key of the site
certificate that FLARE's provisioning issued, and sends the certificate along; every peer checks
that the certificate was issued by the project's CA, that it names the expected site, and that the
signature holds, before deriving any secret. The hub can still drop a key (the round then fails
with an error); it cannot substitute one.

The blob each site sends is fixed-size (``BLOB_SIZE`` bytes, zero padded) so that it gathers like
any tensor: ``[len(public), len(signature), len(certificate)]`` as three big-endian uint32, then the
three fields. Only public material travels: the public key, the signature and the certificate.
"""

from __future__ import annotations

import struct
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

__all__ = ["BLOB_SIZE", "KeyAuthenticationError", "SiteIdentity", "pack", "unpack", "verify"]

BLOB_SIZE = 4096
_HEADER = struct.Struct(">III")


class KeyAuthenticationError(RuntimeError):
    """A peer's masking key is not signed by the site the project's CA certified."""


def _message(job: str, round_idx: int, index: int, public: bytes) -> bytes:
    return b"lightning_fedseg masking key|" + f"{job}|{round_idx}|{index}|".encode() + public


class SiteIdentity:
    """A site's provisioned certificate and private key, and the project's CA (all PEM files).

    Args:
        certificate: the site's certificate (FLARE kit: ``startup/client.crt``).
        key: its private key (``startup/client.key``); it never leaves this object.
        ca: the project's root certificate (``startup/rootCA.pem``).
    """

    def __init__(self, certificate: str | Path, key: str | Path, ca: str | Path) -> None:
        self.certificate_pem = Path(certificate).read_bytes()
        self._key = serialization.load_pem_private_key(Path(key).read_bytes(), password=None)
        self.ca = x509.load_pem_x509_certificate(Path(ca).read_bytes())

    @classmethod
    def from_kit(cls, startup: str | Path) -> SiteIdentity:
        """The identity in a FLARE client kit's ``startup`` folder."""
        startup = Path(startup)
        return cls(startup / "client.crt", startup / "client.key", startup / "rootCA.pem")

    def sign(self, job: str, round_idx: int, index: int, public: bytes) -> bytes:
        message = _message(job, round_idx, index, public)
        if isinstance(self._key, rsa.RSAPrivateKey):
            pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)
            return self._key.sign(message, pss, hashes.SHA256())
        if isinstance(self._key, ec.EllipticCurvePrivateKey):
            return self._key.sign(message, ec.ECDSA(hashes.SHA256()))
        raise TypeError(f"Unsupported site key type {type(self._key).__name__}.")

    def blob(self, job: str, round_idx: int, index: int, public: bytes) -> bytes:
        """What this site sends for the key exchange: its public key, signed, with its certificate."""
        return pack(public, self.sign(job, round_idx, index, public), self.certificate_pem)


def pack(public: bytes, signature: bytes, certificate: bytes) -> bytes:
    """The fixed-size blob of the three fields.

    Example:
        >>> blob = pack(b"k" * 32, b"sig", b"cert")
        >>> len(blob), unpack(blob)
        (4096, (b'kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk', b'sig', b'cert'))
    """
    body = _HEADER.pack(len(public), len(signature), len(certificate)) + public + signature + certificate
    if len(body) > BLOB_SIZE:
        raise ValueError(f"A signed key of {len(body)} bytes exceeds {BLOB_SIZE} bytes.")
    return body + bytes(BLOB_SIZE - len(body))


def unpack(blob: bytes) -> tuple[bytes, bytes, bytes]:
    """``(public key, signature, certificate)`` of a blob made by :func:`pack`."""
    sizes = _HEADER.unpack_from(blob)
    if _HEADER.size + sum(sizes) > len(blob):
        raise KeyAuthenticationError("A malformed signed key (its fields overrun it).")
    out, offset = [], _HEADER.size
    for size in sizes:
        out.append(bytes(blob[offset : offset + size]))
        offset += size
    return out[0], out[1], out[2]


def verify(blob: bytes, ca: x509.Certificate, expected_name: str, job: str, round_idx: int, index: int) -> bytes:
    """The public key in ``blob`` after checking it was signed, for this job, round and index, by a
    certificate the project's ``ca`` issued to ``expected_name``; else :class:`KeyAuthenticationError`."""
    public, signature, pem = unpack(blob)
    try:
        certificate = x509.load_pem_x509_certificate(pem)
        certificate.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as err:
        raise KeyAuthenticationError(
            f"The masking key sent as {expected_name!r} comes with a certificate the project's CA did not issue."
        ) from err
    names = [a.value for a in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if names != [expected_name]:
        raise KeyAuthenticationError(f"The masking key sent as {expected_name!r} is signed by {names}.")
    key = certificate.public_key()
    message = _message(job, round_idx, index, public)
    try:
        if isinstance(key, rsa.RSAPublicKey):
            pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.AUTO)
            key.verify(signature, message, pss, hashes.SHA256())
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        else:
            raise KeyAuthenticationError(f"Unsupported key type in {expected_name!r}'s certificate.")
    except InvalidSignature as err:
        raise KeyAuthenticationError(
            f"The masking key sent as {expected_name!r} for round {round_idx} is not signed by {expected_name!r}:"
            " it was substituted on the way (by the hub or the network)."
        ) from err
    return public
