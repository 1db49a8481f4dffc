#!/usr/bin/env python3
"""Capturing a disk into an image, first and after a 1 % change, against hashing the device.

    python3 bench/capture.py [--runs 3] [--disk-gib 3] [--dir /var/tmp/kagami-bench-capture]

Needs root (losetup), openssl, dd, mke2fs, curl; builds the release binaries. The disk is
bench/formats.py's (MBR + ext4 of /usr/share) on a direct-I/O loop device. Each run, into a
fresh release `kagami serve`:
  - ceiling: `openssl dgst -sha256 LOOP` (one read and one hash of the whole device, 1 core);
  - first capture: `kagami-agent capture` (reads and hashes the disk, uploads every data block,
    re-reading their segments, commits the manifest);
  - 1 % of the data blocks changed on the device, then a second capture (uploads the changed
    blocks only).
Prints medians of same-run ratios (ceiling time / capture time: above 1 means faster) and the
uploaded bytes against the changed blocks' bytes.
"""
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from agent import BLOCK, Loop, damage, measured, prepare  # noqa: E402
from ingest import Server, run, timed  # noqa: E402


def capture(binary, srv, dev, name):
    return measured([binary, "capture", "--server", srv.url, "--token", srv.token, "--name", name,
                     "--disk", dev])


def main():
    args, target, raw, size, blocks = prepare(__doc__, "/var/tmp/kagami-bench-capture")
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
            row["changed"] = damage(loop.dev, blocks, 0.01, r)
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
    print(f"| agent CPU-s first / second | {med(lambda x: x['first_cpu']):.2f} / {med(lambda x: x['second_cpu']):.2f} | |")
    print(f"| agent peak RSS first / second (MiB) | {max(x['first_rss'] for x in rows):.0f} / {max(x['second_rss'] for x in rows):.0f} | |")


if __name__ == "__main__":
    main()
