//! Machines deployed over the network, end to end, on a provisioning network of their own: a
//! namespace with a bridge, `kagami serve` on it answering DHCP (full or proxy), TFTP and HTTP,
//! and QEMU machines (TCG) plugged into the bridge through taps. A machine with an empty disk
//! powers on, boots from the network (BIOS: QEMU's iPXE ROM; UEFI: OVMF's own PXE, which
//! fetches `ipxe.efi` over Kagami's TFTP), gets the agent ramdisk built by `kagami ramdisk
//! build`; the agent writes the assigned image onto the disk, reports, and reboots; the next
//! script sends the machine to its disk, which prints the image's marker on the serial console.
//! Nothing is mocked: the firmware, iPXE and the kernel are Debian's, the agent is ours.

use std::time::Duration;

use kagami_e2e::common::Server;
use kagami_e2e::{
    DISK_BYTES, Firmware, Lab, NOISE_AT, SERVER_ADDR, empty_disk, in_order, marker_disk,
    nonzero_blocks,
};

const LIMIT: Duration = Duration::from_secs(300);

fn full_dhcp() -> [&'static str; 4] {
    [
        "--dhcp-mode",
        "full",
        "--dhcp-range",
        "10.79.0.100,10.79.0.150",
    ]
}

fn image_id(s: &Server, file: &std::path::Path, name: &str) -> String {
    s.import(file, name)["id"].as_str().expect("id").to_string()
}

fn host(s: &Server, name: &str) -> serde_json::Value {
    s.cli_json(&["host", "show", name])
}

/// Waits until the host's state is `state`.
fn wait_state(s: &Server, name: &str, state: &str) -> serde_json::Value {
    let start = std::time::Instant::now();
    loop {
        let h = host(s, name);
        if h["state"] == state {
            return h;
        }
        assert!(start.elapsed() < LIMIT, "host never {state}: {h}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn a_bios_machine_gets_its_lease_and_image_from_kagami_and_boots_it() {
    let lab = Lab::new(&full_dhcp(), &[]);
    lab.build_ramdisk();
    let marker = format!("KAGAMI-BIOS-{}", std::process::id());
    let image_file = lab.dir.path().join("marker.raw");
    marker_disk(lab.dir.path(), &image_file, &marker, 3);
    let s = lab.server();
    let id = image_id(s, &image_file, "marker");
    s.cli(&["host", "add", "52:54:00:4b:47:01", "--name", "vm1"]);
    s.cli(&["host", "deploy", "vm1", "--image", &id]);

    // The machine's own disk starts empty: only a deployment can make it print the marker.
    let disk = lab.dir.path().join("disk.raw");
    empty_disk(&disk, 64 << 20);
    let mut vm = lab.machine(Firmware::Bios, &disk, "52:54:00:4b:47:01", "bios-first");
    let script = vm.wait_for("/boot/ramdisk/initrd.img", LIMIT);
    let agent_up = vm.wait_for("inventory reported", LIMIT);
    let written = vm.wait_for("written and reported", LIMIT);
    let booted = vm.wait_for(&marker, LIMIT);
    eprintln!(
        "BIOS: PXE to the agent ramdisk {script:?}; agent up {agent_up:?}; image written \
         {written:?}; booted from its disk {booted:?}"
    );
    let console = vm.console();
    drop(vm);

    // Each phase, in order: the lease (ours), the script, the kernel, the agent, the write
    // (every data block fetched once), the report, the local boot (no boot file this time).
    let image_bytes = std::fs::read(&image_file).expect("image");
    let blocks = nonzero_blocks(&image_bytes);
    in_order(
        &console,
        &[
            &format!("Next server: {SERVER_ADDR}"),
            "/boot/ipxe",
            "host 52:54:00:4b:47:01 is deploying",
            "/boot/ramdisk/vmlinuz",
            "/boot/ramdisk/initrd.img",
            "kagami: network on eth0",
            "inventory reported",
            &format!("written: {blocks} blocks fetched"),
            "written and reported",
            &marker,
        ],
    );
    let log = s.log_text();
    in_order(
        &log,
        &[
            "dhcp: lease mac=52:54:00:4b:47:01",
            "boot script: host 52:54:00:4b:47:01 is deploying",
            // Deployed: no boot file, the firmware goes to the disk.
            "dhcp: no boot file: the host boots its own disk mac=52:54:00:4b:47:01",
        ],
    );

    let h = host(s, "vm1");
    assert_eq!(h["state"], "deployed", "{h}");
    let d = &h["deployment"];
    assert_eq!(d["state"], "succeeded", "{d}");
    assert_eq!(
        d["disks"][0]["bytes_done"], DISK_BYTES,
        "progress reached the end: {d}"
    );
    // Each phase timed by the server (and the write by the agent), in order.
    let p = &d["phases"];
    for phase in ["power_on", "ipxe", "agent_up", "write", "reboot"] {
        assert!(p[phase].as_f64().is_some_and(|s| s >= 0.0), "{phase}: {d}");
    }
    let t = &d["timings"];
    let at = |k: &str| t[k].as_f64().unwrap_or_else(|| panic!("{k}: {d}"));
    assert!(
        at("dhcp_at") <= at("script_at")
            && at("script_at") <= at("agent_at")
            && at("agent_at") <= at("result_at")
            && at("result_at") <= at("local_boot_at"),
        "milestones in order: {d}"
    );
    let shown = s.cli(&["host", "show", "vm1"]);
    assert!(shown.contains("phases: power_on"), "{shown}");
    assert_eq!(h["inventory"]["disks"][0]["path"], "/dev/vda", "{h}");
    assert_eq!(
        h["inventory"]["nics"][0]["mac"], "52:54:00:4b:47:01",
        "the inventory names the NIC it booted from: {h}"
    );
    // The disk is the image, byte for byte (the rest of the larger disk stays zero).
    let written = std::fs::read(&disk).expect("disk");
    assert!(
        written[..DISK_BYTES] == image_bytes[..],
        "the disk is the image"
    );
    assert!(written[DISK_BYTES..].iter().all(|&b| b == 0));

    // A reprovision: one block of the machine's disk drifts while it is off; a differential
    // deployment fetches and writes that block only, and the machine boots the image again.
    let mut drifted = written;
    drifted[NOISE_AT + 100] ^= 0xff;
    std::fs::write(&disk, &drifted).expect("drift");
    s.cli(&[
        "host",
        "deploy",
        "vm1",
        "--image",
        &id,
        "--mode",
        "differential",
    ]);
    let mut vm = lab.machine(Firmware::Bios, &disk, "52:54:00:4b:47:01", "bios-second");
    vm.wait_for("written and reported", LIMIT);
    vm.wait_for(&marker, LIMIT);
    let console = vm.console();
    drop(vm);
    assert!(
        console.contains("written: 1 blocks fetched, 65536 bytes written"),
        "only the drifted block travels:\n{console}"
    );
    let h = host(s, "vm1");
    assert_eq!(h["state"], "deployed", "{h}");
    assert_eq!(h["deployment"]["mode"], "differential");
    let rewritten = std::fs::read(&disk).expect("disk");
    assert!(
        rewritten[..DISK_BYTES] == image_bytes[..],
        "the disk is the image again"
    );
}

#[test]
fn a_uefi_machine_fetches_ipxe_over_tftp_and_boots_its_image() {
    let lab = Lab::new(&full_dhcp(), &[]);
    lab.build_ramdisk();
    let marker = format!("KAGAMI-UEFI-{}", std::process::id());
    let image_file = lab.dir.path().join("marker.raw");
    marker_disk(lab.dir.path(), &image_file, &marker, 4);
    let s = lab.server();
    let id = image_id(s, &image_file, "marker");
    s.cli(&["host", "add", "52:54:00:4b:47:02", "--name", "uefi1"]);
    s.cli(&["host", "deploy", "uefi1", "--image", &id]);

    let disk = lab.dir.path().join("disk.raw");
    empty_disk(&disk, 64 << 20);
    let mut vm = lab.machine(Firmware::Uefi, &disk, "52:54:00:4b:47:02", "uefi");
    let ipxe = vm.wait_for("iPXE initialising devices", LIMIT);
    let written = vm.wait_for("written and reported", LIMIT);
    let booted = vm.wait_for(&marker, LIMIT);
    eprintln!("UEFI: iPXE over TFTP {ipxe:?}; image written {written:?}; booted {booted:?}");
    let console = vm.console();
    drop(vm);
    in_order(
        &console,
        &[
            "NBP filename is ipxe.efi",
            "NBP file downloaded successfully",
            "iPXE initialising devices",
            "/boot/ipxe",
            "/boot/ramdisk/initrd.img",
            "inventory reported",
            "written and reported",
            &marker,
        ],
    );
    let log = s.log_text();
    in_order(
        &log,
        &[
            "dhcp: lease mac=52:54:00:4b:47:02",
            "tftp transfer done",
            "boot script: host 52:54:00:4b:47:02 is deploying",
            "dhcp: no boot file: the host boots its own disk mac=52:54:00:4b:47:02",
        ],
    );
    assert!(
        log.contains("file=ipxe.efi bytes="),
        "iPXE came over Kagami's TFTP:\n{log}"
    );
    let h = host(s, "uefi1");
    assert_eq!(h["state"], "deployed", "{h}");
    let image_bytes = std::fs::read(&image_file).expect("image");
    let written = std::fs::read(&disk).expect("disk");
    assert!(
        written[..DISK_BYTES] == image_bytes[..],
        "the disk is the image"
    );
}

/// Proxy mode beside the site's DHCP server (busybox udhcpd hands out the addresses): the
/// machine boots the agent all the same. An image whose stored block went bad fails the
/// deployment loudly — the host is `failed` with the block named — and deploying a good image
/// again succeeds on the same machine, which reboots into the agent on its own.
#[test]
fn proxy_mode_beside_the_sites_dhcp_boots_and_a_corrupt_block_fails_the_deploy_loudly() {
    let mut lab = Lab::new(&["--dhcp-mode", "proxy"], &[]);
    let tmp = lab.dir.path().to_path_buf();
    let conf = tmp.join("udhcpd.conf");
    std::fs::write(
        &conf,
        format!(
            "start 10.79.0.200\nend 10.79.0.220\ninterface br0\nlease_file {}\npidfile {}\n\
             opt subnet 255.255.255.0\nopt router {SERVER_ADDR}\n",
            tmp.join("udhcpd.leases").display(),
            tmp.join("udhcpd.pid").display(),
        ),
    )
    .expect("udhcpd.conf");
    std::fs::write(tmp.join("udhcpd.leases"), b"").expect("leases");
    lab.spawn("busybox", &["udhcpd", "-f", conf.to_str().expect("path")]);
    lab.build_ramdisk();

    let bad_file = tmp.join("bad.raw");
    let good_file = tmp.join("good.raw");
    let good_marker = format!("KAGAMI-GOOD-{}", std::process::id());
    marker_disk(&tmp, &bad_file, "KAGAMI-NEVER-BOOTED", 5);
    marker_disk(&tmp, &good_file, &good_marker, 6);
    let s = lab.server();
    let bad = image_id(s, &bad_file, "bad");
    // One byte flipped in a block only the bad image has (its noise), in the pack on disk.
    let noise = &std::fs::read(&bad_file).expect("bad")[NOISE_AT + (256 << 10)..][..4096];
    let mut flipped = false;
    for pack in std::fs::read_dir(s.data_dir().join("packs")).expect("packs") {
        let path = pack.expect("pack").path();
        let mut bytes = std::fs::read(&path).expect("pack");
        if let Some(at) = bytes.windows(noise.len()).position(|w| w == noise) {
            bytes[at + 1000] ^= 0xff;
            std::fs::write(&path, &bytes).expect("pack");
            flipped = true;
        }
    }
    assert!(flipped, "the noise block is in a pack");
    let good = image_id(s, &good_file, "good");
    s.cli(&["host", "add", "52:54:00:4b:47:03", "--name", "px1"]);
    s.cli(&["host", "deploy", "px1", "--image", &bad]);

    let disk = tmp.join("disk.raw");
    empty_disk(&disk, 64 << 20);
    let mut vm = lab.machine(Firmware::Bios, &disk, "52:54:00:4b:47:03", "proxy");
    let h = wait_state(s, "px1", "failed");
    let reason = h["state_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("corrupt") && reason.contains("block"),
        "the reason names the corrupt block: {h}"
    );
    assert_eq!(h["deployment"]["state"], "failed", "{h}");
    // The agent reboots 10 s after a failure; a new deployment catches it.
    s.cli(&["host", "deploy", "px1", "--image", &good]);
    vm.wait_for(&good_marker, LIMIT);
    let console = vm.console();
    drop(vm);
    in_order(
        &console,
        &[
            "/boot/ramdisk/initrd.img",
            "corrupt",
            "kagami: the agent exited",
            "/boot/ramdisk/initrd.img",
            "written and reported",
            &good_marker,
        ],
    );
    assert!(
        console.contains("10.79.0.2"),
        "the address came from the site's server (10.79.0.200-220):\n{console}"
    );
    let log = s.log_text();
    assert!(
        !log.contains("dhcp: lease"),
        "proxy mode leases nothing:\n{log}"
    );
    assert!(log.contains("dhcp: proxy"), "{log}");
    let h = host(s, "px1");
    assert_eq!(h["state"], "deployed", "{h}");
    let image_bytes = std::fs::read(&good_file).expect("image");
    let written = std::fs::read(&disk).expect("disk");
    assert!(
        written[..DISK_BYTES] == image_bytes[..],
        "the disk is the good image"
    );
}

/// A machine deployed, then captured by `kagami host capture` at its next network boot (one
/// block changed on its disk meanwhile: only that block is uploaded), and the capture deployed
/// onto a second machine, whose disk ends up the first one's byte for byte.
#[test]
fn a_captured_machine_deploys_onto_a_second_machine() {
    let lab = Lab::new(&full_dhcp(), &[]);
    lab.build_ramdisk();
    let marker = format!("KAGAMI-CAPTURED-{}", std::process::id());
    let image_file = lab.dir.path().join("marker.raw");
    marker_disk(lab.dir.path(), &image_file, &marker, 8);
    let s = lab.server();
    let id = image_id(s, &image_file, "marker");
    s.cli(&["host", "add", "52:54:00:4b:47:0a", "--name", "src"]);
    s.cli(&["host", "add", "52:54:00:4b:47:0b", "--name", "dst"]);
    s.cli(&["host", "deploy", "src", "--image", &id]);
    let disk_a = lab.dir.path().join("a.raw");
    empty_disk(&disk_a, 64 << 20);
    let mut vm = lab.machine(Firmware::Bios, &disk_a, "52:54:00:4b:47:0a", "src-deploy");
    vm.wait_for(&marker, LIMIT);
    drop(vm);

    // While it is off, something is written into a hole of its disk; then it is captured.
    let mut a = std::fs::read(&disk_a).expect("disk a");
    let note = b"written after the deployment, kept";
    a[(12 << 20) + 5..][..note.len()].copy_from_slice(note);
    std::fs::write(&disk_a, &a).expect("disk a");
    s.cli(&["host", "capture", "src", "--name", "src-capture"]);
    let mut vm = lab.machine(Firmware::Bios, &disk_a, "52:54:00:4b:47:0a", "src-capture");
    vm.wait_for("and reported", LIMIT);
    // Back to deployed: the next boot is its own disk again.
    vm.wait_for(&marker, LIMIT);
    let console = vm.console();
    drop(vm);
    assert!(
        console.contains("made (1 blocks uploaded, 65572 bytes)"),
        "only the changed block travels:\n{console}"
    );
    let h = host(s, "src");
    assert_eq!(h["state"], "deployed", "{h}");
    let d = &h["deployment"];
    assert_eq!(
        (&d["action"], &d["state"]),
        (&"capture".into(), &"succeeded".into()),
        "{d}"
    );
    let captured = d["capture"]["image"].as_str().expect("image").to_string();
    let image = s.cli_json(&["image", "show", &captured]);
    assert_eq!(image["source_host"], "src", "{image}");
    assert_eq!(image["source_disk"], "/dev/vda", "{image}");
    assert_eq!(image["virtual_size"], 64 << 20, "the whole disk: {image}");

    // The capture, deployed onto a second machine.
    s.cli(&["host", "deploy", "dst", "--image", &captured]);
    let disk_b = lab.dir.path().join("b.raw");
    empty_disk(&disk_b, 64 << 20);
    let mut vm = lab.machine(Firmware::Bios, &disk_b, "52:54:00:4b:47:0b", "dst-deploy");
    vm.wait_for(&marker, LIMIT);
    drop(vm);
    assert_eq!(host(s, "dst")["state"], "deployed");
    assert!(
        std::fs::read(&disk_b).expect("disk b") == a,
        "the second machine's disk is the first one's"
    );
}
