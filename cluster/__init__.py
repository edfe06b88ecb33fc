"""pagoda.cluster: the Ray Serve application that serves pagoda engines on a Ray cluster.

    client ─HTTP─> Serve proxy ─> Ingress (ingress.py: build_app's OpenAI API over ClusterEngineClient)
                                    │ client.py: model by name, tokenize + hash leading blocks,
                                    │            retry once on replica failure
                                    ▼ handle per model, PrefixAwareRouter (routing_policy.py, prefix_aware_router.py)
                                  LLMReplica × N per model (replica.py: one AsyncEngine each)
                                    │ TP > 1: Worker actors in a STRICT_PACK placement group
                                    │ (ray_executor.py: RayExecutor, the engine's Executor over Ray)
                                    └ outputs: one call per ready batch to the ingress's Mailbox actor
                                      (channels.py: the token channel); each request's own call
                                      ends with its LeaseEnd

    config.py    the app arguments (shared with deploy/serve.yaml and the Helm chart); no Ray
    app.py       build_app(args): one deployment per model + the ingress; Serve options per model
    wire.py      what crosses Ray: requests with routing hints, delta-encoded outputs, replica reports
    channels.py  the token channel: mailbox actor, per-request inboxes in sequence order
    metrics.py   /metrics: the replicas' expositions merged, labelled by replica
    cli.py       `pagoda serve` (Ray path) and `pagoda status`; no Ray at import

The engine never imports Ray; everything Ray lives here.
"""

if __name__ != "pagoda.cluster":
    # NOTE: reached only when the repository root is on sys.path and something imports the folder by
    # its bare name; loading it as a second copy of pagoda.cluster would only fail later and obscurely.
    raise ImportError(f"{__name__!r} is not a package: this folder installs as pagoda.cluster "
                      "(pip install -e . in the repository root)")

