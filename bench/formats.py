#!/usr/bin/env python3
"""Import and export of image formats against qemu-img in the same run.

    python3 bench/formats.py [--runs 3] [--disk-gib 3] [--dir /var/tmp/kagami-bench-formats]
                             [--binary PATH] [--baseline PATH]

A realistic OS disk: an MBR-partitioned raw disk whose partition is an ext4 filesystem full of
real files (`mke2fs -d /usr/share`), converted by qemu-img to qcow2, vmdk and vhd. Then, RUNS
times, for each format:
  - import:  qemu-img convert -f FMT -O raw -t writeback (then sync, as our store is durable)
             against curl POST /v1/images/{id}/import?disk_format=FMT into a fresh server with
             an empty store (so every block is written, as qemu-img writes every byte), until
             its import job ends;
  - export:  qemu-img convert -f raw -O FMT (vmdk: streamOptimized) of the raw disk (then sync;
             the raw file and Kagami's packs are read into the page cache first)
             against `kagami image download ID --format FMT -o FILE --no-verify` (GET
             /v1/images/{id}/file?format=FMT written to a file; then sync).
Prints medians of same-run ratios (qemu-img time / Kagami time: above 1 means Kagami is faster)
and their lowest and highest run,
server CPU seconds and peak RSS. --binary measures a kagami binary already built (no cargo
build); --baseline also measures the imports and exports of another kagami binary (an older
build) in the same runs, each right after this one's, for a same-run before/after ratio.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ingest import ROOT, Server, cpu_seconds, peak_rss_mib, run, timed, warm, warm_tree  # noqa: E402

FORMATS = [("qcow2", "qcow2", []), ("vmdk", "vmdk", []), ("vhd", "vpc", [])]
EXPORT_OPTS = {"vmdk": ["-o", "subformat=streamOptimized"], "vpc": ["-o", "subformat=dynamic"]}


def make_disk(path, size):
    if os.path.exists(path) and os.path.getsize(path) == size:
        return
    part_start = 1 << 20
    run(["truncate", "-s", str(size), path])
    run(["mke2fs", "-q", "-F", "-t", "ext4", "-E", f"offset={part_start}", "-d", "/usr/share", path,
         f"{(size - part_start) // 1024}k"])
    # One MBR partition (type 0x83) covering the filesystem.
    sectors = (size - part_start) // 512
    entry = bytes([0x80, 0, 0, 0, 0x83, 0, 0, 0]) + (2048).to_bytes(4, "little") + sectors.to_bytes(4, "little")
    with open(path, "r+b") as f:
        f.seek(446)
        f.write(entry)
        f.seek(510)
        f.write(b"\x55\xaa")


def import_file(srv, image_id, fmt, src):
    """Seconds from the upload's first byte to the end of its import job, and to the 202 (the
    job converts while the file arrives; the request answers once the whole file is staged and
    inspected)."""
    t = time.monotonic()
    out = run(["curl", "-sfS", "-X", "POST", "-T", src, "-H", f"Authorization: Bearer {srv.token}",
               f"{srv.url}/v1/images/{image_id}/import?disk_format={fmt}"], capture_output=True).stdout
    answered = time.monotonic() - t
    job = json.loads(out)["id"]
    req = urllib.request.Request(f"{srv.url}/v1/jobs/{job}", headers={"Authorization": f"Bearer {srv.token}"})
    while True:
        with urllib.request.urlopen(req) as r:
            state = json.load(r)
        if state["state"] == "succeeded":
            return time.monotonic() - t, answered
        if state["state"] == "failed":
            raise SystemExit(f"import of {src} failed: {state['error']}")
        time.sleep(0.02)


def import_fresh(binary, work, fmt, src):
    """Imports `src` into a new server with an empty store: seconds to the job's end and to the
    202, server CPU seconds, peak server RSS in MiB."""
    data = os.path.join(work, "import-data")
    subprocess.run(["rm", "-rf", data])
    os.makedirs(data)
    srv = Server(binary, data)
    try:
        img = srv.api("POST", "/v1/images", "-H", "content-type: application/json", "-d", f'{{"name":"{fmt}"}}')
        warm(src)
        cpu0 = cpu_seconds(srv.proc.pid)
        took, answered = import_file(srv, img["id"], fmt, src)
        cpu = cpu_seconds(srv.proc.pid) - cpu0
        rss = peak_rss_mib(srv.proc.pid)
        # Untimed: the staged upload's background fsync may still be writing; it must not land
        # in the next measurement.
        run(["sync", "-f", data])
    finally:
        srv.stop()
    subprocess.run(["rm", "-rf", data])
    return took, answered, cpu, rss


def download(binary, srv, image_id, fmt, out):
    """The operator's download: `kagami image download` (without its read-back check, which
    qemu-img does not do either), then sync."""
    return ["sh", "-c", f"KAGAMI_URL={srv.url} KAGAMI_TOKEN={srv.token} {binary} image download "
                        f"{image_id} --format {fmt} -o {out} --no-verify && sync -f {out}"]


def upload_base(srv, raw):
    """The raw disk as an image of `srv`, to export from."""
    base = srv.api("POST", "/v1/images", "-H", "content-type: application/json", "-d", '{"name":"os"}')
    run(["curl", "-sfS", "-o", "/dev/null", "-X", "PUT", "-T", raw, "-H",
         f"Authorization: Bearer {srv.token}", f"{srv.url}/v1/images/{base['id']}/file"])
    return base


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--disk-gib", type=float, default=3)
    ap.add_argument("--dir", default="/var/tmp/kagami-bench-formats")
    ap.add_argument("--binary", help="a kagami binary to measure instead of building one")
    ap.add_argument("--baseline", help="another kagami binary whose imports and exports are measured too")
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    binary = args.binary
    if binary is None:
        run(["cargo", "build", "--release", "--locked", "--bin", "kagami"], cwd=ROOT)
        binary = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release", "kagami")
    raw = os.path.join(args.dir, "os.raw")
    make_disk(raw, int(args.disk_gib * (1 << 30)))
    sources = {}
    for name, qfmt, opts in FORMATS:
        src = os.path.join(args.dir, f"os.{name}")
        if not os.path.exists(src):
            run(["qemu-img", "convert", "-q", "-f", "raw", "-O", qfmt, *opts, raw, src])
        sources[name] = (qfmt, src)
    out = os.path.join(args.dir, "out")
    results = {}
    for r in range(args.runs):
        data = os.path.join(args.dir, "data")
        subprocess.run(["rm", "-rf", data])
        os.makedirs(data)
        srv = Server(binary, data)
        old = None
        try:
            pid = srv.proc.pid
            warm(raw)
            base = upload_base(srv, raw)
            if args.baseline:
                old_data = os.path.join(args.dir, "data-baseline")
                subprocess.run(["rm", "-rf", old_data])
                os.makedirs(old_data)
                old = Server(args.baseline, old_data)
                old_base = upload_base(old, raw)
            for name, (qfmt, src) in sources.items():
                warm(src)
                q = timed(["sh", "-c", f"qemu-img convert -q -t writeback -f {qfmt} -O raw {src} {out} && sync -f {out}"])
                os.remove(out)
                # Each import into an empty store: the exported base holds the same blocks, and
                # an import that finds them stored writes nothing (a flattering, unfair run).
                k, answered, cpu, rss = import_fresh(binary, args.dir, name, src)
                results.setdefault(f"import {name}", []).append((q, k, cpu))
                results.setdefault("answered", {}).setdefault(name, []).append((answered, k))
                results.setdefault("rss", []).append(rss)
                if old:
                    b, _, bcpu, _ = import_fresh(args.baseline, args.dir, name, src)
                    results.setdefault(f"baseline import {name}", []).append((q, b, bcpu, k, cpu))
                opts = " ".join(EXPORT_OPTS.get(qfmt, []))
                # Both sides read from memory: qemu-img the raw file, Kagami its packs (written
                # with O_DIRECT, so not in the page cache until something reads them).
                warm(raw)
                warm_tree(os.path.join(data, "packs"))
                if old:
                    warm_tree(os.path.join(old_data, "packs"))
                q = timed(["sh", "-c", f"qemu-img convert -q -f raw -O {qfmt} {opts} {raw} {out} && sync -f {out}"])
                qsize = os.path.getsize(out)
                os.remove(out)
                cpu0 = cpu_seconds(pid)
                k = timed(download(binary, srv, base["id"], name, out))
                cpu = cpu_seconds(pid) - cpu0
                ksize = os.path.getsize(out)
                os.remove(out)
                results.setdefault(f"export {name}", []).append((q, k, cpu, qsize, ksize))
                if old:
                    cpu0 = cpu_seconds(old.proc.pid)
                    b = timed(download(args.baseline, old, old_base["id"], name, out))
                    bcpu = cpu_seconds(old.proc.pid) - cpu0
                    os.remove(out)
                    results.setdefault(f"baseline export {name}", []).append((q, b, bcpu, k, cpu))
            rss = peak_rss_mib(pid)
            results.setdefault("rss", []).append(rss)
        finally:
            srv.stop()
            if old:
                old.stop()
        print(f"run {r + 1} done", file=sys.stderr)
    gib = os.path.getsize(raw) / (1 << 30)
    print(f"\n{args.runs} runs, {gib:g} GiB disk (ext4 of /usr/share), medians of same-run ratios.\n")
    print("| operation | qemu-img s | Kagami s | qemu-img / Kagami | lowest–highest run | Kagami server CPU-s "
          "| output MiB qemu / Kagami |")
    print("|---|---|---|---|---|---|---|")
    for key, rows in results.items():
        if key in ("rss", "answered") or key.startswith("baseline"):
            continue
        q = statistics.median(r[0] for r in rows)
        k = statistics.median(r[1] for r in rows)
        ratios = [r[0] / r[1] for r in rows]
        ratio = statistics.median(ratios)
        cpu = statistics.median(r[2] for r in rows)
        sizes = f"{rows[0][3] / 2**20:.0f} / {rows[0][4] / 2**20:.0f}" if len(rows[0]) > 3 else ""
        # The spread shows how much one run says on this machine (qemu-img's flush time swings).
        print(f"| {key} | {q:.2f} | {k:.2f} | **{ratio:.2f}x** | {min(ratios):.2f}–{max(ratios):.2f}x | {cpu:.2f} "
              f"| {sizes} |")
    print(f"\nserver peak RSS: {max(results['rss']):.0f} MiB")
    print("\nImports: the upload's 202 (the whole file staged and inspected) and the job's end, medians:\n")
    print("| import | 202 after s | job ended s |")
    print("|---|---|---|")
    for name, rows in results["answered"].items():
        print(f"| {name} | {statistics.median(r[0] for r in rows):.2f} | {statistics.median(r[1] for r in rows):.2f} |")
    if args.baseline:
        print(f"\nbaseline {args.baseline}: imports and exports in the same runs, each right after this build's.\n")
        print("| operation | qemu-img s | baseline s | this build s | qemu-img / baseline | qemu-img / this build "
              "| baseline / this build | server CPU-s baseline / this build |")
        print("|---|---|---|---|---|---|---|---|")
        for key, rows in results.items():
            if not key.startswith("baseline"):
                continue
            med = lambda i: statistics.median(r[i] for r in rows)  # noqa: E731
            ratio = lambda f: statistics.median(f(r) for r in rows)  # noqa: E731
            print(f"| {key.split(' ', 1)[1]} | {med(0):.2f} | {med(1):.2f} | {med(3):.2f} | {ratio(lambda r: r[0] / r[1]):.2f}x "
                  f"| {ratio(lambda r: r[0] / r[3]):.2f}x | {ratio(lambda r: r[1] / r[3]):.2f}x | {med(2):.2f} / {med(4):.2f} |")


if __name__ == "__main__":
    main()
