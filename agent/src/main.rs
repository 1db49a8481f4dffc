//! `kagami-agent`: runs on the machine being provisioned.
//!
//! Today it can print the manifest of what is on a disk or file (`hash`), which is how capture
//! and differential writes see a disk. Writing images with io_uring, inventory and capture arrive
//! with their issues.

use std::fs::File;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kagami_images::split::split_reader;

#[derive(Debug, Parser)]
#[command(name = "kagami-agent", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
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

fn main() -> ExitCode {
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
