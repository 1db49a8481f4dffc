//! An ISO booted from the network, temporarily, end to end: `kagami host boot-iso` makes a BIOS
//! machine's iPXE `sanboot` an ISO (built here with `grub-mkrescue`) over HTTP Range requests
//! from Kagami's content route with a per-boot token; GRUB from the ISO prints its marker on the
//! serial console. `kagami host release` returns the host to where it was: its next network boot
//! gets no boot file and the machine boots its own disk. Nothing is mocked: SeaBIOS, iPXE and
//! GRUB are Debian's. The same machine also sanboots the ISO over iSCSI (`--via iscsi`) from
//! Kagami's iSCSI target, iPXE logging in with the CHAP credentials its script carries.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kagami_e2e::{Firmware, Lab, in_order, marker_disk};

const LIMIT: Duration = Duration::from_secs(120);
const MAC: &str = "52:54:00:4b:49:01";

/// A BIOS-bootable ISO whose GRUB prints `marker` on COM1 (and the screen) and waits.
fn marker_iso(dir: &Path, marker: &str) -> PathBuf {
    let root = dir.join("isoroot");
    std::fs::create_dir_all(root.join("boot/grub")).expect("iso root");
    std::fs::write(
        root.join("boot/grub/grub.cfg"),
        format!(
            "serial --unit=0 --speed=115200\nterminal_output serial console\n\
             echo \"{marker}\"\nsleep 3600\n"
        ),
    )
    .expect("grub.cfg");
    let iso = dir.join("marker.iso");
    let out = Command::new("grub-mkrescue")
        .args(["-d", "/usr/lib/grub/i386-pc", "-o"])
        .arg(&iso)
        .args([
            "--install-modules=normal echo sleep serial terminal configfile iso9660 biosdisk \
             part_acorn part_amiga part_apple part_bsd part_dfly part_dvh part_gpt part_msdos \
             part_plan part_sun part_sunpc",
            "--locales=",
            "--fonts=",
            "--themes=",
        ])
        .arg(&root)
        .output()
        .expect("grub-mkrescue (scripts/lab-setup installs grub-pc-bin and xorriso)");
    assert!(
        out.status.success(),
        "grub-mkrescue failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    iso
}

fn state(lab: &Lab) -> serde_json::Value {
    lab.server().cli_json(&["host", "show", "iso1"])
}

#[test]
fn a_bios_machine_sanboots_an_iso_over_http_until_released_then_boots_its_disk() {
    let started = Instant::now();
    let lab = Lab::new(
        &[
            "--dhcp-mode",
            "full",
            "--dhcp-range",
            "10.79.0.100,10.79.0.150",
        ],
        &[(
            "KAGAMI_LOG",
            "info,kagami::boot::dhcp=debug,kagami::api::images=debug",
        )],
    );
    let s = lab.server();
    let marker = format!("KAGAMI-ISO-{}", std::process::id());
    let iso = marker_iso(lab.dir.path(), &marker);
    let image = s.cli_json(&[
        "image",
        "import",
        iso.to_str().expect("path"),
        "--name",
        "rescue",
        "--kind",
        "iso",
    ]);
    assert_eq!(
        (&image["kind"], &image["status"]),
        (&"iso".into(), &"active".into()),
        "{image}"
    );
    let id = image["id"].as_str().expect("id").to_string();
    s.cli(&["host", "add", MAC, "--name", "iso1"]);
    let h = s.cli_json(&["host", "boot-iso", "iso1", "--image", &id]);
    assert_eq!(h["state"], "iso", "{h}");

    // The machine's own disk prints another marker: seeing the ISO's proves the ISO booted.
    let disk_marker = format!("KAGAMI-DISK-{}", std::process::id());
    let disk = lab.dir.path().join("disk.raw");
    marker_disk(lab.dir.path(), &disk, &disk_marker, 6);
    let mut vm = lab.machine(Firmware::Bios, &disk, MAC, "iso-boot");
    let booted = vm.wait_for(&marker, LIMIT);
    let console = vm.console();
    drop(vm);
    eprintln!("BIOS: power-on to the ISO's GRUB {booted:?}");
    in_order(
        &console,
        &[
            "/boot/ipxe",
            // (the console wraps the script's line at 80 columns)
            &format!("host {MAC} boots ISO image"),
            "Booting from SAN device",
            &marker,
        ],
    );
    assert!(!console.contains(&disk_marker), "{console}");

    // iPXE read the ISO in ranges through the ISO boot's token; the log names no token.
    let log = s.log_text();
    in_order(
        &log,
        &[
            &format!("dhcp: lease mac={MAC}"),
            &format!("boot script: host {MAC} boots ISO image {id} until released"),
            "content read by an ISO boot",
        ],
    );
    let ranges = log
        .lines()
        .filter(|l| l.contains("content read by an ISO boot") && l.contains("bytes="))
        .count();
    assert!(ranges >= 10, "{ranges} range requests:\n{log}");
    eprintln!("iPXE read the ISO in {ranges} range requests");
    assert!(!log.contains("token="), "a token in the log:\n{log}");
    assert_eq!(state(&lab)["state"], "iso");

    // Released: back to where it was; the next boot gets no boot file and boots the disk.
    let out = s.cli(&["host", "release", "iso1"]);
    assert!(out.contains("it is discovered"), "{out}");
    let released_at = s.log_text().len();
    let mut vm = lab.machine(Firmware::Bios, &disk, MAC, "after-release");
    vm.wait_for(&disk_marker, LIMIT);
    let console = vm.console();
    drop(vm);
    assert!(!console.contains(&marker), "{console}");
    let log = s.log_text();
    assert!(
        log[released_at..].contains(&format!(
            "dhcp: no boot file: the host boots its own disk mac={MAC}"
        )),
        "{}",
        &log[released_at..]
    );
    let h = state(&lab);
    assert_eq!(h["state"], "discovered", "{h}");
    assert!(h.get("iso_boot").is_none(), "{h}");
    eprintln!("whole test {:?}", started.elapsed());
}

#[test]
fn a_bios_machine_sanboots_an_iso_over_iscsi_with_the_boots_chap_credentials() {
    let started = Instant::now();
    // Inside the lab's own network namespace, the production port is free.
    let lab = Lab::new(
        &[
            "--dhcp-mode",
            "full",
            "--dhcp-range",
            "10.79.0.100,10.79.0.150",
            "--iscsi-listen",
            "10.79.0.1:3260",
        ],
        &[],
    );
    let s = lab.server();
    let marker = format!("KAGAMI-ISCSI-ISO-{}", std::process::id());
    let iso = marker_iso(lab.dir.path(), &marker);
    let image = s.cli_json(&[
        "image",
        "import",
        iso.to_str().expect("path"),
        "--name",
        "rescue",
        "--kind",
        "iso",
    ]);
    let id = image["id"].as_str().expect("id").to_string();
    s.cli(&["host", "add", MAC, "--name", "iso1"]);
    let h = s.cli_json(&[
        "host",
        "boot-iso",
        "iso1",
        "--image",
        &id,
        "--via",
        "iscsi",
        "--until",
        "next-boot",
    ]);
    assert_eq!(
        (&h["state"], &h["iso_boot"]["via"]),
        (&"iso".into(), &"iscsi".into()),
        "{h}"
    );

    let disk_marker = format!("KAGAMI-DISK-{}", std::process::id());
    let disk = lab.dir.path().join("disk.raw");
    marker_disk(lab.dir.path(), &disk, &disk_marker, 6);
    let mut vm = lab.machine(Firmware::Bios, &disk, MAC, "iso-iscsi");
    let booted = vm.wait_for(&marker, LIMIT);
    let console = vm.console();
    drop(vm);
    eprintln!("BIOS: power-on to the ISO's GRUB over iSCSI {booted:?}");
    in_order(
        &console,
        &[
            "/boot/ipxe",
            &format!("host {MAC} boots ISO image"),
            &marker,
        ],
    );
    assert!(!console.contains(&disk_marker), "{console}");
    assert!(!console.contains("did not boot"), "{console}");

    // iPXE logged in as this boot (not as a project's token) to the ISO's target.
    let log = s.log_text();
    in_order(
        &log,
        &[
            &format!(
                "boot script: host {MAC} boots ISO image {id} once (until next-boot) over iSCSI"
            ),
            "iSCSI session started",
        ],
    );
    let session = log
        .lines()
        .find(|l| l.contains("iSCSI session started") && l.contains(&id))
        .unwrap_or_else(|| panic!("no iSCSI session on the ISO:\n{log}"));
    assert!(session.contains("boot_host=Some("), "{session}");
    // --until next-boot: the host is back in its state once the script was served.
    assert_eq!(state(&lab)["state"], "discovered");
    eprintln!("whole test {:?}", started.elapsed());
}
