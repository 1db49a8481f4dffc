//! DHCP for network boot: the first thing a PXE-booting machine talks to.
//!
//! Two modes (`dhcp.mode`), both bound to one interface (`SO_BINDTODEVICE`, through socket2)
//! so that nothing outside the provisioning network is heard or answered:
//!
//! - **proxy** (proxyDHCP, PXE spec §2.2.5): the site's DHCP server hands out addresses; Kagami
//!   answers only network-booting clients — vendor class `PXEClient`/`HTTPClient`, or iPXE (user
//!   class `iPXE`, option 175) — with their boot file and `yiaddr` 0: a DISCOVER on port 67
//!   gets a proxy OFFER, a REQUEST on port 4011 an ACK. Plain clients get nothing.
//! - **full**, for isolated lab networks: addresses from `dhcp.range` to every client, leases
//!   in the catalog ([`leases`]), router/DNS/lease options, and boot files to network-booting
//!   clients in the same answer.
//!
//! The boot file follows option 93 ([`packet::parse`]): BIOS → `dhcp.bios_file` over TFTP,
//! UEFI x64 → `dhcp.efi_file` over TFTP, UEFI HTTP boot → that file's HTTP URL, and iPXE → its
//! script's URL (`/boot/ipxe?mac=${net0/mac}`). The TFTP server is this interface's address
//! (`siaddr`). A host whose next boot is its own disk (deployed, failed, or idle when idle hosts
//! boot locally) gets no boot file: its firmware goes to the disk at once
//! ([`hosts::wants_boot_file`]).
//!
//! Replies go back to the sender's address when it has one (a renewing client, a client on
//! port 4011, a relay), else to the broadcast address: a client without an address cannot be
//! unicast to without writing the ARP cache, which needs more than safe Rust gives.
//! Each socket is served by one task in arrival order, so two DISCOVERs never race for an
//! address. Sending IPv6 router advertisements ([`ra`]) is optional.

mod leases;
pub mod packet;
mod ra;

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use dhcproto::v4::MessageType;
use tokio::net::UdpSocket;

use crate::catalog::{Catalog, hosts, now_ms};
use crate::config::{Config, DhcpMode, UnknownHosts};
use leases::Range;
use packet::{Answer, BootFiles, Client, Firmware, Lease, Request};

/// The DHCP server port, and the PXE boot server port (proxyDHCP REQUESTs).
const SERVER_PORT: u16 = 67;
const PXE_PORT: u16 = 4011;
const CLIENT_PORT: u16 = 68;
/// How long an offered address is kept for its client before anyone else may get it.
const OFFER_HOLD: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub struct Server {
    mode: DhcpMode,
    interface: String,
    /// The interface's address: server identifier and next server.
    addr: Ipv4Addr,
    files: BootFiles,
    pool: Option<Pool>,
    catalog: Catalog,
    dhcp: UdpSocket,
    pxe: UdpSocket,
    /// Idle hosts boot the agent (`provision.unknown_hosts = "discover"`).
    discover: bool,
    router_advertisements: bool,
}

#[derive(Debug)]
struct Pool {
    range: Range,
    mask: Ipv4Addr,
    router: Option<Ipv4Addr>,
    dns: Vec<Ipv4Addr>,
    lease_secs: u32,
    /// Offers in flight: address → (MAC, until).
    offers: Mutex<HashMap<Ipv4Addr, (String, Instant)>>,
}

impl Server {
    /// Binds the sockets (ports 67 and 4011 on `dhcp.interface`); `None` when DHCP is off.
    pub async fn from_config(config: &Config, catalog: Catalog) -> anyhow::Result<Option<Server>> {
        let c = &config.dhcp;
        if c.mode == DhcpMode::Off {
            return Ok(None);
        }
        let (addr, mask) = interface_v4(&c.interface)?;
        let pool = match (c.mode, c.range()?) {
            (DhcpMode::Full, Some((first, last))) => {
                let net = |ip: Ipv4Addr| u32::from(ip) & u32::from(mask);
                if net(first) != net(addr) || net(last) != net(addr) {
                    anyhow::bail!(
                        "invalid configuration: dhcp.range {} is not inside {}'s subnet {addr}/{mask}",
                        c.range,
                        c.interface
                    );
                }
                let range = Range { first, last };
                if range.contains(addr) {
                    anyhow::bail!(
                        "invalid configuration: dhcp.range {} holds {}'s own address {addr}",
                        c.range,
                        c.interface
                    );
                }
                Some(Pool {
                    range,
                    mask,
                    router: c.router()?,
                    dns: c.dns.clone(),
                    lease_secs: c.lease_secs,
                    offers: Mutex::default(),
                })
            }
            _ => None,
        };
        let base = match config.provision.advertise_url.trim_end_matches('/') {
            "" => format!("http://{addr}:{}", config.server.listen.port()),
            url => url.to_string(),
        };
        let files = BootFiles {
            bios: c.bios_file.clone(),
            efi: c.efi_file.clone(),
            efi_url: format!("{base}/boot/files/{}", c.efi_file),
            script_url: format!("{base}/boot/ipxe?mac=${{net0/mac}}"),
        };
        let server = Server {
            mode: c.mode,
            interface: c.interface.clone(),
            addr,
            files,
            pool,
            catalog,
            dhcp: bind(&c.interface, SERVER_PORT)?,
            pxe: bind(&c.interface, PXE_PORT)?,
            router_advertisements: c.router_advertisements,
            discover: config.provision.unknown_hosts == UnknownHosts::Discover,
        };
        tracing::info!(
            mode = ?server.mode,
            interface = %server.interface,
            %addr,
            range = %c.range,
            "dhcp is serving on ports {SERVER_PORT} and {PXE_PORT}"
        );
        Ok(Some(server))
    }

    /// Serves both ports (and router advertisements) until the process ends.
    pub async fn run(self) {
        let server = Arc::new(self);
        if server.router_advertisements {
            tokio::spawn(ra::run(server.interface.clone()));
        }
        let pxe = server.clone();
        tokio::spawn(async move { pxe.serve(&pxe.pxe, PXE_PORT).await });
        server.serve(&server.dhcp, SERVER_PORT).await;
    }

    async fn serve(&self, socket: &UdpSocket, port: u16) {
        let mut buf = vec![0u8; packet::MAX_PACKET];
        loop {
            let (n, from) = match socket.recv_from(&mut buf).await {
                Ok(got) => got,
                Err(e) => {
                    tracing::warn!("dhcp: receiving on port {port} failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let req = match packet::parse(&buf[..n]) {
                Ok(req) => req,
                Err(why) => {
                    tracing::warn!(%from, port, "dhcp: ignored a packet: {why}");
                    continue;
                }
            };
            let reply = match self.answer(&req, port).await {
                Ok(Some(reply)) => reply,
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!(mac = %mac_text(&req.mac), "dhcp: cannot answer: {e:#}");
                    continue;
                }
            };
            let to = match from {
                SocketAddr::V4(v4) if !v4.ip().is_unspecified() => from,
                _ => SocketAddrV4::new(Ipv4Addr::BROADCAST, CLIENT_PORT).into(),
            };
            if let Err(e) = socket.send_to(&reply, to).await {
                tracing::warn!(%to, "dhcp: sending a reply failed: {e}");
            }
        }
    }

    /// The reply to `req` on `port`, if any.
    async fn answer(&self, req: &Request, port: u16) -> anyhow::Result<Option<Vec<u8>>> {
        let mac = mac_text(&req.mac);
        let boot = match req.client {
            Client::Boot(firmware) if self.wants_boot_file(&mac).await? => {
                Some((firmware, self.files.for_firmware(firmware)))
            }
            Client::Boot(_) => {
                tracing::debug!(%mac, "dhcp: no boot file: the host boots its own disk");
                None
            }
            Client::UnsupportedArch(arch) => {
                tracing::warn!(%mac, arch, "dhcp: no boot file for this client architecture");
                None
            }
            Client::Plain => None,
        };
        let proxy_answer = |kind| Answer {
            kind,
            server: self.addr,
            lease: None,
            boot,
            proxy: true,
        };
        // Port 4011 (both modes) and proxy mode: boot files only, to network-booting clients.
        let pool = match &self.pool {
            Some(pool) if port == SERVER_PORT => pool,
            _ => {
                let kind = match (req.kind, port) {
                    (MessageType::Discover, SERVER_PORT) => MessageType::Offer,
                    (MessageType::Request, PXE_PORT) => MessageType::Ack,
                    _ => return Ok(None),
                };
                let Some((firmware, file)) = boot else {
                    tracing::debug!(%mac, "dhcp: not a network-booting client; left to the site's DHCP server");
                    return Ok(None);
                };
                tracing::debug!(%mac, ?firmware, file, "dhcp: proxy {kind:?}");
                return Ok(Some(self.encode(req, &proxy_answer(kind))?));
            }
        };
        match req.kind {
            MessageType::Discover => self.offer(pool, req, &mac, boot).await,
            MessageType::Request => self.acknowledge(pool, req, &mac, boot).await,
            MessageType::Decline => {
                let Some(ip) = req.requested else {
                    return Ok(None);
                };
                let now = now_ms();
                let m = mac.clone();
                if self
                    .catalog
                    .run(move |c| leases::decline(c, &m, ip, now))
                    .await?
                {
                    tracing::warn!(%mac, %ip, "dhcp: the client found its address in use; it is held back for 10 minutes");
                }
                Ok(None)
            }
            MessageType::Release => {
                let (ip, now, m) = (req.ciaddr, now_ms(), mac.clone());
                if self
                    .catalog
                    .run(move |c| leases::release(c, &m, ip, now))
                    .await?
                {
                    tracing::debug!(%mac, %ip, "dhcp: lease released");
                }
                Ok(None)
            }
            _ => Ok(None),
        }
    }

    /// Whether `mac` should boot from the network now ([`hosts::wants_boot_file`]).
    async fn wants_boot_file(&self, mac: &str) -> anyhow::Result<bool> {
        let (mac, discover) = (mac.to_string(), self.discover);
        Ok(self
            .catalog
            .run(move |c| hosts::wants_boot_file(c, &mac, discover))
            .await?)
    }

    async fn offer(
        &self,
        pool: &Pool,
        req: &Request,
        mac: &str,
        boot: Option<(Firmware, &str)>,
    ) -> anyhow::Result<Option<Vec<u8>>> {
        let now = Instant::now();
        let (mine, others) = {
            let mut offers = pool.offers.lock().unwrap_or_else(|p| p.into_inner());
            offers.retain(|_, (_, until)| *until > now);
            let mine = offers
                .iter()
                .find(|(_, (m, _))| m == mac)
                .map(|(ip, _)| *ip);
            let others: HashSet<Ipv4Addr> = offers
                .iter()
                .filter(|(_, (m, _))| m != mac)
                .map(|(ip, _)| *ip)
                .collect();
            (mine, others)
        };
        let addr = match mine {
            Some(ip) => Some(ip),
            None => {
                let (range, m, requested, at) =
                    (pool.range, mac.to_string(), req.requested, now_ms());
                self.catalog
                    .run(move |c| leases::choose(c, range, &m, requested, &others, at))
                    .await?
            }
        };
        let Some(addr) = addr else {
            tracing::warn!(%mac, "dhcp: no address left in the pool for a new client");
            return Ok(None);
        };
        pool.offers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(addr, (mac.to_string(), now + OFFER_HOLD));
        tracing::debug!(%mac, %addr, file = boot.map(|b| b.1), "dhcp: offer");
        let lease = pool.lease(addr);
        Ok(Some(self.encode(
            req,
            &self.full_answer(MessageType::Offer, &lease, boot),
        )?))
    }

    async fn acknowledge(
        &self,
        pool: &Pool,
        req: &Request,
        mac: &str,
        boot: Option<(Firmware, &str)>,
    ) -> anyhow::Result<Option<Vec<u8>>> {
        let forget_offer = || {
            pool.offers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|_, (m, _)| m != mac);
        };
        if req.server_id.is_some_and(|id| id != self.addr) {
            // The client chose another server's offer.
            forget_offer();
            return Ok(None);
        }
        let wanted = req
            .requested
            .or((!req.ciaddr.is_unspecified()).then_some(req.ciaddr));
        let Some(ip) = wanted else {
            return Ok(None);
        };
        let nak = |why: &str| -> anyhow::Result<Option<Vec<u8>>> {
            tracing::warn!(%mac, %ip, "dhcp: NAK: {why}");
            forget_offer();
            Ok(Some(self.encode(
                req,
                &Answer {
                    kind: MessageType::Nak,
                    server: self.addr,
                    lease: None,
                    boot: None,
                    proxy: false,
                },
            )?))
        };
        if !pool.range.contains(ip) {
            return nak("not an address of this server's range");
        }
        let held_by_other = pool
            .offers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&ip)
            .is_some_and(|(m, until)| m != mac && *until > Instant::now());
        if held_by_other {
            return nak("offered to another client");
        }
        let (m, secs, now) = (mac.to_string(), pool.lease_secs, now_ms());
        if !self
            .catalog
            .run(move |c| leases::bind(c, &m, ip, secs, now))
            .await?
        {
            return nak("leased to another client");
        }
        forget_offer();
        tracing::debug!(%mac, %ip, secs, file = boot.map(|b| b.1), "dhcp: lease");
        let lease = pool.lease(ip);
        Ok(Some(self.encode(
            req,
            &self.full_answer(MessageType::Ack, &lease, boot),
        )?))
    }

    fn full_answer<'a>(
        &self,
        kind: MessageType,
        lease: &'a Lease,
        boot: Option<(Firmware, &'a str)>,
    ) -> Answer<'a> {
        Answer {
            kind,
            server: self.addr,
            lease: Some(lease),
            boot,
            proxy: false,
        }
    }

    fn encode(&self, req: &Request, answer: &Answer<'_>) -> anyhow::Result<Vec<u8>> {
        packet::reply(req, answer).map_err(|e| anyhow::anyhow!("cannot encode the reply: {e}"))
    }
}

impl Pool {
    fn lease(&self, addr: Ipv4Addr) -> Lease {
        Lease {
            addr,
            mask: self.mask,
            router: self.router,
            dns: self.dns.clone(),
            secs: self.lease_secs,
        }
    }
}

fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The interface's first IPv4 address and its netmask.
fn interface_v4(interface: &str) -> anyhow::Result<(Ipv4Addr, Ipv4Addr)> {
    let addrs = nix::ifaddrs::getifaddrs().context("cannot list the network interfaces")?;
    let mut seen = false;
    for a in addrs.filter(|a| a.interface_name == interface) {
        seen = true;
        let v4 = |s: Option<nix::sys::socket::SockaddrStorage>| {
            s.and_then(|s| s.as_sockaddr_in().map(|a| a.ip()))
        };
        if let (Some(addr), Some(mask)) = (v4(a.address), v4(a.netmask)) {
            return Ok((addr, mask));
        }
    }
    if seen {
        anyhow::bail!("dhcp.interface {interface} has no IPv4 address: give it one first");
    }
    anyhow::bail!("dhcp.interface {interface} does not exist")
}

/// A UDP socket on `port` that hears and speaks on `interface` only.
fn bind(interface: &str, port: u16) -> anyhow::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    socket
        .bind_device(Some(interface.as_bytes()))
        .with_context(|| {
            format!("cannot bind to interface {interface} (SO_BINDTODEVICE needs CAP_NET_RAW)")
        })?;
    socket.set_broadcast(true)?;
    socket.set_nonblocking(true)?;
    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    socket.bind(&addr.into()).with_context(|| {
        format!("cannot listen on UDP port {port} (ports below 1024 need CAP_NET_BIND_SERVICE)")
    })?;
    Ok(UdpSocket::from_std(socket.into())?)
}
