"""Across institutions over NVIDIA FLARE: provisioning, the job, the hub's controller.

Each institution runs the unchanged ``lightning-fedseg fit --config <study.yaml>`` with
``trainer.strategy.init_args.flare_profile`` set (:mod:`lightning_fedseg.federation.flare_transport`);
this package holds the coordinator's side:

* :mod:`.provision`: FLARE's ``project.yml`` for the study's sites, ``nvflare provision`` (the CA,
  every party's certificate and startup kit), the component allow-lists and the attach profiles;
* :mod:`.job`: the job (configuration only) from the study's YAML, and its submission;
* :mod:`.controller`: the hub's ``ModelController``, relaying the sites' exchanges (:mod:`.relay`);
* :mod:`.cli`: ``lightning-fedseg deploy provision | start | submit``.

Importing :mod:`.controller` needs ``nvflare`` (``pip install 'lightning_fedseg[flare]'``).
"""
