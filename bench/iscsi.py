#!/usr/bin/env python3
"""Sequential read over iSCSI: Kagami's target against `tgtd` serving the same raw file.

    python3 bench/iscsi.py [--runs 3] [--disk-gib 1.5] [--dir /var/tmp/kagami-bench-iscsi]

Needs tgt (tgtd, tgtadm), qemu-img with its iscsi driver (qemu-block-extra, from
scripts/lab-setup), mke2fs, curl; builds the release binaries. The disk is the one
bench/formats.py makes: MBR + ext4 full of real files (`mke2fs -d /usr/share`), a sparse raw
file. It is uploaded into a fresh release `kagami serve --iscsi-listen` (every block verified on
each read, as configured by default) and read with the CHAP credentials `kagami image
export-iscsi` prints; `tgtd -f --iscsi portal=127.0.0.1:PORT` serves the same raw file as LUN 1
of a target made with `tgtadm` (its own control port, so a tgtd of the tests is left alone). Both
are read from the page cache (the raw file and the packs are read once first). Same run, RUNS
times, alternating which goes first:

  - to null:  `qemu-img convert -n -f raw --target-image-opts URL driver=null-co,size=N` — the
              serving path alone (qemu-img reads every sector: neither target reports holes);
  - to file:  `qemu-img convert -f raw -O raw URL FILE` — a copy onto the local file system.

Wall seconds, the server's CPU seconds (from /proc) and qemu-img's (wait4). Prints medians and
the median of same-run ratios tgtd time / Kagami time (above 1: Kagami is faster).
`KAGAMI__STORE__VERIFY_READS=false python3 bench/iscsi.py` measures Kagami without re-hashing
blocks on read (what the verification costs; tgtd checks nothing).
"""
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from agent import prepare  # noqa: E402
from ingest import Server, cpu_seconds, free_port, run, wait_port, warm, warm_tree  # noqa: E402

TGT_IQN = "iqn.2026-11.io.kagami.bench:os"


def convert(url, dest, size, server_pid):
    """qemu-img convert URL to DEST (None: null-co): (seconds, server CPU s, qemu-img CPU s)."""
    if dest is None:
        cmd = ["qemu-img", "convert", "-n", "-f", "raw", "--target-image-opts", url,
               f"driver=null-co,size={size}"]
    else:
        if os.path.exists(dest):
            os.remove(dest)
        cmd = ["qemu-img", "convert", "-f", "raw", "-O", "raw", url, dest]
    before = cpu_seconds(server_pid)
    t = time.monotonic()
    p = subprocess.Popen(cmd)
    _, status, usage = os.wait4(p.pid, 0)
    secs = time.monotonic() - t
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with status {status}")
    return secs, cpu_seconds(server_pid) - before, usage.ru_utime + usage.ru_stime


def tgtadm(control, *args):
    run(["tgtadm", "-C", str(control), "--lld", "iscsi", *args])


def start_tgtd(raw, port, control):
    tgtd = subprocess.Popen(["tgtd", "-f", "-C", str(control), "--iscsi", f"portal=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    tgtadm(control, "--mode", "target", "--op", "new", "--tid", "1", "--targetname", TGT_IQN)
    tgtadm(control, "--mode", "logicalunit", "--op", "new", "--tid", "1", "--lun", "1",
           "--backing-store", raw)
    tgtadm(control, "--mode", "logicalunit", "--op", "update", "--tid", "1", "--lun", "1",
           "--params", "readonly=1")
    tgtadm(control, "--mode", "target", "--op", "bind", "--tid", "1", "--initiator-address", "ALL")
    return tgtd


def stop_tgtd(tgtd, control):
    subprocess.run(["tgtadm", "-C", str(control), "--lld", "iscsi", "--mode", "target", "--op",
                    "delete", "--force", "--tid", "1"], stderr=subprocess.DEVNULL)
    subprocess.run(["tgtadm", "-C", str(control), "--mode", "system", "--op", "delete"],
                   stderr=subprocess.DEVNULL)
    try:
        tgtd.wait(timeout=5)
    except subprocess.TimeoutExpired:
        tgtd.kill()
        tgtd.wait()


def main():
    args, target, raw, size, blocks = prepare(__doc__, "/var/tmp/kagami-bench-iscsi")
    data = os.path.join(args.dir, "data")
    subprocess.run(["rm", "-rf", data])
    os.makedirs(data)
    kagami_port, tgt_port = free_port(), free_port()
    control = 20000 + os.getpid() % 10000
    os.environ["KAGAMI__ISCSI__LISTEN"] = f"127.0.0.1:{kagami_port}"
    srv = Server(os.path.join(target, "kagami"), data)
    tgtd = start_tgtd(raw, tgt_port, control)
    out = os.path.join(args.dir, "copy.raw")
    rows = []
    try:
        image = srv.api("POST", "/v1/images", "-H", "content-type: application/json", "-d", '{"name":"os"}')
        run(["curl", "-sfS", "-o", "/dev/null", "-X", "PUT", "-T", raw, "-H",
             f"Authorization: Bearer {srv.token}", f"{srv.url}/v1/images/{image['id']}/file"])
        exported = run([os.path.join(target, "kagami"), "image", "export-iscsi", image["id"]],
                       env=dict(os.environ, KAGAMI_URL=srv.url, KAGAMI_TOKEN=srv.token),
                       capture_output=True, text=True).stdout
        kagami_url = next(line.split(": ", 1)[1] for line in exported.splitlines()
                          if line.startswith("libiscsi"))
        urls = {
            "kagami": (kagami_url, srv.proc.pid),
            "tgtd": (f"iscsi://127.0.0.1:{tgt_port}/{TGT_IQN}/1", tgtd.pid),
        }
        for r in range(args.runs):
            warm(raw)
            warm_tree(os.path.join(data, "packs"))
            row = {}
            order = ["kagami", "tgtd"] if r % 2 == 0 else ["tgtd", "kagami"]
            for dest_name, dest in [("null", None), ("file", out)]:
                for who in order:
                    url, pid = urls[who]
                    secs, srv_cpu, cli_cpu = convert(url, dest, size, pid)
                    row[f"{who}_{dest_name}"] = secs
                    row[f"{who}_{dest_name}_srv_cpu"] = srv_cpu
                    row[f"{who}_{dest_name}_cli_cpu"] = cli_cpu
                    if dest is not None:
                        run(["cmp", raw, out])  # each copy is the raw disk, byte for byte
            rows.append(row)
            print(f"run {r + 1}: " + ", ".join(f"{k}={v:.2f}" for k, v in row.items()), flush=True)
    finally:
        srv.stop()
        stop_tgtd(tgtd, control)

    med = lambda k: statistics.median(row[k] for row in rows)  # noqa: E731
    mib = size / (1 << 20)
    data_mib = len(blocks) * 64 / 1024
    print(f"\ndisk {size / (1 << 30):.2f} GiB, {data_mib:.0f} MiB of data blocks, {args.runs} runs, medians:")
    for dest in ["null", "file"]:
        ratio = statistics.median(row[f"tgtd_{dest}"] / row[f"kagami_{dest}"] for row in rows)
        for who in ["kagami", "tgtd"]:
            k = f"{who}_{dest}"
            print(f"  {who:7} -> {dest:5} {med(k):6.2f} s  {mib / med(k):6.0f} MiB/s of disk  "
                  f"server CPU {med(k + '_srv_cpu'):5.2f} s  qemu-img CPU {med(k + '_cli_cpu'):5.2f} s")
        print(f"  to {dest}: Kagami {ratio:.2f}x tgtd (median of same-run tgtd/Kagami time ratios)")


if __name__ == "__main__":
    main()
