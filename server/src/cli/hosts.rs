//! `kagami host`: enroll machines, assign images to their disks, follow and release them.

use clap::Subcommand;
use reqwest::Method;
use serde_json::{Value, json};

use super::client::Client;
use super::{Output, human_bytes, print};
use crate::catalog::hosts::{Deployment, Host};

#[derive(Debug, Subcommand)]
pub enum HostCommand {
    /// Enroll a machine before its first network boot.
    Add {
        /// The MAC it PXE-boots from (aa:bb:cc:dd:ee:ff).
        mac: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// List hosts with their state and latest deployment.
    List {
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Show a host (by id, MAC or name): inventory, deployment progress, state history.
    Show {
        host: String,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Assign images to a host's disks; its next network boot writes them.
    Deploy {
        host: String,
        /// The image for the host's first disk.
        #[arg(long, required_unless_present = "disk")]
        image: Option<String>,
        /// DEVICE=IMAGE, e.g. /dev/sdb=<ID>; repeat for more disks.
        #[arg(long, value_parser = parse_disk)]
        disk: Vec<(String, String)>,
        /// full: write every block; differential: write only what differs on the disk.
        #[arg(long, default_value = "full", value_parser = ["full", "differential"])]
        mode: String,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Capture a host's disks into a new image at its next network boot: the agent reads them,
    /// uploads only the blocks the server lacks, and the host returns to its state.
    Capture {
        host: String,
        /// The new image's name (a whole-machine image's disks: NAME-disk0, NAME-disk1, …).
        #[arg(long)]
        name: String,
        /// system or data (one disk), or whole (every disk, the system disk first).
        #[arg(long, default_value = "system", value_parser = ["system", "data", "whole"])]
        kind: String,
        /// The device to read, e.g. /dev/sda; repeat for a whole-machine image [default: the
        /// host's first fixed disk, or all of them for --kind whole].
        #[arg(long)]
        disk: Vec<String>,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Boot an ISO image on a host, temporarily: its next network boots `sanboot` the ISO over
    /// HTTP or iSCSI, until `kagami host release` (or for one boot), then it returns to its state.
    BootIso {
        host: String,
        /// The ISO image (kind iso, active).
        #[arg(long)]
        image: String,
        /// release: every network boot boots the ISO until the host is released; next-boot:
        /// one boot, then the host is back in its state.
        #[arg(long, default_value = "release", value_parser = ["release", "next-boot"])]
        until: String,
        /// http: iPXE reads the ISO from the content route; iscsi: from the iSCSI target
        /// (the server needs --iscsi-listen), logging in with CHAP credentials of this boot.
        #[arg(long, default_value = "http", value_parser = ["http", "iscsi"])]
        via: String,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Stop whatever the host was assigned (an unfinished deployment fails as released; an ISO
    /// boot ends and the host returns to the state it had before).
    Release { host: String },
    /// Forget a host and its history.
    Forget { host: String },
}

fn parse_disk(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((dev, image)) if dev.starts_with("/dev/") && !image.is_empty() => {
            Ok((dev.to_string(), image.to_string()))
        }
        _ => Err(format!(
            "'{s}' is not DEVICE=IMAGE (e.g. /dev/sdb=<image id>)"
        )),
    }
}

fn host_line(h: &Host) {
    let deployment = h.deployment.as_ref().map_or(String::new(), progress_text);
    let deployment = match &h.iso_boot {
        Some(b) => format!(
            "ISO {} over {} until {}",
            b.image,
            b.via.as_str(),
            b.until.as_str()
        ),
        None => deployment,
    };
    println!(
        "{}\t{}\t{}\t{}\t{deployment}",
        h.mac,
        h.name.as_deref().unwrap_or("-"),
        h.state.as_str(),
        h.state_reason
    );
}

/// ", ETA 1m 05s" while an estimate is known.
fn eta_text(eta: Option<u64>) -> String {
    match eta {
        Some(s) if s >= 60 => format!(", ETA {}m {:02}s", s / 60, s % 60),
        Some(s) => format!(", ETA {s}s"),
        None => String::new(),
    }
}

fn progress_text(d: &Deployment) -> String {
    if let Some(c) = &d.capture {
        return match (c.image, &c.progress) {
            (Some(image), _) => format!("capture {} {}: image {image}", d.id, d.state),
            (None, Some(p)) => format!(
                "capture {} {}: disk {} {} {} / {}{}",
                d.id,
                d.state,
                p.disk,
                p.phase,
                human_bytes(p.bytes_done),
                human_bytes(p.bytes_total),
                eta_text(p.eta_secs)
            ),
            (None, None) => {
                format!(
                    "capture {} {} ({} image '{}')",
                    d.id, d.state, c.kind, c.name
                )
            }
        };
    }
    let (done, total) = d.disks.iter().fold((0, 0), |(a, b), disk| {
        (a + disk.bytes_done, b + disk.bytes_total)
    });
    format!(
        "deployment {} {} ({} / {})",
        d.id,
        d.state,
        human_bytes(done),
        human_bytes(total)
    )
}

pub async fn run(client: &Client, cmd: HostCommand) -> anyhow::Result<()> {
    match cmd {
        HostCommand::Add { mac, name, output } => {
            let host: Host = client
                .call(
                    Method::POST,
                    "/v1/hosts",
                    &json!({"mac": mac, "name": name}),
                )
                .await?;
            print(output, &host, |h| {
                println!("enrolled host {} ({})", h.mac, h.id)
            })?;
        }
        HostCommand::List { output } => {
            let hosts: Vec<Host> = client.get("/v1/hosts").await?;
            print(output, &hosts, |l| l.iter().for_each(host_line))?;
        }
        HostCommand::Show { host, output } => {
            let detail: Value = client.get(&format!("/v1/hosts/{host}")).await?;
            print(output, &detail, |d| {
                let host: Option<Host> = serde_json::from_value(d.clone()).ok();
                if let Some(h) = &host {
                    host_line(h);
                    if let Some(dep) = &h.deployment {
                        for (i, disk) in dep.disks.iter().enumerate() {
                            println!(
                                "  disk {i}: {} ← image {}: {} {} / {}{}",
                                disk.device.as_deref().unwrap_or("(first disk)"),
                                disk.image_id,
                                disk.phase.as_deref().unwrap_or("pending"),
                                human_bytes(disk.bytes_done),
                                human_bytes(disk.bytes_total),
                                eta_text(disk.eta_secs)
                            );
                        }
                        if !dep.phases.is_empty() {
                            let phases: Vec<String> =
                                ["power_on", "ipxe", "agent_up", "write", "reboot"]
                                    .iter()
                                    .filter_map(|p| {
                                        Some(format!("{p} {:.1} s", dep.phases.get(*p)?))
                                    })
                                    .collect();
                            println!("  phases: {}", phases.join(", "));
                        }
                        if let Some(e) = &dep.error {
                            println!("  error: {e}");
                        }
                    }
                }
                for e in d["events"].as_array().into_iter().flatten() {
                    println!(
                        "  {}  {:<10} {}",
                        e["at"].as_str().unwrap_or_default(),
                        e["state"].as_str().unwrap_or_default(),
                        e["reason"].as_str().unwrap_or_default()
                    );
                }
            })?;
        }
        HostCommand::Deploy {
            host,
            image,
            disk,
            mode,
            output,
        } => {
            let disks: Vec<Value> = disk
                .iter()
                .map(|(device, image)| json!({"device": device, "image": image}))
                .collect();
            let body = json!({"image": image, "disks": disks, "mode": mode});
            let d: Deployment = client
                .call(Method::POST, &format!("/v1/hosts/{host}/deploy"), &body)
                .await?;
            print(output, &d, |d| {
                println!(
                    "deployment {} assigned to host {host}: it starts at the host's next network boot",
                    d.id
                )
            })?;
        }
        HostCommand::Capture {
            host,
            name,
            kind,
            disk,
            output,
        } => {
            let body = json!({"name": name, "kind": kind, "devices": disk});
            let d: Deployment = client
                .call(Method::POST, &format!("/v1/hosts/{host}/capture"), &body)
                .await?;
            print(output, &d, |d| {
                println!(
                    "capture {} assigned to host {host}: it starts at the host's next network boot",
                    d.id
                )
            })?;
        }
        HostCommand::BootIso {
            host,
            image,
            until,
            via,
            output,
        } => {
            let body = json!({"image": image, "until": until, "via": via});
            let h: Host = client
                .call(Method::POST, &format!("/v1/hosts/{host}/boot-iso"), &body)
                .await?;
            print(output, &h, |h| {
                println!(
                    "host {} boots ISO image {image} over {via} at its next network boot (until {until}); \
                     `kagami host release {host}` ends it",
                    h.mac
                )
            })?;
        }
        HostCommand::Release { host } => {
            let h: Host = client
                .call(
                    Method::POST,
                    &format!("/v1/hosts/{host}/release"),
                    &json!({}),
                )
                .await?;
            println!("host {} released; it is {}", h.mac, h.state.as_str());
        }
        HostCommand::Forget { host } => {
            client
                .send(client.request(Method::DELETE, &format!("/v1/hosts/{host}")))
                .await?;
            println!("host {host} forgotten");
        }
    }
    Ok(())
}
