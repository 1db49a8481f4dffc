//! The DHCP server, black box: the real `kagami serve` inside a network namespace holding
//! bridges, each client in a namespace of its own on a veth pair, and real clients — busybox
//! `udhcpc` for full mode, and a PXE/iPXE client built by hand in Python (`dhcp_client.py`)
//! for what udhcpc cannot send (option 93, vendor and user classes, port 4011).
//!
//! Needs root (namespaces), iproute2, busybox and python3 (scripts/test installs them).
//! Every namespace, and so every link, is removed and every process killed by PID when a test
//! ends, also when it fails ([`Lab`]'s `Drop`).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use common::{Server, kagami};

static LABS: AtomicUsize = AtomicUsize::new(0);

/// Bridges `br0` (10.77.0.1/24, the provisioning network) and `br1` (10.78.0.1/24, another
/// network the server must not answer on) in the server's namespace; client `i` in its own
/// namespace, its `eth0` on one of them.
struct Lab {
    server_ns: String,
    clients: Vec<(String, String)>,
    namespaces: Vec<String>,
    children: Vec<Child>,
    server: Option<Server>,
    tmp: tempfile::TempDir,
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn ip(args: &[&str]) {
    run(Command::new("ip").args(args));
}

impl Lab {
    /// `bridges[i]` is the bridge client `i` is plugged into.
    fn new(bridges: &[&str]) -> Lab {
        let n = LABS.fetch_add(1, Ordering::SeqCst);
        let tag = format!("kgd{}-{n}", std::process::id());
        let mut lab = Lab {
            server_ns: format!("{tag}-s"),
            clients: Vec::new(),
            namespaces: Vec::new(),
            children: Vec::new(),
            server: None,
            tmp: tempfile::tempdir().expect("tmp"),
        };
        let srv = lab.server_ns.clone();
        lab.add_ns(&srv);
        ip(&["-n", &srv, "link", "set", "lo", "up"]);
        for (br, net) in [("br0", "10.77.0.1/24"), ("br1", "10.78.0.1/24")] {
            ip(&["-n", &srv, "link", "add", br, "type", "bridge"]);
            ip(&["-n", &srv, "addr", "add", net, "dev", br]);
            ip(&["-n", &srv, "link", "set", br, "up"]);
        }
        for (i, br) in bridges.iter().enumerate() {
            let ns = format!("{tag}-c{i}");
            lab.add_ns(&ns);
            let port = format!("vc{i}");
            let mac = format!("52:54:00:77:{n:02x}:{i:02x}");
            ip(&[
                "-n", &srv, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ]);
            ip(&["-n", &srv, "link", "set", &port, "master", br, "up"]);
            ip(&["-n", &ns, "link", "set", "eth0", "address", &mac, "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            lab.clients.push((ns, mac));
        }
        lab
    }

    fn add_ns(&mut self, name: &str) {
        ip(&["netns", "add", name]);
        self.namespaces.push(name.to_string());
    }

    fn start(&mut self, args: &[&str]) -> &mut Server {
        let mut all = vec!["--dhcp-interface", "br0"];
        all.extend(args);
        self.server = Some(Server::start_in(Some(&self.server_ns), &[], &all));
        self.server.as_mut().expect("server")
    }

    fn server(&mut self) -> &mut Server {
        self.server.as_mut().expect("started")
    }

    fn http_port(&self) -> u16 {
        self.server.as_ref().expect("started").port
    }

    /// A command run in client `i`'s namespace.
    fn in_client(&self, i: usize, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.clients[i].0, program]);
        cmd
    }

    /// One exchange of the hand-built PXE client; its answers.
    fn pxe(&self, i: usize, args: &[&str]) -> Vec<Value> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dhcp_client.py");
        let out = run(self
            .in_client(i, "python3")
            .arg(script)
            .args([
                "--iface",
                "eth0",
                "--mac",
                &self.clients[i].1,
                "--timeout",
                "1",
            ])
            .args(args));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect()
    }

    /// A udhcpc script that logs each event and configures the address (so renewals, which
    /// are unicast from it, can be sent).
    fn udhcpc_script(&self) -> PathBuf {
        let path = self.tmp.path().join("udhcpc.sh");
        if !path.exists() {
            std::fs::write(
                &path,
                "#!/bin/sh\n\
                 echo \"$1 ip=$ip subnet=$subnet router=$router dns=$dns siaddr=$siaddr\" >> \"$LOG\"\n\
                 case \"$1\" in\n\
                 bound|renew) ip addr flush dev \"$interface\"; ip addr add \"$ip/$subnet\" dev \"$interface\";;\n\
                 deconfig) ip addr flush dev \"$interface\";;\n\
                 esac\n",
            )
            .expect("script");
            run(Command::new("chmod").arg("+x").arg(&path));
        }
        path
    }

    fn udhcpc_log(&self, i: usize) -> PathBuf {
        self.tmp.path().join(format!("udhcpc{i}.log"))
    }

    /// udhcpc in client `i`: gets a lease and quits; the `bound` line it logged.
    fn udhcpc_once(&self, i: usize) -> String {
        let log = self.udhcpc_log(i);
        let _ = std::fs::remove_file(&log);
        let out = self
            .in_client(i, "env")
            .arg(format!("LOG={}", log.display()))
            .args([
                "busybox", "udhcpc", "-f", "-q", "-n", "-i", "eth0", "-t", "4", "-T", "1", "-s",
            ])
            .arg(self.udhcpc_script())
            .output()
            .expect("udhcpc");
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(
            out.status.success(),
            "udhcpc got no lease: {}\n{text}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.server
                .as_ref()
                .map(|s| s.log_text())
                .unwrap_or_default()
        );
        text.lines()
            .find(|l| l.starts_with("bound "))
            .unwrap_or_else(|| panic!("no bound event: {text}"))
            .to_string()
    }

    /// udhcpc in client `i`, staying in the foreground (renewals on SIGUSR1); its PID.
    fn udhcpc_daemon(&mut self, i: usize) -> u32 {
        let log = self.udhcpc_log(i);
        let _ = std::fs::remove_file(&log);
        let child = self
            .in_client(i, "env")
            .arg(format!("LOG={}", log.display()))
            .args([
                "busybox", "udhcpc", "-f", "-i", "eth0", "-t", "4", "-T", "1", "-s",
            ])
            .arg(self.udhcpc_script())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("udhcpc");
        let pid = child.id();
        self.children.push(child);
        pid
    }

    /// Waits until client `i`'s log has `count` lines starting with `event`; the last.
    fn wait_event(&self, i: usize, event: &str, count: usize) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let text = std::fs::read_to_string(self.udhcpc_log(i)).unwrap_or_default();
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with(&format!("{event} ")))
                .collect();
            if lines.len() >= count {
                return lines[lines.len() - 1].to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no {event} #{count} from udhcpc: {text}\nserver log:\n{}",
                self.server
                    .as_ref()
                    .map(|s| s.log_text())
                    .unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        drop(self.server.take());
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// The `ip=` of a udhcpc event line.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split(' ')
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in {line}"))
}

fn in_range(ip: &str) -> bool {
    let last: u8 = ip
        .strip_prefix("10.77.0.")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    (100..=110).contains(&last)
}

#[test]
fn full_mode_leases_addresses_to_udhcpc_and_keeps_them_across_a_restart() {
    let mut lab = Lab::new(&["br0", "br0", "br0", "br0"]);
    let config = lab.tmp.path().join("kagami.toml");
    std::fs::write(
        &config,
        "[dhcp]\nrouter = \"10.77.0.254\"\ndns = [\"10.77.0.53\", \"10.77.0.54\"]\n",
    )
    .expect("config");
    lab.start(&[
        "--dhcp-mode",
        "full",
        "--dhcp-range",
        "10.77.0.100,10.77.0.110",
        "--config",
        config.to_str().expect("utf-8"),
    ]);

    let first = lab.udhcpc_once(0);
    let a = field(&first, "ip").to_string();
    assert!(in_range(&a), "{first}");
    assert_eq!(field(&first, "subnet"), "255.255.255.0");
    assert_eq!(field(&first, "router"), "10.77.0.254");
    assert!(first.contains("dns=10.77.0.53 10.77.0.54"), "{first}");
    // The same MAC again: the same address.
    assert_eq!(field(&lab.udhcpc_once(0), "ip"), a);
    // Another MAC: another address.
    let b = field(&lab.udhcpc_once(1), "ip").to_string();
    assert!(in_range(&b) && b != a, "{a} {b}");

    // A renewal (unicast REQUEST from the bound address) keeps the address.
    let pid = lab.udhcpc_daemon(0).to_string();
    assert_eq!(field(&lab.wait_event(0, "bound", 1), "ip"), a);
    run(Command::new("kill").args(["-USR1", &pid]));
    assert_eq!(field(&lab.wait_event(0, "renew", 1), "ip"), a);

    // A PXE client on full mode: an address and its boot file in one answer.
    let offers = lab.pxe(
        3,
        &[
            "--arch",
            "7",
            "--vendor",
            "PXEClient:Arch:00007:UNDI:003016",
        ],
    );
    assert_eq!(offers.len(), 1, "{offers:?}");
    let pxe_addr = offers[0]["yiaddr"].as_str().expect("yiaddr");
    assert!(
        in_range(pxe_addr) && pxe_addr != a && pxe_addr != b,
        "{offers:?}"
    );
    assert_eq!(offers[0]["file"], "ipxe.efi");
    assert_eq!(offers[0]["siaddr"], "10.77.0.1");

    // Leases live in the catalog: after a restart (SIGKILL), the renewal is acknowledged, the
    // other client gets its address back, and a new client gets neither.
    lab.server().restart();
    run(Command::new("kill").args(["-USR1", &pid]));
    assert_eq!(field(&lab.wait_event(0, "renew", 2), "ip"), a);
    assert_eq!(field(&lab.udhcpc_once(1), "ip"), b);
    let c = field(&lab.udhcpc_once(2), "ip").to_string();
    assert!(in_range(&c) && c != a && c != b, "{a} {b} {c}");
}

/// ISC dhclient, the other client a site's machines run: a lease from the range, with the
/// server's identifier, in its lease file.
#[test]
fn full_mode_leases_an_address_to_isc_dhclient() {
    let mut lab = Lab::new(&["br0"]);
    lab.start(&[
        "--dhcp-mode",
        "full",
        "--dhcp-range",
        "10.77.0.100,10.77.0.110",
    ]);
    let leases = lab.tmp.path().join("dhclient.leases");
    let pidfile = lab.tmp.path().join("dhclient.pid");
    // In the foreground (-d), as the lab's child: killed by PID however the test ends.
    let child = lab
        .in_client(0, "dhclient")
        .args(["-d", "-v", "-sf", "/bin/true", "-lf"])
        .arg(&leases)
        .arg("-pf")
        .arg(&pidfile)
        .arg("eth0")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("dhclient (scripts/test installs isc-dhcp-client)");
    lab.children.push(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    let lease = loop {
        let text = std::fs::read_to_string(&leases).unwrap_or_default();
        if text.contains("fixed-address") {
            break text;
        }
        assert!(Instant::now() < deadline, "no lease:\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let addr = lease
        .lines()
        .find_map(|l| l.trim().strip_prefix("fixed-address "))
        .map(|a| a.trim_end_matches(';'))
        .expect("fixed-address");
    assert!(in_range(addr), "{lease}");
    assert!(
        lease.contains("option dhcp-server-identifier 10.77.0.1;"),
        "{lease}"
    );
    assert!(
        lease.contains("option subnet-mask 255.255.255.0;"),
        "{lease}"
    );
}

#[test]
fn proxy_mode_answers_pxe_clients_with_their_boot_file_and_no_address() {
    let mut lab = Lab::new(&["br0", "br1"]);
    // The site's DHCP server gave the client its address.
    ip(&[
        "-n",
        &lab.clients[0].0.clone(),
        "addr",
        "add",
        "10.77.0.50/24",
        "dev",
        "eth0",
    ]);
    ip(&[
        "-n",
        &lab.clients[1].0.clone(),
        "addr",
        "add",
        "10.78.0.50/24",
        "dev",
        "eth0",
    ]);
    let config = lab.tmp.path().join("kagami.toml");
    std::fs::write(&config, "[dhcp]\nrouter_advertisements = true\n").expect("config");
    lab.start(&[
        "--dhcp-mode",
        "proxy",
        "--config",
        config.to_str().expect("utf-8"),
    ]);
    let base = format!("http://10.77.0.1:{}", lab.http_port());
    let pxe = "PXEClient:Arch:00000:UNDI:002001";

    let cases: [(&[&str], &str, &str); 6] = [
        (
            &["--arch", "0", "--vendor", pxe],
            "undionly.kpxe",
            "PXEClient",
        ),
        (&["--vendor", pxe], "undionly.kpxe", "PXEClient"),
        (&["--arch", "7", "--vendor", pxe], "ipxe.efi", "PXEClient"),
        (&["--arch", "9", "--vendor", pxe], "ipxe.efi", "PXEClient"),
        (
            &[
                "--arch",
                "16",
                "--vendor",
                "HTTPClient:Arch:00016:UNDI:003001",
            ],
            &format!("{base}/boot/files/ipxe.efi"),
            "HTTPClient",
        ),
        (
            &["--arch", "0", "--vendor", pxe, "--user-class", "iPXE"],
            &format!("{base}/boot/ipxe?mac=${{net0/mac}}"),
            "PXEClient",
        ),
    ];
    for (args, file, vendor) in cases {
        let answers = lab.pxe(0, args);
        assert_eq!(answers.len(), 1, "{args:?}: {answers:?}");
        let offer = &answers[0];
        assert_eq!(offer["type"], 2, "an OFFER: {offer}");
        assert_eq!(
            offer["yiaddr"], "0.0.0.0",
            "no address in proxy mode: {offer}"
        );
        assert_eq!(offer["siaddr"], "10.77.0.1", "{offer}");
        assert_eq!(offer["file"], file, "{args:?}");
        assert_eq!(offer["bootfile"], file, "{args:?}");
        assert_eq!(offer["vendor"], vendor, "{args:?}");
        assert!(
            offer["options"].get("51").is_none(),
            "no lease time: {offer}"
        );
    }

    // Port 4011: the PXE client asks the proxy directly, from its address, and is ACKed.
    let acks = lab.pxe(
        0,
        &[
            "--kind",
            "request",
            "--to",
            "10.77.0.1",
            "--port",
            "4011",
            "--ciaddr",
            "10.77.0.50",
            "--arch",
            "7",
            "--vendor",
            pxe,
        ],
    );
    assert_eq!(acks.len(), 1, "{acks:?}");
    assert_eq!(acks[0]["type"], 5, "an ACK: {}", acks[0]);
    assert_eq!(acks[0]["file"], "ipxe.efi");
    assert_eq!(acks[0]["yiaddr"], "0.0.0.0");
    assert_eq!(acks[0]["ciaddr"], "10.77.0.50");

    // Nothing for a client that is not booting from the network, nor for an architecture
    // without a boot file, nor for anyone on another interface.
    assert_eq!(lab.pxe(0, &[]), Vec::<Value>::new());
    assert_eq!(
        lab.pxe(0, &["--vendor", "udhcp 1.35.0"]),
        Vec::<Value>::new()
    );
    assert_eq!(
        lab.pxe(0, &["--arch", "11", "--vendor", pxe]),
        Vec::<Value>::new()
    );
    assert_eq!(
        lab.pxe(1, &["--arch", "0", "--vendor", pxe]),
        Vec::<Value>::new()
    );
    let log = lab.server().log_text();
    assert!(
        log.contains("no boot file for this client architecture"),
        "{log}"
    );

    // Router advertisements (router lifetime 0) reach the provisioning network: one answers
    // a router solicitation at once.
    let listen = "import socket\n\
        s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)\n\
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b'eth0')\n\
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)\n\
        s.settimeout(5)\n\
        idx = socket.if_nametoindex('eth0')\n\
        s.sendto(bytes([133, 0, 0, 0, 0, 0, 0, 0]), ('ff02::2', 0, 0, idx))\n\
        while True:\n\
        \x20   data, addr = s.recvfrom(1500)\n\
        \x20   if data[0] == 134:\n\
        \x20       print(data[:16].hex(), addr[0]); break\n";
    let out = run(lab.in_client(0, "python3").args(["-c", listen]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("8600") && text.get(8..16) == Some("40000000"),
        "an advertisement, router lifetime 0: {text}"
    );
    assert!(
        text.contains(" fe80::"),
        "from a link-local address: {text}"
    );
}

#[test]
fn bad_dhcp_settings_stop_start_up_with_the_reason() {
    let dir = tempfile::tempdir().expect("tmp");
    for (args, reason) in [
        (
            &["--dhcp-mode", "full", "--dhcp-interface", "lo"][..],
            "dhcp.range",
        ),
        (&["--dhcp-mode", "proxy"][..], "dhcp.interface"),
        (
            &["--dhcp-mode", "proxy", "--dhcp-interface", "nosuch0"][..],
            "does not exist",
        ),
        (
            &[
                "--dhcp-mode",
                "full",
                "--dhcp-interface",
                "lo",
                "--dhcp-range",
                "10.0.0.9,10.0.0.1",
            ][..],
            "FIRST,LAST",
        ),
        (
            &[
                "--dhcp-mode",
                "full",
                "--dhcp-interface",
                "lo",
                "--dhcp-range",
                "10.0.0.1,10.0.0.9",
            ][..],
            "not inside lo's subnet",
        ),
    ] {
        let out = Command::new(kagami())
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(args)
            .output()
            .expect("kagami serve");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started");
        assert!(err.contains(reason), "{args:?}: {err}");
    }
}

#[test]
fn uefi_http_boot_fetches_the_efi_file_over_http_and_nothing_else() {
    let boot = tempfile::tempdir().expect("tmp");
    common::write_file(&boot.path().join("ipxe.efi"), &common::noise(5, 3000));
    common::write_file(&boot.path().join("secret.bin"), b"not a boot file");
    let server =
        Server::start_with_args(&[], &["--boot-dir", boot.path().to_str().expect("utf-8")]);
    let r = server.curl(None, "GET", "/boot/files/ipxe.efi", &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.body, common::noise(5, 3000));
    for path in [
        "/boot/files/secret.bin",
        "/boot/files/..%2Fsecret.bin",
        "/boot/files/undionly.kpxe",
    ] {
        assert_eq!(server.curl(None, "GET", path, &[]).status, 404, "{path}");
    }
}

#[test]
fn proxy_mode_coexists_with_the_sites_dhcp_server_on_the_same_network() {
    let mut lab = Lab::new(&["br0"]);
    // The site's DHCP server: busybox udhcpd, on the same bridge (even the same host: both
    // sockets share port 67 and each gets every broadcast).
    let conf = lab.tmp.path().join("udhcpd.conf");
    std::fs::write(
        &conf,
        format!(
            "start 10.77.0.150\nend 10.77.0.160\ninterface br0\nlease_file {}\npidfile {}\n\
             opt subnet 255.255.255.0\nopt router 10.77.0.1\n",
            lab.tmp.path().join("udhcpd.leases").display(),
            lab.tmp.path().join("udhcpd.pid").display(),
        ),
    )
    .expect("udhcpd.conf");
    std::fs::write(lab.tmp.path().join("udhcpd.leases"), b"").expect("leases");
    let udhcpd = Command::new("ip")
        .args(["netns", "exec", &lab.server_ns, "busybox", "udhcpd", "-f"])
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("udhcpd");
    lab.children.push(udhcpd);
    lab.start(&["--dhcp-mode", "proxy"]);

    // A PXE ROM's DISCOVER gets both offers: an address from the site, a boot file from Kagami.
    let deadline = Instant::now() + Duration::from_secs(10);
    let answers = loop {
        let answers = lab.pxe(
            0,
            &[
                "--arch",
                "0",
                "--vendor",
                "PXEClient:Arch:00000:UNDI:002001",
            ],
        );
        if answers.len() == 2 || Instant::now() > deadline {
            break answers;
        }
    };
    assert_eq!(answers.len(), 2, "{answers:?}");
    let (site, proxy): (Vec<&Value>, Vec<&Value>) =
        answers.iter().partition(|a| a["yiaddr"] != "0.0.0.0");
    assert_eq!((site.len(), proxy.len()), (1, 1), "{answers:?}");
    assert!(
        site[0]["yiaddr"]
            .as_str()
            .is_some_and(|a| a.starts_with("10.77.0.15") || a == "10.77.0.160"),
        "{answers:?}"
    );
    assert_eq!(proxy[0]["file"], "undionly.kpxe");
    assert_eq!(proxy[0]["vendor"], "PXEClient");
    assert_eq!(proxy[0]["siaddr"], "10.77.0.1");

    // A plain client gets its lease from the site's server; Kagami stays silent.
    let bound = lab.udhcpc_once(0);
    let ip = field(&bound, "ip");
    assert!(
        ip.starts_with("10.77.0.15") || ip == "10.77.0.160",
        "{bound}"
    );
}
