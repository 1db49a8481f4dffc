//! A bounded, seeded property test of every decoder of untrusted input — the same entry points
//! as the cargo-fuzz targets in `fuzz/` — run in CI: real images of every format, mutated
//! thousands of ways (bit flips, truncations, interesting integers written over fields), must
//! each be accepted or refused, never panic.

use std::process::Command;

use kagami_images::fuzzing::{self, Rng};

const INTERESTING: [u64; 9] = [
    0,
    1,
    0x7f,
    0xff,
    0xffff,
    0x8000_0000,
    0xffff_ffff,
    1 << 40,
    u64::MAX,
];

fn seeds() -> Vec<(String, Vec<u8>)> {
    let dir = tempfile::tempdir().expect("tmp");
    let raw = dir.path().join("seed.raw");
    let mut disk = vec![0u8; 6 << 20];
    for (i, b) in disk.iter_mut().enumerate().step_by(97) {
        *b = (i / 4096) as u8 | 1;
    }
    std::fs::write(&raw, &disk).expect("write");
    let mut out = Vec::new();
    for (name, fmt, opts) in [
        ("qcow2", "qcow2", vec![]),
        ("qcow2-compressed", "qcow2", vec!["-c"]),
        ("vmdk", "vmdk", vec![]),
        (
            "vmdk-stream",
            "vmdk",
            vec!["-o", "subformat=streamOptimized"],
        ),
        ("vhd", "vpc", vec![]),
        ("vhdx", "vhdx", vec![]),
        ("vdi", "vdi", vec![]),
        ("qed", "qed", vec![]),
    ] {
        let path = dir.path().join(name);
        let mut args = vec!["convert", "-q", "-f", "raw", "-O", fmt];
        args.extend_from_slice(&opts);
        let (src, dst) = (
            raw.to_str().expect("p").to_string(),
            path.to_str().expect("p").to_string(),
        );
        args.extend_from_slice(&[&src, &dst]);
        let status = Command::new("qemu-img")
            .args(&args)
            .status()
            .expect("qemu-img");
        assert!(status.success(), "qemu-img {args:?}");
        out.push((name.to_string(), std::fs::read(&path).expect("read")));
    }
    let mut iso = vec![0u8; 40 * 2048];
    iso[16 * 2048] = 1;
    iso[16 * 2048 + 1..16 * 2048 + 6].copy_from_slice(b"CD001");
    iso[16 * 2048 + 80..16 * 2048 + 84].copy_from_slice(&40u32.to_le_bytes());
    iso[16 * 2048 + 84..16 * 2048 + 88].copy_from_slice(&40u32.to_be_bytes());
    iso[16 * 2048 + 128..16 * 2048 + 130].copy_from_slice(&2048u16.to_le_bytes());
    iso[16 * 2048 + 130..16 * 2048 + 132].copy_from_slice(&2048u16.to_be_bytes());
    out.push(("iso".into(), iso));
    out
}

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut m = seed.to_vec();
    // Most structure lives in the first 64 KiB (qcow2/vhdx headers further: up to 1 MiB) and at
    // the end (footers); aim there most of the time.
    let hot = |rng: &mut Rng, len: usize| match rng.below(4) {
        0 => rng.below(len.min(512)),
        1 => rng.below(len.min(1 << 20)),
        2 => len.saturating_sub(1 + rng.below(len.min(2048))),
        _ => rng.below(len),
    };
    for _ in 0..1 + rng.below(4) {
        if m.is_empty() {
            break;
        }
        match rng.below(4) {
            0 => {
                let at = hot(rng, m.len());
                m[at] ^= 1 << rng.below(8);
            }
            1 => {
                let at = hot(rng, m.len());
                let v = INTERESTING[rng.below(INTERESTING.len())];
                let width = [2usize, 4, 8][rng.below(3)];
                let bytes = if rng.below(2) == 0 {
                    v.to_le_bytes()
                } else {
                    v.to_be_bytes()
                };
                let end = (at + width).min(m.len());
                m[at..end].copy_from_slice(&bytes[..end - at]);
            }
            2 => {
                let cut = hot(rng, m.len());
                m.truncate(cut);
            }
            _ => {
                let at = hot(rng, m.len());
                let v = rng.next_u64().to_le_bytes();
                let end = (at + 8).min(m.len());
                m[at..end].copy_from_slice(&v[..end - at]);
            }
        }
    }
    m
}

#[test]
fn mutated_images_are_accepted_or_refused_never_a_panic() {
    let seeds = seeds();
    let mut rng = Rng(0x6b61_6761_6d69);
    for (name, seed) in &seeds {
        // The unmutated seed must be accepted by its own format, or the mutations test little.
        let verdict = kagami_images::format::verdict(&seed.as_slice(), None, &Default::default());
        assert!(verdict.accepted(), "{name}: {verdict:?}");
        for i in 0..600 {
            let input = mutate(&mut rng, seed);
            let result = std::panic::catch_unwind(|| fuzzing::inspect_and_read(&input));
            assert!(
                result.is_ok(),
                "{name}: mutation {i} panicked (seed state {:#x})",
                rng.0
            );
        }
    }
}

#[test]
fn random_manifests_and_frames_never_panic() {
    let mut rng = Rng(42);
    let real = kagami_images::split::split_bytes(&vec![3u8; 5 << 20]).encode_bundle();
    fuzzing::manifest(&real);
    for _ in 0..3000 {
        let input = mutate(&mut rng, &real);
        fuzzing::manifest(&input);
        fuzzing::frames(&input);
        let len = rng.below(200);
        let noise: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        fuzzing::manifest(&noise);
        fuzzing::frames(&noise);
    }
}
