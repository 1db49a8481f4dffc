#!/usr/bin/env python3
"""Kagami's TFTP server against atftpd and dnsmasq's TFTP, same client, same run.

    python3 bench/tftp.py [--runs 5] [--mib 64] [--dir /var/tmp/kagami-bench-tftp] [--binary K]

Needs root (a private network namespace: dnsmasq's TFTP only listens on port 69), atftp,
atftpd and dnsmasq (installed with apt-get when missing); builds the release `kagami`. The three
servers serve the same folder on the namespace's loopback; the client is atftp (the only one of
curl, tftp-hpa, busybox and atftp that speaks windowsize). Each run fetches a random file of
MIB MiB from each server in turn (the order rotates), in two settings:

  - blksize 1468 (one block per ACK, RFC 2348),
  - blksize 1468 + windowsize 16 (RFC 7440; dnsmasq ignores windowsize and runs as above),

and the small file (1 MiB) in the second setting. Every copy is compared with the original.
Prints per-run seconds, median MiB/s, and medians of the same-run ratios Kagami / peer.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NS = f"kagami-bench-tftp-{os.getpid()}"
PORTS = {"kagami": 6969, "atftpd": 6970, "dnsmasq": 69}


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def in_ns(cmd):
    return ["ip", "netns", "exec", NS, *cmd]


def ensure_tools():
    missing = [pkg for tool, pkg in [("atftp", "atftp"), ("atftpd", "atftpd"), ("dnsmasq", "dnsmasq-base")]
               if not shutil.which(tool) and not os.path.exists(f"/usr/sbin/{tool}")]
    if missing:
        run(["apt-get", "update", "-qq"])
        run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
            env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))


def fetch(server, name, out, options):
    """Seconds for atftp to fetch NAME from SERVER with OPTIONS; checks the copy."""
    cmd = ["atftp", "-g", "-r", name, "-l", out]
    for o in options:
        cmd += ["--option", o]
    cmd += ["127.0.0.1", str(PORTS[server])]
    if os.path.exists(out):
        os.remove(out)
    t = time.perf_counter()
    run(in_ns(cmd), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--dir", default="/var/tmp/kagami-bench-tftp")
    ap.add_argument("--binary", help="a kagami binary to measure instead of building one")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/tftp.py: needs root (a network namespace, port 69 for dnsmasq)")
    ensure_tools()
    binary = args.binary
    if not binary:
        run(["cargo", "build", "--release", "--locked", "--bin", "kagami"], cwd=ROOT)
        binary = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")),
                              "release", "kagami")

    work = args.dir
    shutil.rmtree(work, ignore_errors=True)
    boot = os.path.join(work, "boot")
    os.makedirs(boot)
    os.chmod(work, 0o755)
    os.chmod(boot, 0o755)
    files = {"big.bin": args.mib << 20, "small.bin": 1 << 20}
    for name, size in files.items():
        with open(os.path.join(boot, name), "wb") as f:
            f.write(os.urandom(size))
        os.chmod(os.path.join(boot, name), 0o644)
    out = os.path.join("/dev/shm", f"kagami-bench-tftp-{os.getpid()}")

    procs = []
    run(["ip", "netns", "add", NS])
    try:
        run(["ip", "-n", NS, "link", "set", "lo", "up"])
        procs.append(subprocess.Popen(in_ns([
            binary, "serve", "--listen", "127.0.0.1:18470", "--data-dir", os.path.join(work, "data"),
            "--tftp-listen", f"127.0.0.1:{PORTS['kagami']}", "--boot-dir", boot]),
            env=dict(os.environ, KAGAMI_LOG="warn", KAGAMI__GC__INTERVAL_SECS="0"),
            stderr=subprocess.DEVNULL))
        procs.append(subprocess.Popen(in_ns([
            "atftpd", "--daemon", "--no-fork", "--port", str(PORTS["atftpd"]),
            "--bind-address", "127.0.0.1", "--logfile", "/dev/null", boot]),
            stderr=subprocess.DEVNULL))
        procs.append(subprocess.Popen(in_ns([
            "dnsmasq", "--keep-in-foreground", "--port=0", "--enable-tftp", f"--tftp-root={boot}",
            "--listen-address=127.0.0.1", "--bind-interfaces", "--user=root",
            "--pid-file=", "--log-facility=/dev/null", "--conf-file=/dev/null"]),
            stderr=subprocess.DEVNULL))
        time.sleep(1.0)
        versions = {
            "atftp": (lambda r: (r.stdout or r.stderr).split("\n")[0])(
                subprocess.run(["atftp", "--version"], capture_output=True, text=True)),
            "dnsmasq": subprocess.run(["dnsmasq", "--version"], capture_output=True, text=True).stdout.split("\n")[0],
        }
        print(f"# {versions['atftp']}; {versions['dnsmasq']}; {args.mib} MiB file, {args.runs} runs")

        settings = [
            ("big.bin", f"{args.mib} MiB, blksize 1468", ["blksize 1468"]),
            ("big.bin", f"{args.mib} MiB, blksize 1468 + windowsize 16", ["blksize 1468", "windowsize 16"]),
            ("small.bin", "1 MiB, blksize 1468 + windowsize 16", ["blksize 1468", "windowsize 16"]),
        ]
        servers = list(PORTS)
        times = {(s, label): [] for s in servers for _, label, _ in settings}
        for r in range(args.runs):
            order = servers[r % 3:] + servers[:r % 3]
            for name, label, options in settings:
                for server in order:
                    secs = fetch(server, name, out, options)
                    run(["cmp", "-s", out, os.path.join(boot, name)])
                    times[(server, label)].append(secs)
            for _, label, _ in settings:
                print(f"run {r + 1}, {label}: " + ", ".join(
                    f"{s} {times[(s, label)][-1]:.3f} s" for s in servers))

        print()
        print("| setting | Kagami | atftpd | dnsmasq | Kagami / atftpd | Kagami / dnsmasq |")
        print("|---|---|---|---|---|---|")
        for name, label, _ in settings:
            mib = files[name] / (1 << 20)
            rate = {s: statistics.median(mib / t for t in times[(s, label)]) for s in servers}
            ratio = {p: statistics.median(times[(p, label)][i] / times[("kagami", label)][i]
                                          for i in range(args.runs)) for p in ("atftpd", "dnsmasq")}
            print(f"| {label} | {rate['kagami']:.1f} MiB/s | {rate['atftpd']:.1f} MiB/s | "
                  f"{rate['dnsmasq']:.1f} MiB/s | **{ratio['atftpd']:.2f}×** | **{ratio['dnsmasq']:.2f}×** |")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        subprocess.run(["ip", "netns", "del", NS])
        if os.path.exists(out):
            os.remove(out)


if __name__ == "__main__":
    main()
