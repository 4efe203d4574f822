"""Signed masking keys, with certificates from a real FLARE provisioning (two projects, two CAs)."""

from __future__ import annotations

import pytest

pytest.importorskip("nvflare")

from lightning_fedseg.deploy.provision import provision
from lightning_fedseg.federation.masking import RoundKeys
from lightning_fedseg.federation.signed_keys import (
    BLOB_SIZE,
    KeyAuthenticationError,
    SiteIdentity,
    pack,
    unpack,
    verify,
)


@pytest.fixture(scope="module")
def projects(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kits")
    ours = provision(tmp / "ours", ["1", "2"], fed_port=9002, admin_port=9003)
    theirs = provision(tmp / "theirs", ["1", "2"], fed_port=9002, admin_port=9003)
    identity = {site: SiteIdentity.from_kit(kit / "startup") for site, kit in ours.sites.items()}
    rogue = {site: SiteIdentity.from_kit(kit / "startup") for site, kit in theirs.sites.items()}
    return identity, rogue


def test_a_key_signed_by_its_site_is_accepted(projects):
    identity, _ = projects
    public = RoundKeys().public_bytes()
    blob = identity["1"].blob("job-7", 3, 0, public)
    assert len(blob) == BLOB_SIZE
    assert verify(blob, identity["2"].ca, "site-1", "job-7", 3, 0) == public


def test_a_substituted_key_is_refused(projects):
    identity, _ = projects
    ca = identity["2"].ca
    public, signature, certificate = unpack(identity["1"].blob("job-7", 3, 0, RoundKeys().public_bytes()))
    swapped = pack(RoundKeys().public_bytes(), signature, certificate)  # the hub's own key, site 1's signature
    with pytest.raises(KeyAuthenticationError, match="not signed by 'site-1'"):
        verify(swapped, ca, "site-1", "job-7", 3, 0)
    for job, round_idx, index in (("job-8", 3, 0), ("job-7", 4, 0), ("job-7", 3, 1)):  # replayed elsewhere
        with pytest.raises(KeyAuthenticationError, match="not signed"):
            verify(pack(public, signature, certificate), ca, "site-1", job, round_idx, index)


def test_a_key_from_another_ca_or_another_site_is_refused(projects):
    identity, rogue = projects
    ca = identity["1"].ca
    public = RoundKeys().public_bytes()
    with pytest.raises(KeyAuthenticationError, match="CA did not issue"):
        verify(rogue["1"].blob("job-7", 3, 0, public), ca, "site-1", "job-7", 3, 0)
    with pytest.raises(KeyAuthenticationError, match=r"sent as 'site-1' is signed by \['site-2'\]"):
        verify(identity["2"].blob("job-7", 3, 0, public), ca, "site-1", "job-7", 3, 0)
