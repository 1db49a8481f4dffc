//! `kagami-agent run`: the agent's life on a booted host. Report the inventory, fetch the task,
//! write each disk with [`crate::write`] while reporting progress to the server, report the
//! result, and (with `--reboot`) restart into the new system.
//!
//! The server and token come from flags or, in the ramdisk, from the kernel command line
//! (`kagami.url=… kagami.token=…`, put there by the host's iPXE script). Every call retries
//! with backoff, so a server restart in the middle of a deployment costs a pause, not the
//! deployment.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use serde::Deserialize;
use serde_json::json;

use crate::client::{Client, retrying};
use crate::write;

#[derive(Debug, Deserialize)]
struct Disk {
    device: Option<String>,
    image_id: String,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "task", rename_all = "lowercase")]
enum Task {
    Deploy {
        deployment: String,
        mode: String,
        disks: Vec<Disk>,
    },
    Capture(CaptureTask),
    Wait,
}

/// Read these disks (none named: the system disk, or all fixed disks for `whole`) into a new
/// image named `name` of `kind`, from host `source`.
#[derive(Debug, Deserialize)]
struct CaptureTask {
    deployment: String,
    name: String,
    kind: String,
    disks: Vec<String>,
    source: String,
}

#[derive(Debug)]
pub struct Options {
    pub server: String,
    pub token: String,
    /// Poll for a task while there is none (a discovered host waiting to be deployed).
    pub wait: bool,
    pub verify: bool,
    pub patience: Duration,
    pub jobs: usize,
    pub queue_depth: usize,
    pub engine: crate::io::Choice,
}

/// `kagami.url` and `kagami.token` from a kernel command line.
pub fn from_cmdline(cmdline: &str) -> (Option<String>, Option<String>) {
    let get = |key: &str| {
        cmdline
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .map(str::to_string)
    };
    (get("kagami.url="), get("kagami.token="))
}

/// The device of each disk: its own, or — for those that name none, in order — the host's
/// fixed disks (`candidates`, in the inventory's order) that no other entry names.
fn choose_devices(disks: &[Disk], candidates: &[String]) -> anyhow::Result<Vec<PathBuf>> {
    let named: Vec<&str> = disks.iter().filter_map(|d| d.device.as_deref()).collect();
    let mut free = candidates.iter().filter(|c| !named.contains(&c.as_str()));
    disks
        .iter()
        .enumerate()
        .map(|(i, d)| match &d.device {
            Some(dev) => Ok(PathBuf::from(dev)),
            None => free.next().map(PathBuf::from).ok_or_else(|| {
                anyhow!(
                    "disk {i} of the deployment names no device and this host has no fixed disk \
                     left for it (fixed disks: {candidates:?})"
                )
            }),
        })
        .collect()
}

/// Sends a task's progress snapshots to the server (at most one every 2 s) until aborted; the
/// disk is `disk`, or the snapshot's own when `None` (a capture moves from disk to disk).
fn report_progress(
    client: &Client,
    deployment: &str,
    disk: Option<usize>,
) -> (
    tokio::sync::watch::Sender<crate::progress::Snapshot>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, mut rx) = tokio::sync::watch::channel(crate::progress::Snapshot::default());
    let (client, deployment) = (client.clone(), deployment.to_string());
    let reporter = tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let s = *rx.borrow_and_update();
            let body = json!({"deployment": deployment, "disk": disk.unwrap_or(s.disk),
                              "phase": s.phase, "bytes_done": s.done, "bytes_total": s.total,
                              "eta_secs": s.eta_secs});
            if let Err(e) = client.post_json("/agent/progress", &body).await {
                tracing::warn!("progress report: {e}");
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    });
    (tx, reporter)
}

/// Captures the host's disks into a new image for the server (its per-boot token uploads the
/// blocks and commits the images) and reports the result.
async fn capture(client: &Client, opts: &Options, task: CaptureTask) -> anyhow::Result<bool> {
    let CaptureTask {
        deployment,
        name,
        kind,
        disks,
        source,
    } = task;
    let started = Instant::now();
    // No device named: the system disk, or every fixed disk for a whole-machine image.
    let fixed = crate::inventory::fixed_disks();
    let disks: Vec<PathBuf> = match (disks.is_empty(), kind.as_str()) {
        (false, _) => disks.into_iter().map(PathBuf::from).collect(),
        (true, "whole") => fixed.into_iter().map(PathBuf::from).collect(),
        (true, _) => fixed.into_iter().take(1).map(PathBuf::from).collect(),
    };
    tracing::info!(
        "capture {deployment}: {} disk(s) as a {kind} image",
        disks.len()
    );
    let (tx, reporter) = report_progress(client, &deployment, None);
    let outcome = crate::capture::run(crate::capture::Options {
        server: opts.server.clone(),
        token: opts.token.clone(),
        name,
        kind,
        disks,
        source,
        images_path: "/agent/images",
        progress: Some(tx),
        force: false,
        queue_depth: opts.queue_depth,
        engine: opts.engine,
        patience: opts.patience,
    })
    .await;
    reporter.abort();
    if let Ok(made) = &outcome {
        let done = json!({"deployment": deployment, "disk": made.disks.len().saturating_sub(1),
                          "phase": "done", "bytes_done": made.counts.virtual_size,
                          "bytes_total": made.counts.virtual_size});
        retrying("reporting progress", opts.patience, || {
            client.post_json("/agent/progress", &done)
        })
        .await?;
    }
    let mut timings = BTreeMap::new();
    timings.insert("capture".to_string(), started.elapsed().as_secs_f64());
    let result = match &outcome {
        Ok(c) => json!({"deployment": deployment, "image": c.image, "timings": timings}),
        Err(e) => json!({"deployment": deployment, "error": format!("{e:#}"), "timings": timings}),
    };
    retrying("reporting the result", opts.patience, || {
        client.post_json("/agent/result", &result)
    })
    .await?;
    let made = outcome?;
    println!(
        "capture {deployment}: image {} made ({} blocks uploaded, {} bytes) and reported",
        made.image, made.counts.uploaded_blocks, made.counts.uploaded_bytes
    );
    Ok(true)
}

/// Runs the agent's task; `Ok(true)` when a deployment was written or a capture made (the
/// caller may reboot).
pub async fn run(opts: Options) -> anyhow::Result<bool> {
    let client = Client::new(&opts.server, &opts.token)?;
    let inventory = crate::inventory::collect();
    retrying("reporting the inventory", opts.patience, || {
        client.post_json("/agent/inventory", &inventory)
    })
    .await?;
    tracing::info!("inventory reported to {}", opts.server);
    let (deployment, mode, disks) = loop {
        let task: Task = retrying("fetching the task", opts.patience, || {
            client.get_json("/agent/task")
        })
        .await?;
        match task {
            Task::Deploy {
                deployment,
                mode,
                disks,
            } => break (deployment, mode, disks),
            Task::Capture(task) => return capture(&client, &opts, task).await,
            Task::Wait if opts.wait => tokio::time::sleep(Duration::from_secs(5)).await,
            Task::Wait => {
                println!("no task for this host");
                return Ok(false);
            }
        }
    };
    tracing::info!("deployment {deployment}: {} disk(s), {mode}", disks.len());
    let started = Instant::now();
    let outcome = write_disks(&client, &opts, &deployment, &mode, &disks).await;
    let mut timings = BTreeMap::new();
    timings.insert("write".to_string(), started.elapsed().as_secs_f64());
    let error = outcome.as_ref().err().map(|e| format!("{e:#}"));
    let result = json!({"deployment": deployment, "error": error, "timings": timings});
    retrying("reporting the result", opts.patience, || {
        client.post_json("/agent/result", &result)
    })
    .await?;
    outcome?;
    println!("deployment {deployment} written and reported");
    Ok(true)
}

async fn write_disks(
    client: &Client,
    opts: &Options,
    deployment: &str,
    mode: &str,
    disks: &[Disk],
) -> anyhow::Result<()> {
    if disks.is_empty() {
        bail!("the deployment lists no disk");
    }
    let devices = choose_devices(disks, &crate::inventory::fixed_disks())?;
    for (i, (disk, device)) in disks.iter().zip(devices).enumerate() {
        let (tx, reporter) = report_progress(client, deployment, Some(i));
        let options = write::Options {
            server: opts.server.clone(),
            token: opts.token.clone(),
            image: disk.image_id.clone(),
            disk: device.clone(),
            mode: match mode {
                "differential" => write::Mode::Differential,
                _ => write::Mode::Full,
            },
            holes: write::Holes::Zero,
            verify: opts.verify,
            jobs: opts.jobs,
            queue_depth: opts.queue_depth,
            engine: opts.engine,
            force: false,
            patience: opts.patience,
            images_path: "/agent/images",
            progress: Some(tx),
        };
        let report = write::run(options)
            .await
            .with_context(|| format!("disk {i} ({})", device.display()));
        reporter.abort();
        let report = report?;
        let total = report.virtual_size;
        let done = json!({"deployment": deployment, "disk": i, "phase": "done",
                          "bytes_done": total, "bytes_total": total});
        retrying("reporting progress", opts.patience, || {
            client.post_json("/agent/progress", &done)
        })
        .await?;
        tracing::info!(
            "disk {i} ({}): image {} written: {} blocks fetched, {} bytes written",
            device.display(),
            report.digest,
            report.counters.fetched_blocks,
            report.counters.written_bytes
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_kernel_command_line_names_server_and_token() {
        let (url, token) = super::from_cmdline(
            "BOOT_IMAGE=vmlinuz initrd=initrd.img kagami.url=http://10.0.0.1:8470 kagami.token=kgm_ab console=ttyS0",
        );
        assert_eq!(url.as_deref(), Some("http://10.0.0.1:8470"));
        assert_eq!(token.as_deref(), Some("kgm_ab"));
        assert_eq!(super::from_cmdline("quiet"), (None, None));
    }

    #[test]
    fn disks_without_a_device_take_the_free_fixed_disks_in_order() {
        let disk = |device: Option<&str>| super::Disk {
            device: device.map(str::to_string),
            image_id: "i".into(),
        };
        let fixed = ["/dev/vda", "/dev/vdb", "/dev/vdc"].map(str::to_string);
        let chosen =
            super::choose_devices(&[disk(None), disk(Some("/dev/vda")), disk(None)], &fixed)
                .expect("enough disks");
        let chosen: Vec<_> = chosen.iter().map(|p| p.display().to_string()).collect();
        assert_eq!(chosen, ["/dev/vdb", "/dev/vda", "/dev/vdc"]);
        let e = super::choose_devices(&[disk(None), disk(None)], &fixed[..1])
            .expect_err("one disk short");
        assert!(e.to_string().contains("disk 1"), "{e}");
    }
}
