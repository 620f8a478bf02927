#!/usr/bin/env python3
"""Peak memory of the server under concurrent maximum-size input images.

Starts the server binary (demo model, loopback only), sends CONCURRENT
`/v1/answer` requests at once, each with a SIDE x SIDE PNG (the largest the
server accepts by default), and reports the server's peak resident memory
(VmHWM) before and after. Standard library only.

    cargo build --release -p ulm-server
    python3 load-tests/image_memory.py [path/to/ulm-server]
"""

import base64
import json
import os
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import zlib

SIDE = 4096
CONCURRENT = 16


def png(side):
    """A side x side RGB PNG: a gradient, so it compresses to little but decodes to side^2 * 3 bytes."""
    row = bytes(x % 251 for x in range(side * 3))
    raw = b"".join(b"\x00" + row for _ in range(side))

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def peak_rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main():
    binary = sys.argv[1] if len(sys.argv) > 1 else "target/release/ulm-server"
    data_dir = tempfile.mkdtemp()
    server = subprocess.Popen(
        [binary, "serve", "--no-auth", "--demo", "--port", "0", "--data-dir", data_dir],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        url = None
        for line in server.stdout:
            if line.startswith("listening on "):
                url = line.split()[-1]
                break
        assert url and url.startswith("http://127."), "the server did not start on loopback"
        image = png(SIDE)
        body = json.dumps(
            {
                "image": base64.b64encode(image).decode(),
                "question": "What is in the image?",
                "max_new_tokens": 4,
            }
        ).encode()
        idle = peak_rss_mib(server.pid)
        statuses = []

        def send():
            request = urllib.request.Request(
                url + "/v1/answer", data=body, headers={"content-type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, timeout=600) as response:
                    statuses.append(response.status)
            except urllib.error.HTTPError as e:
                statuses.append(e.code)

        started = time.time()
        threads = [threading.Thread(target=send) for _ in range(CONCURRENT)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.time() - started
        peak = peak_rss_mib(server.pid)
        print(f"| image | PNG bytes | requests | statuses | seconds | peak RSS before | peak RSS after |")
        print(f"|---|---:|---:|---|---:|---:|---:|")
        print(
            f"| {SIDE} x {SIDE} | {len(image)} | {CONCURRENT} | "
            f"{sorted(set(statuses))} x {len(statuses)} | {seconds:.1f} | {idle:.0f} MiB | {peak:.0f} MiB |"
        )
        if any(s != 200 for s in statuses) or len(statuses) != CONCURRENT:
            sys.exit(1)
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
