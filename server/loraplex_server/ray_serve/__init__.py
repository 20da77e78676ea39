"""Ray Serve scale-out: many replicas of the Loraplex engine behind Serve's gRPC proxy.

Optional (``pip install 'loraplex-server[ray]'``); nothing else in Loraplex imports this package.

- ``status``: gRPC statuses carried from a replica to the ingress, and the servicer context shim.
- ``adapters``: which adapters a replica serves (catalog) and holds (evictions wait for requests).
- ``service``: one replica's engine loop and the regular servicer, without Ray (tests use it alone).
- ``replica`` / ``ingress``: the two Serve deployments; ``app``: the application builder that
  ``deploy/ray/serve_config.yaml`` names.

Requests for an adapter go to the replicas that already hold it: the ingress sends each request
with ``multiplexed_model_id=adapter_id`` and replicas load adapters through ``@serve.multiplexed``.
"""
