#!/bin/sh
# Run by `bentoml containerize` (bentofile.yaml docker.setup_script), as root, after the Python packages.
# Cache directories owned by the `bentoml` user that the service runs as: a named volume mounted on one of them starts
# with this ownership, so that the service can write downloads, conversions and the XLA compilation cache there.
set -eu
install -d -o bentoml -g bentoml -m 0755 \
    /home/bentoml/.cache \
    /home/bentoml/.cache/nemotron-embed-vl \
    /home/bentoml/.cache/nemotron-embed-vl/xla \
    /home/bentoml/.cache/huggingface
