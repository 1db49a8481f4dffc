#!/usr/bin/env python3
"""Power-on to a deployed, booted machine: Kagami against dnsmasq + a plain HTTP server + `wget | dd`.

    python3 bench/pxe.py [--runs 3] [--image-mib 256] [--data-mib 64] [--dir /var/tmp/kagami-bench-pxe]

Needs root, scripts/lab-setup (QEMU, iPXE ROMs, busybox, a Debian kernel) and a debug or
release build (`--profile release` builds release). Both flows run in a network namespace of
their own holding a bridge (10.79.0.1/24) and one tap: the same QEMU machine (TCG, 512 MiB,
virtio NIC and disk, QEMU's iPXE ROM), the same Debian kernel with the same driver modules, and
router advertisements on the bridge for both (else iPXE waits 16 s for IPv6):

  - kagami: `kagami serve` with its own DHCP (full mode) on the bridge, the image imported,
    `kagami host deploy`; the machine's iPXE gets /boot/ipxe from Kagami's DHCP, boots the agent
    ramdisk, the agent writes the disk (every block verified, holes punched), reports and
    reboots; the next DHCP answer has no boot file and the machine boots its disk.
  - peer:   dnsmasq (DHCP with an iPXE tag → the script URL, RA) and Python's http.server
    serving the raw image, kernel and a ramdisk whose init runs `wget -O - …/image.raw | dd
    of=/dev/vda bs=4M` then reboots (Kagami's ramdisk with a different /init appended, so kernel,
    modules and busybox are identical); a script that turns into `exit` once the write is done.

The image: IMAGE_MIB with DATA_MIB of random data in 1 MiB stretches, holes between, and a boot
sector that prints a marker on COM1. Time is taken from QEMU's start to each phase's first line
on the serial console. Medians of RUNS runs, and the same-run ratio peer / kagami. Kagami's own
view of the phases (`kagami host show`: ipxe, agent_up, write, reboot) is printed too.
"""
import argparse
import http.server
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ingest import ROOT, Server, free_port, run  # noqa: E402

MAC = "52:54:00:4b:47:02"
ADDR = "10.79.0.1"
MODULES = ["virtio_pci", "virtio_net", "virtio_blk"]
MARKER = "KAGAMI-BENCH-MARKER"
PEER_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
while read -r m; do insmod /lib/modules/$m; done < /etc/kagami/modules
ip link set lo up; ip link set eth0 up
udhcpc -i eth0 -n -q -t 5 -T 2 -s /etc/kagami/udhcpc.script >/dev/null 2>&1
echo "peer: writing"
wget -q -O - http://ADDR:PORT/image.raw | dd of=/dev/vda bs=4M 2>/dev/null
sync
wget -q -O /dev/null http://ADDR:PORT/done
echo "peer: written"
reboot -f
"""


def boot_sector():
    code = bytes([0x31, 0xC0, 0x8E, 0xD8, 0xFC, 0xBE, 0x16, 0x7C, 0xBA, 0xF8, 0x03, 0xAC, 0x84, 0xC0,
                  0x74, 0x03, 0xEE, 0xEB, 0xF8, 0xF4, 0xEB, 0xFD])
    sector = code + f"\r\n{MARKER}\r\n\0".encode()
    return sector + bytes(510 - len(sector)) + b"\x55\xaa"


def make_image(path, image_mib, data_mib):
    with open(path, "wb") as f:
        f.truncate(image_mib << 20)
        f.write(boot_sector())
        stride = max(2, image_mib // max(1, data_mib))
        for i in range(data_mib):
            f.seek(((1 + i * stride) % image_mib) << 20)
            f.write(os.urandom(1 << 20))


def newc(entries):
    """A newc cpio archive of (name, mode, data)."""
    out = bytearray()
    for ino, (name, mode, data) in enumerate(entries + [("TRAILER!!!", 0, b"")], 1):
        hdr = "070701" + "".join(f"{v:08x}" for v in
                                  (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0))
        out += hdr.encode() + name.encode() + b"\0"
        out += bytes((4 - len(out) % 4) % 4)
        out += data
        out += bytes((4 - len(out) % 4) % 4)
    return bytes(out)


class Machine:
    def __init__(self, disk, console):
        self.console = console
        self.start = time.monotonic()
        self.proc = subprocess.Popen(
            ["qemu-system-x86_64", "-accel", "tcg", "-m", "512", "-nographic", "-no-user-config",
             "-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no",
             "-device", f"virtio-net-pci,netdev=n0,mac={MAC},bootindex=1",
             "-drive", f"file={disk},if=none,id=d0,format=raw",
             "-device", "virtio-blk-pci,drive=d0,bootindex=2"],
            stdin=subprocess.DEVNULL, stdout=open(console, "wb"), stderr=subprocess.STDOUT)

    def phases(self, marks, limit=600):
        """Seconds from start until each text in `marks` first appears, in order."""
        found = {}
        while len(found) < len(marks):
            text = open(self.console, "rb").read().decode(errors="replace")
            for m in marks:
                if m not in found and m in text:
                    found[m] = time.monotonic() - self.start
            if time.monotonic() - self.start > limit or self.proc.poll() is not None:
                raise SystemExit(f"timed out waiting for {set(marks) - set(found)}; see {self.console}")
            time.sleep(0.1)
        self.proc.kill()
        self.proc.wait()
        return [found[m] for m in marks]


def kagami_run(binary, work, image, ramdisk_src, r):
    data = os.path.join(work, f"data{r}")
    shutil.rmtree(data, ignore_errors=True)
    os.makedirs(data)
    srv = Server(binary, data, host="0.0.0.0",
                 args=["--dhcp-mode", "full", "--dhcp-interface", "br0",
                       "--dhcp-range", "10.79.0.100,10.79.0.150"],
                 env={"KAGAMI__DHCP__ROUTER_ADVERTISEMENTS": "true"})
    try:
        shutil.copytree(ramdisk_src, os.path.join(data, "ramdisk"))
        env = dict(os.environ, KAGAMI_URL=srv.url, KAGAMI_TOKEN=srv.token)
        cli = lambda *a: run([binary, *a], env=env, capture_output=True, text=True).stdout  # noqa: E731
        img = json.loads(cli("image", "import", image, "--name", "bench", "--output", "json"))
        cli("host", "add", MAC)
        cli("host", "deploy", MAC, "--image", img["id"])
        disk = os.path.join(work, "disk.raw")
        with open(disk, "wb") as f:
            f.truncate(os.path.getsize(image) + (16 << 20))
        vm = Machine(disk, os.path.join(work, f"kagami{r}.log"))
        marks = vm.phases(["/boot/ramdisk/initrd.img", "inventory reported", "written and reported", MARKER])
        host = json.loads(cli("host", "show", MAC, "--output", "json"))
        return marks, host["deployment"]["phases"]
    finally:
        srv.stop()


def peer_run(work, image, ramdisk_src, r):
    port = free_port()
    served = os.path.join(work, "peer")
    shutil.rmtree(served, ignore_errors=True)
    os.makedirs(served)
    shutil.copy(os.path.join(ramdisk_src, "vmlinuz"), served)
    init = PEER_INIT.replace("PORT", str(port)).replace("ADDR", ADDR).encode()
    with open(os.path.join(served, "initrd.img"), "wb") as f:
        f.write(open(os.path.join(ramdisk_src, "initrd.img"), "rb").read())
        f.write(newc([("init", 0o100755, init)]))
    os.symlink(image, os.path.join(served, "image.raw"))
    state = {"done": False}

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=served, **kw)

        def do_GET(self):
            if self.path == "/done":
                state["done"] = True
                body = b"ok"
            elif self.path.startswith("/boot.ipxe"):
                body = (b"#!ipxe\nexit\n" if state["done"] else
                        f"#!ipxe\nkernel http://{ADDR}:{port}/vmlinuz initrd=initrd.img console=ttyS0\n"
                        f"initrd http://{ADDR}:{port}/initrd.img\nboot\n".encode())
            else:
                return super().do_GET()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer((ADDR, port), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    leases = os.path.join(work, "dnsmasq.leases")
    open(leases, "w").close()
    # DHCP for the bridge, iPXE clients (option 175) sent to the script, router advertisements.
    dnsmasq = subprocess.Popen(
        ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0", "--interface=br0",
         "--bind-interfaces", f"--dhcp-leasefile={leases}", "--dhcp-range=10.79.0.100,10.79.0.150,1h",
         "--dhcp-match=set:ipxe,175", f"--dhcp-boot=tag:ipxe,http://{ADDR}:{port}/boot.ipxe",
         "--enable-ra", "--dhcp-range=::,constructor:br0,ra-only"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        disk = os.path.join(work, "disk.raw")
        with open(disk, "wb") as f:
            f.truncate(os.path.getsize(image) + (16 << 20))
        vm = Machine(disk, os.path.join(work, f"peer{r}.log"))
        return vm.phases(["/initrd.img", "peer: writing", "peer: written", MARKER])
    finally:
        dnsmasq.terminate()
        dnsmasq.wait()
        httpd.shutdown()


def namespace(name):
    """A namespace with bridge br0 (ADDR/24 and an IPv6 prefix for the peer's RA) and tap0."""
    ip = lambda *a: run(["ip", *a])  # noqa: E731
    subprocess.run(["ip", "netns", "del", name], stderr=subprocess.DEVNULL)
    ip("netns", "add", name)
    ip("-n", name, "link", "set", "lo", "up")
    ip("-n", name, "link", "add", "br0", "type", "bridge")
    ip("-n", name, "addr", "add", f"{ADDR}/24", "dev", "br0")
    ip("-n", name, "addr", "add", "fd00:79::1/64", "dev", "br0")
    ip("-n", name, "link", "set", "br0", "up")
    ip("-n", name, "tuntap", "add", "dev", "tap0", "mode", "tap")
    ip("-n", name, "link", "set", "tap0", "master", "br0", "up")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--image-mib", type=int, default=256)
    ap.add_argument("--data-mib", type=int, default=64)
    ap.add_argument("--profile", default="dev", choices=["dev", "release"])
    ap.add_argument("--dir", default="/var/tmp/kagami-bench-pxe")
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    target = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")),
                          "debug" if args.profile == "dev" else "release")
    binary = os.path.join(target, "kagami")
    image = os.path.join(args.dir, "image.raw")
    ramdisk = os.path.join(args.dir, "ramdisk")
    if not args.inside:
        run(["cargo", "build", "--locked", "--profile", args.profile, "--bin", "kagami", "--bin", "kagami-agent"],
            cwd=ROOT)
        lab = os.environ.get("KAGAMI_LAB_DIR", os.path.expanduser("~/.cache/kagami/lab"))
        make_image(image, args.image_mib, args.data_mib)
        shutil.rmtree(ramdisk, ignore_errors=True)
        run([binary, "ramdisk", "build", "--kernel", f"{lab}/kernel/vmlinuz", "--modules",
             f"{lab}/kernel/modules", "--out", ramdisk, "--agent", os.path.join(target, "kagami-agent"),
             *sum((["--module", m] for m in MODULES), [])], capture_output=True)
        # The runs happen inside a namespace of their own (the servers bind to its bridge).
        ns = f"kgbench{os.getpid()}"
        namespace(ns)
        try:
            return subprocess.run(["ip", "netns", "exec", ns, sys.executable, os.path.abspath(__file__),
                                   "--inside", *sys.argv[1:]]).returncode
        finally:
            run(["ip", "netns", "del", ns])
    rows = []
    seen = []
    for r in range(args.runs):
        k, phases = kagami_run(binary, args.dir, image, ramdisk, r)
        p = peer_run(args.dir, image, ramdisk, r)
        rows.append((k, p))
        seen.append(phases)
        print(f"run {r + 1}: kagami {[round(x, 1) for x in k]}  peer {[round(x, 1) for x in p]}  "
              f"kagami's phases {phases}", file=sys.stderr)
    med = lambda f: statistics.median(f(row) for row in rows)  # noqa: E731
    names = ["PXE to ramdisk loaded", "agent/writer running", "disk written", "booted from the disk"]
    print(f"\n{args.runs} runs; image {args.image_mib} MiB with {args.data_mib} MiB of data; "
          f"seconds from QEMU start (TCG), medians.\n")
    print("| phase reached | Kagami s | peer (HTTP + wget \\| dd) s |")
    print("|---|---|---|")
    for i, n in enumerate(names):
        print(f"| {n} | {med(lambda row: row[0][i]):.1f} | {med(lambda row: row[1][i]):.1f} |")
    write_k = med(lambda row: row[0][2] - row[0][1])
    write_p = med(lambda row: row[1][2] - row[1][1])
    print(f"| writing the disk (phase length) | {write_k:.1f} | {write_p:.1f} |")
    print(f"\npower-on to booted image, peer / Kagami (same run, median): "
          f"**{med(lambda row: row[1][3] / row[0][3]):.2f}x**")
    names = ["power_on", "ipxe", "agent_up", "write", "reboot"]
    print("\nKagami's phases as `kagami host show` reports them (server clock, medians): " + ", ".join(
        f"{n} {statistics.median(p.get(n, float('nan')) for p in seen):.1f} s" for n in names))


if __name__ == "__main__":
    sys.exit(main())
