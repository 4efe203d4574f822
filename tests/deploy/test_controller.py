"""The hub's controller, outside a running FLARE server: attribution, missing sites, the version."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("nvflare")

from nvflare.app_common.abstract.fl_model import FLModel

from lightning_fedseg import __version__
from lightning_fedseg.deploy.controller import FederatedController
from lightning_fedseg.deploy.relay import RelayError, relay


def answer(client: str, site: str, seq: int, value: float) -> FLModel:
    meta = {"client_name": client, "site": site, "op": "sum", "seq": seq, "src": -1, "pid": 1}
    return FLModel(params={"x": np.array([value, 1.0, 1.0])}, meta=meta)


def test_answers_are_ordered_by_site_and_attributed_to_the_authenticated_client():
    hub = FederatedController(["1", "2"], __version__)
    messages = hub._messages([answer("site-2", "2", 5, 3.0), answer("site-1", "1", 5, 1.0)], 5)
    assert [m.site for m in messages] == ["1", "2"]
    assert relay(messages).tolist() == [4.0, 2.0, 2.0]


def test_a_site_missing_from_an_exchange_stops_the_job_with_no_aggregate():
    # e.g. a site that dropped after the key exchange: the masked sum is never formed from fewer sites
    hub = FederatedController(["1", "2", "3"], __version__)
    with pytest.raises(RelayError, match=r"no answer from sites \['2'\]"):
        hub._messages([answer("site-1", "1", 4, 1.0), answer("site-3", "3", 4, 1.0)], 4)


def test_a_client_that_speaks_for_another_site_is_refused():
    hub = FederatedController(["1", "2"], __version__)
    with pytest.raises(RelayError, match="FLARE client 'site-2' sent a message as site '1'"):
        hub._messages([answer("site-1", "1", 2, 1.0), answer("site-2", "1", 2, 1.0)], 2)


def test_site_names_must_be_distinct():
    with pytest.raises(ValueError, match="distinct site names"):
        FederatedController(["1", "1"], __version__)
