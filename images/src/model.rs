//! The image model: the vocabulary server, CLI and agent exchange as JSON.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Declares a string-valued enum once: serde names, `as_str`, `FromStr` and `Display` agree.
macro_rules! wire_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] $variant),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl FromStr for $name {
            type Err = UnknownValue;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(UnknownValue {
                        what: stringify!($name),
                        got: s.chars().take(64).collect(),
                        expected: &[$($text),+],
                    }),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(self.as_str())
            }
        }
    };
}

/// A string that names none of an enum's values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{got}' is not a valid {what}; expected one of: {}", expected.join(", "))]
pub struct UnknownValue {
    pub what: &'static str,
    pub got: String,
    pub expected: &'static [&'static str],
}

wire_enum! {
    /// What an image holds and how it may be used.
    ImageKind {
        /// A bootable system disk.
        System = "system",
        /// A data disk.
        Data = "data",
        /// All of a host's disks (system first, then data disks).
        Whole = "whole",
        /// An ISO, usable only for a temporary transitional boot.
        Iso = "iso",
    }
}

wire_enum! {
    /// Who may see and use an image.
    Visibility {
        /// Only the owner project.
        Private = "private",
        /// The owner and the projects it was shared with.
        Shared = "shared",
        /// Every project.
        Public = "public",
        /// Every project, listed in the marketplace.
        Marketplace = "marketplace",
    }
}

wire_enum! {
    /// Where an image is in its life.
    ImageStatus {
        /// Created, no data yet.
        Queued = "queued",
        /// Data is being uploaded; never readable.
        Saving = "saving",
        /// Manifest committed: every block is stored and the image can be used.
        Active = "active",
        /// An upload failed or was interrupted; `status_reason` says why. A new upload may retry.
        Failed = "failed",
    }
}

wire_enum! {
    /// Firmware an image boots with.
    BootMode {
        Bios = "bios",
        Uefi = "uefi",
    }
}

/// An image as the API shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Image {
    pub id: Uuid,
    pub name: String,
    pub description: String,
    /// The owner project's name.
    pub owner: String,
    pub kind: ImageKind,
    pub visibility: Visibility,
    pub status: ImageStatus,
    /// Why the image is in its status (set for `failed`).
    pub status_reason: Option<String>,
    pub region: String,
    /// Logical size of the disk in bytes (known once active).
    pub virtual_size: Option<u64>,
    /// Bytes of the disk that hold data (non-hole blocks); what the store keeps for it before dedup.
    pub data_size: Option<u64>,
    /// Non-hole 64 KiB blocks.
    pub data_blocks: Option<u64>,
    /// `sha256:<hex>` of the manifest index; names the content exactly.
    pub digest: Option<String>,
    pub min_ram_mb: u64,
    pub min_disk_gb: u64,
    pub boot_mode: Option<BootMode>,
    pub architecture: Option<String>,
    pub os_type: Option<String>,
    pub os_distro: Option<String>,
    pub os_version: Option<String>,
    pub tags: Vec<String>,
    pub properties: BTreeMap<String, String>,
    pub protected: bool,
    /// A whole-machine image's disk images, in order (the system disk first); empty otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<Uuid>,
    /// The whole-machine image this disk image is part of, and its place there.
    #[serde(default)]
    pub parent: Option<Uuid>,
    #[serde(default)]
    pub disk_index: Option<u32>,
    /// Lineage of a capture: the host and disk it was made from, and the previous capture of
    /// the same host (and disk) in the same project.
    #[serde(default)]
    pub source_host: Option<String>,
    #[serde(default)]
    pub source_disk: Option<String>,
    #[serde(default)]
    pub previous: Option<Uuid>,
    /// RFC 3339 UTC timestamps.
    pub created_at: String,
    pub updated_at: String,
}

/// A page of images; pass `next_marker` back as `marker` to get the next page.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImagePage {
    pub images: Vec<Image>,
    pub next_marker: Option<Uuid>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enums_round_trip_through_text_and_json() {
        for kind in ImageKind::ALL {
            assert_eq!(kind.as_str().parse::<ImageKind>(), Ok(*kind));
            assert_eq!(
                serde_json::to_string(kind).expect("json"),
                format!("\"{kind}\"")
            );
        }
        let err = "floppy".parse::<ImageKind>().expect_err("unknown");
        assert!(
            err.to_string().contains("system, data, whole, iso"),
            "{err}"
        );
    }
}
