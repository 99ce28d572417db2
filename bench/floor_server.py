"""The floor of a Python JSON server: what /v1/embeddings would cost if the model were free.

    python bench/floor_server.py --port 3200

uvicorn (httptools) + Starlette + pydantic parse the same body as the real service and answer one fixed float32
2048-d vector written with orjson. bench/served_path.py runs it beside the real server, under the same load, so that
the real server's cost per request can be read as a multiple of this one.
"""

from __future__ import annotations

import argparse

import numpy as np
import orjson
import uvicorn
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

VECTOR = np.random.default_rng(0).standard_normal(2048).astype(np.float32)
VECTOR /= np.linalg.norm(VECTOR)


class Body(BaseModel):
    model: str
    input: str | list[str]
    input_type: str | None = None
    encoding_format: str | None = None


async def embeddings(request: Request) -> Response:
    body = Body.model_validate_json(await request.body())
    inputs = [body.input] if isinstance(body.input, str) else body.input
    answer = {"object": "list", "model": body.model,
              "data": [{"object": "embedding", "index": i, "embedding": VECTOR} for i in range(len(inputs))],
              "usage": {"prompt_tokens": 8, "total_tokens": 8}}
    return Response(orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


app = Starlette(routes=[Route("/v1/embeddings", embeddings, methods=["POST"])])

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=3200)
    args = parser.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, http="httptools", log_level="warning", access_log=False)
