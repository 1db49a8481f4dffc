//! An ISO booted from the network, temporarily, end to end: `kagami host boot-iso` makes a
//! machine's iPXE `sanboot` an ISO over HTTP Range requests from Kagami's content route with a
//! per-boot token, or over iSCSI (`--via iscsi`) from Kagami's iSCSI target, iPXE logging in with
//! the CHAP credentials its script carries; GRUB from the ISO prints its marker on the serial
//! console. `kagami host release` (or `--until next-boot`) returns the host to where it was: its
//! next network boot gets no boot file and the machine boots its own disk. Nothing is mocked:
//! SeaBIOS, OVMF, iPXE and GRUB are Debian's.
//!
//! The machines: BIOS (QEMU's iPXE ROM) with a hybrid ISO from `grub-mkrescue` over HTTP and over
//! iSCSI; BIOS with a non-hybrid ISO (El Torito only, no MBR, as Windows' and many firmware ISOs
//! are) over both; UEFI (OVMF's PXE, `ipxe.efi` over Kagami's TFTP) with a BIOS-and-UEFI
//! `grub-mkrescue` ISO over both and the non-hybrid ISO over iSCSI. Hybrid or not makes no
//! difference to iPXE: it finds ISO 9660's primary volume descriptor on the SAN device, treats the
//! device as a CD-ROM of 2048-byte blocks (four of the iSCSI LUN's 512-byte ones) and boots El
//! Torito — on BIOS through its INT 13 CD-ROM emulation, on UEFI as a CD-ROM block device whose El
//! Torito EFI image the firmware opens.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kagami_e2e::{Firmware, Lab, in_order, marker_disk};

const LIMIT: Duration = Duration::from_secs(120);
/// OVMF under TCG: power-on to iPXE takes ~10 s, to the ISO's GRUB ~17 s.
const UEFI_LIMIT: Duration = Duration::from_secs(180);
const MAC: &str = "52:54:00:4b:49:01";

/// The ISO's GRUB configuration: the marker on COM1 (and the screen), then the device GRUB
/// runs from (UEFI: `cd0`, the CD-ROM iPXE hands the firmware; BIOS: `hd0`, iPXE's INT 13
/// drive 0x80 — GRUB calls only drives from 0x90 up `cd`), and a wait.
fn grub_cfg(marker: &str) -> String {
    format!(
        "serial --unit=0 --speed=115200\nterminal_output serial console\n\
         echo \"{marker}\"\necho \"booted from ($root)\"\nsleep 3600\n"
    )
}

/// The platforms a [`marker_iso`] boots on.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Platforms {
    Bios,
    BiosAndUefi,
}

/// A hybrid ISO made by `grub-mkrescue` (El Torito, and an MBR in its system area; with UEFI
/// also an El Torito EFI image, FAT with GRUB as `\EFI\BOOT\BOOTX64.EFI`) whose GRUB prints
/// `marker`.
fn marker_iso(dir: &Path, marker: &str, platforms: Platforms) -> PathBuf {
    let root = dir.join("isoroot");
    std::fs::create_dir_all(root.join("boot/grub")).expect("iso root");
    std::fs::write(root.join("boot/grub/grub.cfg"), grub_cfg(marker)).expect("grub.cfg");
    let iso = dir.join("marker.iso");
    let mut cmd = Command::new("grub-mkrescue");
    // Without -d, grub-mkrescue builds every platform installed: i386-pc and x86_64-efi.
    if platforms == Platforms::Bios {
        cmd.args(["-d", "/usr/lib/grub/i386-pc"]);
    }
    let out = cmd
        .arg("-o")
        .arg(&iso)
        .args([
            "--install-modules=normal echo sleep serial terminal configfile iso9660 \
             part_acorn part_amiga part_apple part_bsd part_dfly part_dvh part_gpt part_msdos \
             part_plan part_sun part_sunpc",
            "--locales=",
            "--fonts=",
            "--themes=",
        ])
        .arg(&root)
        .output()
        .expect("grub-mkrescue (scripts/lab-setup installs GRUB and xorriso)");
    assert!(
        out.status.success(),
        "grub-mkrescue failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let eltorito = el_torito(&iso);
    assert!(eltorito.contains("BIOS  y   none"), "{eltorito}");
    assert_eq!(
        eltorito.contains("UEFI  y   none"),
        platforms == Platforms::BiosAndUefi,
        "{eltorito}"
    );
    iso
}

/// A non-hybrid ISO, as Windows' and many vendors' firmware ISOs are: two El Torito
/// no-emulation entries — BIOS (GRUB's `i386-pc-eltorito` core with everything it needs built
/// in) and UEFI (a FAT image holding a standalone GRUB as `\EFI\BOOT\BOOTX64.EFI`, which finds
/// the ISO 9660 file system and reads its `grub.cfg`) — and nothing in the system area: no MBR,
/// no partition table, so only a firmware or iPXE that reads the ISO as a CD-ROM and follows its
/// boot catalog can boot it.
fn eltorito_only_iso(dir: &Path, marker: &str) -> PathBuf {
    let root = dir.join("eltorito-root");
    let grub = root.join("boot/grub");
    std::fs::create_dir_all(grub.join("i386-pc")).expect("iso root");
    std::fs::write(grub.join("grub.cfg"), grub_cfg(marker)).expect("grub.cfg");
    let core = grub.join("i386-pc/eltorito.img");
    run(Command::new("grub-mkimage")
        .args(["-O", "i386-pc-eltorito", "-p", "/boot/grub", "-o"])
        .arg(&core)
        .args([
            "biosdisk",
            "iso9660",
            "normal",
            "echo",
            "sleep",
            "serial",
            "terminal",
            "configfile",
        ]));
    // UEFI: GRUB's own configuration (in its memdisk) looks for the ISO by a file only the ISO
    // has, and reads the ISO's grub.cfg.
    let work = tempfile::tempdir_in(dir).expect("tmp");
    let embedded = work.path().join("embedded.cfg");
    std::fs::write(
        &embedded,
        "search --no-floppy --file /boot/grub/i386-pc/eltorito.img --set=root\n\
         configfile /boot/grub/grub.cfg\n",
    )
    .expect("embedded.cfg");
    let efi = work.path().join("BOOTX64.EFI");
    run(Command::new("grub-mkstandalone")
        .args(["-O", "x86_64-efi", "-o"])
        .arg(&efi)
        .args([
            "--install-modules=search search_fs_file iso9660 configfile normal echo sleep \
             serial terminal",
            "--locales=",
            "--fonts=",
            "--themes=",
        ])
        .arg(format!("boot/grub/grub.cfg={}", embedded.display())));
    let fat = root.join("efi.img");
    run(Command::new("mkfs.vfat")
        .args(["-C", "-n", "KAGAMI_EFI"])
        .arg(&fat)
        .arg("2048"));
    for (program, args) in [
        ("mmd", vec!["::/EFI", "::/EFI/BOOT"]),
        (
            "mcopy",
            vec![efi.to_str().expect("path"), "::/EFI/BOOT/BOOTX64.EFI"],
        ),
    ] {
        run(Command::new(program)
            .env("MTOOLS_SKIP_CHECK", "1")
            .arg("-i")
            .arg(&fat)
            .args(args));
    }
    let iso = dir.join("eltorito-only.iso");
    run(Command::new("xorriso")
        .args(["-as", "mkisofs", "-R", "-V", "KAGAMI_ELTORITO"])
        .args(["-b", "boot/grub/i386-pc/eltorito.img", "-no-emul-boot"])
        .args(["-boot-load-size", "4", "-boot-info-table"])
        .args(["-eltorito-alt-boot", "-e", "efi.img", "-no-emul-boot", "-o"])
        .arg(&iso)
        .arg(&root));
    let eltorito = el_torito(&iso);
    assert!(eltorito.contains("BIOS  y   none"), "{eltorito}");
    assert!(eltorito.contains("UEFI  y   none"), "{eltorito}");
    let bytes = std::fs::read(&iso).expect("iso");
    assert!(
        bytes[..32 << 10].iter().all(|&b| b == 0),
        "the system area (MBR included) is empty"
    );
    assert_eq!(&bytes[(16 << 11) + 1..][..5], b"CD001", "ISO 9660");
    iso
}

/// `xorriso -report_el_torito plain` of `iso`: its boot catalog's entries.
fn el_torito(iso: &Path) -> String {
    let out = Command::new("xorriso")
        .arg("-indev")
        .arg(iso)
        .args(["-report_el_torito", "plain"])
        .output()
        .expect("xorriso");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A lab whose server answers DHCP in full and serves iSCSI on the bridge, logging DHCP and
/// the ISO boots' content reads.
fn iso_lab() -> Lab {
    Lab::new(
        &[
            "--dhcp-mode",
            "full",
            "--dhcp-range",
            "10.79.0.100,10.79.0.150",
            // Inside the lab's own network namespace, the production port is free.
            "--iscsi-listen",
            "10.79.0.1:3260",
        ],
        &[(
            "KAGAMI_LOG",
            "info,kagami::boot::dhcp=debug,kagami::api::images=debug",
        )],
    )
}

/// `iso` imported as an ISO image named `name`.
fn import_iso(lab: &Lab, iso: &Path, name: &str) -> serde_json::Value {
    lab.server().cli_json(&[
        "image",
        "import",
        iso.to_str().expect("path"),
        "--name",
        name,
        "--kind",
        "iso",
    ])
}

/// The machine's own disk, which prints a marker of its own (returned with its path): seeing
/// the ISO's marker instead proves the ISO booted.
fn own_disk(lab: &Lab) -> (PathBuf, String) {
    let disk_marker = format!("KAGAMI-DISK-{}", std::process::id());
    let disk = lab.dir.path().join("disk.raw");
    marker_disk(lab.dir.path(), &disk, &disk_marker, 6);
    (disk, disk_marker)
}

/// Powers on a BIOS machine (`name`) with `disk` until the ISO's GRUB prints `marker`: its
/// console must show the script, iPXE's SAN boot and the marker in order, and neither the
/// disk's own marker nor a failed boot.
fn bios_sanboot(lab: &Lab, disk: &Path, disk_marker: &str, name: &str, marker: &str) {
    let mut vm = lab.machine(Firmware::Bios, disk, MAC, name);
    let booted = vm.wait_for(marker, LIMIT);
    let console = vm.console();
    drop(vm);
    eprintln!("BIOS: power-on to the ISO's GRUB, {name}: {booted:?}");
    in_order(
        &console,
        &[
            "/boot/ipxe",
            // (the console wraps the script's line at 80 columns)
            &format!("host {MAC} boots ISO image"),
            "Booting from SAN device",
            marker,
        ],
    );
    assert!(!console.contains(disk_marker), "{console}");
    assert!(!console.contains("did not boot"), "{console}");
}

fn state(lab: &Lab) -> serde_json::Value {
    lab.server().cli_json(&["host", "show", "iso1"])
}

#[test]
fn a_bios_machine_sanboots_an_iso_over_http_until_released_then_boots_its_disk() {
    let started = Instant::now();
    let lab = iso_lab();
    let s = lab.server();
    let marker = format!("KAGAMI-ISO-{}", std::process::id());
    let iso = marker_iso(lab.dir.path(), &marker, Platforms::Bios);
    let image = import_iso(&lab, &iso, "rescue");
    assert_eq!(
        (&image["kind"], &image["status"]),
        (&"iso".into(), &"active".into()),
        "{image}"
    );
    let id = image["id"].as_str().expect("id").to_string();
    s.cli(&["host", "add", MAC, "--name", "iso1"]);
    let h = s.cli_json(&["host", "boot-iso", "iso1", "--image", &id]);
    assert_eq!(h["state"], "iso", "{h}");

    let (disk, disk_marker) = own_disk(&lab);
    bios_sanboot(&lab, &disk, &disk_marker, "iso-boot", &marker);

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
    let lab = iso_lab();
    let s = lab.server();
    let marker = format!("KAGAMI-ISCSI-ISO-{}", std::process::id());
    let iso = marker_iso(lab.dir.path(), &marker, Platforms::Bios);
    let image = import_iso(&lab, &iso, "rescue");
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

    let (disk, disk_marker) = own_disk(&lab);
    bios_sanboot(&lab, &disk, &disk_marker, "iso-iscsi", &marker);

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

/// Where `iso`'s El Torito boot catalog is, and its default entry's boot image (LBAs in
/// 2048-byte blocks), from the boot record volume descriptor at block 17.
fn el_torito_lbas(iso: &[u8]) -> (u64, u64) {
    let record = &iso[17 << 11..18 << 11];
    assert_eq!(
        &record[..7],
        b"\0CD001\x01",
        "a boot record volume descriptor"
    );
    assert!(record[7..].starts_with(b"EL TORITO SPECIFICATION"));
    let le32 = |b: &[u8]| u64::from(u32::from_le_bytes(b[..4].try_into().expect("4")));
    let catalog = le32(&record[0x47..]);
    let entry = &iso[(catalog << 11) as usize + 32..][..32];
    assert_eq!((entry[0], entry[1]), (0x88, 0), "bootable, no emulation");
    (catalog, le32(&entry[8..]))
}

/// The ranges of `image` the server's log shows an ISO boot reading, in order (HEAD and
/// whole-content reads left out).
fn ranges_read(log: &str, image: &str) -> Vec<(u64, u64)> {
    log.lines()
        .filter(|l| l.contains("content read by an ISO boot") && l.contains(image))
        .filter_map(|l| {
            let r = l.split("range=\"bytes=").nth(1)?;
            let (from, to) = r.split('"').next()?.split_once('-')?;
            Some((from.parse().ok()?, to.parse().ok()?))
        })
        .collect()
}

/// A non-hybrid ISO (El Torito only, no MBR) boots on a BIOS machine over HTTP and over iSCSI as
/// it is: iPXE finds ISO 9660's primary volume descriptor on the SAN device, takes it for a
/// CD-ROM (2048-byte blocks, four of the iSCSI LUN's 512-byte ones) and boots the El Torito
/// boot catalog's image; it never reads the (empty) system area where an MBR would be.
#[test]
fn a_bios_machine_sanboots_a_non_hybrid_el_torito_iso_over_http_and_iscsi() {
    let started = Instant::now();
    let lab = iso_lab();
    let s = lab.server();
    let marker = format!("KAGAMI-ELTORITO-{}", std::process::id());
    let iso = eltorito_only_iso(lab.dir.path(), &marker);
    let (catalog, boot_image) = el_torito_lbas(&std::fs::read(&iso).expect("iso"));
    let image = import_iso(&lab, &iso, "eltorito");
    let id = image["id"].as_str().expect("id").to_string();
    s.cli(&["host", "add", MAC, "--name", "iso1"]);
    let (disk, disk_marker) = own_disk(&lab);

    for via in ["http", "iscsi"] {
        let h = s.cli_json(&[
            "host",
            "boot-iso",
            "iso1",
            "--image",
            &id,
            "--via",
            via,
            "--until",
            "next-boot",
        ]);
        assert_eq!(h["iso_boot"]["via"], via, "{h}");
        bios_sanboot(
            &lab,
            &disk,
            &disk_marker,
            &format!("eltorito-{via}"),
            &marker,
        );
        assert_eq!(state(&lab)["state"], "discovered", "back after one boot");
    }

    let log = s.log_text();
    in_order(
        &log,
        &[
            &format!("boot script: host {MAC} boots ISO image {id} once (until next-boot)"),
            "content read by an ISO boot",
            &format!(
                "boot script: host {MAC} boots ISO image {id} once (until next-boot) over iSCSI"
            ),
            "iSCSI session started",
        ],
    );
    // Over HTTP, iPXE's first reads are ISO 9660's primary volume descriptor (block 16: the
    // CD-ROM check), the El Torito boot record (block 17), the boot catalog and the boot
    // image; nothing before block 16 is ever read.
    let ranges = ranges_read(&log, &id);
    let starts: Vec<u64> = ranges.iter().map(|r| r.0).collect();
    assert_eq!(
        starts[..4],
        [16 << 11, 17 << 11, catalog << 11, boot_image << 11],
        "{ranges:?}"
    );
    assert!(starts.iter().all(|&at| at >= 16 << 11), "{ranges:?}");
    let session = log
        .lines()
        .find(|l| l.contains("iSCSI session started") && l.contains(&id))
        .unwrap_or_else(|| panic!("no iSCSI session on the ISO:\n{log}"));
    assert!(session.contains("boot_host=Some("), "{session}");
    eprintln!("whole test {:?}", started.elapsed());
}

/// A UEFI machine (OVMF's own PXE fetches `ipxe.efi` over Kagami's TFTP) sanboots a
/// BIOS-and-UEFI `grub-mkrescue` ISO over HTTP until released, then once over iSCSI, then the
/// non-hybrid ISO once over iSCSI; iPXE presents each to the firmware as a CD-ROM, whose El
/// Torito EFI image starts GRUB. After the boots over iSCSI the host is back where it was: its
/// next network boot gets no boot file.
#[test]
fn a_uefi_machine_sanboots_isos_over_http_until_released_then_over_iscsi_once() {
    let started = Instant::now();
    let lab = iso_lab();
    let s = lab.server();
    let marker = format!("KAGAMI-UEFI-ISO-{}", std::process::id());
    let iso = marker_iso(lab.dir.path(), &marker, Platforms::BiosAndUefi);
    // The EFI boot image's block, from the boot catalog's UEFI entry.
    let efi_lba: u64 = el_torito(&iso)
        .lines()
        .find(|l| l.contains("El Torito boot img") && l.contains("UEFI"))
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
        .expect("a UEFI El Torito entry");
    let image = import_iso(&lab, &iso, "rescue");
    let id = image["id"].as_str().expect("id").to_string();
    let eltorito_marker = format!("KAGAMI-UEFI-ELTORITO-{}", std::process::id());
    let eltorito = eltorito_only_iso(lab.dir.path(), &eltorito_marker);
    let eltorito = import_iso(&lab, &eltorito, "eltorito")["id"]
        .as_str()
        .expect("id")
        .to_string();
    s.cli(&["host", "add", MAC, "--name", "iso1"]);
    let (disk, disk_marker) = own_disk(&lab);
    let uefi_boot = |name: &str, marker: &str| {
        let mut vm = lab.machine(Firmware::Uefi, &disk, MAC, name);
        let booted = vm.wait_for(marker, UEFI_LIMIT);
        // GRUB names the device its grub.cfg came from: an EFI CD-ROM.
        vm.wait_for("booted from (cd0)", LIMIT);
        let console = vm.console();
        eprintln!("UEFI: power-on to the ISO's GRUB, {name}: {booted:?}");
        in_order(
            &console,
            &[
                "NBP filename is ipxe.efi",
                "NBP file downloaded successfully",
                "iPXE initialising devices",
                "/boot/ipxe",
                &format!("host {MAC} boots ISO image"),
                "Booting from SAN device",
                marker,
            ],
        );
        assert!(!console.contains(&disk_marker), "{console}");
        assert!(!console.contains("did not boot"), "{console}");
    };

    // Over HTTP, until released.
    let h = s.cli_json(&["host", "boot-iso", "iso1", "--image", &id]);
    assert_eq!(h["state"], "iso", "{h}");
    uefi_boot("grub-mkrescue ISO over HTTP", &marker);
    let log = s.log_text();
    in_order(
        &log,
        &[
            &format!("dhcp: lease mac={MAC}"),
            "file=ipxe.efi bytes=",
            &format!("boot script: host {MAC} boots ISO image {id} until released"),
            "content read by an ISO boot",
        ],
    );
    let ranges = ranges_read(&log, &id);
    assert!(ranges.len() >= 10, "{ranges:?}");
    assert!(
        ranges
            .iter()
            .any(|&(from, to)| (from..=to).contains(&(efi_lba << 11))),
        "the firmware read the El Torito EFI image (block {efi_lba}): {ranges:?}"
    );
    assert!(!log.contains("token="), "a token in the log:\n{log}");
    assert_eq!(state(&lab)["state"], "iso", "until released");
    let out = s.cli(&["host", "release", "iso1"]);
    assert!(out.contains("it is discovered"), "{out}");

    // Over iSCSI, once: the same ISO, then the non-hybrid one (El Torito only).
    for (image, marker, name) in [
        (&id, &marker, "grub-mkrescue ISO over iSCSI"),
        (&eltorito, &eltorito_marker, "El Torito-only ISO over iSCSI"),
    ] {
        let h = s.cli_json(&[
            "host",
            "boot-iso",
            "iso1",
            "--image",
            image,
            "--via",
            "iscsi",
            "--until",
            "next-boot",
        ]);
        assert_eq!(h["iso_boot"]["via"], "iscsi", "{h}");
        let before = s.log_text().len();
        uefi_boot(name, marker);
        let log = s.log_text();
        in_order(
            &log[before..],
            &[
                &format!(
                    "boot script: host {MAC} boots ISO image {image} once (until next-boot) over \
                     iSCSI"
                ),
                "iSCSI session started",
            ],
        );
        let session = log[before..]
            .lines()
            .find(|l| l.contains("iSCSI session started") && l.contains(image.as_str()))
            .unwrap_or_else(|| panic!("no iSCSI session on the ISO:\n{log}"));
        assert!(session.contains("boot_host=Some("), "{session}");
        let h = state(&lab);
        assert_eq!(h["state"], "discovered", "{h}");
        assert!(h.get("iso_boot").is_none(), "{h}");
    }

    // The next power-on: OVMF's PXE gets an address and no boot file (the firmware then goes on
    // to its other boot options and, minutes of IPv6 and HTTP boot timeouts later, the disk).
    let before = s.log_text().len();
    let vm = lab.machine(Firmware::Uefi, &disk, MAC, "after");
    let no_boot_file = format!("dhcp: no boot file: the host boots its own disk mac={MAC}");
    let waited = Instant::now();
    while !s.log_text()[before..].contains(&no_boot_file) {
        assert!(
            waited.elapsed() < UEFI_LIMIT,
            "no '{no_boot_file}':\n{}",
            &s.log_text()[before..]
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let console = vm.console();
    drop(vm);
    assert!(!console.contains("Kagami:"), "no script: {console}");
    eprintln!("whole test {:?}", started.elapsed());
}
