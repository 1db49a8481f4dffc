//! A machine deployed over the network, end to end: a QEMU machine (TCG) with QEMU's iPXE
//! ROM boots from the network; its DHCP answer (QEMU's user-mode network, for now) points at
//! Kagami's `/boot/ipxe`; Kagami's script boots the agent ramdisk built by `kagami ramdisk
//! build`; the agent writes the assigned image onto the machine's disk, reports, and reboots;
//! the next script sends the machine to its disk, whose boot sector prints a marker on the
//! serial console. Nothing is mocked: the kernel is Debian's, the agent is ours.

#[path = "../../server/tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Server;

const MAC: &str = "52:54:00:4b:47:01";

/// The lab from `scripts/lab-setup`.
fn lab() -> PathBuf {
    let dir = std::env::var_os("KAGAMI_LAB_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/kagami/lab")
        });
    assert!(
        dir.join("kernel/vmlinuz").is_file(),
        "no lab kernel in {}: run scripts/lab-setup (scripts/test does)",
        dir.display()
    );
    dir
}

/// A 16 MiB disk whose boot sector prints `marker` on COM1 and halts, with some data and
/// holes behind it.
fn marker_disk(path: &Path, marker: &str) {
    // xor ax,ax; mov ds,ax; cld; mov si,0x7c16; mov dx,0x3f8;
    // next: lodsb; test al,al; jz done; out dx,al; jmp next; done: hlt; jmp done
    let mut sector = vec![
        0x31, 0xC0, 0x8E, 0xD8, 0xFC, 0xBE, 0x16, 0x7C, 0xBA, 0xF8, 0x03, 0xAC, 0x84, 0xC0, 0x74,
        0x03, 0xEE, 0xEB, 0xF8, 0xF4, 0xEB, 0xFD,
    ];
    sector.extend_from_slice(format!("\r\n{marker}\r\n\0").as_bytes());
    sector.resize(510, 0);
    sector.extend_from_slice(&[0x55, 0xAA]);
    let mut disk = vec![0u8; 16 << 20];
    disk[..512].copy_from_slice(&sector);
    disk[(5 << 20)..(6 << 20)].copy_from_slice(&common::noise(3, 1 << 20));
    std::fs::write(path, disk).expect("disk");
}

/// A QEMU machine, killed on drop.
struct Machine {
    child: Child,
    console: PathBuf,
}

impl Machine {
    fn boot(dir: &Path, disk: &Path, script_url: &str, name: &str) -> Machine {
        let console = dir.join(format!("{name}.log"));
        let log = std::fs::File::create(&console).expect("console log");
        let child = Command::new("qemu-system-x86_64")
            .args([
                "-accel",
                "tcg",
                "-m",
                "512",
                "-nographic",
                "-no-user-config",
            ])
            .args(["-netdev", &format!("user,id=n0,bootfile={script_url}")])
            .args([
                "-device",
                &format!("virtio-net-pci,netdev=n0,mac={MAC},bootindex=1"),
            ])
            .args([
                "-drive",
                &format!("file={},if=none,id=d0,format=raw", disk.display()),
            ])
            .args(["-device", "virtio-blk-pci,drive=d0,bootindex=2"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("qemu-system-x86_64 (scripts/lab-setup installs it)");
        Machine { child, console }
    }

    fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.console).unwrap_or_default()).into_owned()
    }

    /// Waits until the console shows `text`; panics with the console after `limit`.
    fn wait_for(&mut self, text: &str, limit: Duration) -> Duration {
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

#[test]
fn a_machine_boots_from_the_network_gets_its_image_and_boots_it() {
    let lab = lab();
    let s = Server::start();
    let dir = tempfile::tempdir().expect("tmp");
    let agent = common::kagami().with_file_name("kagami-agent");
    let ramdisk = s.data_dir().join("ramdisk");
    let out = s.cli(&[
        "ramdisk",
        "build",
        "--kernel",
        lab.join("kernel/vmlinuz").to_str().expect("path"),
        "--modules",
        lab.join("kernel/modules").to_str().expect("path"),
        "--out",
        ramdisk.to_str().expect("path"),
        "--agent",
        agent.to_str().expect("path"),
        "--module",
        "virtio_pci",
        "--module",
        "virtio_net",
        "--module",
        "virtio_blk",
    ]);
    assert!(out.contains("virtio_net"), "{out}");

    let marker = format!("KAGAMI-DEPLOYED-{}", std::process::id());
    let image_file = dir.path().join("marker.raw");
    marker_disk(&image_file, &marker);
    let image = s.import(&image_file, "marker");
    let id = image["id"].as_str().expect("id");
    s.cli(&["host", "add", MAC, "--name", "vm1"]);
    s.cli(&["host", "deploy", "vm1", "--image", id]);

    // The machine's own disk starts empty: only a deployment can make it print the marker.
    let disk = dir.path().join("disk.raw");
    std::fs::File::create(&disk)
        .expect("disk")
        .set_len(64 << 20)
        .expect("size");
    // QEMU's user network reaches the host's loopback at 10.0.2.2.
    let url = format!("http://10.0.2.2:{}/boot/ipxe", s.port);
    let mut vm = Machine::boot(dir.path(), &disk, &url, "first-boot");
    let limit = Duration::from_secs(240);
    let script = vm.wait_for("/boot/ramdisk/initrd.img", limit);
    let agent_up = vm.wait_for("inventory reported", limit);
    let written = vm.wait_for("written and reported", limit);
    let booted = vm.wait_for(&marker, limit);
    eprintln!(
        "PXE to the agent ramdisk: {script:?}; agent up: {agent_up:?}; image written: \
         {written:?}; booted from its disk: {booted:?}"
    );
    drop(vm);

    let h = s.cli_json(&["host", "show", "vm1"]);
    assert_eq!(h["state"], "deployed", "{h}");
    let d = &h["deployment"];
    assert_eq!(d["state"], "succeeded", "{d}");
    assert_eq!(d["disks"][0]["bytes_done"], 16 << 20);
    assert_eq!(h["inventory"]["disks"][0]["path"], "/dev/vda", "{h}");
    assert_eq!(
        h["inventory"]["nics"][0]["mac"], MAC,
        "the inventory names the NIC it booted from: {h}"
    );
    // The disk is the image, byte for byte (the rest of the larger disk stays zero).
    let image_bytes = std::fs::read(&image_file).expect("image");
    let written = std::fs::read(&disk).expect("disk");
    assert!(written[..16 << 20] == image_bytes[..]);

    // A reprovision: one block of the machine's disk drifts while it is off; a differential
    // deployment fetches and writes that block only, and the machine boots the image again.
    let mut drifted = written;
    drifted[(5 << 20) + 100] ^= 0xff;
    std::fs::write(&disk, &drifted).expect("drift");
    s.cli(&[
        "host",
        "deploy",
        "vm1",
        "--image",
        id,
        "--mode",
        "differential",
    ]);
    let mut vm = Machine::boot(dir.path(), &disk, &url, "second-boot");
    vm.wait_for("written and reported", limit);
    vm.wait_for(&marker, limit);
    let console = vm.console();
    drop(vm);
    assert!(
        console.contains("written: 1 blocks fetched, 65536 bytes written"),
        "only the drifted block travels:\n{console}"
    );
    let h = s.cli_json(&["host", "show", "vm1"]);
    assert_eq!(h["state"], "deployed", "{h}");
    assert_eq!(h["deployment"]["mode"], "differential");
    let rewritten = std::fs::read(&disk).expect("disk");
    assert!(
        rewritten[..16 << 20] == image_bytes[..],
        "the disk is the image again"
    );
}
