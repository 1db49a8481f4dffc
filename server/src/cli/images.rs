//! `kagami image …`: create, upload, import, list, show, update, delete, download.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use kagami_images::format::{self, DiskFormat};
use kagami_images::model::{BootMode, Image, ImageKind, ImagePage, ImageStatus, Visibility};
use reqwest::Method;
use serde_json::{Map, Value, json};
use tokio::io::AsyncWriteExt;

use super::client::Client;
use super::{Output, human_bytes, print};
use crate::api::DIGEST_HEADER;
use crate::catalog::jobs::Job;

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Create an image record (no data yet); prints its id.
    Create {
        #[command(flatten)]
        meta: NewMeta,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Upload FILE (raw, ISO, qcow2, …) into a queued or failed image.
    Upload {
        id: String,
        file: PathBuf,
        /// The file's format [default: what its signature says, else raw].
        #[arg(long)]
        format: Option<DiskFormat>,
    },
    /// Create an image and upload FILE (raw, ISO, qcow2, …) into it, in one step (a format
    /// other than raw is converted by a job on the server, followed with its progress); or,
    /// with --source, have the server fetch the file as a durable job and follow it too.
    Import {
        /// The image file to upload.
        #[arg(required_unless_present = "source")]
        file: Option<PathBuf>,
        /// An http:// or https:// URL the server fetches (admin; needs --format).
        #[arg(long, conflicts_with = "file", requires = "format")]
        source: Option<String>,
        /// The file's format [default: what its signature says, else raw].
        #[arg(long)]
        format: Option<DiskFormat>,
        #[command(flatten)]
        meta: NewMeta,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// List images, newest last; filters combine.
    List {
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        kind: Option<ImageKind>,
        #[arg(long)]
        visibility: Option<Visibility>,
        #[arg(long)]
        status: Option<ImageStatus>,
        #[arg(long)]
        tag: Option<String>,
        #[arg(long)]
        owner: Option<String>,
        /// created_at, updated_at, name or virtual_size, with :asc or :desc.
        #[arg(long)]
        sort: Option<String>,
        /// Page size (1-1000); without --marker the CLI follows pages to the end.
        #[arg(long)]
        limit: Option<u32>,
        /// Start after this image id (one page only).
        #[arg(long)]
        marker: Option<String>,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Show one image.
    Show {
        id: String,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// The chain of captures an image ends: the image, the capture of the same host (and disk)
    /// before it, and so on, newest first, with what each one added.
    History {
        id: String,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Change an image's properties.
    Update {
        id: String,
        #[command(flatten)]
        patch: Patch,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Delete an image (refused while protected); its blocks go to garbage collection.
    Delete { id: String },
    /// Inspect a local image file, with no server: its format, virtual size, and whether Kagami
    /// would accept it (exit status 1 if not). Nothing inside the file is followed or opened.
    Inspect {
        file: PathBuf,
        /// The format you claim the file is [default: whatever its signature says, else raw].
        #[arg(long)]
        format: Option<DiskFormat>,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Download the raw disk to FILE (or stdout with `-o -`), then check it against the digest.
    Download {
        id: String,
        #[arg(short, long)]
        output: PathBuf,
        /// raw (default) or qcow2; the file is streamed as it is generated.
        #[arg(long, default_value = "raw")]
        format: DiskFormat,
        /// Skip re-hashing the downloaded file against the image digest.
        #[arg(long)]
        no_verify: bool,
    },
    /// Print the NBD URL that reads the image as a block device (`nbdcopy`, `nbdinfo`,
    /// `qemu-img`): `nbd://HOST:PORT/ID/TOKEN`. The URL holds your token: treat it as one.
    ExportNbd { id: String },
    /// Print the iSCSI URL of the image's target (`iscsi://HOST:PORT/IQN/0`) and the CHAP name
    /// and secret to log in with, derived from your token (they let whoever holds them read
    /// what your token may read, over iSCSI only). Public images need no CHAP.
    ExportIscsi { id: String },
}

/// Metadata given at creation.
#[derive(Debug, Args)]
pub struct NewMeta {
    /// The image's name (up to 255 characters; names need not be unique).
    #[arg(long)]
    name: String,
    /// Free text shown with the image.
    #[arg(long, default_value = "")]
    description: String,
    /// system, data, whole (all of a host's disks) or iso (transitional boots only).
    #[arg(long, default_value = "system")]
    kind: ImageKind,
    /// private, shared, public or marketplace.
    #[arg(long, default_value = "private")]
    visibility: Visibility,
    /// Least memory a host needs to boot the image, in MiB.
    #[arg(long)]
    min_ram_mb: Option<u64>,
    /// Least disk the image needs, in GiB.
    #[arg(long)]
    min_disk_gb: Option<u64>,
    /// Firmware the image boots with: bios or uefi.
    #[arg(long)]
    boot_mode: Option<BootMode>,
    /// CPU architecture, e.g. x86_64 or aarch64.
    #[arg(long)]
    architecture: Option<String>,
    /// A tag; repeat for several.
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// A property KEY=VALUE; repeat for several.
    #[arg(long = "property", value_parser = parse_property)]
    properties: Vec<(String, String)>,
    /// Refuse deletion until protection is turned off.
    #[arg(long)]
    protected: bool,
}

/// Fields to change; only those given are sent.
#[derive(Debug, Args)]
pub struct Patch {
    #[arg(long)]
    name: Option<String>,
    #[arg(long)]
    description: Option<String>,
    #[arg(long)]
    visibility: Option<Visibility>,
    #[arg(long)]
    min_ram_mb: Option<u64>,
    #[arg(long)]
    min_disk_gb: Option<u64>,
    #[arg(long)]
    boot_mode: Option<BootMode>,
    #[arg(long)]
    architecture: Option<String>,
    #[arg(long)]
    os_type: Option<String>,
    #[arg(long)]
    os_distro: Option<String>,
    #[arg(long)]
    os_version: Option<String>,
    /// Replace the tags (repeat for several).
    #[arg(long = "tag")]
    tags: Option<Vec<String>>,
    /// Replace the properties with KEY=VALUE pairs (repeat for several).
    #[arg(long = "property", value_parser = parse_property)]
    properties: Option<Vec<(String, String)>>,
    #[arg(long)]
    protected: Option<bool>,
}

fn parse_property(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("'{s}' is not KEY=VALUE"))
}

impl NewMeta {
    fn body(&self) -> Value {
        let props: BTreeMap<_, _> = self.properties.iter().cloned().collect();
        let mut body = json!({
            "name": self.name, "description": self.description, "kind": self.kind, "visibility": self.visibility,
            "tags": self.tags, "properties": props, "protected": self.protected,
        });
        for (key, value) in [
            ("min_ram_mb", self.min_ram_mb.map(Value::from)),
            ("min_disk_gb", self.min_disk_gb.map(Value::from)),
            ("boot_mode", self.boot_mode.map(|b| Value::from(b.as_str()))),
            ("architecture", self.architecture.clone().map(Value::from)),
        ] {
            if let Some(v) = value {
                body[key] = v;
            }
        }
        body
    }
}

impl Patch {
    fn body(&self) -> Value {
        let mut body = Map::new();
        let mut set = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                body.insert(k.into(), v);
            }
        };
        set("name", self.name.clone().map(Value::from));
        set("description", self.description.clone().map(Value::from));
        set(
            "visibility",
            self.visibility.map(|v| Value::from(v.as_str())),
        );
        set("min_ram_mb", self.min_ram_mb.map(Value::from));
        set("min_disk_gb", self.min_disk_gb.map(Value::from));
        set("boot_mode", self.boot_mode.map(|b| Value::from(b.as_str())));
        set("architecture", self.architecture.clone().map(Value::from));
        set("os_type", self.os_type.clone().map(Value::from));
        set("os_distro", self.os_distro.clone().map(Value::from));
        set("os_version", self.os_version.clone().map(Value::from));
        set("tags", self.tags.clone().map(Value::from));
        set(
            "properties",
            self.properties
                .as_ref()
                .map(|p| json!(p.iter().cloned().collect::<BTreeMap<_, _>>())),
        );
        set("protected", self.protected.map(Value::from));
        Value::Object(body)
    }
}

/// `kagami image inspect`: local, no server, no token.
pub fn inspect(file: &Path, claimed: Option<DiskFormat>, output: Output) -> anyhow::Result<()> {
    let f = std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
    let verdict = format::verdict(&f, claimed, &format::Limits::default());
    print(output, &verdict, |v| {
        print_verdict(&file.display().to_string(), v)
    })?;
    if !verdict.accepted() {
        std::process::exit(1);
    }
    Ok(())
}

fn print_verdict(what: &str, v: &format::Verdict) {
    match &v.info {
        Some(info) => {
            println!("{what}: accepted as {}", info.format);
            println!(
                "virtual size: {} ({} bytes); file: {}",
                human_bytes(info.virtual_size),
                info.virtual_size,
                human_bytes(info.file_size)
            );
            for f in &info.findings {
                println!("  - {f}");
            }
        }
        None => {
            println!(
                "{what}: refused as {} ({})",
                v.claimed,
                v.code.as_deref().unwrap_or_default()
            );
            println!("  {}", v.reason.as_deref().unwrap_or_default());
        }
    }
}

pub async fn run(client: &Client, cmd: ImageCommand) -> anyhow::Result<()> {
    match cmd {
        ImageCommand::Inspect {
            file,
            format,
            output,
        } => inspect(&file, format, output)?,
        ImageCommand::ExportNbd { id } => println!("{}", nbd_url(client, &id).await?),
        ImageCommand::ExportIscsi { id } => export_iscsi(client, &id).await?,
        ImageCommand::Create { meta, output } => {
            let image: Image = client
                .call(Method::POST, "/v1/images", &meta.body())
                .await?;
            print(output, &image, show)?;
        }
        ImageCommand::Upload { id, file, format } => {
            let image = upload(client, &id, &file, format).await?;
            show(&image);
        }
        ImageCommand::Import {
            file: None,
            source: Some(url),
            format: Some(format),
            meta,
            output,
        } => {
            let created: Image = client
                .call(Method::POST, "/v1/images", &meta.body())
                .await?;
            let id = created.id;
            let body = serde_json::json!({ "source_url": url, "disk_format": format });
            let job: Job = client
                .call(Method::POST, &format!("/v1/images/{id}/import"), &body)
                .await?;
            let image = follow(client, &job).await?;
            print(output, &image, show)?;
        }
        ImageCommand::Import { file: None, .. } => {
            bail!("give a FILE, or --source URL with --format")
        }
        ImageCommand::Import {
            file: Some(file),
            format,
            meta,
            output,
            ..
        } => {
            if !file.is_file() {
                bail!("{} is not a readable file", file.display());
            }
            let created: Image = client
                .call(Method::POST, "/v1/images", &meta.body())
                .await?;
            let image = upload(client, &created.id.to_string(), &file, format)
                .await
                .with_context(|| format!("image {} was created but its upload failed; retry with `kagami image upload {} FILE`", created.id, created.id))?;
            print(output, &image, show)?;
        }
        ImageCommand::List {
            name,
            kind,
            visibility,
            status,
            tag,
            owner,
            sort,
            limit,
            marker,
            output,
        } => {
            let mut query: Vec<(&str, String)> = Vec::new();
            let mut add = |k: &'static str, v: Option<String>| {
                if let Some(v) = v {
                    query.push((k, v));
                }
            };
            add("name", name);
            add("kind", kind.map(|k| k.to_string()));
            add("visibility", visibility.map(|v| v.to_string()));
            add("status", status.map(|s| s.to_string()));
            add("tag", tag);
            add("owner", owner);
            add("sort", sort);
            add("limit", limit.map(|l| l.to_string()));
            let one_page = marker.is_some();
            let mut marker = marker;
            let mut images = Vec::new();
            loop {
                let mut q = query.clone();
                if let Some(m) = &marker {
                    q.push(("marker", m.clone()));
                }
                let page: ImagePage = client
                    .json(client.request(Method::GET, "/v1/images").query(&q))
                    .await?;
                images.extend(page.images);
                marker = page.next_marker.map(|m| m.to_string());
                if one_page || marker.is_none() {
                    break;
                }
            }
            print(output, &images, |list| {
                println!(
                    "{:<36}  {:<24}  {:<6}  {:<11}  {:<7}  {:>10}",
                    "ID", "NAME", "KIND", "VISIBILITY", "STATUS", "SIZE"
                );
                for i in list {
                    let size = i
                        .virtual_size
                        .map(human_bytes)
                        .unwrap_or_else(|| "-".into());
                    println!(
                        "{:<36}  {:<24}  {:<6}  {:<11}  {:<7}  {:>10}",
                        i.id, i.name, i.kind, i.visibility, i.status, size
                    );
                }
            })?;
        }
        ImageCommand::Show { id, output } => {
            let image: Image = client.get(&format!("/v1/images/{id}")).await?;
            print(output, &image, show)?;
        }
        ImageCommand::History { id, output } => {
            let chain: Vec<Image> = client.get(&format!("/v1/images/{id}/history")).await?;
            print(output, &chain, |chain| {
                for i in chain {
                    println!(
                        "{}  {}  {:<8} {:<6} {:>10} of data  {}",
                        i.id,
                        i.created_at,
                        i.kind,
                        i.status,
                        i.data_size.map(human_bytes).unwrap_or_else(|| "-".into()),
                        i.name
                    );
                }
            })?;
        }
        ImageCommand::Update { id, patch, output } => {
            let image: Image = client
                .call(Method::PATCH, &format!("/v1/images/{id}"), &patch.body())
                .await?;
            print(output, &image, show)?;
        }
        ImageCommand::Delete { id } => {
            client
                .send(client.request(Method::DELETE, &format!("/v1/images/{id}")))
                .await?;
            println!("deleted {id}");
        }
        ImageCommand::Download {
            id,
            output,
            format,
            no_verify,
        } => download(client, &id, &output, format, !no_verify).await?,
    }
    Ok(())
}

/// Follows a job to its end with a progress bar; returns the image it made.
async fn follow(client: &Client, job: &Job) -> anyhow::Result<Image> {
    let pb = bar(0, "importing");
    let path = format!("/v1/jobs/{}", job.id);
    let outcome = loop {
        let now: Job = client.get(&path).await?;
        if let Some(total) = now.bytes_total {
            pb.set_length(total);
        }
        pb.set_position(now.bytes_done);
        pb.set_message(now.phase.clone().unwrap_or_default());
        match now.state.as_str() {
            "succeeded" => break Ok(()),
            "failed" => break Err(now.error.unwrap_or_default()),
            _ => tokio::time::sleep(std::time::Duration::from_millis(500)).await,
        }
    };
    pb.finish_and_clear();
    if let Err(e) = outcome {
        bail!("import job {} failed: {e}", job.id);
    }
    client.get(&format!("/v1/images/{}", job.image_id)).await
}

fn show(i: &Image) {
    println!("id:          {}", i.id);
    println!("name:        {}", i.name);
    println!("owner:       {}   region: {}", i.owner, i.region);
    println!(
        "kind:        {}   visibility: {}   protected: {}",
        i.kind, i.visibility, i.protected
    );
    match &i.status_reason {
        Some(r) => println!("status:      {} ({r})", i.status),
        None => println!("status:      {}", i.status),
    }
    if let (Some(v), Some(d)) = (i.virtual_size, i.data_size) {
        println!(
            "size:        {} virtual, {} of data in {} blocks",
            human_bytes(v),
            human_bytes(d),
            i.data_blocks.unwrap_or(0)
        );
    }
    if let Some(d) = &i.digest {
        println!("digest:      {d}");
    }
    if let Some(b) = i.boot_mode {
        println!("boot mode:   {b}");
    }
    if !i.tags.is_empty() {
        println!("tags:        {}", i.tags.join(", "));
    }
    for (k, v) in &i.properties {
        println!("property:    {k}={v}");
    }
    for (n, m) in i.members.iter().enumerate() {
        println!("disk {n}:      {m}");
    }
    if let Some(p) = i.parent {
        println!(
            "part of:     whole-machine image {p} (disk {})",
            i.disk_index.unwrap_or(0)
        );
    }
    if let Some(h) = &i.source_host {
        match &i.source_disk {
            Some(d) => println!("captured:    from {h}, disk {d}"),
            None => println!("captured:    from {h}"),
        }
    }
    if let Some(p) = i.previous {
        println!("previous:    {p} (kagami image history {})", i.id);
    }
}

fn bar(len: u64, verb: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    let style = ProgressStyle::with_template(&format!(
        "{verb} {{bar:40}} {{bytes}}/{{total_bytes}} {{bytes_per_sec}} eta {{eta}}"
    ))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    pb.set_style(style);
    pb
}

/// Sends a file into an image: raw and ISO bytes stream straight in (`PUT …/file`); other
/// formats go through the server's import (`POST …/import`), which inspects and converts them.
async fn upload(
    client: &Client,
    id: &str,
    file: &Path,
    format: Option<DiskFormat>,
) -> anyhow::Result<Image> {
    let f = tokio::fs::File::open(file)
        .await
        .with_context(|| format!("cannot open {}", file.display()))?;
    let format = match format {
        Some(f) => f,
        None => {
            let std_file = f.try_clone().await?.into_std().await;
            match tokio::task::spawn_blocking(move || format::detect(&std_file))
                .await??
                .as_slice()
            {
                [one] => *one,
                _ => DiskFormat::Raw,
            }
        }
    };
    let path = match format {
        DiskFormat::Raw | DiskFormat::Iso => format!("/v1/images/{id}/file"),
        other => format!("/v1/images/{id}/import?disk_format={other}"),
    };
    let method = if matches!(format, DiskFormat::Raw | DiskFormat::Iso) {
        Method::PUT
    } else {
        Method::POST
    };
    let len = f.metadata().await?.len();
    let pb = bar(len, "uploading");
    let progress = pb.clone();
    let stream = tokio_util::io::ReaderStream::with_capacity(f, 1 << 20).inspect(move |chunk| {
        if let Ok(c) = chunk {
            progress.inc(c.len() as u64);
        }
    });
    let req = client
        .request(method, &path)
        .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
        .header(reqwest::header::CONTENT_LENGTH, len)
        .body(reqwest::Body::wrap_stream(stream));
    if matches!(format, DiskFormat::Raw | DiskFormat::Iso) {
        let result = client.json(req).await;
        pb.finish_and_clear();
        return result;
    }
    // Other formats are converted by a job on the server: follow it to its end.
    let job: anyhow::Result<Job> = client.json(req).await;
    pb.finish_and_clear();
    follow(client, &job?).await
}

/// Bytes flushed to disk at a time while a download is written.
const FLUSH_EVERY: u64 = 16 << 20;
/// Received chunks waiting for the writer (tens of KiB each).
const WRITE_QUEUE: usize = 256;
/// Bytes gathered before they are written: whole 64 KiB blocks, so all-zero ones can be left
/// out, and a few large writes instead of one per received chunk.
const WRITE_BUFFER: usize = 4 << 20;

/// Writes what is sent to `file` on a thread of its own, so the transfer goes on while the disk
/// writes; another thread flushes (fdatasync) each [`FLUSH_EVERY`] bytes as they are written,
/// so the disk works alongside the transfer rather than all at the end. With `holes` (a raw
/// disk), a regular file (created empty) gets its all-zero blocks as holes — a raw download of a
/// sparse image stays sparse —, a device every byte; other formats carry their own holes and
/// are written as they come. The handle ends once the file is on disk (fsync).
fn durable_writer(
    file: std::fs::File,
    holes: bool,
) -> (
    tokio::sync::mpsc::Sender<bytes::Bytes>,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(WRITE_QUEUE);
    let done = tokio::task::spawn_blocking(move || {
        let sparse = holes && file.metadata()?.is_file();
        let file = std::sync::Arc::new(file);
        // One flush pending at most: a flush that starts later covers everything before it.
        let (flush, flushes) = std::sync::mpsc::sync_channel::<()>(1);
        let flusher = {
            let file = file.clone();
            std::thread::spawn(move || {
                while flushes.recv().is_ok() {
                    file.sync_data()?;
                }
                Ok::<(), std::io::Error>(())
            })
        };
        let wrote = (|| {
            let mut buf = Vec::with_capacity(if sparse { WRITE_BUFFER } else { 0 });
            let (mut at, mut since) = (0u64, 0u64);
            // Counts written bytes; asks for a flush every FLUSH_EVERY of them.
            let mut advance = |n: usize| {
                since += n as u64;
                if since >= FLUSH_EVERY {
                    since = 0;
                    let _ = flush.try_send(());
                }
            };
            while let Some(mut chunk) = rx.blocking_recv() {
                if !sparse {
                    std::os::unix::fs::FileExt::write_all_at(&*file, &chunk, at)?;
                    at += chunk.len() as u64;
                    advance(chunk.len());
                    continue;
                }
                while !chunk.is_empty() {
                    let take = chunk.len().min(WRITE_BUFFER - buf.len());
                    buf.extend_from_slice(&chunk.split_to(take));
                    if buf.len() == WRITE_BUFFER {
                        write_blocks(&file, &buf, at)?;
                        at += buf.len() as u64;
                        advance(buf.len());
                        buf.clear();
                    }
                }
            }
            if sparse {
                write_blocks(&file, &buf, at)?;
                // Trailing holes: the file still ends where the download does.
                file.set_len(at + buf.len() as u64)?;
            }
            Ok::<(), std::io::Error>(())
        })();
        drop(flush);
        let flushed = flusher
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the flushing thread panicked")));
        wrote.and(flushed).and_then(|()| file.sync_all())
    });
    (tx, done)
}

/// Writes `data` at offset `at` of `file` (a multiple of the block size), leaving out its
/// all-zero 64 KiB blocks (holes in a file created empty): runs of the others go in one write
/// each.
fn write_blocks(file: &std::fs::File, data: &[u8], at: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let block = kagami_images::BLOCK_SIZE;
    let mut run: Option<usize> = None;
    for (i, piece) in data.chunks(block).enumerate() {
        let zero = kagami_images::manifest::is_zero(piece);
        match (run, zero) {
            (None, false) => run = Some(i),
            (Some(from), true) => {
                file.write_all_at(&data[from * block..i * block], at + (from * block) as u64)?;
                run = None;
            }
            _ => {}
        }
    }
    if let Some(from) = run {
        file.write_all_at(&data[from * block..], at + (from * block) as u64)?;
    }
    Ok(())
}

async fn download(
    client: &Client,
    id: &str,
    output: &Path,
    format: DiskFormat,
    verify: bool,
) -> anyhow::Result<()> {
    let resp = client
        .send(client.request(
            Method::GET,
            &format!("/v1/images/{id}/file?format={format}"),
        ))
        .await?;
    let digest = resp
        .headers()
        .get(DIGEST_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let pb = bar(resp.content_length().unwrap_or(0), "downloading");
    let to_stdout = output == Path::new("-");
    let mut body = resp.bytes_stream();
    if to_stdout {
        let mut out = tokio::io::stdout();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.context("the download broke off; run it again")?;
            out.write_all(&chunk).await?;
            pb.inc(chunk.len() as u64);
        }
        out.flush().await?;
    } else {
        let file = std::fs::File::create(output)
            .with_context(|| format!("cannot create {}", output.display()))?;
        let (tx, written) = durable_writer(file, format == DiskFormat::Raw);
        while let Some(chunk) = body.next().await {
            let chunk = chunk.context("the download broke off; run it again")?;
            pb.inc(chunk.len() as u64);
            if tx.send(chunk).await.is_err() {
                break; // the writer stopped: its error follows
            }
        }
        drop(tx);
        written
            .await?
            .with_context(|| format!("cannot write {}", output.display()))?;
    }
    pb.finish_and_clear();
    if to_stdout || !verify {
        return Ok(());
    }
    let Some(expected) = digest else {
        bail!("the server sent no digest to verify against")
    };
    let path = output.to_path_buf();
    // Verify what was written: read the file back as its logical disk (through Kagami's own
    // inspector and reader for non-raw formats) and compare the manifest digest.
    let manifest =
        tokio::task::spawn_blocking(move || -> anyhow::Result<kagami_images::Manifest> {
            let file = std::fs::File::open(path)?;
            if format == DiskFormat::Raw {
                return Ok(kagami_images::split::split_reader(file, |_, _, _| Ok(()))?);
            }
            let limits = format::Limits::default();
            let info = format::inspect(&file, format, &limits)?;
            let mut disk = format::read::open(file, &info, &limits)?;
            let mut builder = kagami_images::split::ManifestBuilder::new();
            let mut buf = vec![0u8; kagami_images::SEGMENT_SIZE];
            let mut at = 0u64;
            while at < info.virtual_size {
                let n = (info.virtual_size - at).min(buf.len() as u64) as usize;
                disk.read_logical(&mut buf[..n], at)?;
                builder.push(&buf[..n])?;
                at += n as u64;
            }
            Ok(builder.finish())
        })
        .await??;
    let actual = format!("sha256:{}", manifest.digest());
    if actual != expected {
        bail!(
            "{} does not match the image: digest {actual}, expected {expected}",
            output.display()
        );
    }
    eprintln!(
        "wrote {} ({}), digest verified: {expected}",
        output.display(),
        human_bytes(manifest.virtual_size())
    );
    Ok(())
}

/// The NBD URL of image `id` for this client's token, once the server confirms the token can
/// read the image and that NBD is on. A listener on every address (`0.0.0.0:10809`) is named by
/// the host the CLI reaches the API at.
async fn nbd_url(client: &Client, id: &str) -> anyhow::Result<String> {
    let (image, host, port) = export_address(client, id, "nbd", "NBD").await?;
    Ok(format!(
        "nbd://{host}:{port}/{}/{}",
        image.id,
        client.token()
    ))
}

/// Prints image `id`'s iSCSI URL and this client's CHAP credentials (see `kagami image
/// export-iscsi --help`).
async fn export_iscsi(client: &Client, id: &str) -> anyhow::Result<()> {
    let (image, host, port) = export_address(client, id, "iscsi", "iSCSI").await?;
    let target = crate::stream::iscsi::target_name(image.id);
    let (name, secret) = crate::stream::iscsi::chap::credentials(client.token());
    println!("iscsi://{host}:{port}/{target}/0");
    println!("CHAP name:   {name}");
    println!("CHAP secret: {secret}");
    println!("libiscsi (qemu-img, iscsi-ls): iscsi://{name}%{secret}@{host}:{port}/{target}/0");
    Ok(())
}

/// Image `id` (once the server confirms this client's token can read it and it is active) and
/// the host and port of the server's `key` listener from `/v1/exports`. A listener on every
/// address (`0.0.0.0:PORT`) is named by the host the CLI reaches the API at.
async fn export_address(
    client: &Client,
    id: &str,
    key: &str,
    what: &str,
) -> anyhow::Result<(Image, String, u16)> {
    let image: Image = client.get(&format!("/v1/images/{id}")).await?;
    if image.status != ImageStatus::Active {
        bail!(
            "image {id} is {}; only active images can be exported",
            image.status
        );
    }
    let exports: Value = client.get("/v1/exports").await?;
    let Some(listen) = exports[key].as_str() else {
        bail!(
            "the server does not serve {what}; start it with --{key}-listen ADDR:PORT (or [{key}] listen)"
        );
    };
    let addr: std::net::SocketAddr = listen
        .parse()
        .with_context(|| format!("the server reported an {what} address {listen:?}"))?;
    let host = if addr.ip().is_unspecified() {
        reqwest::Url::parse(client.base())
            .ok()
            .and_then(|u| u.host_str().map(str::to_string))
            .unwrap_or_else(|| "localhost".into())
    } else {
        match addr.ip() {
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            ip => ip.to_string(),
        }
    };
    Ok((image, host, addr.port()))
}
