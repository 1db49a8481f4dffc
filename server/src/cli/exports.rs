//! `kagami export`: the block exports' open sessions (NBD connections, iSCSI sessions).

use clap::Subcommand;

use super::client::Client;
use super::{Output, human_bytes, print};
use crate::api::Exports;
use crate::stream::sessions::Session;

#[derive(Debug, Subcommand)]
pub enum ExportCommand {
    /// List open NBD connections and iSCSI sessions: protocol, client, image, who, since when,
    /// bytes read and commands served (an admin sees all; others their project's).
    List {
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
}

pub async fn run(client: &Client, cmd: ExportCommand) -> anyhow::Result<()> {
    match cmd {
        ExportCommand::List { output } => {
            let exports: Exports = client.get("/v1/exports").await?;
            print(output, &exports.sessions, |l| l.iter().for_each(line))?;
        }
    }
    Ok(())
}

fn line(s: &Session) {
    let image = s
        .image
        .map_or_else(|| "(discovery)".to_string(), |i| i.to_string());
    println!(
        "{}\t{}\t{image}\t{}\tsince {}\t{} read\t{} commands",
        s.protocol.as_str(),
        s.peer,
        s.who,
        s.started_at,
        human_bytes(s.bytes_read),
        s.commands
    );
}
