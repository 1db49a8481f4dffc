#!/usr/bin/env python3
"""The agent writing a realistic OS disk onto a loop device, against dd on the same device.

    python3 bench/agent.py [--runs 3] [--disk-gib 3] [--dir /var/tmp/kagami-bench-agent]

Needs root (losetup), dd, mke2fs, curl; builds the release binaries. The disk is the one
bench/formats.py makes: MBR + ext4 full of real files (`mke2fs -d /usr/share`). It is imported
into a fresh release `kagami serve`; the target is a loop device with direct I/O over a sparse
file on the same file system, re-created empty before every contender. Same run, RUNS times:

  - full write:   `dd if=RAW of=LOOP bs=4M oflag=direct conv=fsync` (RAW in the page cache)
                  against `kagami-agent write --mode full` (every block fetched over HTTP from
                  the server and its sha256 verified before it is written; holes punched);
  - differential: 1 % of the image's data blocks damaged on the disk, then
                  `kagami-agent write --mode differential` against `dd iflag=direct` reading
                  the same data segments the agent must read and hash (the floor);
  - the agent's CPU seconds and peak RSS (from wait4), blocks fetched, bytes received.

Prints medians of same-run ratios.
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from formats import make_disk  # noqa: E402
from ingest import ROOT, Server, run, timed, warm  # noqa: E402

BLOCK = 64 << 10
SEGMENT = 4 << 20


def data_blocks(raw):
    """Offsets of the raw disk's non-zero 64 KiB blocks."""
    out = []
    zero = bytes(BLOCK)
    with open(raw, "rb") as f:
        off = 0
        while True:
            b = f.read(BLOCK)
            if not b:
                return out
            if b != zero[: len(b)]:
                out.append(off)
            off += len(b)


def segment_runs(blocks):
    """Contiguous runs (first, count) of the 4 MiB segments holding data."""
    segs = sorted({b // SEGMENT for b in blocks})
    runs = []
    for s in segs:
        if runs and runs[-1][0] + runs[-1][1] == s:
            runs[-1][1] += 1
        else:
            runs.append([s, 1])
    return runs


class Loop:
    def __init__(self, path, size):
        self.path, self.size, self.dev = path, size, None

    def fresh(self):
        """A new, empty (sparse) backing file and loop device."""
        self.close()
        if os.path.exists(self.path):
            os.remove(self.path)
        run(["truncate", "-s", str(self.size), self.path])
        self.dev = run(["losetup", "-f", "--show", "--direct-io=on", self.path],
                       capture_output=True, text=True).stdout.strip()
        return self.dev

    def close(self):
        if self.dev:
            subprocess.run(["losetup", "-d", self.dev])
            self.dev = None


def measured(cmd):
    """Runs `kagami-agent …` printing a JSON report; returns (seconds, CPU seconds, peak RSS
    MiB, report), the CPU and RSS its own (wait4)."""
    t = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=dict(os.environ, KAGAMI_LOG="warn"))
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    secs = time.monotonic() - t
    if status != 0:
        raise SystemExit(f"{' '.join(cmd[:2])} failed with status {status}")
    return secs, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, json.loads(out)


def agent(binary, srv, image, dev, *extra):
    """Runs the agent's write; see `measured`."""
    return measured([binary, "write", "--server", srv.url, "--token", srv.token, "--image", image,
                     "--disk", dev, "--json", *extra])


def prepare(description, default_dir, extra=()):
    """Arguments (`extra`: more (flag, options) pairs), the release build and bench/formats.py's
    disk: (args, release dir, raw disk path, its size, its data blocks)."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--disk-gib", type=float, default=3)
    ap.add_argument("--dir", default=default_dir)
    for flag, options in extra:
        ap.add_argument(flag, **options)
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    run(["cargo", "build", "--release", "--locked", "--bin", "kagami", "--bin", "kagami-agent"], cwd=ROOT)
    target = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release")
    raw = os.path.join(args.dir, "os.raw")
    size = int(args.disk_gib * (1 << 30))
    make_disk(raw, size)
    return args, target, raw, size, data_blocks(raw)


def damage(dev, blocks, fraction, seed):
    """Overwrites 16 bytes in `fraction` of the data blocks; returns how many blocks changed."""
    rng = random.Random(seed)
    chosen = rng.sample(blocks, max(1, int(len(blocks) * fraction)))
    fd = os.open(dev, os.O_WRONLY)
    try:
        for off in chosen:
            os.pwrite(fd, os.urandom(16), off + rng.randrange(0, BLOCK - 16))
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(chosen)


def main():
    args, target, raw, size, blocks = prepare(__doc__, "/var/tmp/kagami-bench-agent")
    runs = segment_runs(blocks)
    data = os.path.join(args.dir, "data")
    subprocess.run(["rm", "-rf", data])
    os.makedirs(data)
    srv = Server(os.path.join(target, "kagami"), data)
    loop = Loop(os.path.join(args.dir, "disk.img"), size)
    rows = []
    try:
        warm(raw)
        image = srv.api("POST", "/v1/images", "-H", "content-type: application/json", "-d", '{"name":"os"}')
        run(["curl", "-sfS", "-o", "/dev/null", "-X", "PUT", "-T", raw, "-H",
             f"Authorization: Bearer {srv.token}", f"{srv.url}/v1/images/{image['id']}/file"])
        binary = os.path.join(target, "kagami-agent")
        read_script = " && ".join(
            f"dd if=DEV of=/dev/null bs=4M iflag=direct skip={s} count={n} status=none" for s, n in runs)
        for r in range(args.runs):
            row = {}
            dev = loop.fresh()
            warm(raw)
            row["dd"] = timed(["dd", f"if={raw}", f"of={dev}", "bs=4M", "oflag=direct", "conv=fsync",
                               "status=none"])
            dev = loop.fresh()
            row["full"], row["full_cpu"], row["full_rss"], full = agent(binary, srv, image["id"], dev)
            changed = damage(dev, blocks, 0.01, r)
            row["changed"] = changed
            row["read"] = timed(["sh", "-c", read_script.replace("DEV", dev)])
            row["diff"], row["diff_cpu"], row["diff_rss"], diff = agent(
                binary, srv, image["id"], dev, "--mode", "differential")
            row["fetched"] = diff["fetched_blocks"]
            row["received"] = diff["received_bytes"]
            row["written"] = full["written_bytes"]
            rows.append(row)
            print(f"run {r + 1}: {row}", file=sys.stderr)
    finally:
        loop.close()
        srv.stop()
    med = lambda f: statistics.median(f(r) for r in rows)  # noqa: E731
    data_bytes = len(blocks) * BLOCK
    read_bytes = sum(n for _, n in runs) * SEGMENT
    print(f"\n{args.runs} runs, {size / 2**30:g} GiB disk (ext4 of /usr/share): {data_bytes / 2**20:.0f} MiB in "
          f"{len(blocks)} data blocks, {read_bytes / 2**20:.0f} MiB of data segments.\n")
    print("| measure | value | goal |")
    print("|---|---|---|")
    print(f"| dd oflag=direct, whole raw disk (s) | {med(lambda r: r['dd']):.2f} | |")
    print(f"| agent full write (s) | {med(lambda r: r['full']):.2f} | |")
    print(f"| full write: dd time / agent time | **{med(lambda r: r['dd'] / r['full']):.2f}x** | >= 1.0 |")
    print(f"| agent full write CPU-s | {med(lambda r: r['full_cpu']):.2f} | |")
    print(f"| dd iflag=direct over the data segments (s) | {med(lambda r: r['read']):.2f} | |")
    print(f"| agent differential rewrite, 1 % of blocks changed (s) | {med(lambda r: r['diff']):.2f} | |")
    print(f"| differential: agent time / dd read time | **{med(lambda r: r['diff'] / r['read']):.2f}x** | <= 1.2 |")
    print(f"| blocks changed / fetched | {med(lambda r: r['changed']):.0f} / {med(lambda r: r['fetched']):.0f} | |")
    print(f"| bytes received / bytes of changed blocks | **{med(lambda r: r['received'] / (r['changed'] * BLOCK)):.3f}x** | <= 1.1 |")
    print(f"| agent differential CPU-s | {med(lambda r: r['diff_cpu']):.2f} | |")
    print(f"| agent peak RSS, full / differential (MiB) | {max(r['full_rss'] for r in rows):.0f} / "
          f"{max(r['diff_rss'] for r in rows):.0f} | < 64 |")
    gbe10 = 1.25e9
    print(f"\nAt 10 GbE (1.25 GB/s): a full write moves {data_bytes / 1e9:.2f} GB of data blocks "
          f"({data_bytes / gbe10:.1f} s of wire); the differential rewrite moves "
          f"{med(lambda r: r['received']) / 1e6:.1f} MB ({med(lambda r: r['received']) / gbe10 * 1000:.0f} ms).")


if __name__ == "__main__":
    main()
