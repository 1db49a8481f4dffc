//! Shared by the format tests: real images from qemu, no-panic sweeps, and reading a whole
//! logical disk back.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::read::{Logical, open};
use super::{DiskFormat, DiskInfo, FormatError, Limits, ReadAt, inspect, inspect_claimed};

/// A named change to an image.
pub type Patch = Box<dyn Fn(&mut [u8])>;

/// `assert!(matches!(got, want))` for an inspection's result `got` (evaluated once), showing
/// it on failure after `what` (format arguments) when given.
macro_rules! assert_matches {
    ($got:expr, $want:pat $(,)?) => {{
        let got = $got;
        assert!(matches!(got, $want), "{got:?}");
    }};
    ($got:expr, $want:pat, $($what:tt)+) => {{
        let got = $got;
        assert!(matches!(got, $want), "{}: {got:?}", format_args!($($what)+));
    }};
}
pub(crate) use assert_matches;

/// Runs `program` (qemu-img or qemu-io: qemu-utils is on every machine of this project) and
/// insists it works.
pub fn run(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().expect("spawn");
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs qemu-img and insists it works.
pub fn qemu_img(args: &[&str]) {
    run("qemu-img", args);
}

/// Whether qemu-img runs here; the inspector tests built on qemu images skip (and say so)
/// without it.
pub fn have_qemu() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("qemu-img is missing; skipping");
    }
    ok
}

pub fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).expect("write");
}

/// `qemu-img create -q -f <format> [opts] <dir/name> <size>`, then each of `writes` (qemu-io
/// commands such as `write -P 0xab 1M 64k`) applied to the new image.
pub fn create(
    dir: &Path,
    name: &str,
    format: &str,
    opts: &[&str],
    size: &str,
    writes: &[&str],
) -> PathBuf {
    let path = dir.join(name);
    let p = path.to_str().expect("utf-8 path");
    let mut args = vec!["create", "-q", "-f", format];
    args.extend_from_slice(opts);
    args.extend_from_slice(&[p, size]);
    qemu_img(&args);
    if !writes.is_empty() {
        let mut args = vec!["-f", format];
        for w in writes {
            args.extend_from_slice(&["-c", w]);
        }
        args.push(p);
        run("qemu-io", &args);
    }
    path
}

/// `qemu-img convert -q -f <from> -O <to> [opts] <src> <dst>`.
pub fn qemu_convert(src: &Path, from: &str, dst: &Path, to: &str, opts: &[&str]) {
    let mut args = vec!["convert", "-q", "-f", from, "-O", to];
    args.extend_from_slice(opts);
    args.push(src.to_str().expect("utf-8 path"));
    args.push(dst.to_str().expect("utf-8 path"));
    qemu_img(&args);
}

/// Converts the raw disk `raw` to `image` in `format` (qemu's name for it), with `opts`.
pub fn convert(raw: &Path, image: PathBuf, format: &str, opts: &[&str]) -> PathBuf {
    qemu_convert(raw, "raw", &image, format, opts);
    image
}

/// What qemu makes of the image: `qemu-img convert -O raw`.
pub fn qemu_raw(image: &Path, qemu_format: &str) -> Vec<u8> {
    let out = image.with_extension("qemu.raw");
    qemu_convert(image, qemu_format, &out, "raw", &[]);
    let data = std::fs::read(&out).expect("read");
    std::fs::remove_file(&out).expect("remove");
    data
}

/// `qemu-img compare`: qemu must read `image` (in `format`) as the raw disk `raw`.
pub fn qemu_compare(raw: &Path, image: &Path, format: &str) {
    qemu_img(&[
        "compare",
        "-q",
        "-f",
        "raw",
        "-F",
        format,
        raw.to_str().expect("p"),
        image.to_str().expect("p"),
    ]);
}

/// Every prefix of the first `span` bytes, and every single-byte flip in them, must give an
/// answer (accept or refuse), never a panic or a huge allocation.
pub fn corrupt_everywhere(image: &[u8], claimed: DiskFormat, span: usize) {
    let limits = Limits {
        max_virtual_size: 1 << 40,
        max_metadata_bytes: 1 << 20,
    };
    for cut in 0..span.min(image.len()) {
        inspect_both(&&image[..cut], claimed, &limits);
    }
    let mut copy = image.to_vec();
    for at in 0..span.min(image.len()) {
        for flip in [0x01u8, 0x80, 0xff] {
            copy[at] ^= flip;
            inspect_both(&&copy[..], claimed, &limits);
            copy[at] ^= flip;
        }
    }
}

/// Inspects `r` both ways and checks they agree as imports rely on: what [`inspect_claimed`]
/// refuses (an upload still arriving is converted on it), [`inspect`] refuses too, and what
/// `inspect` accepts, `inspect_claimed` accepts with the same findings.
pub fn inspect_both(r: &dyn ReadAt, claimed: DiskFormat, limits: &Limits) {
    let whole = inspect(r, claimed, limits);
    let own = inspect_claimed(r, claimed, limits);
    match (&whole, &own) {
        (Ok(w), Ok(o)) => assert_eq!(w, o, "{claimed}"),
        (Ok(_), Err(_)) => panic!("{claimed}: accepted whole, refused on its own checks: {own:?}"),
        (Err(_), _) => {}
    }
}

/// Inspecting the prefixes of `data` cut at `cuts`, then `rounds` copies of it with one to four
/// random bit flips each (at `pick(r)` for a random `r`; then `fix(round, copy)` may repair
/// checksums so the flips reach deeper checks), must give an answer, never a panic. The flips
/// come from a xorshift generator started at `seed`, so a failure reproduces.
pub fn flips_never_panic(
    data: &[u8],
    claimed: DiskFormat,
    cuts: impl Iterator<Item = usize>,
    seed: u64,
    rounds: u32,
    pick: impl Fn(usize) -> usize,
    fix: impl Fn(u32, &mut [u8]),
) {
    let limits = Limits::default();
    for cut in cuts {
        inspect_both(&&data[..cut], claimed, &limits);
    }
    let mut seed = seed;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for i in 0..rounds {
        let mut bad = data.to_vec();
        for _ in 0..1 + next() % 4 {
            let r = next() as usize;
            bad[pick(r)] ^= 1 << (next() % 8);
        }
        fix(i, &mut bad);
        inspect_both(&bad.as_slice(), claimed, &limits);
    }
}

/// 20 MiB + 12 KiB (a partial last block in every format): data stretches that differ
/// every 4 KiB, 1 MiB holes, a few unaligned bytes across block boundaries, data at the
/// very end.
pub fn sample_disk() -> Vec<u8> {
    let mut disk = vec![0u8; (20 << 20) + (12 << 10)];
    for (i, chunk) in disk.chunks_mut(1 << 20).enumerate() {
        if i % 3 != 1 {
            for (j, b) in chunk.iter_mut().enumerate() {
                *b = (i * 31 + j / 4096) as u8 | 1;
            }
        }
    }
    // Inside holes, straddling 1 MiB and 2 MiB boundaries (and 64 KiB clusters).
    disk[(4 << 20) - 3..(4 << 20) + 3].fill(0xee);
    disk[(7 << 20) + 65_535] = 0x5a;
    disk[(10 << 20) + 1] = 0xa5;
    let n = disk.len();
    disk[n - 5..].fill(0x77);
    disk
}

/// Writes the sample disk as `disk.raw` in `dir`, returning its path and content.
pub fn sample_raw(dir: &Path) -> (PathBuf, Vec<u8>) {
    let disk = sample_disk();
    let raw = dir.join("disk.raw");
    write(&raw, &disk);
    (raw, disk)
}

/// Inspects and opens an image file.
pub fn open_file(image: &Path, format: DiskFormat) -> (DiskInfo, Box<dyn Logical>) {
    let file = std::fs::File::open(image).expect("open");
    let info = inspect(&file, format, &Limits::default()).expect("accepted");
    let reader = open(file, &info, &Limits::default()).expect("opens");
    (info, reader)
}

/// The piece sizes [`read_all`] cycles through: odd, and crossing block boundaries.
const PIECES: [usize; 6] = [1, 4095, 70_000, 1 << 20, (9 << 20) + 1, 513];

/// Reads the whole logical disk in pieces of the sizes in `pieces`, over and over.
pub fn read_in_pieces(reader: &mut dyn Logical, pieces: &[usize]) -> Result<Vec<u8>, FormatError> {
    let size = usize::try_from(reader.virtual_size()).expect("size");
    let mut out = vec![0u8; size];
    let mut at = 0;
    for piece in pieces.iter().cycle() {
        if at >= size {
            break;
        }
        let n = (*piece).min(size - at);
        reader.read_logical(&mut out[at..at + n], at as u64)?;
        at += n;
    }
    Ok(out)
}

/// Reads the whole logical disk in odd pieces that cross block boundaries.
pub fn read_all(reader: &mut dyn Logical) -> Result<Vec<u8>, FormatError> {
    read_in_pieces(reader, &PIECES)
}

/// Inspects and reads `image` whole, and checks the result against qemu's conversion
/// and against `disk` (the logical disk may be longer, zero-padded).
pub fn check_image(image: &Path, format: DiskFormat, qemu_format: &str, disk: &[u8]) {
    let (info, mut reader) = open_file(image, format);
    assert_eq!(reader.virtual_size(), info.virtual_size);
    let got = read_all(&mut *reader).expect("reads");
    let name = image.display();
    assert!(got.len() >= disk.len(), "{name}: {} bytes", got.len());
    assert!(
        got[..disk.len()] == *disk,
        "{name}: logical content differs"
    );
    assert!(
        got[disk.len()..].iter().all(|&b| b == 0),
        "{name}: the padding is not zero"
    );
    assert!(
        got == qemu_raw(image, qemu_format),
        "{name}: differs from qemu-img convert"
    );
    // What the tables call a hole reads as zeroes, in windows of a block, a segment, and odd.
    for window in [64 << 10, 4 << 20, 3 * 4096 + 512] {
        for at in (0..got.len()).step_by(window) {
            let len = window.min(got.len() - at);
            let hole = reader.is_hole(at as u64, len as u64).expect("is_hole");
            assert!(
                !hole || got[at..at + len].iter().all(|&b| b == 0),
                "{name}: {len} bytes at {at} called a hole hold data"
            );
        }
    }
    // Reads past the end are refused, not zero-filled or wrapped.
    let mut one = [0u8; 2];
    assert!(
        reader
            .read_logical(&mut one, info.virtual_size - 1)
            .is_err()
    );
    assert!(reader.read_logical(&mut one, u64::MAX).is_err());
    assert!(reader.read_logical(&mut [], info.virtual_size).is_ok());
}

/// Converts the sample disk (written as `disk.raw` in `dir`) to `qemu_format` once per
/// `(name, qemu-img options)` case, as `<name>.<ext>` in `dir`, and checks each image with
/// [`check_image`]. Returns the sample's path and content.
pub fn check_conversions(
    dir: &Path,
    format: DiskFormat,
    qemu_format: &str,
    ext: &str,
    cases: &[(&str, &[&str])],
) -> (PathBuf, Vec<u8>) {
    let (raw, disk) = sample_raw(dir);
    for (name, opts) in cases {
        let image = convert(&raw, dir.join(format!("{name}.{ext}")), qemu_format, opts);
        check_image(&image, format, qemu_format, &disk);
    }
    (raw, disk)
}

/// Opens `bytes` (a damaged copy of an inspected image) with the original image's
/// inspection result and reads it whole, for the error.
pub fn read_damaged(dir: &Path, bytes: &[u8], info: &DiskInfo) -> Result<(), FormatError> {
    let path = dir.join("damaged.img");
    write(&path, bytes);
    let file = std::fs::File::open(&path).expect("open");
    let mut reader = open(file, info, &Limits::default())?;
    read_all(&mut *reader).map(|_| ())
}
