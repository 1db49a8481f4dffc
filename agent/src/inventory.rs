//! What the machine is, from sysfs and procfs: disks, NICs, CPU, memory, firmware and the DMI
//! identity. Sent to the server when the agent starts; the server keeps it on the host.

use std::path::Path;

use serde::Serialize;
use serde_json::{Value, json};

#[derive(Debug, Clone, Serialize)]
pub struct Disk {
    pub name: String,
    pub path: String,
    pub size: u64,
    pub model: Option<String>,
    pub serial: Option<String>,
    pub rotational: bool,
    pub removable: bool,
}

fn read(path: impl AsRef<Path>) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Block devices that can hold an image: not loop, RAM, optical, floppy or device-mapper
/// devices; sorted by name (`nvme0n1`, `sda`, `vda`, …).
pub fn disks() -> Vec<Disk> {
    let mut out: Vec<Disk> = std::fs::read_dir("/sys/block")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let skip = ["loop", "ram", "zram", "sr", "fd", "dm-", "md", "nbd"];
            if skip.iter().any(|p| name.starts_with(p)) {
                return None;
            }
            let dir = e.path();
            let sectors: u64 = read(dir.join("size"))?.parse().ok()?;
            Some(Disk {
                path: format!("/dev/{name}"),
                size: sectors * 512,
                model: read(dir.join("device/model")),
                serial: read(dir.join("device/serial")).or_else(|| read(dir.join("serial"))),
                rotational: read(dir.join("queue/rotational")).as_deref() == Some("1"),
                removable: read(dir.join("removable")).as_deref() == Some("1"),
                name,
            })
        })
        .filter(|d| d.size > 0)
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The disks images go on when a deployment names none, in order: the fixed (not removable)
/// ones, the first being the system disk.
pub fn fixed_disks() -> Vec<String> {
    disks()
        .into_iter()
        .filter(|d| !d.removable)
        .map(|d| d.path)
        .collect()
}

fn nics() -> Vec<Value> {
    let mut out: Vec<Value> = std::fs::read_dir("/sys/class/net")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let dir = e.path();
            // Physical NICs have a device link; lo, bridges and veths do not.
            if !dir.join("device").exists() {
                return None;
            }
            Some(json!({
                "name": name,
                "mac": read(dir.join("address")),
                "speed_mbps": read(dir.join("speed")).and_then(|s| s.parse::<i64>().ok()).filter(|s| *s > 0),
                "state": read(dir.join("operstate")),
                "driver": std::fs::read_link(dir.join("device/driver")).ok()
                    .and_then(|p| p.file_name().map(|n| n.to_string_lossy().to_string())),
            }))
        })
        .collect();
    out.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    out
}

fn cpu() -> Value {
    let info = read("/proc/cpuinfo").unwrap_or_default();
    let model = info
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string());
    let count = info.lines().filter(|l| l.starts_with("processor")).count();
    json!({"model": model, "count": count, "arch": std::env::consts::ARCH})
}

fn memory_bytes() -> Option<u64> {
    let info = read("/proc/meminfo")?;
    let kib: u64 = info
        .lines()
        .find(|l| l.starts_with("MemTotal:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Everything above as the JSON the server stores.
pub fn collect() -> Value {
    let dmi = |f: &str| read(format!("/sys/class/dmi/id/{f}"));
    json!({
        "disks": disks(),
        "nics": nics(),
        "cpu": cpu(),
        "memory_bytes": memory_bytes(),
        "firmware": if Path::new("/sys/firmware/efi").exists() { "uefi" } else { "bios" },
        "system": {
            "uuid": dmi("product_uuid"),
            "vendor": dmi("sys_vendor"),
            "product": dmi("product_name"),
            "serial": dmi("product_serial"),
        },
        "agent_version": env!("CARGO_PKG_VERSION"),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn this_machine_has_a_cpu_memory_and_a_disk() {
        let v = super::collect();
        assert!(v["cpu"]["count"].as_u64().unwrap_or(0) >= 1, "{v}");
        assert!(v["memory_bytes"].as_u64().unwrap_or(0) > 1 << 20, "{v}");
        assert!(
            !v["disks"].as_array().map(Vec::is_empty).unwrap_or(true),
            "{v}"
        );
        assert!(matches!(v["firmware"].as_str(), Some("uefi" | "bios")));
    }
}
