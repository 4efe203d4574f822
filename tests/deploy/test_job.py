"""The coordinator's pure steps: the hub's relay, the project, the job, and what is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from lightning_fedseg import CDS, FedAvg, FederatedStrategy
from lightning_fedseg.deploy.job import check_study, write_job
from lightning_fedseg.deploy.provision import ALLOWED, project_yaml
from lightning_fedseg.deploy.relay import Message, RelayError, contribution_weights, relay
from lightning_fedseg.federation import Krum
from lightning_fedseg.federation.flare_transport import FlareSession
from lightning_fedseg.federation.masking import decode, encode, mask
from lightning_fedseg.federation.transport import flatten_state
from tests.federation.toy import ToyClassifier, ToyDataModule, trainer_kwargs


def test_the_hubs_sum_is_the_weighted_all_reduce_in_site_order():
    states = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, -1.0])}, {"w": torch.tensor([0.5, 0.25])}]
    weights = [10.0, 30.0, 20.0]
    messages = [
        Message(str(i), "sum", 4, flatten_state({"w": s["w"] * w}, w, 1.0).numpy())
        for i, (s, w) in enumerate(zip(states, weights, strict=True))
    ]
    total = relay(messages)
    by_hand = [1.0 * 10 + 3.0 * 30 + 0.5 * 20, 2.0 * 10 - 1.0 * 30 + 0.25 * 20, 60.0, 3.0]
    assert total.tolist() == by_hand
    assert contribution_weights(messages) == {"0": (10.0, 1), "1": (30.0, 1), "2": (20.0, 1)}


def test_masked_encodings_summed_by_the_hub_decode_to_the_plain_sum():
    from lightning_fedseg.federation.masking import RoundKeys

    values = [torch.tensor([0.25, -1.5, 3.0], dtype=torch.float64), torch.tensor([1.0, 0.5, -2.0], dtype=torch.float64)]
    keys = [RoundKeys(), RoundKeys()]
    publics = [k.public_bytes() for k in keys]
    messages = []
    for rank, (value, key) in enumerate(zip(values, keys, strict=True)):
        peer = 1 - rank
        pair = {peer: key.shared_key(publics[peer], 7, 0, 1)}
        masked = mask(encode(value), rank, pair, 7)
        assert not torch.equal(masked, encode(value))  # the hub never sees the encoding in the clear
        messages.append(Message(str(rank), "sum", 1, masked.numpy()))
    torch.testing.assert_close(decode(torch.from_numpy(relay(messages))), values[0] + values[1])


def test_sites_that_disagree_are_named():
    with pytest.raises(RelayError, match="site 'b' sent op 'broadcast'"):
        relay([Message("a", "sum", 2, np.zeros(2)), Message("b", "broadcast", 2, np.zeros(2), 0)])
    with pytest.raises(RelayError, match="site 'b' sent a float64 array of shape \\(3,\\)"):
        relay([Message("a", "sum", 2, np.zeros(2)), Message("b", "sum", 2, np.zeros(3))])
    with pytest.raises(RelayError, match="unknown op 'scatter'"):
        relay([Message("a", "scatter", 2, np.zeros(2))])


def test_the_project_names_each_institution_as_a_flare_client():
    project = project_yaml(["1", "hospital_b"], server_host="fl.example.org", fed_port=443, admin_port=8443)
    clients = [p for p in project["participants"] if p["type"] == "client"]  # type: ignore[attr-defined,index]
    assert [c["name"] for c in clients] == ["site-1", "site-hospital_b"]
    assert project["participants"][0] == {  # type: ignore[index]
        "name": "fl.example.org", "type": "server", "org": "consortium", "fed_learn_port": 443, "admin_port": 8443,
    }  # fmt: skip
    with pytest.raises(ValueError, match="FLARE client names"):
        project_yaml(["a b"])
    with pytest.raises(ValueError, match="distinct"):
        project_yaml(["a", "a"])


def test_the_job_is_configuration_only(tmp_path):
    from lightning_fedseg import __version__

    job = write_job(tmp_path, ["1", "2", "3"], timeout=60)
    files = sorted(str(p.relative_to(job)) for p in job.rglob("*") if p.is_file())
    assert files == ["app/config/config_fed_client.json", "app/config/config_fed_server.json", "meta.json"]
    server = json.loads((job / "app/config/config_fed_server.json").read_text())
    (workflow,) = server["workflows"]
    assert workflow["path"] in ALLOWED
    assert workflow["args"] == {"sites": ["1", "2", "3"], "version": __version__, "exchange_timeout": 60.0}
    client = json.loads((job / "app/config/config_fed_client.json").read_text())
    executor = client["executors"][0]["executor"]
    assert executor["path"] in ALLOWED and executor["args"]["execution_mode"] == "attach"


def _study(tmp_path, **strategy):
    config = {"trainer": {"strategy": {"class_path": "lightning_fedseg.FederatedStrategy", "init_args": strategy}}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_studies_with_no_meaning_across_institutions_are_refused(tmp_path):
    with pytest.raises(ValueError, match="mode` is cds, which pools"):
        check_study(_study(tmp_path, mode={"class_path": "lightning_fedseg.CDS"}))
    krum = {"class_path": "lightning_fedseg.federation.Krum", "init_args": {"num_byzantine": 0}}
    with pytest.raises(ValueError, match="server` is Krum, which needs every site's own state"):
        check_study(_study(tmp_path, server=krum))
    fedadam = {"class_path": "lightning_fedseg.federation.FedAdam"}
    assert check_study(_study(tmp_path, server=fedadam, timeout=30))["timeout"] == 30


@pytest.mark.parametrize(
    ("mode", "server", "match"),
    [(CDS(), None, "cds mode, which pools"), (FedAvg(), Krum(0, multi=2), "needs every site's own state")],
)
def test_a_flare_site_refuses_what_the_hub_cannot_run(tmp_path, mode, server, match):
    profile = tmp_path / "attach.json"
    profile.write_text(json.dumps({"site_name": "site-a"}))
    strategy = FederatedStrategy(mode=mode, server=server, flare_profile=str(profile))
    trainer = trainer_kwargs(tmp_path, strategy=strategy, max_epochs=1)
    import lightning.pytorch as pl

    with pytest.raises(ValueError, match=match):
        pl.Trainer(**trainer).fit(ToyClassifier(), datamodule=ToyDataModule())


def test_a_missing_attach_profile_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"attach profile .*nope\.json"):
        FlareSession(tmp_path / "nope.json")
