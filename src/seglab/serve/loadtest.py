"""A bounded load test on loopback: for each model, start `seglab serve` on 127.0.0.1 (a real uvicorn process), send
N concurrent clients' POST /v1/segment for T seconds, and print throughput, latency percentiles and the
answers by status code.

    python -m seglab.serve.loadtest outputs/export/.../model.onnx outputs/export/.../model.xml --clients 4 --seconds 20
    python -m seglab.serve.loadtest model.onnx --clients 1 4 8 --batching both   # batched vs one at a time
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

from seglab.data.masks import load_image
from seglab.models.inference import sample_image
from seglab.serve.auth import TOKEN_ENV
from seglab.serve.formats import png_bytes

HOST = "127.0.0.1"  # never anything else: this tool must not load someone else's server
MAX_CLIENTS, MAX_SECONDS = 64, 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_ready(url: str, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"seglab serve exited with code {server.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"seglab serve was not ready within {timeout:.0f} s")


def run_clients(url: str, image: bytes, clients: int, seconds: float, fmt: str) -> list[tuple[float, int]]:
    """(latency in s, status) of every request the clients finished before the deadline."""
    results: list[tuple[float, int]] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client() -> None:
        own = []
        with httpx.Client(timeout=60) as http:
            while time.monotonic() < deadline:
                start = time.perf_counter()
                try:
                    status = http.post(
                        f"{url}/v1/segment", params={"format": fmt}, files={"image": ("image.png", image, "image/png")}
                    ).status_code
                except httpx.TransportError:
                    status = 0  # no HTTP answer at all (refused, reset, timed out)
                own.append((time.perf_counter() - start, status))
        with lock:
            results.extend(own)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def summarise(model: str, results: list[tuple[float, int]], seconds: float) -> dict:
    ok = np.array([latency for latency, status in results if status == 200])
    percentiles = np.percentile(ok, [50, 95, 99]) * 1e3 if ok.size else [float("nan")] * 3
    return {
        "model": model,
        "requests": len(results),
        "ok": int(ok.size),
        "throughput_per_s": ok.size / seconds,
        "p50_ms": float(percentiles[0]),
        "p95_ms": float(percentiles[1]),
        "p99_ms": float(percentiles[2]),
        "errors": {str(k): v for k, v in sorted(Counter(s for _, s in results if s != 200).items())},
    }


BATCHING = {"on": [], "off": ["limits.batch_size=1"]}  # on: serve.yaml's batching; off: one request at a time


def load_model(model: str, image: bytes, args: argparse.Namespace, overrides: list[str]) -> list[dict]:
    """One server for the model; each --clients count in turn against it, after a warm-up."""
    port = free_port()
    url = f"http://{HOST}:{port}"
    with tempfile.TemporaryDirectory() as run_dir:
        cmd = [
            sys.executable,
            "-m",
            "seglab.commands",
            "serve",
            f"ckpt_path={Path(model).resolve()}",
            f"host={HOST}",
            f"port={port}",
            "device=cpu",
            "log_level=warning",
            f"limits.queue_size={args.queue_size}",
            f"hydra.run.dir={run_dir}",
            *overrides,
            *args.set,
        ]
        # Its own loopback server needs no token: one in the user's environment is not passed on.
        env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
        server = subprocess.Popen(cmd, cwd=run_dir, stdout=subprocess.DEVNULL, env=env)
        try:
            wait_ready(url, server, timeout=180)
            run_clients(url, image, 1, 1.0, args.format)  # warm-up, not counted
            rows = [
                {
                    **summarise(model, run_clients(url, image, clients, args.seconds, args.format), args.seconds),
                    "clients": clients,
                }
                for clients in args.clients
            ]
        finally:
            server.terminate()
            server.wait(timeout=60)
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, checked against the tool's bounds; --queue-size defaults to the most --clients."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help=".ckpt, .onnx or .xml files, each served and loaded in turn")
    parser.add_argument(
        "--clients",
        type=int,
        nargs="+",
        default=[4],
        help=f"concurrent clients (1-{MAX_CLIENTS}); several: each in turn, e.g. --clients 1 4 8",
    )
    parser.add_argument("--seconds", type=float, default=20.0, help=f"duration per run (at most {MAX_SECONDS})")
    parser.add_argument("--image", type=Path, help="the image every request sends (default: synthetic)")
    parser.add_argument("--size", type=int, default=256, help="side of the synthetic image")
    parser.add_argument("--format", choices=("json", "mask", "overlay", "confidence", "probabilities"), default="mask")
    parser.add_argument(
        "--queue-size",
        type=int,
        default=None,
        help="the server's limits.queue_size (default: the most --clients, so no request gets 503)",
    )
    parser.add_argument(
        "--batching",
        choices=("on", "off", "both"),
        default="on",
        help="on: serve.yaml's limits.batch_size; off: limits.batch_size=1; both: each, and the "
        "ratio of their requests/s per client count",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a serve.py override, e.g. limits.batch_wait_ms=10 (repeatable)",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    if not all(1 <= c <= MAX_CLIENTS for c in args.clients) or not 0 < args.seconds <= MAX_SECONDS:
        parser.error(f"--clients must be 1-{MAX_CLIENTS} and --seconds in (0, {MAX_SECONDS}]")
    args.queue_size = args.queue_size or max(args.clients)
    return args


def print_plan(args: argparse.Namespace, width: int, height: int) -> None:
    """One line: what every run sends and to which server."""
    clients = "/".join(str(c) for c in args.clients)
    print(
        f"seglab load test: {clients} clients x {args.seconds:g} s per model, POST /v1/segment?format="
        f"{args.format}, {width}x{height} PNG, server on {HOST} (queue {args.queue_size}"
        + "".join(f", {override}" for override in args.set)
        + ")",
        flush=True,
    )


def print_row(model: str, batching: str, row: dict, seconds: float) -> None:
    """One run's throughput, latency percentiles and errors."""
    errors = ", ".join(f"{k}: {v}" for k, v in row["errors"].items()) or "none"
    print(
        f"  {Path(model).name:<24} batching {batching:<3} {row['clients']:>2} clients {row['ok']:>5} ok "
        f"in {seconds:g} s = {row['throughput_per_s']:6.2f}/s   p50 {row['p50_ms']:7.1f} ms  "
        f"p95 {row['p95_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms   errors: {errors}",
        flush=True,
    )


def print_batching_gain(model: str, rows: list[dict], clients: list[int]) -> None:
    """The model's requests/s batched over unbatched, per client count ("-" where unbatched served none)."""
    rate = {(r["batching"], r["clients"]): r["throughput_per_s"] for r in rows if r["model"] == model}
    print(
        f"  {Path(model).name}: requests/s batched / unbatched: "
        + ", ".join(
            f"{c} clients {rate[('on', c)] / rate[('off', c)]:.2f}x" if rate[("off", c)] else f"{c} clients -"
            for c in clients
        ),
        flush=True,
    )


def main(argv: list[str] | None = None) -> list[dict]:
    """Each model served in turn and loaded by each --clients count (with and without batching for --batching
    both); prints a line per run and returns the rows, also written to --json."""
    args = parse_args(argv)
    array = load_image(args.image) if args.image else sample_image(args.size, args.size)
    image = png_bytes(array)
    print_plan(args, array.shape[1], array.shape[0])
    rows = []
    variants = ("on", "off") if args.batching == "both" else (args.batching,)
    for model in args.models:
        for batching in variants:
            for row in load_model(model, image, args, BATCHING[batching]):
                rows.append({**row, "batching": batching})
                print_row(model, batching, row, args.seconds)
        if args.batching == "both":
            print_batching_gain(model, rows, args.clients)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
