//! `kagami-agent`: runs on the machine being provisioned, booted from Kagami's ramdisk.
//!
//! - `write`: puts an image onto a disk — verified, hole-aware, differential, resumable
//!   ([`write`]);
//! - `hash`: prints the manifest digest of what is on a disk or file, which is how capture and
//!   differential writes see a disk.

use std::fs::File;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kagami_images::split::split_reader;

mod capture;
mod client;
mod deploy;
mod disk;
mod inventory;
mod io;
mod progress;
mod write;

#[derive(Debug, Parser)]
#[command(
    name = "kagami-agent",
    version,
    about = "Kagami's agent: writes images onto this machine's disks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write an image onto a disk: every block verified before it is written, holes discarded
    /// or zeroed, only changed blocks in differential mode, retried and resumed after network
    /// or server failures.
    Write(WriteArgs),
    /// The agent's job on a network-booted host: report the inventory, fetch the task, write
    /// the assigned images onto the disks while reporting progress, report the result.
    /// Server and token come from the flags or from the kernel command line (kagami.url=,
    /// kagami.token=), where the host's iPXE script puts them.
    Run(RunArgs),
    /// Make an image from a disk, uploading only the blocks the server lacks (a second capture
    /// of a disk moves only what changed). Needs an admin token today.
    Capture(CaptureArgs),
    /// Print this machine's inventory (disks, NICs, CPU, memory, firmware) as JSON.
    Inventory,
    /// Hash a disk (or image file) into 64 KiB blocks and print its digest and block counts.
    Hash {
        /// The block device or file to read.
        #[arg(long)]
        disk: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, clap::Args)]
struct WriteArgs {
    /// The Kagami server, e.g. http://10.0.0.1:8080.
    #[arg(long, env = "KAGAMI_URL")]
    server: String,
    /// A token that may read the image.
    #[arg(long, env = "KAGAMI_TOKEN", hide_env_values = true)]
    token: String,
    /// The image's id.
    #[arg(long)]
    image: String,
    /// The disk to write: a block device (e.g. /dev/nvme0n1) or a plain file.
    #[arg(long)]
    disk: PathBuf,
    /// full: write every block; differential: read the disk first, write only what differs.
    #[arg(long, value_enum, default_value = "full")]
    mode: write::Mode,
    /// zero: make the image's holes read as zeroes (discard where the disk guarantees zeroes);
    /// skip: leave them, for a disk known to be zeroed.
    #[arg(long, value_enum, default_value = "zero")]
    holes: write::Holes,
    /// Read back every block written, after the final flush, and check it.
    #[arg(long)]
    verify: bool,
    /// Segment requests in flight (each up to 4 MiB).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    jobs: u16,
    /// Disk operations in flight (io_uring queue depth).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    queue_depth: u16,
    /// The disk I/O engine: io_uring, falling back to a thread pool where it is refused.
    #[arg(long, value_enum, default_value = "auto")]
    engine: io::Choice,
    /// How long to keep retrying when the server or network is away, e.g. 10m.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    retry_for: Duration,
    /// Write even if the disk is in use (mounted, swap, held) or holds the running root.
    #[arg(long)]
    force: bool,
    /// Print the final report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct CaptureArgs {
    /// The Kagami server, e.g. http://10.0.0.1:8470.
    #[arg(long, env = "KAGAMI_URL")]
    server: String,
    /// An admin token (block uploads are admin-only for now).
    #[arg(long, env = "KAGAMI_TOKEN", hide_env_values = true)]
    token: String,
    /// The new image's name (a whole-machine image's disks are NAME-disk0, NAME-disk1, …).
    #[arg(long)]
    name: String,
    /// system or data (one --disk), or whole: every --disk, the system disk first.
    #[arg(long, default_value = "system", value_parser = ["system", "data", "whole"])]
    kind: String,
    /// The disk (block device or file) to capture; it must not be mounted. Repeat for a
    /// whole-machine image.
    #[arg(long, required = true)]
    disk: Vec<PathBuf>,
    /// The host these disks belong to, recorded as the images' source: captures of the same
    /// source (and disk) form a chain (`kagami image history`) [default: this hostname].
    #[arg(long)]
    source: Option<String>,
    /// Capture even a mounted disk (safe only for a read-only mount).
    #[arg(long)]
    force: bool,
    /// Disk reads in flight (io_uring queue depth).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    queue_depth: u16,
    #[arg(long, value_enum, default_value = "auto")]
    engine: io::Choice,
    /// How long to keep retrying when the server is away.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    retry_for: Duration,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The Kagami server [default: kagami.url= on the kernel command line].
    #[arg(long)]
    server: Option<String>,
    /// The per-boot agent token [default: kagami.token= on the kernel command line].
    #[arg(long, hide_env_values = true, env = "KAGAMI_AGENT_TOKEN")]
    token: Option<String>,
    /// While no task is assigned, ask again every 5 s instead of exiting.
    #[arg(long)]
    wait: bool,
    /// Read back and check every block after writing.
    #[arg(long)]
    verify: bool,
    /// Restart the machine after a successful deployment (in the ramdisk).
    #[arg(long)]
    reboot: bool,
    /// How long to keep retrying when the server is away, e.g. 30m.
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    retry_for: Duration,
    /// Segment requests in flight.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    jobs: u16,
    /// Disk operations in flight (io_uring queue depth).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    queue_depth: u16,
    #[arg(long, value_enum, default_value = "auto")]
    engine: io::Choice,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    // reqwest is built with rustls and no default provider (never aws-lc): pick ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")
}

fn run_agent(args: RunArgs) -> anyhow::Result<()> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let (url, token) = deploy::from_cmdline(&cmdline);
    let opts = deploy::Options {
        server: args.server.or(url).ok_or_else(|| {
            anyhow::anyhow!(
                "no server: pass --server or boot with kagami.url= on the kernel command line"
            )
        })?,
        token: args.token.or(token).ok_or_else(|| {
            anyhow::anyhow!(
                "no token: pass --token or boot with kagami.token= on the kernel command line"
            )
        })?,
        wait: args.wait,
        verify: args.verify,
        patience: args.retry_for,
        jobs: args.jobs.into(),
        queue_depth: args.queue_depth.into(),
        engine: args.engine,
    };
    let deployed = runtime()?.block_on(deploy::run(opts))?;
    if deployed && args.reboot {
        nix::unistd::sync();
        nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT)
            .context("cannot reboot")?;
    }
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KAGAMI_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kagami-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(args) => run_agent(args),
        Command::Capture(a) => {
            let report = runtime()?.block_on(capture::run(capture::Options {
                server: a.server,
                token: a.token,
                name: a.name,
                kind: a.kind,
                disks: a.disk,
                source: a.source.unwrap_or_else(capture::hostname),
                images_path: "/images",
                progress: None,
                force: a.force,
                queue_depth: a.queue_depth.into(),
                engine: a.engine,
                patience: a.retry_for,
            }))?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        Command::Inventory => {
            println!("{}", serde_json::to_string_pretty(&inventory::collect())?);
            Ok(())
        }
        Command::Write(args) => {
            let json = args.json;
            let opts = write::Options {
                server: args.server,
                token: args.token,
                image: args.image,
                disk: args.disk,
                mode: args.mode,
                holes: args.holes,
                verify: args.verify,
                jobs: args.jobs.into(),
                queue_depth: args.queue_depth.into(),
                engine: args.engine,
                force: args.force,
                images_path: "/images",
                progress: None,
                patience: args.retry_for,
            };
            let report = runtime()?.block_on(write::run(opts))?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                let c = &report.counters;
                let mib = |b: u64| b as f64 / 1048576.0;
                println!(
                    "{}: image {} written in {:.1} s ({}): {:.1} MiB written, {:.1} MiB zeroed, \
                     {:.1} MiB unchanged, {} blocks fetched, {:.1} MiB verified, {} retries",
                    report.disk.display(),
                    report.digest,
                    report.seconds,
                    report.engine,
                    mib(c.written_bytes),
                    mib(c.zeroed_bytes),
                    mib(c.unchanged_bytes),
                    c.fetched_blocks,
                    mib(c.verified_bytes),
                    c.retries
                );
            }
            Ok(())
        }
        Command::Hash { disk, json } => {
            let file =
                File::open(&disk).with_context(|| format!("cannot open {}", disk.display()))?;
            let manifest = split_reader(file, |_, _, _| Ok(()))
                .with_context(|| format!("cannot read {}", disk.display()))?;
            let (blocks, bytes) = manifest.data_stats();
            let digest = format!("sha256:{}", manifest.digest());
            if json {
                let v = serde_json::json!({
                    "disk": disk, "digest": digest, "virtual_size": manifest.virtual_size(),
                    "data_blocks": blocks, "data_size": bytes, "segments": manifest.segments().len(),
                });
                println!("{v}");
            } else {
                println!(
                    "{}: {digest}, {} bytes, {blocks} data blocks ({bytes} bytes)",
                    disk.display(),
                    manifest.virtual_size()
                );
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
