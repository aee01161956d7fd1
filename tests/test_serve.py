"""``blipkit serve`` as a real process on a free loopback port, over a tiny trained run: every endpoint,
batched answers equal to one-at-a-time ones, OpenAI's chat-completions shape, and a fuzz of malformed
requests that must all get 4xx JSON errors while the server keeps serving."""

from __future__ import annotations

import base64
import io
import json
import random
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from PIL import Image, ImageDraw

from blipkit.cli import cli
from blipkit.config import load_recipe
from blipkit.serve.batcher import Batcher
from blipkit.serve.errors import RequestError
from blipkit.serve.payloads import ImageReader
from blipkit.train.runner import train

KEY = "test-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def png(index: int, size: tuple[int, int] = (40, 40)) -> bytes:
    """A distinct small picture per index."""
    image = Image.new("RGB", size, ((index * 70) % 256, (index * 40 + 90) % 256, (200 - index * 30) % 256))
    ImageDraw.Draw(image).rectangle([index * 3 % 20, 5, index * 3 % 20 + 15, 25], fill=(250 - index * 20, 20, 20))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels: a decompression bomb's calling card."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def data_url(data: bytes) -> str:
    return f"data:image/png;base64,{b64(data)}"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BLIPKIT_CACHE", str(root / "cache"))
        train(load_recipe("tiny", ["stage1.steps=2", "stage2.steps=2"]), output=root / "run", quiet=True)
    return root / "run"


@pytest.fixture(scope="module")
def server(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A ``blipkit serve`` process: a long batching wait (so that concurrent requests surely meet), a 2 MiB
    body limit, a 1-megapixel image limit, URL fetching on, and an API key."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    command = [sys.executable, "-m", "blipkit", "serve", "--model", str(run_dir), "--port", str(port), "--name", "tiny",
               "--max-wait-ms", "200", "--max-body-mb", "2", "--max-image-pixels", "1000000", "--allow-url-fetch",
               "--api-key", KEY, "--log-level", "warning"]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, f"the server stopped:\n{log.read_text()}"
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"no /health within 120 s:\n{log.read_text()}"
            time.sleep(0.1)
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
            yield {"client": client, "base": base, "log": log, "process": process}
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture
def client(server: dict[str, Any]) -> httpx.Client:
    return server["client"]


def assert_error(response: httpx.Response, status: int | None = None) -> str:
    """A 4xx JSON error with a one-line message; the message."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    if status is not None:
        assert response.status_code == status, response.text[:300]
    body = response.json()
    message = body["error"]["message"]
    assert isinstance(message, str) and message and "\n" not in message
    assert isinstance(body["error"]["type"], str)
    return message


def test_health_and_model_list(server: dict[str, Any], client: httpx.Client) -> None:
    health = httpx.get(f"{server['base']}/health").json()  # no API key needed
    assert health["status"] == "ok" and health["model"] == "tiny"
    assert set(health["tasks"]) == {"caption", "ask", "chat", "embed"}
    assert health["batching"]["max_batch"] == 8
    listing = client.get("/v1/models").json()
    assert listing["object"] == "list" and [m["id"] for m in listing["data"]] == ["tiny"]
    assert listing["data"][0]["object"] == "model" and isinstance(listing["data"][0]["created"], int)
    assert client.get("/v1/models/tiny").json()["id"] == "tiny"
    assert "serves 'tiny'" in assert_error(client.get("/v1/models/other"), 404)


def test_the_api_key_is_required(server: dict[str, Any]) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = httpx.post(f"{server['base']}/v1/caption", json={"image": b64(png(0))}, headers=headers)
        assert "Authorization: Bearer" in assert_error(response, 401)


def test_caption_takes_uploads_base64_and_data_urls(client: httpx.Client) -> None:
    image = png(1)
    uploaded = client.post("/v1/caption", files={"image": ("a.png", image, "image/png")})
    assert uploaded.status_code == 200, uploaded.text
    caption = uploaded.json()["caption"]
    assert isinstance(caption, str) and caption and uploaded.json()["model"] == "tiny"
    assert client.post("/v1/caption", json={"image": b64(image)}).json()["caption"] == caption
    assert client.post("/v1/caption", json={"image": data_url(image)}).json()["caption"] == caption
    two = client.post("/v1/caption", data={"num_captions": "2", "max_new_tokens": "4"},
                      files={"image": ("a.png", image, "image/png")})
    assert two.status_code == 200, two.text
    assert len(two.json()["captions"]) == 2


def test_ask(client: httpx.Client) -> None:
    response = client.post("/v1/ask", json={"image": b64(png(2)), "question": "what colour is the square?"})
    assert response.status_code == 200, response.text
    assert response.json()["question"] == "what colour is the square?"
    assert isinstance(response.json()["answer"], str) and response.json()["answer"]


def test_embed_images_and_texts(client: httpx.Client) -> None:
    response = client.post("/v1/embed", json={"images": [b64(png(3)), data_url(png(4))], "texts": ["a red square", "blue"]})
    assert response.status_code == 200, response.text
    body = response.json()
    images, texts, similarity = body["image_embeddings"], body["text_embeddings"], body["similarity"]
    assert len(images) == 2 and len(images[0]) == 4  # the tiny recipe's 4 queries
    assert len(texts) == 2 and len(texts[0]) == len(images[0][0])
    assert all(abs(sum(v * v for v in query) - 1) < 1e-4 for query in images[0])
    for i, image in enumerate(images):
        for j, text in enumerate(texts):
            best = max(sum(a * b for a, b in zip(query, text)) for query in image)
            assert similarity[i][j] == pytest.approx(best, abs=1e-5)
    alone = client.post("/v1/embed", files={"image": ("a.png", png(3), "image/png")}).json()["image_embeddings"][0]
    assert [v for query in alone for v in query] == pytest.approx([v for query in images[0] for v in query], abs=1e-5)
    assert "text_embeddings" in client.post("/v1/embed", data={"text": ["one", "two"]}).json()


def chat_body(content: Any, **extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}],
            **extra}


def test_chat_completions_have_openai_shape_and_equal_ask_and_caption(client: httpx.Client) -> None:
    image = png(5)
    parts = [{"type": "text", "text": "what shape is it?"}, {"type": "image_url", "image_url": {"url": data_url(image)}}]
    response = client.post("/v1/chat/completions", json=chat_body(parts))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == "tiny"
    assert isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] and usage["completion_tokens"] > 0
    asked = client.post("/v1/ask", json={"image": b64(image), "question": "what shape is it?"}).json()["answer"]
    assert choice["message"]["content"] == asked
    captioned = client.post("/v1/chat/completions", json=chat_body([parts[1]], max_tokens=5)).json()
    assert captioned["choices"][0]["message"]["content"] == client.post(
        "/v1/caption", json={"image": b64(image), "max_new_tokens": 5}).json()["caption"]

    streamed = client.post("/v1/chat/completions", json=chat_body(parts, stream=True, stream_options={"include_usage": True}))
    assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
    events = [line.removeprefix("data: ") for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == asked and chunks[-1]["usage"]["completion_tokens"] == usage["completion_tokens"]


def test_chat_image_urls_are_fetched_only_when_reachable(client: httpx.Client, tmp_path: Path) -> None:
    (tmp_path / "pic.png").write_bytes(png(6))
    web = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(tmp_path)))
    threading.Thread(target=web.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{web.server_address[1]}"
        fetched = client.post("/v1/chat/completions", json=chat_body([{"type": "image_url", "image_url": {"url": f"{url}/pic.png"}}]))
        assert fetched.status_code == 200, fetched.text
        assert fetched.json()["choices"][0]["message"]["content"] == client.post(
            "/v1/caption", json={"image": b64(png(6))}).json()["caption"]
        missing = client.post("/v1/chat/completions", json=chat_body([{"type": "image_url", "image_url": {"url": f"{url}/nope.png"}}]))
        assert "HTTP 404" in assert_error(missing, 400)
    finally:
        web.shutdown()
    closed = f"http://127.0.0.1:{free_port()}/pic.png"
    refused = client.post("/v1/chat/completions", json=chat_body([{"type": "image_url", "image_url": {"url": closed}}]))
    assert "cannot fetch" in assert_error(refused, 400)
    with pytest.raises(RequestError, match="--allow-url-fetch"):
        ImageReader(max_pixels=10**6, max_bytes=10**6).read(f"{url}/pic.png")


def test_concurrent_requests_batch_and_answer_as_sequential_ones(client: httpx.Client) -> None:
    questions = ["what colour is the square?", "what shape?", "is there a circle on the left?", "how many shapes?",
                 "what is in the picture?", "where is the red square?"]
    requests = [("/v1/ask", {"image": b64(png(10 + i)), "question": q, **({"max_new_tokens": 3} if i % 3 == 0 else {})})
                for i, q in enumerate(questions)]
    requests += [("/v1/caption", {"image": b64(png(20 + i))}) for i in range(4)]

    def send(request: tuple[str, dict[str, Any]]) -> str:
        response = client.post(request[0], json=request[1])
        assert response.status_code == 200, response.text
        return response.json().get("answer", response.json().get("caption"))

    sequential = [send(request) for request in requests]
    before = client.get("/health").json()["batching"]
    with ThreadPoolExecutor(len(requests)) as pool:
        concurrent = list(pool.map(send, requests))
    after = client.get("/health").json()["batching"]
    assert concurrent == sequential
    assert len(set(sequential[:6])) > 1, "different questions should get different answers from the tiny model"
    assert after["items"] - before["items"] == len(requests)
    assert after["batches"] - before["batches"] < len(requests) and after["largest_batch"] >= 2


def malformed_requests() -> list[tuple[str, str, dict[str, Any], int | None]]:
    """(method, path, httpx keyword arguments, expected status or None for any 4xx)."""
    rng = random.Random(0)
    noise = bytes(rng.getrandbits(8) for _ in range(512))
    good = png(30)
    truncated = good[: len(good) // 2]
    cases: list[tuple[str, str, dict[str, Any], int | None]] = [
        ("POST", "/v1/caption", {"content": noise, "headers": {"Content-Type": "application/octet-stream"}}, 415),
        ("POST", "/v1/caption", {"content": b"image=abc", "headers": {"Content-Type": "text/plain"}}, 415),
        ("POST", "/v1/caption", {"content": noise, "headers": {"Content-Type": "application/json"}}, 400),
        ("POST", "/v1/caption", {"content": b"[1, 2]", "headers": {"Content-Type": "application/json"}}, 400),
        ("POST", "/v1/caption", {"content": b"[" * 100000, "headers": {"Content-Type": "application/json"}}, 400),
        ("POST", "/v1/caption", {"files": {"image": ("x.png", noise, "image/png")}}, 400),
        ("POST", "/v1/caption", {"files": {"image": ("x.png", truncated, "image/png")}}, 400),
        ("POST", "/v1/caption", {"files": {"image": ("x.png", b"", "image/png")}}, 400),
        ("POST", "/v1/caption", {"json": {"image": "not base64 !!!"}}, 400),
        ("POST", "/v1/caption", {"json": {"image": "data:image/png,abc"}}, 400),
        ("POST", "/v1/caption", {"json": {"image": b64(noise)}}, 400),
        ("POST", "/v1/caption", {"json": {"image": b64(png_header_only(100000, 100000))}}, 400),
        ("POST", "/v1/caption", {"json": {"image": b64(png(0, (1100, 1000)))}}, 400),
        ("POST", "/v1/caption", {"content": b"{" + b" " * (3 * 2**20) + b"}", "headers": {"Content-Type": "application/json"}}, 413),
        ("POST", "/v1/caption", {"json": {}}, 400),
        ("POST", "/v1/caption", {"json": {"image": 5}}, 400),
        ("POST", "/v1/caption", {"json": {"image": b64(good), "num_beams": "x"}}, 400),
        ("POST", "/v1/caption", {"json": {"image": b64(good), "max_new_tokens": 0}}, 400),
        ("POST", "/v1/caption", {"json": {"image": b64(good), "max_new_tokens": 10**9}}, 400),
        ("POST", "/v1/caption", {"json": {"image": b64(good), "num_captions": True}}, 400),
        ("POST", "/v1/caption", {"json": {"image": b64(good), "temperature": 0.5}}, 400),
        ("POST", "/v1/caption", {"data": {"image": b64(good), "max_new_tokens": "many"}}, 400),
        ("POST", "/v1/caption", {"content": b"--x\r\nbroken", "headers": {"Content-Type": "multipart/form-data; boundary=x"}}, 400),
        ("POST", "/v1/caption", {"content": b"", "headers": {"Content-Type": "multipart/form-data"}}, 400),
        ("POST", "/v1/ask", {"json": {"image": b64(good)}}, 400),
        ("POST", "/v1/ask", {"json": {"image": b64(good), "question": ["a"]}}, 400),
        ("POST", "/v1/ask", {"json": {"image": b64(good), "question": "x" * 5000}}, 400),
        ("POST", "/v1/embed", {"json": {}}, 400),
        ("POST", "/v1/embed", {"json": {"texts": [1, 2]}}, 400),
        ("POST", "/v1/embed", {"json": {"texts": "abc"}}, 400),
        ("POST", "/v1/embed", {"json": {"images": [b64(good)] * 65}}, 400),
        ("POST", "/v1/chat/completions", {"json": {"model": "tiny"}}, 400),
        ("POST", "/v1/chat/completions", {"json": {"model": "tiny", "messages": "hi"}}, 400),
        ("POST", "/v1/chat/completions", {"json": chat_body("no image here")}, 400),
        ("POST", "/v1/chat/completions", {"json": chat_body([{"type": "image_url", "image_url": {"url": data_url(good)}}] * 2)}, 400),
        ("POST", "/v1/chat/completions", {"json": chat_body([{"type": "audio"}])}, 400),
        ("POST", "/v1/chat/completions", {"json": chat_body([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}])}, 400),
        ("POST", "/v1/chat/completions", {"json": {**chat_body([{"type": "image_url", "image_url": {"url": data_url(good)}}]), "model": "gpt-4o"}}, 404),
        ("POST", "/v1/chat/completions", {"json": chat_body([{"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}])}, 400),
        ("GET", "/v1/caption", {}, 405),
        ("DELETE", "/health", {}, 405),
        ("GET", "/v2/anything", {}, 404),
    ]
    body = json.dumps({"image": b64(good), "prompt": "a picture of"}).encode()
    for _ in range(12):  # random byte flips of a valid body: any answer but a 5xx
        mutated = bytearray(body)
        for _ in range(rng.randint(1, 8)):
            mutated[rng.randrange(len(mutated))] = rng.getrandbits(8)
        cases.append(("POST", "/v1/caption", {"content": bytes(mutated), "headers": {"Content-Type": "application/json"}}, None))
    return cases


def test_malformed_requests_get_json_4xx_and_the_server_keeps_serving(server: dict[str, Any], client: httpx.Client) -> None:
    for method, path, kwargs, status in malformed_requests():
        response = client.request(method, path, **kwargs)
        if status is None and response.status_code == 200:
            continue  # a flip inside the base64 can still leave a decodable image
        assert_error(response, status)
    assert client.get("/health").json()["status"] == "ok"
    ok = client.post("/v1/caption", json={"image": b64(png(31))})
    assert ok.status_code == 200, ok.text
    assert server["process"].poll() is None
    assert "Traceback" not in server["log"].read_text()


def test_a_failing_item_fails_only_its_own_request() -> None:
    calls: list[list[int]] = []

    def run(key: Any, items: list[int]) -> list[int]:
        calls.append(list(items))
        if 13 in items:
            raise ValueError("unlucky")
        return [item * 2 for item in items]

    batcher = Batcher(run, max_batch=8, max_wait_s=0.2)
    batcher.start()
    try:
        futures = [batcher.submit("double", item) for item in (1, 13, 3)] + [batcher.submit("other", 4)]
        assert [f.result(timeout=10) for f in (futures[0], futures[2], futures[3])] == [2, 6, 8]
        with pytest.raises(ValueError, match="unlucky"):
            futures[1].result(timeout=10)
    finally:
        batcher.stop()
    assert calls[0] == [1, 13, 3] and [4] in calls, "one batch per key, then the failed batch item by item"
    assert batcher.stats()["failed_items"] == 1


def test_missing_extra_and_busy_port_are_one_line_errors(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        busy = CliRunner().invoke(cli, ["serve", "--model", str(run_dir), "--port", port])
        assert busy.exit_code == 1 and busy.stderr.startswith("Error: cannot listen on 127.0.0.1:")
        assert "--port" in busy.stderr and len(busy.stderr.strip().splitlines()) == 1
        monkeypatch.setitem(sys.modules, "uvicorn", None)
        missing = CliRunner().invoke(cli, ["serve", "--model", str(run_dir), "--port", port])
    assert missing.exit_code == 1 and "pip install 'blipkit[serve]'" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
