//! Kagami's end-to-end tests live in `tests/tests/`: virtual machines (QEMU with TCG) boot from
//! the network against a real `kagami serve` and its agent ramdisk, as a rack's machines do.
//! `scripts/lab-setup` installs the lab (QEMU, iPXE ROMs and binaries, OVMF, busybox, GRUB's
//! EFI image, a Debian kernel).
//!
//! This library is the lab bench: a network namespace holding a bridge (the provisioning
//! network), `kagami serve` inside it answering DHCP and TFTP on that bridge, and QEMU machines
//! plugged into it through taps. Nothing leaves the namespace; everything the lab started is
//! killed by PID and the namespace (with its bridge and taps) deleted when it is dropped, also
//! when a test fails.

#[path = "../../server/tests/common/mod.rs"]
pub mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::Server;

/// The provisioning network inside every lab's namespace (each lab has its own namespace, so
/// labs running at once do not meet).
pub const SERVER_ADDR: &str = "10.79.0.1";

/// Debian's `ipxe` package: `undionly.kpxe` (BIOS) and `ipxe.efi` (UEFI). They are symlinks
/// out of this folder, which Kagami refuses to serve: each lab copies them into its boot folder.
pub const IPXE_DIR: &str = "/usr/lib/ipxe";

const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

static LABS: AtomicUsize = AtomicUsize::new(0);

/// The lab's downloads from `scripts/lab-setup`: the Debian kernel and its modules.
pub fn lab_dir() -> PathBuf {
    let dir = std::env::var_os("KAGAMI_LAB_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/kagami/lab")
        });
    for needed in [
        dir.join("kernel/vmlinuz"),
        Path::new(IPXE_DIR).join("ipxe.efi"),
    ] {
        assert!(
            needed.is_file(),
            "{} is missing: run scripts/lab-setup (scripts/test does)",
            needed.display()
        );
    }
    dir
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ip(args: &[&str]) {
    run(Command::new("ip").args(args));
}

/// The machine's firmware and how it boots from the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Firmware {
    /// SeaBIOS with QEMU's iPXE option ROM: DHCP (as iPXE) → the script over HTTP.
    Bios,
    /// OVMF with no option ROM: native UEFI PXE → DHCP → `ipxe.efi` over TFTP → iPXE → DHCP
    /// again → the script over HTTP.
    Uefi,
}

/// A namespace with bridge `br0` ([`SERVER_ADDR`]/24), `kagami serve` in it, and machines.
#[derive(Debug)]
pub struct Lab {
    pub ns: String,
    pub dir: tempfile::TempDir,
    server: Option<Server>,
    children: Vec<Child>,
    taps: std::cell::Cell<usize>,
}

impl Lab {
    /// A namespace with its bridge, and the server started in it with `args` (its DHCP and
    /// TFTP on the bridge) and `env` (`KAGAMI_LOG` in it replaces the lab's log filter).
    pub fn new(args: &[&str], env: &[(&str, &str)]) -> Lab {
        let n = LABS.fetch_add(1, Ordering::SeqCst);
        let mut lab = Lab {
            ns: format!("kge{}-{n}", std::process::id()),
            dir: tempfile::tempdir().expect("tmp"),
            server: None,
            children: Vec::new(),
            taps: Default::default(),
        };
        ip(&["netns", "add", &lab.ns]);
        let ns = lab.ns.clone();
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ip(&["-n", &ns, "link", "add", "br0", "type", "bridge"]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{SERVER_ADDR}/24"),
            "dev",
            "br0",
        ]);
        ip(&["-n", &ns, "link", "set", "br0", "up"]);
        let boot = lab.boot_dir();
        std::fs::create_dir(&boot).expect("boot dir");
        for file in ["undionly.kpxe", "ipxe.efi"] {
            std::fs::copy(Path::new(IPXE_DIR).join(file), boot.join(file)).expect("iPXE");
        }
        lab.start(args, env);
        lab
    }

    /// (Re)starts `kagami serve` in the namespace.
    pub fn start(&mut self, args: &[&str], env: &[(&str, &str)]) {
        drop(self.server.take());
        let tftp = format!("{SERVER_ADDR}:69");
        let boot = self.boot_dir();
        let mut all = vec![
            "--dhcp-interface",
            "br0",
            "--tftp-listen",
            &tftp,
            "--boot-dir",
            boot.to_str().expect("path"),
        ];
        all.extend(args);
        // Router advertisements spare iPXE its 16 s wait for IPv6 autoconfiguration.
        let mut env = env.to_vec();
        env.push(("KAGAMI__DHCP__ROUTER_ADVERTISEMENTS", "true"));
        if !env.iter().any(|(k, _)| *k == "KAGAMI_LOG") {
            env.push(("KAGAMI_LOG", "info,kagami::boot::dhcp=debug"));
        }
        self.server = Some(Server::start_in(Some(&self.ns), &env, &all));
    }

    /// The iPXE binaries the server hands out over TFTP.
    pub fn boot_dir(&self) -> PathBuf {
        self.dir.path().join("boot")
    }

    pub fn server(&self) -> &Server {
        self.server.as_ref().expect("started")
    }

    /// The base URL machines on the bridge use.
    pub fn url(&self) -> String {
        format!("http://{SERVER_ADDR}:{}", self.server().port)
    }

    /// Builds the agent ramdisk from the lab's Debian kernel into the server's ramdisk folder.
    pub fn build_ramdisk(&self) {
        let lab = lab_dir();
        let agent = common::kagami().with_file_name("kagami-agent");
        let out = self
            .server()
            .data_dir()
            .join("ramdisk")
            .to_str()
            .expect("path")
            .to_string();
        let kernel = lab.join("kernel/vmlinuz");
        let modules = lab.join("kernel/modules");
        let built = self.server().cli(&[
            "ramdisk",
            "build",
            "--kernel",
            kernel.to_str().expect("path"),
            "--modules",
            modules.to_str().expect("path"),
            "--out",
            &out,
            "--agent",
            agent.to_str().expect("path"),
            "--module",
            "virtio_pci",
            "--module",
            "virtio_net",
            "--module",
            "virtio_blk",
        ]);
        assert!(built.contains("virtio_net"), "{built}");
    }

    /// Runs `program` in the namespace until the lab ends (killed by PID then).
    pub fn spawn(&mut self, program: &str, args: &[&str]) {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns, program])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{program}: {e}"));
        self.children.push(child);
    }

    /// Powers on a machine with `disk` (raw) and MAC `mac`, its NIC on the bridge through a
    /// new tap; `name` names its console log.
    pub fn machine(&self, firmware: Firmware, disk: &Path, mac: &str, name: &str) -> Machine {
        let tap = format!("tap{}", self.taps.replace(self.taps.get() + 1));
        ip(&["-n", &self.ns, "tuntap", "add", "dev", &tap, "mode", "tap"]);
        ip(&["-n", &self.ns, "link", "set", &tap, "master", "br0", "up"]);
        let console = self.dir.path().join(format!("{name}.log"));
        let log = std::fs::File::create(&console).expect("console log");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, "qemu-system-x86_64"])
            .args([
                "-accel",
                "tcg",
                "-m",
                "512",
                "-nographic",
                "-no-user-config",
            ])
            .args([
                "-netdev",
                &format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
            ])
            .args([
                "-drive",
                &format!("file={},if=none,id=d0,format=raw", disk.display()),
            ])
            .args(["-device", "virtio-blk-pci,drive=d0,bootindex=2"]);
        match firmware {
            Firmware::Bios => {
                cmd.args(["-M", "pc"]).args([
                    "-device",
                    &format!("virtio-net-pci,netdev=n0,mac={mac},bootindex=1"),
                ]);
            }
            Firmware::Uefi => {
                let vars = self.dir.path().join(format!("{name}.vars.fd"));
                std::fs::copy(OVMF_VARS, &vars).expect("OVMF variables (scripts/lab-setup)");
                cmd.args(["-M", "q35"])
                    .args([
                        "-drive",
                        &format!("if=pflash,format=raw,readonly=on,file={OVMF_CODE}"),
                    ])
                    .args([
                        "-drive",
                        &format!("if=pflash,format=raw,file={}", vars.display()),
                    ])
                    // No option ROM: the firmware's own PXE fetches iPXE over TFTP.
                    .args([
                        "-device",
                        &format!("virtio-net-pci,netdev=n0,mac={mac},romfile=,bootindex=1"),
                    ]);
            }
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("qemu-system-x86_64 (scripts/lab-setup installs it)");
        Machine { child, console }
    }

    /// Waits until the server's log shows `text`; panics with the log after `limit`.
    pub fn wait_log(&self, text: &str, limit: Duration) {
        let start = Instant::now();
        while !self.server().log_text().contains(text) {
            assert!(
                start.elapsed() < limit,
                "no '{text}' in the server's log after {limit:?}:\n{}",
                self.server().log_text()
            );
            std::thread::sleep(Duration::from_millis(250));
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
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// A QEMU machine, killed on drop (`ip netns exec` execs QEMU: the PID is QEMU's).
#[derive(Debug)]
pub struct Machine {
    child: Child,
    console: PathBuf,
}

impl Machine {
    pub fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.console).unwrap_or_default()).into_owned()
    }

    /// Waits until the console shows `text`; panics with the console after `limit`.
    pub fn wait_for(&mut self, text: &str, limit: Duration) -> Duration {
        let start = Instant::now();
        loop {
            if self.console().contains(text) {
                return start.elapsed();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "QEMU exited ({status}) before '{text}':\n{}",
                    self.console()
                );
            }
            assert!(
                start.elapsed() < limit,
                "no '{text}' on the console after {limit:?}:\n{}",
                self.console()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Asserts that `texts` occur in `log` in this order.
pub fn in_order(log: &str, texts: &[&str]) {
    let mut from = 0;
    for text in texts {
        match log[from..].find(text) {
            Some(at) => from += at + text.len(),
            None => panic!(
                "'{text}' does not follow {:?} in:\n{log}",
                &texts[..texts.iter().position(|t| t == text).unwrap_or(0)]
            ),
        }
    }
}

/// Size of [`marker_disk`].
pub const DISK_BYTES: usize = 16 << 20;

/// Where [`marker_disk`] puts its noise: one MiB, unique to the seed.
pub const NOISE_AT: usize = 10 << 20;

/// A 16 MiB disk that prints `marker` on COM1 when booted, by BIOS or UEFI: an MBR whose boot
/// code prints it and halts, and whose one partition (type 0xEF, an EFI system partition at
/// 1 MiB) holds a FAT with GRUB as `\EFI\BOOT\BOOTX64.EFI`, its embedded configuration echoing
/// it. Behind the partition, 1 MiB of noise from `seed` and holes.
pub fn marker_disk(dir: &Path, path: &Path, marker: &str, seed: u64) {
    let work = tempfile::tempdir_in(dir).expect("tmp");
    let cfg = work.path().join("grub.cfg");
    std::fs::write(&cfg, format!("echo \"{marker}\"\nsleep 3600\n")).expect("grub.cfg");
    let efi = work.path().join("BOOTX64.EFI");
    run(Command::new("grub-mkstandalone")
        .args(["-O", "x86_64-efi", "-o"])
        .arg(&efi)
        .args([
            "--install-modules=echo sleep configfile normal",
            "--locales=",
            "--fonts=",
            "--themes=",
        ])
        .arg(format!("boot/grub/grub.cfg={}", cfg.display())));
    let esp = work.path().join("esp.img");
    run(Command::new("mkfs.vfat")
        .args(["-C", "-n", "KAGAMI"])
        .arg(&esp)
        .arg("8192"));
    let mtools = |program: &str, args: &[&str]| {
        run(Command::new(program)
            .env("MTOOLS_SKIP_CHECK", "1")
            .arg("-i")
            .arg(&esp)
            .args(args));
    };
    mtools("mmd", &["::/EFI", "::/EFI/BOOT"]);
    mtools(
        "mcopy",
        &[efi.to_str().expect("path"), "::/EFI/BOOT/BOOTX64.EFI"],
    );

    // xor ax,ax; mov ds,ax; cld; mov si,0x7c16; mov dx,0x3f8;
    // next: lodsb; test al,al; jz done; out dx,al; jmp next; done: hlt; jmp done
    let mut mbr = vec![
        0x31, 0xC0, 0x8E, 0xD8, 0xFC, 0xBE, 0x16, 0x7C, 0xBA, 0xF8, 0x03, 0xAC, 0x84, 0xC0, 0x74,
        0x03, 0xEE, 0xEB, 0xF8, 0xF4, 0xEB, 0xFD,
    ];
    mbr.extend_from_slice(format!("\r\n{marker}\r\n\0").as_bytes());
    assert!(mbr.len() <= 0x1BE, "marker too long for the boot sector");
    mbr.resize(0x1BE, 0);
    // Partition 1: not active, CHS unused (FE FF FF), type 0xEF, LBA 2048, 16384 sectors.
    mbr.extend_from_slice(&[0x00, 0xFE, 0xFF, 0xFF, 0xEF, 0xFE, 0xFF, 0xFF]);
    mbr.extend_from_slice(&2048u32.to_le_bytes());
    mbr.extend_from_slice(&16384u32.to_le_bytes());
    mbr.resize(510, 0);
    mbr.extend_from_slice(&[0x55, 0xAA]);

    let mut disk = vec![0u8; DISK_BYTES];
    disk[..512].copy_from_slice(&mbr);
    let fat = std::fs::read(&esp).expect("esp");
    disk[(1 << 20)..(1 << 20) + fat.len()].copy_from_slice(&fat);
    disk[NOISE_AT..NOISE_AT + (1 << 20)].copy_from_slice(&common::noise(seed, 1 << 20));
    std::fs::write(path, disk).expect("disk");
}

/// How many 64 KiB blocks of `data` hold something (what a full deployment fetches).
pub fn nonzero_blocks(data: &[u8]) -> usize {
    data.chunks(64 << 10)
        .filter(|b| b.iter().any(|&x| x != 0))
        .count()
}

/// An empty (sparse) disk of `bytes` for a machine.
pub fn empty_disk(path: &Path, bytes: u64) {
    std::fs::File::create(path)
        .expect("disk")
        .set_len(bytes)
        .expect("size");
}
