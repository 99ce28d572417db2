"""The NIM-compatible HTTP service around `model.Embedder`.

`service.py` (repo root) is the transport: the BentoML service and its routes, one short handler each.
This package is the core it stands on, none of it aware of BentoML:

    settings.py   configuration from environment variables, read once
    schemas.py    request bodies and the batch items of /embed_batch
    errors.py     typed errors, each with its HTTP status and NIM type
    inputs.py     data URLs, modality inference, image checks from the header alone
    prepare.py    one request -> validated, tokenised batch items (before batching)
    runner.py     tokenised inputs -> vectors or per-item errors, through the engine's batch queue
    encoding.py   dimensions, embedding types and base64
    http.py       the Starlette plumbing: the /v1 routes, body limit, error shapes, 404/405, client disconnects
    admission.py  admission control: inputs and tokens in flight, 429 beyond them
    access.py     request ids, JSON access logs, API keys, CORS options
    openapi.py    the OpenAPI of the /v1 routes (/v1/openapi.json, merged into /docs.json)
    preflight.py  a missing or corrupt checkpoint stops the server before any worker starts
    metrics.py    Prometheus metrics (multi-process aware)
    info.py       bodies of /v1/models, health, metadata, manifest, license and version
    lifecycle.py  loads and warms the model in the background so probes answer meanwhile; SIGTERM un-listens
    health_port.py  the probes on a port and in a process of their own (EMBED_HEALTH_PORT)
    bentoml_compat.py  the one use of BentoML's internals, checked against the pinned version

Overload, hostile input, faults and access control: docs/operations.md.
"""
