//! `kagami ramdisk build`: make the agent's boot ramdisk (see `boot::ramdisk`).

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;

use super::human_bytes;
use crate::boot::ramdisk::{self, DEFAULT_MODULES};

#[derive(Debug, Subcommand)]
pub enum RamdiskCommand {
    /// Build vmlinuz + initrd.img for `kagami serve --ramdisk-dir DIR` from a kernel and its
    /// modules (e.g. unpacked from Debian's linux-image-amd64 with `dpkg -x`).
    Build {
        /// The kernel image (vmlinuz).
        #[arg(long)]
        kernel: PathBuf,
        /// That kernel's modules: its /lib/modules/<version> folder.
        #[arg(long)]
        modules: PathBuf,
        /// Where vmlinuz and initrd.img are written.
        #[arg(long)]
        out: PathBuf,
        /// The agent binary [default: kagami-agent beside this kagami].
        #[arg(long)]
        agent: Option<PathBuf>,
        /// A static busybox (Debian: busybox-static).
        #[arg(long, default_value = "/bin/busybox")]
        busybox: PathBuf,
        /// Driver modules to load at boot, with their dependencies [default: virtio, SATA,
        /// NVMe and common server NICs].
        #[arg(long = "module")]
        modules_wanted: Vec<String>,
    },
}

pub fn run(cmd: RamdiskCommand) -> anyhow::Result<()> {
    match cmd {
        RamdiskCommand::Build {
            kernel,
            modules,
            out,
            agent,
            busybox,
            modules_wanted,
        } => {
            let agent = match agent {
                Some(a) => a,
                None => std::env::current_exe()
                    .context("where is this binary?")?
                    .with_file_name("kagami-agent"),
            };
            let module_names = if modules_wanted.is_empty() {
                DEFAULT_MODULES.iter().map(|m| m.to_string()).collect()
            } else {
                modules_wanted
            };
            let built = ramdisk::build(&ramdisk::Build {
                kernel,
                modules,
                out: out.clone(),
                agent,
                busybox,
                module_names,
            })?;
            println!(
                "{}: vmlinuz and initrd.img ({}), {} modules: {}",
                out.display(),
                human_bytes(built.initrd_bytes),
                built.modules.len(),
                built.modules.join(" ")
            );
            if !built.skipped.is_empty() {
                println!(
                    "not in this kernel's modules (built in or absent): {}",
                    built.skipped.join(" ")
                );
            }
            Ok(())
        }
    }
}
