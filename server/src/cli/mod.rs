//! The client subcommands of `kagami`: thin wrappers over the HTTP API.

pub mod admin;
pub mod client;
pub mod exports;
pub mod hosts;
pub mod images;
pub mod ramdisk;

use serde::Serialize;

/// How listings and single objects are printed.
#[derive(Clone, Copy, Debug, Default, clap::ValueEnum)]
pub enum Output {
    /// Human-readable text.
    #[default]
    Table,
    /// The API's JSON, for scripts.
    Json,
}

/// Prints `value` as JSON, or hands it to `table` for text.
pub fn print<T: Serialize>(
    output: Output,
    value: &T,
    table: impl FnOnce(&T),
) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Output::Table => table(value),
    }
    Ok(())
}

/// Bytes in binary units, e.g. `1.5 GiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
