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
//! The second read costs the first capture of a disk a second pass over its data; keeping
//! segments in memory until the server answered would bound that by RAM instead. Uploads
//! through a per-boot agent token (host capture) come with the capture deployment work.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
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

#[derive(Debug)]
pub struct Options {
    pub server: String,
    pub token: String,
    pub name: String,
    pub kind: String,
    pub disk: PathBuf,
    pub force: bool,
    pub queue_depth: usize,
    pub engine: io::Choice,
    pub patience: Duration,
}

#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub image: String,
    pub disk: PathBuf,
    pub digest: String,
    pub virtual_size: u64,
    /// Bytes read from the disk, both passes.
    pub read_bytes: u64,
    pub data_blocks: u64,
    /// Data blocks the server already had (from this or any image).
    pub known_blocks: u64,
    pub uploaded_blocks: u64,
    /// Frame bytes sent (block bytes plus 36 per block).
    pub uploaded_bytes: u64,
    pub seconds: f64,
}

/// Segments re-read and uploaded per request (≤ 16 MiB of frames, held once: retries share
/// the same bytes).
const UPLOAD_SEGMENTS: usize = 4;
/// Ids per `blocks/missing` request.
const MISSING_BATCH: usize = 65536;

pub async fn run(opts: Options) -> anyhow::Result<Report> {
    let started = Instant::now();
    let client = Client::new(&opts.server, &opts.token)?;
    let target = Target::open_read(&opts.disk, opts.force)?;
    let size = target.size;
    if size == 0 {
        anyhow::bail!("{} is empty", opts.disk.display());
    }
    let files = Arc::new(Files::new(target.direct, target.buffered));
    let (mut link, engine, io_thread) = start_io(files, opts.engine, opts.queue_depth, 2, 6)?;
    tracing::info!(
        "capturing {} ({size} bytes) with {engine}",
        opts.disk.display()
    );

    // 1. Hash every block.
    let count = Manifest::segment_count(size);
    let mut segments: Vec<Option<Vec<BlockId>>> = vec![None; count];
    scan(&mut link, size, (0..count).collect(), |i, ids, _| {
        segments[i] = Some(ids);
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
    let new = serde_json::json!({"name": opts.name, "kind": opts.kind});
    let created = retrying("creating the image", opts.patience, || {
        client.send_body(
            Method::POST,
            "/images",
            bytes::Bytes::from(new.to_string()),
            "application/json",
        )
    })
    .await?;
    let created: serde_json::Value = serde_json::from_slice(&created)?;
    let id = created["id"]
        .as_str()
        .ok_or_else(|| anyhow!("the server did not return an image id"))?
        .to_string();
    let bundle = bytes::Bytes::from(manifest.encode_bundle());
    let path = format!("/images/{id}/manifest");
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
        disk: opts.disk,
        digest: format!("sha256:{}", manifest.digest()),
        virtual_size: size,
        read_bytes,
        data_blocks,
        known_blocks,
        uploaded_blocks,
        uploaded_bytes,
        seconds: started.elapsed().as_secs_f64(),
    })
}
