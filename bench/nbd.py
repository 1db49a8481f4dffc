#!/usr/bin/env python3
"""nbdcopy from Kagami's NBD export against `nbdkit file` serving the same raw file.

    python3 bench/nbd.py [--runs 5] [--disk-gib 1.5] [--dir /var/tmp/kagami-bench-nbd]

Needs nbdkit, nbdcopy (libnbd-bin), mke2fs, curl; builds the release binaries. The disk is the
one bench/formats.py makes: MBR + ext4 full of real files (`mke2fs -d /usr/share`), a sparse raw
file. It is uploaded into a fresh release `kagami serve --nbd-listen` (every block verified on
each read, as configured by default) and served by `nbdkit --readonly file RAW` on another port;
both are read from the page cache (the raw file and the packs are read once first). Same run,
RUNS times, alternating which goes first:

  - to null:  `nbdcopy URL null:` — the serving path alone (nbdcopy asks both servers for
              base:allocation and reads only the data extents; multi-conn, 4 connections);
  - to file:  `nbdcopy URL FILE` — a copy onto the local file system, as an operator would.

Wall seconds, the server's CPU seconds (from /proc) and nbdcopy's (wait4). Prints medians and
the median of same-run ratios nbdkit time / Kagami time (above 1: Kagami is faster).
`KAGAMI__STORE__VERIFY_READS=false python3 bench/nbd.py` measures Kagami without re-hashing
blocks on read (what the verification costs; nbdkit checks nothing).
"""
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from agent import prepare  # noqa: E402
from ingest import Server, cpu_seconds, free_port, run, wait_port, warm, warm_tree  # noqa: E402


def copy(url, dest, server_pid):
    """nbdcopy URL DEST: (seconds, server CPU seconds, nbdcopy CPU seconds)."""
    if dest != "null:" and os.path.exists(dest):
        os.remove(dest)
    before = cpu_seconds(server_pid)
    t = time.monotonic()
    p = subprocess.Popen(["nbdcopy", url, dest])
    _, status, usage = os.wait4(p.pid, 0)
    secs = time.monotonic() - t
    if status != 0:
        raise SystemExit(f"nbdcopy {url} {dest} failed with status {status}")
    return secs, cpu_seconds(server_pid) - before, usage.ru_utime + usage.ru_stime


def main():
    args, target, raw, size, blocks = prepare(__doc__, "/var/tmp/kagami-bench-nbd")
    data = os.path.join(args.dir, "data")
    subprocess.run(["rm", "-rf", data])
    os.makedirs(data)
    kagami_port, nbdkit_port = free_port(), free_port()
    os.environ["KAGAMI__NBD__LISTEN"] = f"127.0.0.1:{kagami_port}"
    srv = Server(os.path.join(target, "kagami"), data)
    nbdkit = subprocess.Popen(["nbdkit", "--foreground", "--readonly", "--ipaddr", "127.0.0.1",
                               "--port", str(nbdkit_port), "file", raw])
    out = os.path.join(args.dir, "copy.raw")
    rows = []
    try:
        wait_port(nbdkit_port)
        image = srv.api("POST", "/v1/images", "-H", "content-type: application/json", "-d", '{"name":"os"}')
        run(["curl", "-sfS", "-o", "/dev/null", "-X", "PUT", "-T", raw, "-H",
             f"Authorization: Bearer {srv.token}", f"{srv.url}/v1/images/{image['id']}/file"])
        urls = {
            "kagami": (f"nbd://127.0.0.1:{kagami_port}/{image['id']}/{srv.token}", srv.proc.pid),
            "nbdkit": (f"nbd://127.0.0.1:{nbdkit_port}/", nbdkit.pid),
        }
        for r in range(args.runs):
            warm(raw)
            warm_tree(os.path.join(data, "packs"))
            row = {}
            order = ["kagami", "nbdkit"] if r % 2 == 0 else ["nbdkit", "kagami"]
            for dest_name, dest in [("null", "null:"), ("file", out)]:
                for who in order:
                    url, pid = urls[who]
                    secs, srv_cpu, cli_cpu = copy(url, dest, pid)
                    row[f"{who}_{dest_name}"] = secs
                    row[f"{who}_{dest_name}_srv_cpu"] = srv_cpu
                    row[f"{who}_{dest_name}_cli_cpu"] = cli_cpu
            run(["cmp", raw, out])  # the last copy (whichever went last) is the raw disk
            rows.append(row)
            print(f"run {r + 1}: " + ", ".join(f"{k}={v:.2f}" for k, v in row.items()), flush=True)
    finally:
        srv.stop()
        nbdkit.terminate()
        nbdkit.wait()

    med = lambda k: statistics.median(row[k] for row in rows)  # noqa: E731
    data_mib = len(blocks) * 64 / 1024
    print(f"\ndisk {size / (1 << 30):.2f} GiB, {data_mib:.0f} MiB of data blocks, {args.runs} runs, medians:")
    for dest in ["null", "file"]:
        ratio = statistics.median(row[f"nbdkit_{dest}"] / row[f"kagami_{dest}"] for row in rows)
        for who in ["kagami", "nbdkit"]:
            k = f"{who}_{dest}"
            print(f"  {who:7} -> {dest:5} {med(k):6.2f} s  {data_mib / med(k):6.0f} MiB/s of data  "
                  f"server CPU {med(k + '_srv_cpu'):5.2f} s  nbdcopy CPU {med(k + '_cli_cpu'):5.2f} s")
        print(f"  to {dest}: Kagami {ratio:.2f}x nbdkit (median of same-run nbdkit/Kagami time ratios)")


if __name__ == "__main__":
    main()
