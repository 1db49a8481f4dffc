//! `kagami project|token|store`: tenancy and store administration.

use clap::Subcommand;
use reqwest::Method;
use serde_json::json;

use super::client::Client;
use super::{Output, human_bytes, print};
use crate::api::StoreStats;
use crate::catalog::tenancy::{Project, Role, TokenInfo};
use crate::jobs::gc::GcReport;

#[derive(Debug, Subcommand)]
pub enum ProjectCommand {
    /// Create a project (a tenant that owns images).
    Create { name: String },
    /// List projects.
    List {
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a bearer token; its secret is printed once.
    Create {
        #[arg(long)]
        project: String,
        #[arg(long, value_parser = parse_role, default_value = "member")]
        role: Role,
        #[arg(long, default_value = "")]
        description: String,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// List tokens (never their secrets).
    List {
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Revoke a token by id.
    Revoke { id: String },
}

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Show the block store's totals.
    Stats {
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Run garbage collection now.
    Gc {
        /// Keep unreferenced blocks younger than this (default: the server's gc.grace_secs).
        #[arg(long)]
        grace_secs: Option<u64>,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
}

fn parse_role(s: &str) -> Result<Role, String> {
    match s {
        "admin" => Ok(Role::Admin),
        "member" => Ok(Role::Member),
        _ => Err(format!("'{s}' is not a role; use admin or member")),
    }
}

pub async fn project(client: &Client, cmd: ProjectCommand) -> anyhow::Result<()> {
    match cmd {
        ProjectCommand::Create { name } => {
            let p: Project = client
                .call(Method::POST, "/v1/projects", &json!({ "name": name }))
                .await?;
            println!("created project {}", p.name);
        }
        ProjectCommand::List { output } => {
            let list: Vec<Project> = client.get("/v1/projects").await?;
            print(output, &list, |l| {
                l.iter()
                    .for_each(|p| println!("{}\t{}", p.name, p.created_at))
            })?;
        }
    }
    Ok(())
}

pub async fn token(client: &Client, cmd: TokenCommand) -> anyhow::Result<()> {
    match cmd {
        TokenCommand::Create {
            project,
            role,
            description,
            output,
        } => {
            let body = json!({ "project": project, "role": role, "description": description });
            let t: TokenInfo = client.call(Method::POST, "/v1/tokens", &body).await?;
            print(output, &t, |t| {
                println!("token {} for project {} ({:?})", t.id, t.project, t.role);
                println!("secret (shown once): {}", t.secret.as_deref().unwrap_or(""));
            })?;
        }
        TokenCommand::List { output } => {
            let list: Vec<TokenInfo> = client.get("/v1/tokens").await?;
            print(output, &list, |l| {
                for t in l {
                    println!(
                        "{}\t{}\t{:?}\t{}\t{}",
                        t.id, t.project, t.role, t.created_at, t.description
                    );
                }
            })?;
        }
        TokenCommand::Revoke { id } => {
            client
                .send(client.request(Method::DELETE, &format!("/v1/tokens/{id}")))
                .await?;
            println!("revoked {id}");
        }
    }
    Ok(())
}

pub async fn store(client: &Client, cmd: StoreCommand) -> anyhow::Result<()> {
    match cmd {
        StoreCommand::Stats { output } => {
            let s: StoreStats = client.get("/v1/store").await?;
            print(output, &s, |s| {
                println!(
                    "blocks:       {} ({})",
                    s.blocks,
                    human_bytes(s.block_bytes)
                );
                println!("unreferenced: {}", s.unreferenced_blocks);
                println!("packs:        {} ({})", s.packs, human_bytes(s.pack_bytes));
            })?;
        }
        StoreCommand::Gc { grace_secs, output } => {
            let r: GcReport = client
                .call(
                    Method::POST,
                    "/v1/store/gc",
                    &json!({ "grace_secs": grace_secs }),
                )
                .await?;
            print(output, &r, |r| {
                println!(
                    "dropped {} blocks ({}), removed {} packs, rewrote {} packs ({} blocks moved), freed {}",
                    r.dropped_blocks,
                    human_bytes(r.dropped_bytes),
                    r.packs_removed,
                    r.packs_rewritten,
                    r.blocks_moved,
                    human_bytes(r.reclaimed_bytes)
                );
            })?;
        }
    }
    Ok(())
}
