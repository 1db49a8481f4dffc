//! `kagami`: the Kagami daemon (`kagami serve`) and its command-line client.

mod api;
mod boot;
mod catalog;
mod cli;
mod config;
mod error;
mod ingest;
mod jobs;
mod notify;
mod serve;
mod store;
mod stream;
mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::cli::admin::{ProjectCommand, StoreCommand, TokenCommand};
use crate::cli::client::Client;
use crate::cli::exports::ExportCommand;
use crate::cli::hosts::HostCommand;
use crate::cli::images::ImageCommand;
use crate::cli::ramdisk::RamdiskCommand;
use crate::config::{Config, Overrides};

/// Kagami: bare-metal provisioning with a real image service.
#[derive(Debug, Parser)]
#[command(name = "kagami", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon: image catalog, block store and HTTP API.
    Serve {
        /// Catalog, block packs and the first admin token live here [default: ./kagami-data].
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Address of the HTTP API [default: 0.0.0.0:8470].
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// A TOML file (see systemd/kagami.toml); KAGAMI__SECTION__KEY variables override it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The base URL machines are told to use [default: the URL their iPXE used].
        #[arg(long)]
        advertise_url: Option<String>,
        /// The agent ramdisk's folder (vmlinuz, initrd.img) [default: DATA_DIR/ramdisk].
        #[arg(long)]
        ramdisk_dir: Option<PathBuf>,
        /// Serve TFTP on this address (port 69 for PXE clients) [default: off].
        #[arg(long, value_name = "ADDR:PORT")]
        tftp_listen: Option<SocketAddr>,
        /// Serve every image read-only over NBD on this address (port 10809 by convention)
        /// [default: off].
        #[arg(long, value_name = "ADDR:PORT")]
        nbd_listen: Option<SocketAddr>,
        /// Serve every image read-only as an iSCSI target (`iqn.2026-11.io.kagami:<id>`, LUN
        /// 0) on this address (port 3260 by convention) [default: off].
        #[arg(long, value_name = "ADDR:PORT")]
        iscsi_listen: Option<SocketAddr>,
        /// The files PXE clients fetch (iPXE binaries) [default: /srv/kagami/boot].
        #[arg(long, value_name = "DIR")]
        boot_dir: Option<PathBuf>,
        /// The provisioning interface DHCP listens and answers on (alone).
        #[arg(long, value_name = "IF")]
        dhcp_interface: Option<String>,
        /// DHCP: proxy (boot files beside the site's DHCP server), full (addresses too) or
        /// off [default: off].
        #[arg(long, value_name = "MODE", value_parser = ["proxy", "full", "off"])]
        dhcp_mode: Option<String>,
        /// Full-mode DHCP pool.
        #[arg(long, value_name = "FIRST,LAST")]
        dhcp_range: Option<String>,
    },
    /// Manage images.
    Image {
        #[command(flatten)]
        remote: Remote,
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// Manage hosts: enroll, deploy images onto their disks, release (admin).
    Host {
        #[command(flatten)]
        remote: Remote,
        #[command(subcommand)]
        command: HostCommand,
    },
    /// Build the agent's boot ramdisk (no server needed).
    Ramdisk {
        #[command(subcommand)]
        command: RamdiskCommand,
    },
    /// Manage projects (admin).
    Project {
        #[command(flatten)]
        remote: Remote,
        #[command(subcommand)]
        command: ProjectCommand,
    },
    /// Manage bearer tokens (admin).
    Token {
        #[command(flatten)]
        remote: Remote,
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// The block exports' open sessions (NBD, iSCSI).
    Export {
        #[command(flatten)]
        remote: Remote,
        #[command(subcommand)]
        command: ExportCommand,
    },
    /// Inspect the block store and collect garbage (admin).
    Store {
        #[command(flatten)]
        remote: Remote,
        #[command(subcommand)]
        command: StoreCommand,
    },
}

/// Which server to talk to, and as whom.
#[derive(Debug, clap::Args)]
struct Remote {
    /// The server's base URL.
    #[arg(
        long,
        env = "KAGAMI_URL",
        default_value = "http://127.0.0.1:8470",
        global = true
    )]
    url: String,
    /// A bearer token [default: ./kagami-data/admin.token when readable].
    #[arg(long, env = "KAGAMI_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
}

impl Remote {
    fn client(self) -> anyhow::Result<Client> {
        Client::new(&self.url, self.token)
    }
}

fn main() -> ExitCode {
    // Before any HTTP client exists (import sources, the CLI's client): see `tls`.
    tls::install_provider();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KAGAMI_LOG").unwrap_or_else(|_| {
                let level = if matches!(cli.command, Command::Serve { .. }) {
                    "info"
                } else {
                    "warn"
                };
                tracing_subscriber::EnvFilter::new(level)
            }),
        )
        .with_writer(std::io::stderr)
        // Colours for a terminal only: the journal and log files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kagami: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kagami: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve {
            data_dir,
            listen,
            config,
            advertise_url,
            ramdisk_dir,
            tftp_listen,
            nbd_listen,
            iscsi_listen,
            boot_dir,
            dhcp_interface,
            dhcp_mode,
            dhcp_range,
        } => {
            let config = Config::load(
                config.as_deref(),
                Overrides {
                    listen,
                    data_dir,
                    advertise_url,
                    ramdisk_dir,
                    tftp_listen,
                    nbd_listen,
                    iscsi_listen,
                    boot_dir,
                    dhcp_interface,
                    dhcp_mode,
                    dhcp_range,
                },
            )?;
            serve::serve(config).await
        }
        // Inspecting a local file needs no server and no token.
        Command::Image {
            command:
                ImageCommand::Inspect {
                    file,
                    format,
                    output,
                },
            ..
        } => cli::images::inspect(&file, format, output),
        Command::Image { remote, command } => cli::images::run(&remote.client()?, command).await,
        Command::Host { remote, command } => cli::hosts::run(&remote.client()?, command).await,
        Command::Ramdisk { command } => cli::ramdisk::run(command),
        Command::Project { remote, command } => {
            cli::admin::project(&remote.client()?, command).await
        }
        Command::Token { remote, command } => cli::admin::token(&remote.client()?, command).await,
        Command::Store { remote, command } => cli::admin::store(&remote.client()?, command).await,
        Command::Export { remote, command } => cli::exports::run(&remote.client()?, command).await,
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
