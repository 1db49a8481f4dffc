//! `kagami-agent capture`: makes an image from a disk, uploading only the blocks the server
//! lacks — differential by construction: a second capture of a disk that changed by 1 % moves
//! about 1 % of it.
//!
//! 1. Read the whole disk with direct reads (several in flight) and hash every 64 KiB block on
//!    both cores: the manifest.
//! 2. Ask the server which of those blocks it lacks (`POST /v1/blocks/missing`, up to 65,536
//!    ids a request).
//! 3. Read again only the segments holding a missing block, a few at a time, and upload those
//!    blocks as frames (`POST /v1/blocks`; the server re-hashes every one).
//! 4. Create the image and commit the manifest (`PUT /v1/images/{id}/manifest`): the image
//!    exists only once all of it is stored; a failed capture leaves its blocks to GC.
//!
//! A whole-machine capture (`--kind whole`, several `--disk`, the system disk first) captures
//! each disk as its own image (`NAME-disk0` a system image, the others data images), then makes
//! the whole-machine image that groups them; if any step fails, the disk images already made
//! are deleted again. Every image records its source host (`--source`, by default this
//! machine's hostname) and disk, and the server links it to the previous capture of them.
//!
//! The second read costs the first capture of a disk a second pass over its data; keeping
//! segments in memory until the server answered would bound that by RAM instead. Uploads
//! through a per-boot agent token (host capture) come with the capture deployment work.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use kagami_images::manifest::{BLOCK_SIZE, SEGMENT_SIZE};
use kagami_images::split::ManifestBuilder;
use kagami_images::{BlockId, Manifest, wire};
use reqwest::Method;

use crate::client::{Client, retrying};
use crate::disk::Target;
use crate::io::link::{scan, start_io};
use crate::io::{self, Files};
use crate::progress::{Counters, Phase, Progress};

#[derive(Debug)]
pub struct Options {
    pub server: String,
    pub token: String,
    pub name: String,
    /// system or data (one disk), or whole (the disks in order, system disk first).
    pub kind: String,
    pub disks: Vec<PathBuf>,
    /// The host the disks belong to, for the images' lineage.
    pub source: String,
    /// Where images are made: `/images` (an admin token) or `/agent/images` (a capturing
    /// agent's per-boot token).
    pub images_path: &'static str,
    /// Receives progress snapshots (a host capture reports them to the server).
    pub progress: Option<tokio::sync::watch::Sender<crate::progress::Snapshot>>,
    pub force: bool,
    pub queue_depth: usize,
    pub engine: io::Choice,
    pub patience: Duration,
}

/// What a capture made: the image (a whole-machine image for several disks), totals over its
/// disks, and each disk's report.
#[derive(Debug, serde::Serialize)]
pub struct Capture {
    pub image: String,
    pub kind: String,
    /// The disk image's digest (a whole-machine image has one per disk).
    pub digest: Option<String>,
    /// Over all its disks.
    #[serde(flatten)]
    pub counts: Counts,
    pub disks: Vec<Report>,
}

/// One disk's capture.
#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub image: String,
    pub disk: PathBuf,
    pub digest: String,
    #[serde(flatten)]
    pub counts: Counts,
}

/// What a capture read, hashed and sent.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Counts {
    pub virtual_size: u64,
    /// Bytes read from the disk, both passes.
    pub read_bytes: u64,
    /// Blocks hashed (the others are holes: all zeroes, recognised without hashing).
    pub data_blocks: u64,
    /// Data blocks the server already had (from this or any image).
    pub known_blocks: u64,
    pub uploaded_blocks: u64,
    /// Frame bytes sent (block bytes plus 36 per block).
    pub uploaded_bytes: u64,
    pub seconds: f64,
}

impl std::iter::Sum<Counts> for Counts {
    fn sum<I: Iterator<Item = Counts>>(all: I) -> Counts {
        all.fold(Counts::default(), |a, c| Counts {
            virtual_size: a.virtual_size + c.virtual_size,
            read_bytes: a.read_bytes + c.read_bytes,
            data_blocks: a.data_blocks + c.data_blocks,
            known_blocks: a.known_blocks + c.known_blocks,
            uploaded_blocks: a.uploaded_blocks + c.uploaded_blocks,
            uploaded_bytes: a.uploaded_bytes + c.uploaded_bytes,
            seconds: a.seconds + c.seconds,
        })
    }
}

/// Segments re-read and uploaded per request (≤ 16 MiB of frames, held once: retries share
/// the same bytes).
const UPLOAD_SEGMENTS: usize = 4;
/// Ids per `blocks/missing` request.
const MISSING_BATCH: usize = 65536;

/// This machine's hostname: the default source of its captures.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

pub async fn run(opts: Options) -> anyhow::Result<Capture> {
    let started = Instant::now();
    let whole = opts.kind == "whole";
    match (whole, opts.disks.len()) {
        (_, 0) => anyhow::bail!("give the disk to capture (--disk)"),
        (false, n) if n > 1 => anyhow::bail!(
            "{n} disks for one {} image: capture several disks as a whole-machine image \
             (--kind whole, the system disk first)",
            opts.kind
        ),
        (true, n) if n > MAX_DISKS => {
            anyhow::bail!("a whole-machine image holds at most {MAX_DISKS} disks, not {n}")
        }
        _ => {}
    }
    let client = Client::new(&opts.server, &opts.token)?;
    let counters = Arc::new(Counters::default());
    let progress = Progress::start(counters.clone(), opts.progress.clone());
    let mut reports: Vec<Report> = Vec::new();
    for (i, disk) in opts.disks.iter().enumerate() {
        let (name, kind) = match (whole, i) {
            (false, _) => (opts.name.clone(), opts.kind.as_str()),
            (true, 0) => (format!("{}-disk0", opts.name), "system"),
            (true, _) => (format!("{}-disk{i}", opts.name), "data"),
        };
        let at = (&progress, counters.as_ref(), i);
        match capture_disk(&client, &opts, at, disk, &name, kind).await {
            Ok(report) => reports.push(report),
            Err(e) => {
                forget(&client, &opts, &reports).await;
                return Err(e.context(format!("capturing {}", disk.display())));
            }
        }
    }
    let image = if whole {
        let members: Vec<&str> = reports.iter().map(|r| r.image.as_str()).collect();
        let new = serde_json::json!({"name": opts.name, "kind": "whole", "members": members,
                                     "source_host": opts.source});
        match create_image(&client, &opts, &new).await {
            Ok(id) => id,
            Err(e) => {
                forget(&client, &opts, &reports).await;
                return Err(e.context("making the whole-machine image"));
            }
        }
    } else {
        reports[0].image.clone()
    };
    progress.finish();
    let counts = Counts {
        seconds: started.elapsed().as_secs_f64(),
        ..reports.iter().map(|r| r.counts).sum()
    };
    Ok(Capture {
        image,
        kind: opts.kind.clone(),
        digest: (!whole).then(|| reports[0].digest.clone()),
        counts,
        disks: reports,
    })
}

/// Disks in one whole-machine image (the server's limit).
const MAX_DISKS: usize = 32;

/// Deletes the disk images of a capture that failed half way (their blocks go to GC); a
/// failure here is logged, the capture's own error is the one reported.
async fn forget(client: &Client, opts: &Options, reports: &[Report]) {
    for r in reports {
        let path = format!("{}/{}", opts.images_path, r.image);
        if let Err(e) = client
            .send_body(
                Method::DELETE,
                &path,
                bytes::Bytes::new(),
                "application/json",
            )
            .await
        {
            tracing::warn!(
                "could not delete image {} of the failed capture: {e}",
                r.image
            );
        }
    }
}

/// Creates an image from its JSON description; its id.
async fn create_image(
    client: &Client,
    opts: &Options,
    new: &serde_json::Value,
) -> anyhow::Result<String> {
    let body = bytes::Bytes::from(new.to_string());
    let created = retrying("creating the image", opts.patience, || {
        client.send_body(
            Method::POST,
            opts.images_path,
            body.clone(),
            "application/json",
        )
    })
    .await?;
    let created: serde_json::Value = serde_json::from_slice(&created)?;
    Ok(created["id"]
        .as_str()
        .ok_or_else(|| anyhow!("the server did not return an image id"))?
        .to_string())
}

/// Captures one disk into a new image named `name` of `kind`.
async fn capture_disk(
    client: &Client,
    opts: &Options,
    (progress, counters, index): (&Progress, &Counters, usize),
    disk: &std::path::Path,
    name: &str,
    kind: &str,
) -> anyhow::Result<Report> {
    let started = Instant::now();
    let target = Target::open_read(disk, opts.force)?;
    let size = target.size;
    if size == 0 {
        anyhow::bail!("{} is empty", disk.display());
    }
    let files = Arc::new(Files::new(target.direct, target.buffered));
    let (mut link, engine, io_thread) = start_io(files, opts.engine, opts.queue_depth, 2, 6)?;
    tracing::info!("capturing {} ({size} bytes) with {engine}", disk.display());

    // 1. Hash every block.
    progress.phase_of(index, Phase::Reading, size);
    let count = Manifest::segment_count(size);
    let mut segments: Vec<Option<Vec<BlockId>>> = vec![None; count];
    scan(&mut link, size, (0..count).collect(), |i, ids, data| {
        segments[i] = Some(ids);
        counters
            .scanned_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(())
    })
    .await?;
    let mut builder = ManifestBuilder::new();
    for (i, ids) in segments.iter().enumerate() {
        let ids = ids
            .clone()
            .ok_or_else(|| anyhow!("segment {i} was not read"))?;
        let len = (size - i as u64 * SEGMENT_SIZE as u64).min(SEGMENT_SIZE as u64) as usize;
        builder.push_ids(len, ids)?;
    }
    let manifest = builder.finish();
    let (data_blocks, _) = manifest.data_stats();

    // 2. Which blocks does the server lack?
    let distinct: Vec<BlockId> = {
        let mut seen = HashSet::new();
        manifest
            .blocks()
            .filter(|b| !b.id.is_hole() && seen.insert(b.id))
            .map(|b| b.id)
            .collect()
    };
    let mut missing: HashSet<BlockId> = HashSet::new();
    for batch in distinct.chunks(MISSING_BATCH) {
        let body = bytes::Bytes::from(wire::encode_ids(batch));
        let answer = retrying("asking which blocks are missing", opts.patience, || {
            client.send_body(
                Method::POST,
                "/blocks/missing",
                body.clone(),
                "application/octet-stream",
            )
        })
        .await?;
        let ids = wire::decode_ids(&answer).ok_or_else(|| anyhow!("a malformed missing list"))?;
        missing.extend(ids);
    }
    let known_blocks = distinct.len() as u64 - missing.len() as u64;

    // 3. Upload them, re-reading only their segments.
    let holding: Vec<usize> = manifest
        .segments()
        .iter()
        .enumerate()
        .filter(|(_, s)| s.blocks.iter().any(|b| missing.contains(b)))
        .map(|(i, _)| i)
        .collect();
    let mut read_bytes = size;
    let (mut uploaded_blocks, mut uploaded_bytes) = (0u64, 0u64);
    let frame = BLOCK_SIZE as u64 + wire::FRAME_HEADER as u64;
    progress.phase_of(index, Phase::Uploading, missing.len() as u64 * frame);
    for chunk in holding.chunks(UPLOAD_SEGMENTS) {
        let mut frames = Vec::new();
        let mut sent = 0u64;
        scan(&mut link, size, chunk.to_vec(), |_, ids, data| {
            read_bytes += data.len() as u64;
            for (j, id) in ids.iter().enumerate() {
                if missing.remove(id) {
                    let bytes = &data[j * BLOCK_SIZE..((j + 1) * BLOCK_SIZE).min(data.len())];
                    wire::encode_frame(&mut frames, id, bytes);
                    sent += 1;
                }
            }
            Ok(())
        })
        .await?;
        if frames.is_empty() {
            continue;
        }
        uploaded_blocks += sent;
        uploaded_bytes += frames.len() as u64;
        let frames = bytes::Bytes::from(frames);
        retrying("uploading blocks", opts.patience, || {
            client.send_body(
                Method::POST,
                "/blocks",
                frames.clone(),
                "application/vnd.kagami.blocks.v1",
            )
        })
        .await?;
        counters
            .sent_bytes
            .fetch_add(frames.len() as u64, Ordering::Relaxed);
    }
    if !missing.is_empty() {
        anyhow::bail!(
            "{} blocks read in the first pass were not found again: the disk changed while it \
             was captured",
            missing.len()
        );
    }
    drop(link);
    match io_thread.join() {
        Ok(r) => r.context("the I/O engine failed")?,
        Err(_) => anyhow::bail!("the I/O thread panicked"),
    }

    // 4. The image, committed whole.
    let new = serde_json::json!({"name": name, "kind": kind, "source_host": opts.source,
                                 "source_disk": disk.display().to_string()});
    let id = create_image(client, opts, &new).await?;
    let bundle = bytes::Bytes::from(manifest.encode_bundle());
    let path = format!("{}/{id}/manifest", opts.images_path);
    retrying("committing the manifest", opts.patience, || {
        client.send_body(
            Method::PUT,
            &path,
            bundle.clone(),
            "application/vnd.kagami.manifest.v1",
        )
    })
    .await?;
    Ok(Report {
        image: id,
        disk: disk.to_path_buf(),
        digest: format!("sha256:{}", manifest.digest()),
        counts: Counts {
            virtual_size: size,
            read_bytes,
            data_blocks,
            known_blocks,
            uploaded_blocks,
            uploaded_bytes,
            seconds: started.elapsed().as_secs_f64(),
        },
    })
}
