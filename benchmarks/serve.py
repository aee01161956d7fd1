"""Throughput and latency of ``blipkit serve``: one client after another against 8 at once, batching on.

    python benchmarks/serve.py                              # the tiny recipe, trained into a temp dir
    python benchmarks/serve.py --model runs/default         # the default model (train it with: blipkit train)
    python benchmarks/serve.py --task ask --requests 128 --clients 8 --max-wait-ms 5

A real ``blipkit serve`` process listens on a free loopback port; clients (threads, one keep-alive HTTP
connection each) post JSON requests with base64 PNGs of distinct synthetic images. Each phase prints
requests/s, p50 and p95 latency and errors:

  sequential      1 client, batching on (what a lone user sees, including the batching wait)
  concurrent      N clients, batching on
  no batching     N clients against a second server started with --max-batch 1 (concurrency alone)

and the ratio of concurrent to sequential throughput (goal: >= 2x at 8 clients, with 0 errors), plus
whether every image got the same answer in every phase (batched results must equal one-at-a-time ones).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from PIL import Image, ImageDraw


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def synthetic_png(index: int, size: int = 64) -> bytes:
    """A distinct picture per index: a coloured shape on a coloured background."""
    colours = [(220, 40, 40), (40, 160, 40), (40, 60, 220), (230, 200, 40), (160, 60, 200), (240, 240, 240)]
    image = Image.new("RGB", (size, size), colours[index % len(colours)])
    draw = ImageDraw.Draw(image)
    box = [(index * 7) % (size // 2), (index * 11) % (size // 2)]
    box += [box[0] + size // 3, box[1] + size // 3]
    fill = colours[(index // len(colours) + 1 + index) % len(colours)]
    (draw.ellipse if index % 2 else draw.rectangle)(box, fill=fill)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@contextmanager
def server(model: Path, port: int, extra: list[str], log: Path) -> Iterator[None]:
    """A ``blipkit serve`` process, ready when its /health answers."""
    command = [sys.executable, "-m", "blipkit", "serve", "--model", str(model), "--port", str(port),
               "--log-level", "warning", *extra]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                raise SystemExit(f"the server stopped (exit {process.returncode}):\n{log.read_text()[-2000:]}")
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                connection.request("GET", "/health")
                if connection.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the server did not answer /health within 300 s")
            time.sleep(0.2)
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def get_json(port: int, path: str) -> Any:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", path)
    return json.loads(connection.getresponse().read())


def run_clients(port: int, bodies: list[bytes], path: str, clients: int) -> dict[str, Any]:
    """Send every body once, from ``clients`` threads; latencies, answers by body index, errors, wall time."""
    latencies: list[float] = []
    answers: dict[int, str] = {}
    errors: list[str] = []
    lock = threading.Lock()
    next_index = iter(range(len(bodies)))

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        while True:
            with lock:
                index = next(next_index, None)
            if index is None:
                return
            started = time.perf_counter()
            try:
                connection.request("POST", path, body=bodies[index], headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                payload = json.loads(response.read())
                ok = response.status == 200
            except (OSError, http.client.HTTPException, ValueError) as err:
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
                ok, payload = False, {"error": {"message": repr(err)}}
            elapsed = time.perf_counter() - started
            with lock:
                if ok:
                    latencies.append(elapsed)
                    answers[index] = payload.get("caption", payload.get("answer"))
                else:
                    errors.append(str(payload.get("error", payload))[:200])

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {"wall": wall, "latencies": latencies, "answers": answers, "errors": errors}


def summary(name: str, clients: int, result: dict[str, Any]) -> dict[str, Any]:
    latencies = sorted(result["latencies"]) or [float("nan")]
    done = len(result["latencies"])
    row = {
        "phase": name, "clients": clients, "requests": done + len(result["errors"]),
        "req_per_s": done / result["wall"],
        "p50_ms": 1000 * statistics.median(latencies),
        "p95_ms": 1000 * latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
        "errors": len(result["errors"]),
    }
    print(f"{name:<13} {clients:>7} {row['requests']:>8} {row['req_per_s']:>9.1f} {row['p50_ms']:>8.1f} "
          f"{row['p95_ms']:>8.1f} {row['errors']:>6}", flush=True)
    for error in result["errors"][:3]:
        print(f"  error: {error}")
    return row


def train_tiny(folder: Path) -> Path:
    from blipkit.config import load_recipe
    from blipkit.train.runner import train

    os.environ["BLIPKIT_CACHE"] = str(folder / "cache")
    print("training the tiny recipe ...", flush=True)
    train(load_recipe("tiny"), output=folder / "tiny", quiet=True)
    return folder / "tiny"


def request_bodies(count: int, task: str) -> list[bytes]:
    questions = ["what colour is the shape?", "what shape is it?", "where is the shape?", "what is the background colour?"]
    bodies = []
    for index in range(count):
        image = base64.b64encode(synthetic_png(index)).decode()
        fields: dict[str, Any] = {"image": image}
        if task == "ask":
            fields["question"] = questions[index % len(questions)]
        bodies.append(json.dumps(fields).encode())
    return bodies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="Run directory (default: the tiny recipe, trained into a temp dir).")
    parser.add_argument("--task", choices=["caption", "ask"], default="caption")
    parser.add_argument("--requests", type=int, default=96, help="Requests per phase.")
    parser.add_argument("--clients", type=int, default=8, help="Concurrent clients.")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--device", help="Passed to blipkit serve (default: its own choice).")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = args.model or train_tiny(folder)
        if not (model / "blipkit.json").exists():
            raise SystemExit(f"{model} is not a blipkit run directory; train one with: blipkit train")
        bodies = request_bodies(args.requests, args.task)
        path = f"/v1/{args.task}"
        extra = ["--device", args.device] if args.device else []
        print(f"model {model}, task {args.task}, {args.requests} requests per phase, "
              f"batching: up to {args.max_batch}, {args.max_wait_ms:g} ms wait", flush=True)
        print(f"{'phase':<13} {'clients':>7} {'requests':>8} {'req/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'errors':>6}")
        rows, answers = [], {}
        port = free_port()
        with server(model, port, ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms), *extra],
                    folder / "batched.log"):
            run_clients(port, bodies[: args.clients * 2], path, args.clients)  # warm-up
            for name, clients in (("sequential", 1), ("concurrent", args.clients)):
                result = run_clients(port, bodies, path, clients)
                rows.append(summary(name, clients, result))
                answers[name] = result["answers"]
            batches = get_json(port, "/health")["batching"]
        port = free_port()
        with server(model, port, ["--max-batch", "1", *extra], folder / "unbatched.log"):
            run_clients(port, bodies[: args.clients * 2], path, args.clients)
            result = run_clients(port, bodies, path, args.clients)
            rows.append(summary("no batching", args.clients, result))
            answers["no batching"] = result["answers"]
    sequential, concurrent, unbatched = rows
    same = answers["sequential"] == answers["concurrent"] == answers["no batching"]
    print(f"batch sizes formed (size: count): {batches['batch_sizes']}")
    print(f"answers identical in every phase: {'yes' if same else 'NO'}")
    print(f"throughput at {args.clients} clients with batching / sequential: "
          f"{concurrent['req_per_s'] / sequential['req_per_s']:.2f}x (goal >= 2x); "
          f"/ {args.clients} clients without batching: {concurrent['req_per_s'] / unbatched['req_per_s']:.2f}x; "
          f"errors: {sum(row['errors'] for row in rows)}")


if __name__ == "__main__":
    main()
