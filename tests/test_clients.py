"""Real client libraries against a live `bentoml serve` of the tiny checkpoint (tests/service_fixtures.py).

BentoML's own client on its API (embed_batch), the OpenAI SDK, LangChain's NVIDIAEmbeddings and LlamaIndex's
NVIDIAEmbedding: each one's vectors must equal what /v1/embeddings itself answers (encoding_format float) for what
that client actually sent. One test runs the two NVIDIA integrations in a subprocess whose sockets refuse every
address but the loopback: they must import, construct and embed without reaching the internet (no model list
download, no NLTK or tiktoken data, no telemetry).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
import sys
import warnings
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.service_fixtures import MODEL_ID  # noqa: E402

# The live server fixtures (`nim_server`, `server`), registered as a plugin: one server for every test module
# that does the same, where importing the fixtures would start one per module.

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["What is a b-tree?", "A b-tree is a self-balancing search tree.", "Sourdough needs a starter."]
MIN_COSINE = 0.99999


def png_b64(seed: int, size: int = 64) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def reference(url: str, inputs: list[str], input_type: str, **extra) -> np.ndarray:
    """The server's own float vectors: what every client must reproduce."""
    body = {"model": MODEL_ID, "input": inputs, "input_type": input_type, "encoding_format": "float", **extra}
    r = httpx.post(f"{url}/v1/embeddings", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return np.array([d["embedding"] for d in sorted(r.json()["data"], key=lambda d: d["index"])], np.float32)


def assert_same(got, expected: np.ndarray) -> None:
    got = np.atleast_2d(np.asarray(got, np.float32))
    assert got.shape == expected.shape
    cos = np.sum(got * expected, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
    assert cos.min() >= MIN_COSINE, cos


# ---- BentoML ----------------------------------------------------------------------------------------------------------
def test_bentoml_sync_client_on_embed_batch(server):
    import bentoml

    image = png_b64(1)
    with bentoml.SyncHTTPClient(server.url) as client:
        results = client.embed_batch(items=[
            {"text": TEXTS[0], "input_type": "query"},
            {"text": TEXTS[1], "input_type": "passage"},
            {"image": image},
            {"image": image, "text": "a caption"},
            {"text": ""},  # an item's own error, not the batch's
        ])
    assert [r["error"] is None for r in results] == [True, True, True, True, False]
    assert results[4]["error"]["status"] == 400
    vectors = [np.frombuffer(base64.b64decode(r["embedding"]), "<f4") for r in results[:4]]
    data_url = f"data:image/png;base64,{image}"
    assert_same(vectors[0], reference(server.url, [TEXTS[0]], "query"))
    assert_same(vectors[1], reference(server.url, [TEXTS[1]], "passage"))
    assert_same(vectors[2], reference(server.url, [data_url], "passage", modality="image"))
    assert_same(vectors[3], reference(server.url, [f"a caption\n{data_url}"], "passage", modality="text_image"))


# ---- OpenAI SDK -------------------------------------------------------------------------------------------------------
def test_openai_sdk(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="any")
    # Default: the SDK asks for base64 and decodes float32 itself.
    queries = client.embeddings.create(model=MODEL_ID, input=TEXTS, extra_body={"input_type": "query"})
    assert [d.index for d in queries.data] == [0, 1, 2]
    assert_same([d.embedding for d in queries.data], reference(server.url, TEXTS, "query"))
    # Plain OpenAI callers choose the input type with the model suffix.
    passages = client.embeddings.create(model=f"{MODEL_ID}-passage", input=TEXTS, encoding_format="float")
    assert_same([d.embedding for d in passages.data], reference(server.url, TEXTS, "passage"))
    # What NVIDIA's ingestion client sends: images and text+image, per-item modality, truncate END.
    url = f"data:image/png;base64,{png_b64(2)}"
    pages = client.embeddings.create(model=MODEL_ID, input=[url, f"chart title\n{url}"], encoding_format="float",
                                     extra_body={"input_type": "passage", "truncate": "END",
                                                 "modality": ["image", "text_image"]})
    assert_same([d.embedding for d in pages.data],
                reference(server.url, [url, f"chart title\n{url}"], "passage", modality=["image", "text_image"]))
    small = client.embeddings.create(model=MODEL_ID, input=TEXTS[:1], dimensions=16,
                                     extra_body={"input_type": "query"})
    assert_same(small.data[0].embedding, reference(server.url, TEXTS[:1], "query", dimensions=16))


# ---- LangChain --------------------------------------------------------------------------------------------------------
def test_langchain_nvidia_embeddings(server):
    nvidia = pytest.importorskip("langchain_nvidia_ai_endpoints")

    embeddings = nvidia.NVIDIAEmbeddings(base_url=f"{server.url}/v1", model=MODEL_ID)
    assert_same(embeddings.embed_query(TEXTS[0]), reference(server.url, TEXTS[:1], "query", truncate="NONE"))
    assert_same(embeddings.embed_documents(TEXTS), reference(server.url, TEXTS, "passage", truncate="NONE"))
    assert_same(asyncio.run(embeddings.aembed_query(TEXTS[1])), reference(server.url, TEXTS[1:2], "query"))

    truncated = nvidia.NVIDIAEmbeddings(base_url=f"{server.url}/v1", model=MODEL_ID, truncate="END", dimensions=16)
    long_text = "many words " * 200  # over the test server's 64-token text limit: cut, not refused
    assert_same(truncated.embed_documents([long_text]),
                reference(server.url, [long_text], "passage", truncate="END", dimensions=16))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Default model is set as ..."
        default = nvidia.NVIDIAEmbeddings(base_url=f"{server.url}/v1")  # no model: it asks GET /v1/models
    assert default.model == MODEL_ID
    assert_same(default.embed_query(TEXTS[2]), reference(server.url, TEXTS[2:], "query"))


# ---- LlamaIndex -------------------------------------------------------------------------------------------------------
def test_llama_index_nvidia_embedding(server):
    nvidia = pytest.importorskip("llama_index.embeddings.nvidia")

    sent: list[dict] = []
    http_client = httpx.Client(event_hooks={"request": [lambda request: sent.append(json.loads(request.content))]})
    embed = nvidia.NVIDIAEmbedding(base_url=f"{server.url}/v1", model=MODEL_ID, truncate="END",
                                   http_client=http_client)

    def check(vector, inputs: list[str]) -> None:
        body = sent[-1]  # what the client actually sent; the server must answer what /v1/embeddings answers for it
        assert body["input"] == inputs and body["truncate"] == "END" and body["model"] == MODEL_ID
        assert body.get("encoding_format") == "base64"  # through the OpenAI SDK
        assert_same(vector, reference(server.url, inputs, body["input_type"], truncate="END"))

    check(embed.get_text_embedding(TEXTS[1]), TEXTS[1:2])
    assert sent[-1]["input_type"] == "passage"
    check(embed.get_text_embedding_batch(TEXTS), TEXTS)
    check(embed.get_query_embedding(TEXTS[0]), TEXTS[:1])
    # llama-index-embeddings-nvidia 0.6.0 sends input_type "passage" for sync *query* embeddings too (its async
    # path sends "query"): recorded, not asserted, so that a fixed release passes as well.
    http_client.close()

    assert_same(asyncio.run(embed.aget_query_embedding(TEXTS[0])),
                reference(server.url, TEXTS[:1], "query", truncate="END"))


# ---- offline ----------------------------------------------------------------------------------------------------------
OFFLINE_SCRIPT = r"""
import json, socket, sys, warnings
LOCAL = {"127.0.0.1", "::1", "localhost"}
blocked = []
_connect, _gai = socket.socket.connect, socket.getaddrinfo

def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in LOCAL:
        blocked.append(str(address))
        raise OSError(f"offline test: connection to {address} refused")
    return _connect(self, address)

def getaddrinfo(host, *args, **kwargs):
    if host is not None and (host.decode() if isinstance(host, bytes) else host) not in LOCAL:
        blocked.append(str(host))
        raise socket.gaierror(f"offline test: no DNS for {host}")
    return _gai(host, *args, **kwargs)

socket.socket.connect, socket.getaddrinfo = connect, getaddrinfo
warnings.simplefilter("ignore")
url, model = sys.argv[1], sys.argv[2]

from langchain_nvidia_ai_endpoints import NVIDIAEmbeddings
lc = NVIDIAEmbeddings(base_url=url + "/v1", model=model)
sizes = [len(lc.embed_query("offline")), len(NVIDIAEmbeddings(base_url=url + "/v1").embed_documents(["x"])[0])]

from llama_index.embeddings.nvidia import NVIDIAEmbedding
li = NVIDIAEmbedding(base_url=url + "/v1", model=model)
sizes += [len(li.get_query_embedding("offline")), len(li.get_text_embedding_batch(["a", "b"]))]

# LlamaIndex's text utilities load NLTK data and a tiktoken vocabulary: both must come from the wheel.
from llama_index.core.utils import get_tokenizer, globals_helper
sizes += [len(get_tokenizer()("hello world")), len(globals_helper.stopwords) > 0]
print(json.dumps({"blocked": blocked, "sizes": sizes}))
"""


def test_nvidia_integrations_need_no_internet(server, tmp_path):
    pytest.importorskip("langchain_nvidia_ai_endpoints")
    pytest.importorskip("llama_index.embeddings.nvidia")
    env = {k: v for k, v in server.env.items() if not k.startswith(("NVIDIA_", "NLTK_", "TIKTOKEN_"))}
    env["HOME"] = str(tmp_path)  # no user caches to lean on
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    proc = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT, server.url, MODEL_ID], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    dim = reference(server.url, ["x"], "query").shape[1]
    assert result["blocked"] == []
    assert result["sizes"][:4] == [dim, dim, dim, 2] and result["sizes"][4] > 0 and result["sizes"][5] is True
