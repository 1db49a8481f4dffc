#!/usr/bin/env python3
"""Ingest/download benchmark for `kagami serve`, against ceilings measured in the same run.

    python3 bench/ingest.py [--size-gib 4] [--runs 3] [--dir /var/tmp/kagami-bench]

Builds the release binary, makes a raw image of SIZE GiB that is half random data and half
zeros (alternating 64 MiB stretches), then, RUNS times:
  - hashing ceiling:  `openssl dgst -sha256` of the image (one core, SHA-NI), from page cache;
  - writing ceiling:  `dd` of the image's non-zero bytes into the data dir, conv=fdatasync;
  - first ingest:     curl PUT of the image into a fresh server;
  - re-ingest:        the same bytes into a second image (nothing new to store);
  - download:         curl GET of the image to /dev/null (the server re-hashes every block).
Rates are logical bytes of the image per second. The server's CPU seconds come from
/proc/PID/stat and its peak RSS from VmHWM. Prints medians and same-run ratios as Markdown.
"""
import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TICK = os.sysconf("SC_CLK_TCK")
STRETCH = 64 << 20


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def timed(cmd, **kw):
    t = time.monotonic()
    run(cmd, **kw)
    return time.monotonic() - t


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def peak_rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def warm(path):
    """Reads a file into the page cache, so every contender reads it from memory alike."""
    with open(path, "rb") as f:
        while f.read(16 << 20):
            pass


def warm_tree(path):
    """Reads every file under `path` into the page cache (a data directory's packs)."""
    for root, _, files in os.walk(path):
        for name in files:
            warm(os.path.join(root, name))


def make_image(path, data_path, size):
    """Alternating 64 MiB stretches of random data and zeros; data_path gets only the data."""
    if os.path.exists(path) and os.path.getsize(path) == size and os.path.exists(data_path):
        return
    with open(path, "wb") as img, open(data_path, "wb") as data:
        img.truncate(size)
        for i, off in enumerate(range(0, size, STRETCH)):
            if i % 2 == 0:
                chunk = os.urandom(min(STRETCH, size - off))
                img.seek(off)
                img.write(chunk)
                data.write(chunk)


def free_port():
    """A loopback TCP port nothing listens on right now."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port):
    """Waits up to 10 s for something to listen on loopback `port`."""
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on port {port}")


class Server:
    def __init__(self, binary, data_dir, host="127.0.0.1", args=(), env=None):
        self.port = free_port()
        env = dict(os.environ, KAGAMI__GC__INTERVAL_SECS="0", KAGAMI_LOG="warn", **(env or {}))
        self.proc = subprocess.Popen(
            [binary, "serve", "--listen", f"{host}:{self.port}", "--data-dir", data_dir, *args],
            env=env, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        wait_port(self.port)
        with open(os.path.join(data_dir, "admin.token")) as f:
            self.token = f.read().strip()

    def api(self, method, path, *extra):
        out = run(["curl", "-sfS", "-X", method, "-H", f"Authorization: Bearer {self.token}", *extra,
                   self.url + path], capture_output=True).stdout
        return json.loads(out) if out else None

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def one_run(binary, image, data_file, work, size):
    data_dir = os.path.join(work, "data")
    shutil.rmtree(data_dir, ignore_errors=True)
    os.makedirs(data_dir)
    r = {}
    warm(image)
    warm(data_file)
    r["hash_s"] = timed(["openssl", "dgst", "-sha256", image], stdout=subprocess.DEVNULL)
    dd_target = os.path.join(data_dir, "dd.out")
    r["write_s"] = timed(["dd", f"if={data_file}", f"of={dd_target}", "bs=4M", "conv=fdatasync"],
                         stderr=subprocess.DEVNULL)
    os.remove(dd_target)
    srv = Server(binary, data_dir)
    try:
        pid = srv.proc.pid
        img = srv.api("POST", "/v1/images", "-H", "content-type: application/json", "-d", '{"name":"bench"}')
        cpu0 = cpu_seconds(pid)
        r["ingest_s"] = timed(["curl", "-sfS", "-o", "/dev/null", "-X", "PUT", "-T", image, "-H",
                               f"Authorization: Bearer {srv.token}", f"{srv.url}/v1/images/{img['id']}/file"])
        r["ingest_cpu"] = cpu_seconds(pid) - cpu0
        r["ingest_rss"] = peak_rss_mib(pid)
        stats1 = srv.api("GET", "/v1/store")
        img2 = srv.api("POST", "/v1/images", "-H", "content-type: application/json", "-d", '{"name":"again"}')
        cpu0 = cpu_seconds(pid)
        r["reingest_s"] = timed(["curl", "-sfS", "-o", "/dev/null", "-X", "PUT", "-T", image, "-H",
                                 f"Authorization: Bearer {srv.token}", f"{srv.url}/v1/images/{img2['id']}/file"])
        r["reingest_cpu"] = cpu_seconds(pid) - cpu0
        stats2 = srv.api("GET", "/v1/store")
        r["reingest_new_bytes"] = stats2["pack_bytes"] - stats1["pack_bytes"]
        cpu0 = cpu_seconds(pid)
        r["download_s"] = timed(["curl", "-sfS", "-o", "/dev/null", "-H", f"Authorization: Bearer {srv.token}",
                                 f"{srv.url}/v1/images/{img['id']}/file"])
        r["download_cpu"] = cpu_seconds(pid) - cpu0
        r["peak_rss"] = peak_rss_mib(pid)
    finally:
        srv.stop()
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=4)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default="/var/tmp/kagami-bench")
    args = ap.parse_args()
    size = int(args.size_gib * (1 << 30))
    os.makedirs(args.dir, exist_ok=True)
    run(["cargo", "build", "--release", "--locked", "--bin", "kagami"], cwd=ROOT)
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    binary = os.path.join(target, "release", "kagami")
    image = os.path.join(args.dir, "image.raw")
    data_file = os.path.join(args.dir, "data.bin")
    make_image(image, data_file, size)
    runs = []
    for i in range(args.runs):
        r = one_run(binary, image, data_file, args.dir, size)
        runs.append(r)
        print(f"run {i + 1}: " + ", ".join(f"{k}={v:.2f}" for k, v in r.items()), file=sys.stderr)
    gib = size / (1 << 30)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    rate = lambda s: gib / s  # logical GiB/s
    # Ratios are taken within each run, then the median across runs.
    ratio = lambda f: statistics.median(f(r) for r in runs)
    print(f"\n{args.runs} runs, {gib:g} GiB image (half random data, half zeros); medians.\n")
    print("| measure | value |")
    print("|---|---|")
    print(f"| hashing ceiling (openssl dgst -sha256, 1 core) | {rate(med['hash_s']):.2f} GiB/s |")
    print(f"| durable-write ceiling (dd of the data half, conv=fdatasync) | {rate(med['write_s']):.2f} GiB/s of image |")
    print(f"| first ingest | {rate(med['ingest_s']):.2f} GiB/s |")
    print(f"| first ingest / slower ceiling | {ratio(lambda r: max(r['hash_s'], r['write_s']) / r['ingest_s']):.2f}x |")
    print(f"| re-ingest (nothing new) | {rate(med['reingest_s']):.2f} GiB/s |")
    print(f"| re-ingest / hashing ceiling | {ratio(lambda r: r['hash_s'] / r['reingest_s']):.2f}x |")
    print(f"| re-ingest new bytes stored | {int(med['reingest_new_bytes'])} |")
    print(f"| download (verified) | {rate(med['download_s']):.2f} GiB/s |")
    print(f"| download / hashing ceiling | {ratio(lambda r: r['hash_s'] / r['download_s']):.2f}x |")
    print(f"| server CPU-s per GiB: ingest / re-ingest / download | {med['ingest_cpu'] / gib:.2f} / {med['reingest_cpu'] / gib:.2f} / {med['download_cpu'] / gib:.2f} |")
    print(f"| server peak RSS after ingest / after all | {med['ingest_rss']:.0f} / {med['peak_rss']:.0f} MiB |")


if __name__ == "__main__":
    main()
