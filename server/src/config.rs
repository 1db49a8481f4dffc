//! Configuration, layered: built-in defaults → TOML file → environment (`KAGAMI__SECTION__KEY`)
//! → command-line flags. Every key is documented in `systemd/kagami.toml`; an unknown or mistyped
//! key stops start-up with a message that names it.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub limits: Limits,
    pub store: StoreConfig,
    pub gc: GcConfig,
    pub import: ImportConfig,
    pub provision: ProvisionConfig,
    pub boot: BootConfig,
    pub tftp: TftpConfig,
    pub dhcp: DhcpConfig,
    pub nbd: NbdConfig,
    pub iscsi: IscsiConfig,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address the HTTP API listens on.
    pub listen: SocketAddr,
    /// Catalog, block packs and the first admin token live here.
    pub data_dir: PathBuf,
    /// The region this server's images belong to.
    pub region: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest virtual size an image may have, in bytes.
    pub max_image_bytes: u64,
    /// Largest JSON request body, in bytes.
    pub max_json_bytes: usize,
    /// Largest batched block upload, and largest manifest bundle, in bytes.
    pub max_block_batch_bytes: usize,
    /// An upload that sends nothing for this long fails, in seconds.
    pub upload_idle_secs: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// A pack file is closed and a new one started once it reaches this size, in bytes.
    pub pack_bytes: u64,
    /// Re-hash every block read from a pack before serving it.
    pub verify_reads: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GcConfig {
    /// An unreferenced block is kept at least this long after its last use, in seconds.
    pub grace_secs: u64,
    /// How often the background collector runs, in seconds (0 turns it off).
    pub interval_secs: u64,
    /// A sealed pack whose live bytes fall below this fraction of its size is rewritten.
    pub rewrite_below_live_fraction: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImportConfig {
    /// A PEM file of CA certificates trusted for https source URLs, besides the system's
    /// roots; empty for the system's roots only.
    pub ca_file: PathBuf,
    /// Seconds an uploaded file waiting for (or in) its import job may stay in the page cache
    /// before it is fsynced so that a restart can run the job again. A job that ends sooner
    /// (most do) deletes a file that never had to be written: an import writes its bytes to
    /// disk once (the blocks), not twice. A crash inside the window fails the job ("upload
    /// again"). 0: fsync at once.
    pub durable_after_secs: u64,
    /// Uploads converted at once, each while its file arrives; more wait for a slot (their
    /// files still staged meanwhile). 0: one per core.
    pub upload_conversions: usize,
}

impl ImportConfig {
    /// [`ImportConfig::upload_conversions`], with 0 resolved.
    pub fn upload_slots(&self) -> usize {
        match self.upload_conversions {
            0 => kagami_images::split::cores(),
            n => n,
        }
    }
}

impl Default for ImportConfig {
    fn default() -> Self {
        ImportConfig {
            ca_file: PathBuf::new(),
            durable_after_secs: 10,
            upload_conversions: 0,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProvisionConfig {
    /// The base URL hosts are told to use (kernel, initrd, agent API), e.g.
    /// `http://10.0.0.1:8470`; empty: the URL the host's iPXE used to fetch its script.
    pub advertise_url: String,
    /// The agent ramdisk: `vmlinuz` and `initrd.img` (see agent/ramdisk); empty: the data
    /// directory's `ramdisk/`.
    pub ramdisk_dir: PathBuf,
    /// What a host Kagami does not know gets from its iPXE script: `local` (boot its own disk)
    /// or `discover` (boot the agent, which reports its inventory and waits for a task).
    pub unknown_hosts: UnknownHosts,
    /// Extra kernel arguments for the agent ramdisk (e.g. a serial console).
    pub kernel_args: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownHosts {
    Local,
    Discover,
}

impl Default for ProvisionConfig {
    fn default() -> Self {
        ProvisionConfig {
            advertise_url: String::new(),
            ramdisk_dir: PathBuf::new(),
            unknown_hosts: UnknownHosts::Local,
            kernel_args: "console=tty0 console=ttyS0".into(),
        }
    }
}

impl ProvisionConfig {
    /// Where the ramdisk's files are.
    pub fn ramdisk_dir(&self, data_dir: &Path) -> PathBuf {
        if self.ramdisk_dir.as_os_str().is_empty() {
            data_dir.join("ramdisk")
        } else {
            self.ramdisk_dir.clone()
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BootConfig {
    /// The files PXE clients fetch (iPXE binaries); TFTP serves regular files beneath it only.
    pub dir: PathBuf,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TftpConfig {
    /// Address of the TFTP server, `ADDR:PORT`; empty turns it off (the default, so that
    /// `kagami serve` runs unprivileged; production listens on port 69).
    pub listen: String,
    /// Largest block size granted (RFC 2348), in bytes.
    pub max_blksize: u16,
    /// Largest window granted (RFC 7440), in blocks.
    pub max_windowsize: u16,
    /// First retransmission timeout when the client sets none, in milliseconds.
    pub timeout_ms: u64,
    /// Timeouts in a row after which a transfer is dropped.
    pub retries: u32,
    /// Transfers at once; more requests are refused until one ends.
    pub max_transfers: usize,
}

impl TftpConfig {
    /// The address to listen on, or `None` when TFTP is off.
    pub fn listen_addr(&self) -> anyhow::Result<Option<SocketAddr>> {
        if self.listen.is_empty() {
            return Ok(None);
        }
        self.listen.parse().map(Some).map_err(|_| {
            anyhow::anyhow!(
                "invalid configuration: tftp.listen must be ADDR:PORT or empty, not {:?}",
                self.listen
            )
        })
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NbdConfig {
    /// Address of the read-only NBD export, `ADDR:PORT` (10809 is NBD's port); empty turns it
    /// off (the default).
    pub listen: String,
}

impl NbdConfig {
    /// The address to listen on, or `None` when NBD is off.
    pub fn listen_addr(&self) -> anyhow::Result<Option<SocketAddr>> {
        if self.listen.is_empty() {
            return Ok(None);
        }
        self.listen.parse().map(Some).map_err(|_| {
            anyhow::anyhow!(
                "invalid configuration: nbd.listen must be ADDR:PORT or empty, not {:?}",
                self.listen
            )
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IscsiConfig {
    /// Address of the read-only iSCSI target, `ADDR:PORT` (3260 is iSCSI's port); empty turns
    /// it off (the default).
    pub listen: String,
    /// A connection that has sent nothing for this long (and has no command in flight) gets a
    /// NOP-In ping, in seconds; 0: never pinged.
    pub nop_interval_secs: u64,
    /// A pinged connection that shows no life within this long is closed, in seconds.
    pub nop_timeout_secs: u64,
}

impl Default for IscsiConfig {
    fn default() -> Self {
        IscsiConfig {
            listen: String::new(),
            nop_interval_secs: 30,
            nop_timeout_secs: 15,
        }
    }
}

impl IscsiConfig {
    /// The address to listen on, or `None` when iSCSI is off.
    pub fn listen_addr(&self) -> anyhow::Result<Option<SocketAddr>> {
        if self.listen.is_empty() {
            return Ok(None);
        }
        self.listen.parse().map(Some).map_err(|_| {
            anyhow::anyhow!(
                "invalid configuration: iscsi.listen must be ADDR:PORT or empty, not {:?}",
                self.listen
            )
        })
    }

    /// How silent connections are pinged: (idle time before a NOP-In, time to answer it), or
    /// `None` when pings are off.
    pub fn nop(&self) -> anyhow::Result<Option<(Duration, Duration)>> {
        if self.nop_interval_secs == 0 {
            return Ok(None);
        }
        if self.nop_timeout_secs == 0 {
            anyhow::bail!(
                "invalid configuration: iscsi.nop_timeout_secs must be at least 1 while \
                 iscsi.nop_interval_secs pings (set that to 0 to turn pings off)"
            );
        }
        Ok(Some((
            Duration::from_secs(self.nop_interval_secs),
            Duration::from_secs(self.nop_timeout_secs),
        )))
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DhcpConfig {
    /// `off` (the default, so that `kagami serve` runs unprivileged), `proxy` (boot files only,
    /// beside the site's DHCP server) or `full` (addresses from `range` too).
    pub mode: DhcpMode,
    /// The provisioning interface: the only one DHCP listens and answers on.
    pub interface: String,
    /// Full mode's pool, `FIRST,LAST`.
    pub range: String,
    /// Full mode's lease time, in seconds.
    pub lease_secs: u32,
    /// Full mode's default gateway (option 3); empty: none.
    pub router: String,
    /// Full mode's DNS servers (option 6).
    pub dns: Vec<Ipv4Addr>,
    /// Boot file for BIOS PXE ROMs, served by TFTP from `boot.dir`.
    pub bios_file: String,
    /// Boot file for UEFI PXE (over TFTP) and UEFI HTTP boot (over HTTP), from `boot.dir`.
    pub efi_file: String,
    /// Send IPv6 router advertisements on the interface (iPXE waits 16 s for one otherwise).
    pub router_advertisements: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DhcpMode {
    Off,
    Proxy,
    Full,
}

impl Default for DhcpConfig {
    fn default() -> Self {
        DhcpConfig {
            mode: DhcpMode::Off,
            interface: String::new(),
            range: String::new(),
            lease_secs: 3600,
            router: String::new(),
            dns: Vec::new(),
            bios_file: "undionly.kpxe".into(),
            efi_file: "ipxe.efi".into(),
            router_advertisements: false,
        }
    }
}

impl DhcpConfig {
    /// Full mode's pool (first, last), or `None` when `range` is empty.
    pub fn range(&self) -> anyhow::Result<Option<(Ipv4Addr, Ipv4Addr)>> {
        if self.range.is_empty() {
            return Ok(None);
        }
        let bad = || {
            anyhow::anyhow!(
                "invalid configuration: dhcp.range must be FIRST,LAST (IPv4, first <= last, at most 65536 addresses), not {:?}",
                self.range
            )
        };
        let (first, last) = self.range.split_once(',').ok_or_else(bad)?;
        let first: Ipv4Addr = first.trim().parse().map_err(|_| bad())?;
        let last: Ipv4Addr = last.trim().parse().map_err(|_| bad())?;
        if first > last || u32::from(last) - u32::from(first) >= 65536 {
            return Err(bad());
        }
        Ok(Some((first, last)))
    }

    /// Full mode's router, or `None` when `router` is empty.
    pub fn router(&self) -> anyhow::Result<Option<Ipv4Addr>> {
        if self.router.is_empty() {
            return Ok(None);
        }
        self.router.parse().map(Some).map_err(|_| {
            anyhow::anyhow!(
                "invalid configuration: dhcp.router must be an IPv4 address or empty, not {:?}",
                self.router
            )
        })
    }

    fn check(&self) -> anyhow::Result<()> {
        self.range()?;
        self.router()?;
        if self.mode == DhcpMode::Off {
            return Ok(());
        }
        if self.interface.is_empty() {
            anyhow::bail!(
                "invalid configuration: dhcp.interface (--dhcp-interface) must name the provisioning interface when dhcp.mode is proxy or full"
            );
        }
        if self.mode == DhcpMode::Full && self.range.is_empty() {
            anyhow::bail!(
                "invalid configuration: dhcp.range (--dhcp-range FIRST,LAST) is needed in full mode"
            );
        }
        if self.lease_secs < 60 {
            anyhow::bail!("invalid configuration: dhcp.lease_secs must be at least 60");
        }
        for (key, file) in [("bios_file", &self.bios_file), ("efi_file", &self.efi_file)] {
            if file.is_empty() || file.len() > 120 || file.contains(['/', '?', '#', ' ']) {
                anyhow::bail!(
                    "invalid configuration: dhcp.{key} must be a file name in boot.dir, not {file:?}"
                );
            }
        }
        Ok(())
    }
}

impl Default for BootConfig {
    fn default() -> Self {
        BootConfig {
            dir: PathBuf::from("/srv/kagami/boot"),
        }
    }
}

impl Default for TftpConfig {
    fn default() -> Self {
        TftpConfig {
            listen: String::new(),
            max_blksize: 1468,
            max_windowsize: 64,
            timeout_ms: 1000,
            retries: 5,
            max_transfers: 256,
        }
    }
}

impl ImportConfig {
    /// The operator's CA file, if one is set.
    pub fn ca_file(&self) -> Option<&Path> {
        (!self.ca_file.as_os_str().is_empty()).then_some(self.ca_file.as_path())
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 8470)),
            data_dir: PathBuf::from("kagami-data"),
            region: "default".into(),
        }
    }
}

impl Limits {
    /// What the format inspector and readers may accept under these limits.
    pub fn formats(&self) -> kagami_images::format::Limits {
        kagami_images::format::Limits {
            max_virtual_size: self.max_image_bytes,
            ..Default::default()
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_image_bytes: 16 << 40,
            max_json_bytes: 1 << 20,
            max_block_batch_bytes: 64 << 20,
            upload_idle_secs: 120,
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            pack_bytes: 16 << 20,
            verify_reads: true,
        }
    }
}

impl Default for GcConfig {
    fn default() -> Self {
        GcConfig {
            grace_secs: 3600,
            interval_secs: 600,
            rewrite_below_live_fraction: 0.5,
        }
    }
}

/// Values given on the command line; each one set overrides every other layer.
#[derive(Debug, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub advertise_url: Option<String>,
    pub ramdisk_dir: Option<PathBuf>,
    pub tftp_listen: Option<SocketAddr>,
    pub nbd_listen: Option<SocketAddr>,
    pub iscsi_listen: Option<SocketAddr>,
    pub boot_dir: Option<PathBuf>,
    pub dhcp_interface: Option<String>,
    pub dhcp_mode: Option<String>,
    pub dhcp_range: Option<String>,
}

impl Config {
    /// Loads the layers in order. `file` must exist when given.
    pub fn load(file: Option<&Path>, overrides: Overrides) -> anyhow::Result<Config> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            if !file.is_file() {
                anyhow::bail!("config file {} does not exist", file.display());
            }
            fig = fig.merge(Toml::file_exact(file));
        }
        fig = fig.merge(Env::prefixed("KAGAMI__").split("__"));
        if let Some(listen) = overrides.listen {
            fig = fig.merge(("server.listen", listen));
        }
        if let Some(dir) = overrides.data_dir {
            fig = fig.merge(("server.data_dir", dir));
        }
        if let Some(addr) = overrides.tftp_listen {
            fig = fig.merge(("tftp.listen", addr.to_string()));
        }
        if let Some(addr) = overrides.nbd_listen {
            fig = fig.merge(("nbd.listen", addr.to_string()));
        }
        if let Some(addr) = overrides.iscsi_listen {
            fig = fig.merge(("iscsi.listen", addr.to_string()));
        }
        if let Some(dir) = overrides.boot_dir {
            fig = fig.merge(("boot.dir", dir));
        }
        if let Some(interface) = overrides.dhcp_interface {
            fig = fig.merge(("dhcp.interface", interface));
        }
        if let Some(mode) = overrides.dhcp_mode {
            fig = fig.merge(("dhcp.mode", mode));
        }
        if let Some(range) = overrides.dhcp_range {
            fig = fig.merge(("dhcp.range", range));
        }
        if let Some(url) = overrides.advertise_url {
            fig = fig.merge(("provision.advertise_url", url));
        }
        if let Some(dir) = overrides.ramdisk_dir {
            fig = fig.merge(("provision.ramdisk_dir", dir));
        }
        let config: Config = fig
            .extract()
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> anyhow::Result<()> {
        if !(0.0..=1.0).contains(&self.gc.rewrite_below_live_fraction) {
            anyhow::bail!(
                "invalid configuration: gc.rewrite_below_live_fraction must be between 0 and 1"
            );
        }
        if self.store.pack_bytes < 1 << 20 {
            anyhow::bail!("invalid configuration: store.pack_bytes must be at least 1 MiB");
        }
        let url = &self.provision.advertise_url;
        if !(url.is_empty() || url.starts_with("http://") || url.starts_with("https://")) {
            anyhow::bail!(
                "invalid configuration: provision.advertise_url must be an http:// or https:// URL"
            );
        }
        if self.server.region.is_empty() {
            anyhow::bail!("invalid configuration: server.region must not be empty");
        }
        self.dhcp.check()?;
        self.nbd.listen_addr()?;
        self.iscsi.listen_addr()?;
        let tftp = &self.tftp;
        tftp.listen_addr()?;
        if !(8..=65464).contains(&tftp.max_blksize) {
            anyhow::bail!("invalid configuration: tftp.max_blksize must be between 8 and 65464");
        }
        if !(1..=1024).contains(&tftp.max_windowsize) {
            anyhow::bail!("invalid configuration: tftp.max_windowsize must be between 1 and 1024");
        }
        if !(10..=255_000).contains(&tftp.timeout_ms) {
            anyhow::bail!("invalid configuration: tftp.timeout_ms must be between 10 and 255000");
        }
        if tftp.retries == 0 || tftp.max_transfers == 0 {
            anyhow::bail!(
                "invalid configuration: tftp.retries and tftp.max_transfers must be at least 1"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[expect(
        clippy::result_large_err,
        reason = "figment::Jail fixes the closure's error type"
    )]
    fn layers_apply_in_order() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("k.toml", "[server]\nregion = \"from-file\"\nlisten = \"127.0.0.1:1\"\n[gc]\ngrace_secs = 5\n")?;
            jail.set_env("KAGAMI__SERVER__LISTEN", "127.0.0.1:2");
            jail.set_env("KAGAMI__GC__GRACE_SECS", "7");
            let config = Config::load(
                Some(Path::new("k.toml")),
                Overrides {
                    data_dir: Some("/flag".into()),
                    ..Default::default()
                },
            )
            .map_err(|e| e.to_string())?;
            assert_eq!(config.server.region, "from-file");
            assert_eq!(config.server.listen.port(), 2);
            assert_eq!(config.gc.grace_secs, 7);
            assert_eq!(config.server.data_dir, PathBuf::from("/flag"));
            assert_eq!(config.store.pack_bytes, 16 << 20);
            Ok(())
        });
    }

    #[test]
    #[expect(
        clippy::result_large_err,
        reason = "figment::Jail fixes the closure's error type"
    )]
    fn an_unknown_key_is_named() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("k.toml", "[server]\nlisten_addr = \"127.0.0.1:1\"\n")?;
            let err = Config::load(Some(Path::new("k.toml")), Overrides::default())
                .expect_err("rejected");
            assert!(err.to_string().contains("listen_addr"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn the_documented_example_names_every_key_with_its_default() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/kagami.toml");
        let text = std::fs::read_to_string(&example).expect("systemd/kagami.toml");
        let loaded: Config = toml_from(&text);
        let mut defaults = Config::default();
        defaults.server.data_dir = "/var/lib/kagami".into();
        assert_eq!(
            serde_json::to_value(&loaded).expect("json"),
            serde_json::to_value(&defaults).expect("json"),
            "systemd/kagami.toml and the built-in defaults disagree"
        );
        // Every key is written out, not left to its default: one `key = value` line per key.
        let keys = serde_json::to_value(&defaults).expect("json");
        let count: usize = keys
            .as_object()
            .expect("sections")
            .values()
            .map(|v| v.as_object().map_or(0, |o| o.len()))
            .sum();
        let lines = text
            .lines()
            .filter(|l| !l.trim_start().starts_with('#') && l.contains(" = "))
            .count();
        assert_eq!(lines, count, "every key must appear in systemd/kagami.toml");
    }

    fn toml_from(text: &str) -> Config {
        Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string(text))
            .extract()
            .expect("the example parses")
    }
}
