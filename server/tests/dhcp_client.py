#!/usr/bin/env python3
"""A PXE/iPXE DHCP client built by hand (no scapy): sends one DISCOVER or REQUEST the way a
PXE ROM, UEFI HTTP boot or iPXE does, and prints the answers as JSON lines.

Used by server/tests/dhcp.rs (run inside a client network namespace) and bench/dhcp.py.

  dhcp_client.py --iface IF --mac 52:54:00:00:00:01 [--kind discover|request] [--arch 0|7|16]
                 [--vendor PXEClient:Arch:00000:UNDI:002001] [--user-class iPXE]
                 [--to 255.255.255.255] [--port 67] [--ciaddr A] [--timeout 2]
"""

import argparse
import json
import os
import socket
import struct
import sys
import time

KINDS = {"discover": 1, "request": 3}


def packet(mac, xid, kind, arch=None, vendor=None, user_class=None, ciaddr="0.0.0.0",
           requested=None):
    chaddr = bytes.fromhex(mac.replace(":", ""))
    head = struct.pack(
        "!BBBBIHH4s4s4s4s16s64s128s4s",
        1, 1, 6, 0, xid, 0, 0x8000,  # broadcast flag, as PXE ROMs set it
        socket.inet_aton(ciaddr), bytes(4), bytes(4), bytes(4),
        chaddr, b"", b"", bytes([99, 130, 83, 99]))
    opts = bytes([53, 1, KINDS[kind]])
    if vendor:
        opts += bytes([60, len(vendor)]) + vendor.encode()
    if arch is not None:
        opts += bytes([93, 2]) + struct.pack("!H", arch)
        opts += bytes([94, 3, 1, 2, 1])
        opts += bytes([97, 17, 0]) + os.urandom(16)
    if user_class:
        opts += bytes([77, len(user_class)]) + user_class.encode()
    if requested:
        opts += bytes([50, 4]) + socket.inet_aton(requested)
    opts += bytes([55, 5, 1, 3, 43, 60, 67, 255])
    return head + opts


def decode(data):
    """The reply's fields and options (hex, and text where they are names)."""
    if len(data) < 240:
        return None
    xid, = struct.unpack("!I", data[4:8])
    out = {
        "op": data[0],
        "xid": xid,
        "chaddr": data[28:34].hex(":"),
        "ciaddr": socket.inet_ntoa(data[12:16]),
        "yiaddr": socket.inet_ntoa(data[16:20]),
        "siaddr": socket.inet_ntoa(data[20:24]),
        "file": data[108:236].split(b"\0")[0].decode(errors="replace"),
        "options": {},
    }
    i = 240
    while i < len(data) and data[i] != 255:
        if data[i] == 0:
            i += 1
            continue
        code, n = data[i], data[i + 1]
        value = data[i + 2:i + 2 + n]
        out["options"][str(code)] = value.hex()
        if code in (60, 67):
            out[{60: "vendor", 67: "bootfile"}[code]] = value.decode(errors="replace")
        if code == 53:
            out["type"] = value[0]
        i += 2 + n
    return out


def exchange(iface, mac, kind="discover", to="255.255.255.255", port=67, timeout=2.0,
             bind_port=68, first_only=False, **fields):
    """Sends one packet; returns (seconds to the first answer or None, [answers]): every
    answer within `timeout`, or only the first with `first_only`."""
    xid = struct.unpack("!I", os.urandom(4))[0]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, iface.encode())
    s.bind(("0.0.0.0", bind_port))
    start = time.monotonic()
    s.sendto(packet(mac, xid, kind, **fields), (to, port))
    answers, first = [], None
    deadline = start + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        s.settimeout(left)
        try:
            data, _ = s.recvfrom(2048)
        except socket.timeout:
            break
        reply = decode(data)
        if reply and reply["op"] == 2 and reply["xid"] == xid and reply["chaddr"] == mac.lower():
            if first is None:
                first = time.monotonic() - start
            answers.append(reply)
            if first_only:
                break
    s.close()
    return first, answers


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--iface", required=True)
    p.add_argument("--mac", required=True)
    p.add_argument("--kind", default="discover", choices=sorted(KINDS))
    p.add_argument("--arch", type=int)
    p.add_argument("--vendor")
    p.add_argument("--user-class")
    p.add_argument("--to", default="255.255.255.255")
    p.add_argument("--port", type=int, default=67)
    p.add_argument("--ciaddr", default="0.0.0.0")
    p.add_argument("--requested")
    p.add_argument("--timeout", type=float, default=2.0)
    p.add_argument("--latency", action="store_true",
                   help="stop at the first answer; end with {\"first_answer_s\": seconds or null}")
    a = p.parse_args()
    first, answers = exchange(a.iface, a.mac, a.kind, a.to, a.port, a.timeout,
                              first_only=a.latency, arch=a.arch,
                          vendor=a.vendor, user_class=a.user_class, ciaddr=a.ciaddr,
                          requested=a.requested)
    for reply in answers:
        print(json.dumps(reply))
    if a.latency:
        print(json.dumps({"first_answer_s": first}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
