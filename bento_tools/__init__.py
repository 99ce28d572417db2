"""Packaging helpers for the BentoML bento and its container (see docs/deployment.md).

    python -m bento_tools.store_model SRC [--name NAME]   store converted weights as a versioned BentoML model
    python -m bento_tools.build [--model NAME[:VERSION]]  `bentoml build`, optionally with that model baked in

`bento_tools.model_ref` resolves `EMBED_MODEL=bento:NAME[:VERSION]` to the model's directory in the BentoML model
store (the bento's own store inside a container). Not named `packaging`: BentoML imports the PyPI package of that name.
"""
