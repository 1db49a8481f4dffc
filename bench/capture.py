#!/usr/bin/env python3
"""Capturing a disk into an image, first and after a 1 % change, against hashing the device.

    python3 bench/capture.py [--runs 3] [--disk-gib 3] [--dir /var/tmp/kagami-bench-capture]

Needs root (losetup), openssl, dd, mke2fs, curl; builds the release binaries. The disk is
bench/formats.py's (MBR + ext4 of /usr/share) on a direct-I/O loop device. Each run, into a
fresh release `kagami serve`:
  - ceiling: `openssl dgst -sha256 LOOP` (one read and one hash of the whole device, 1 core);
  - first capture: `kagami-agent capture` (reads and hashes the disk, uploads every data block,
    re-reading their segments, commits the manifest);
  - 1 % of the data changed, then a second capture (uploads the changed blocks only). With
    `--change blocks` (default) 16 bytes in 1 % of the data blocks; with `--change files` the
    ext4 filesystem is mounted and 1 % of its data rewritten as an upgrade would: whole files
    replaced by new content of the same size, a few appended to.
Prints medians of same-run ratios (ceiling time / capture time: above 1 means faster) and the
uploaded bytes against the changed blocks' bytes — and, for file changes, against the bytes
that changed at 4 KiB granularity, beside a qcow2 overlay of the same change
(`qemu-img convert -O qcow2 -B before`).
"""
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from agent import BLOCK, Loop, damage, measured, prepare  # noqa: E402
from ingest import Server, run, timed  # noqa: E402


def capture(binary, srv, dev, name):
    return measured([binary, "capture", "--server", srv.url, "--token", srv.token, "--name", name,
                     "--disk", dev])


PAGE = 4096
PART_START = 1 << 20


def change_files(dev, fraction, seed):
    """Mounts the disk's ext4 and rewrites `fraction` of its data the way an upgrade does: whole
    files replaced by new bytes of the same size (most), a few appended to."""
    rng = random.Random(seed)
    mnt = tempfile.mkdtemp(prefix="kagami-bench-mnt-")
    run(["mount", "-o", f"offset={PART_START}", dev, mnt])
    try:
        files = []
        for root, _, names in os.walk(mnt):
            for n in names:
                p = os.path.join(root, n)
                if os.path.isfile(p) and not os.path.islink(p):
                    files.append((p, os.path.getsize(p)))
        total = sum(s for _, s in files)
        rng.shuffle(files)
        budget = int(total * fraction)
        for i, (p, s) in enumerate(files):
            if budget <= 0:
                break
            if i % 10 == 9:
                with open(p, "ab") as f:
                    f.write(os.urandom(min(8192, budget)))
                budget -= 8192
            else:
                with open(p, "r+b") as f:
                    f.write(os.urandom(s))
                budget -= s
    finally:
        run(["umount", mnt])
        os.rmdir(mnt)
    run(["sync"])


def differences(before, after):
    """How two disks differ: (64 KiB blocks that differ, bytes that differ at 4 KiB granularity)."""
    blocks = pages = 0
    with open(before, "rb") as a, open(after, "rb") as b:
        while True:
            x, y = a.read(BLOCK), b.read(BLOCK)
            if not x and not y:
                return blocks, pages
            if x != y:
                blocks += 1
                pages += sum(PAGE for i in range(0, max(len(x), len(y)), PAGE)
                             if x[i:i + PAGE] != y[i:i + PAGE])


def overlay_bytes(before, after, work):
    """Bytes of a qcow2 overlay holding `after` over `before`: an empty overlay over `after`,
    rebased (safe mode) onto `before`, which copies in every cluster that differs."""
    out = os.path.join(work, "overlay.qcow2")
    if os.path.exists(out):
        os.remove(out)
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", after, out])
    run(["qemu-img", "rebase", "-q", "-f", "qcow2", "-F", "raw", "-b", before, out])
    info = json.loads(run(["qemu-img", "info", "--output", "json", out], capture_output=True).stdout)
    os.remove(out)
    return info["actual-size"]


def main():
    args, target, raw, size, blocks = prepare(__doc__, "/var/tmp/kagami-bench-capture",
                                              extra=[("--change", {"choices": ["blocks", "files"],
                                                                   "default": "blocks"})])
    agent = os.path.join(target, "kagami-agent")
    rows = []
    for r in range(args.runs):
        data = os.path.join(args.dir, "data")
        subprocess.run(["rm", "-rf", data])
        os.makedirs(data)
        srv = Server(os.path.join(target, "kagami"), data)
        loop = Loop(os.path.join(args.dir, "disk.img"), size)
        try:
            loop.close()
            if os.path.exists(loop.path):
                os.remove(loop.path)
            run(["cp", "--sparse=always", raw, loop.path])
            loop.dev = run(["losetup", "-f", "--show", "--direct-io=on", loop.path],
                           capture_output=True, text=True).stdout.strip()
            row = {"hash": timed(["openssl", "dgst", "-sha256", loop.dev], stdout=subprocess.DEVNULL)}
            row["first"], row["first_cpu"], row["first_rss"], first = capture(agent, srv, loop.dev, "first")
            if args.change == "files":
                change_files(loop.dev, 0.01, r)
                row["overlay"] = overlay_bytes(raw, loop.dev, args.dir)
            else:
                damage(loop.dev, blocks, 0.01, r)
            row["changed"], row["changed_4k"] = differences(raw, loop.dev)
            row["hash2"] = timed(["openssl", "dgst", "-sha256", loop.dev], stdout=subprocess.DEVNULL)
            row["second"], row["second_cpu"], row["second_rss"], second = capture(agent, srv, loop.dev, "second")
            row["uploaded"] = second["uploaded_bytes"]
            row["uploaded_blocks"] = second["uploaded_blocks"]
            rows.append(row)
            print(f"run {r + 1}: {row}", file=sys.stderr)
        finally:
            loop.close()
            srv.stop()
    med = lambda f: statistics.median(f(x) for x in rows)  # noqa: E731
    print(f"\n{args.runs} runs, {size / 2**30:g} GiB disk (ext4 of /usr/share, {len(blocks) * BLOCK / 2**20:.0f} MiB of data)\n")
    print("| measure | value | goal |")
    print("|---|---|---|")
    print(f"| openssl dgst -sha256 of the device (s) | {med(lambda x: x['hash']):.2f} | |")
    print(f"| first capture (s) | {med(lambda x: x['first']):.2f} | |")
    print(f"| first capture: hashing ceiling / capture | **{med(lambda x: x['hash'] / x['first']):.2f}x** | >= 0.8 |")
    print(f"| second capture after 1 % changed (s) | {med(lambda x: x['second']):.2f} | |")
    print(f"| second capture: hashing ceiling / capture | **{med(lambda x: x['hash2'] / x['second']):.2f}x** | >= 1.0 |")
    print(f"| blocks changed / uploaded | {med(lambda x: x['changed']):.0f} / {med(lambda x: x['uploaded_blocks']):.0f} | |")
    print(f"| uploaded bytes / changed blocks' bytes | **{med(lambda x: x['uploaded'] / (x['changed'] * BLOCK)):.3f}x** | <= 1.1 |")
    if args.change == "files":
        print(f"| bytes changed at 4 KiB granularity (MiB) | {med(lambda x: x['changed_4k']) / 2**20:.1f} | |")
        print(f"| uploaded bytes / bytes changed at 4 KiB | **{med(lambda x: x['uploaded'] / x['changed_4k']):.2f}x** | <= 8 |")
        print(f"| qcow2 overlay bytes / bytes changed at 4 KiB | {med(lambda x: x['overlay'] / x['changed_4k']):.2f}x | (peer) |")
    print(f"| agent CPU-s first / second | {med(lambda x: x['first_cpu']):.2f} / {med(lambda x: x['second_cpu']):.2f} | |")
    print(f"| agent peak RSS first / second (MiB) | {max(x['first_rss'] for x in rows):.0f} / {max(x['second_rss'] for x in rows):.0f} | |")


if __name__ == "__main__":
    main()
