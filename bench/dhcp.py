#!/usr/bin/env python3
"""Kagami's DHCP server against dnsmasq's, same namespaces, same client, same run.

    python3 bench/dhcp.py [--runs 5] [--samples 3] [--flood 2000] [--binary target/release/kagami]

Needs root (network namespaces) and dnsmasq (dnsmasq-base, installed with apt-get when
missing); builds the release `kagami` unless --binary is given. A server namespace holds a
bridge (10.79.0.1/24) with the server on it; the client (server/tests/dhcp_client.py, a PXE
client built by hand) runs in a namespace of its own on a veth pair. Each run starts each
server in turn (the order rotates), fresh, and measures:

  - full mode, first OFFER for a new MAC: seconds from DISCOVER to OFFER, SAMPLES new MACs
    (dnsmasq pings an address before offering it);
  - proxy mode, a PXE DISCOVER (arch 0) from a new MAC: seconds to the proxy OFFER;
  - proxy mode flood: FLOOD DISCOVERs from distinct MACs sent at once, OFFERs received per
    second (until 1 s passes without one).

Prints per-run figures, medians, and medians of the same-run ratios Kagami / dnsmasq (for
times, < 1 is faster; for the flood, > 1 is faster).
"""
import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIENT = os.path.join(ROOT, "server", "tests", "dhcp_client.py")
TAG = f"kgbd{os.getpid()}"
SRV, CLI = f"{TAG}-s", f"{TAG}-c"
PXE = "PXEClient:Arch:00000:UNDI:002001"


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def ensure_tools():
    if not shutil.which("dnsmasq") and not os.path.exists("/usr/sbin/dnsmasq"):
        run(["apt-get", "update", "-qq"])
        run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "dnsmasq-base"],
            env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))


def setup():
    for ns in (SRV, CLI):
        run(["ip", "netns", "add", ns])
    for cmd in (
        ["-n", SRV, "link", "set", "lo", "up"],
        ["-n", SRV, "link", "add", "br0", "type", "bridge"],
        ["-n", SRV, "addr", "add", "10.79.0.1/24", "dev", "br0"],
        ["-n", SRV, "link", "set", "br0", "up"],
        ["-n", SRV, "link", "add", "vc0", "type", "veth", "peer", "name", "eth0", "netns", CLI],
        ["-n", SRV, "link", "set", "vc0", "master", "br0", "up"],
        ["-n", CLI, "link", "set", "eth0", "up"],
        ["-n", CLI, "addr", "add", "10.79.0.2/24", "dev", "eth0"],
    ):
        run(["ip", *cmd])


def teardown():
    for ns in (CLI, SRV):
        subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)


def new_mac(i):
    return "02:" + ":".join(f"{b:02x}" for b in os.urandom(3)) + f":{i >> 8 & 255:02x}:{i & 255:02x}"


def first_offer(args):
    """Seconds from DISCOVER to the first answer, from the client namespace."""
    out = run(["ip", "netns", "exec", CLI, sys.executable, CLIENT, "--iface", "eth0",
               "--timeout", "10", "--latency", *args], capture_output=True, text=True).stdout
    first = json.loads(out.strip().splitlines()[-1])["first_answer_s"]
    if first is None:
        raise RuntimeError(f"no answer to {args}")
    return first


def flood(n):
    """Runs in the client namespace: n DISCOVERs from distinct MACs; offers per second."""
    sys.path.insert(0, os.path.dirname(CLIENT))
    import dhcp_client  # noqa: E402
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"eth0")
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    s.bind(("0.0.0.0", 68))
    macs = [new_mac(i) for i in range(n)]
    packets = [dhcp_client.packet(m, i + 1, "discover", arch=0, vendor=PXE) for i, m in enumerate(macs)]
    seen = set()
    start = time.monotonic()
    for p in packets:
        s.sendto(p, ("255.255.255.255", 67))
    last = start
    s.settimeout(1.0)
    while len(seen) < n:
        try:
            data, _ = s.recvfrom(2048)
        except socket.timeout:
            break
        reply = dhcp_client.decode(data)
        if reply and reply["op"] == 2 and 1 <= reply["xid"] <= n:
            seen.add(reply["xid"])
            last = time.monotonic()
    print(json.dumps({"offers": len(seen), "seconds": last - start}))


class Kagami:
    name = "kagami"

    def __init__(self, binary, mode, work):
        self.data = os.path.join(work, "kagami-data")
        self.cmd = ["ip", "netns", "exec", SRV, binary, "serve", "--listen", "127.0.0.1:8470",
                    "--data-dir", self.data, "--dhcp-interface", "br0",
                    "--dhcp-mode", mode]
        if mode == "full":
            self.cmd += ["--dhcp-range", "10.79.0.10,10.79.0.250"]
        self.log = os.path.join(work, "kagami.log")

    def start(self):
        shutil.rmtree(self.data, ignore_errors=True)
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL,
                                     stderr=open(self.log, "w"),
                                     env=dict(os.environ, RUST_LOG="warn,kagami=warn"))
        deadline = time.monotonic() + 30
        while "kagami: serving" not in open(self.log).read():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(open(self.log).read())
            time.sleep(0.05)

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


class Dnsmasq:
    name = "dnsmasq"

    def __init__(self, mode, work):
        leases = os.path.join(work, "dnsmasq.leases")
        self.leases = leases
        self.cmd = ["ip", "netns", "exec", SRV, "dnsmasq", "--no-daemon", "--port=0",
                    "--interface=br0", "--bind-interfaces", f"--dhcp-leasefile={leases}",
                    "--dhcp-boot=undionly.kpxe", "--pid-file=", "--conf-file=/dev/null"]
        if mode == "full":
            self.cmd += ["--dhcp-range=10.79.0.10,10.79.0.250,255.255.255.0,1h"]
        else:
            self.cmd += ["--dhcp-range=10.79.0.0,proxy", "--pxe-service=x86PC,Kagami,undionly"]

    def start(self):
        if os.path.exists(self.leases):
            os.remove(self.leases)
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.3)
        if self.proc.poll() is not None:
            raise RuntimeError(self.proc.stderr.read().decode())

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--flood", type=int, default=2000)
    ap.add_argument("--binary")
    ap.add_argument("--flood-client", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.flood_client:
        return flood(args.flood_client)
    if os.geteuid() != 0:
        sys.exit("bench/dhcp.py: needs root (network namespaces, port 67)")
    ensure_tools()
    binary = args.binary
    if not binary:
        run(["cargo", "build", "--release", "--locked", "--bin", "kagami"], cwd=ROOT)
        binary = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")),
                              "release", "kagami")
    work = tempfile.mkdtemp(prefix="kagami-bench-dhcp-")
    results = {}  # (metric, server) -> [per-run value]
    try:
        setup()
        for r in range(args.runs):
            servers = ["kagami", "dnsmasq"] if r % 2 == 0 else ["dnsmasq", "kagami"]
            for name in servers:
                for mode in ("full", "proxy"):
                    server = Kagami(binary, mode, work) if name == "kagami" else Dnsmasq(mode, work)
                    server.start()
                    try:
                        if mode == "full":
                            times = [first_offer(["--mac", new_mac(i)]) for i in range(args.samples)]
                            results.setdefault(("full first offer s", name), []).append(
                                statistics.median(times))
                        else:
                            times = [first_offer(["--mac", new_mac(i), "--arch", "0", "--vendor", PXE])
                                     for i in range(args.samples)]
                            results.setdefault(("proxy offer s", name), []).append(
                                statistics.median(times))
                            out = run(["ip", "netns", "exec", CLI, sys.executable, __file__,
                                       "--flood-client", str(args.flood)],
                                      capture_output=True, text=True).stdout
                            f = json.loads(out)
                            rate = f["offers"] / f["seconds"] if f["seconds"] > 0 else 0.0
                            results.setdefault(("proxy flood offers/s", name), []).append(rate)
                            results.setdefault(("proxy flood answered", name), []).append(
                                f["offers"] / args.flood)
                    finally:
                        server.stop()
            line = {f"{m} {s}": round(v[-1], 4) for (m, s), v in results.items()}
            print(f"run {r + 1}: {json.dumps(line)}", flush=True)
    finally:
        teardown()
        shutil.rmtree(work, ignore_errors=True)
    print()
    for metric in dict.fromkeys(m for m, _ in results):
        k, d = results[(metric, "kagami")], results[(metric, "dnsmasq")]
        ratios = [a / b for a, b in zip(k, d) if b]
        print(f"{metric}: kagami median {statistics.median(k):.4f}, dnsmasq median "
              f"{statistics.median(d):.4f}, same-run ratio kagami/dnsmasq median "
              f"{statistics.median(ratios) if ratios else float('nan'):.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
