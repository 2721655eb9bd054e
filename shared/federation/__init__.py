"""What the coordinator and a hospital site both need, with no Flower import.

* :mod:`shared.federation.run_config`: the run config's schema, defaults and validation;
* :mod:`shared.federation.site_data`: which site a node plays and where its cache lives;
* :mod:`shared.federation.site_training`: a site's work for one message (build the model, train
  on the site's split, evaluate).

``server/`` (the ServerApp, strategies, checkpoints, the coordinator's command) and ``client/``
(the ClientApp, the hospital's command) each import from here and never from each other.
"""
