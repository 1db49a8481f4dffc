//! IPv6 router advertisements on the provisioning interface (`dhcp.router_advertisements`).
//!
//! iPXE (Debian's 2019 build) waits 16 s for IPv6 autoconfiguration on a segment where no
//! router speaks; any advertisement ends that wait. This one is minimal: no prefix, no M/O
//! flags, router lifetime 0 (never a default router), so it configures nothing on any host.
//! It goes to all nodes at start, every [`PERIOD`], and in answer to each router solicitation
//! (at most one a second).

use std::net::{Ipv6Addr, SocketAddrV6};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::UdpSocket;

const PERIOD: Duration = Duration::from_secs(10);
const ROUTER_SOLICITATION: u8 = 133;
const ROUTER_ADVERTISEMENT: u8 = 134;

/// Type, code, checksum (the kernel fills it in for ICMPv6 sockets), hop limit 64, no flags,
/// router lifetime 0, reachable time 0, retransmission timer 0.
const ADVERTISEMENT: [u8; 16] = [
    ROUTER_ADVERTISEMENT,
    0,
    0,
    0,
    64,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
];

pub async fn run(interface: String) {
    // A fresh interface has no link-local address for a second or two (DAD): retry soon.
    let mut delay = Duration::from_secs(1);
    loop {
        if let Err(e) = advertise(&interface).await {
            tracing::warn!(%interface, "router advertisements stopped: {e:#}; retrying in {delay:?}");
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(PERIOD);
    }
}

async fn advertise(interface: &str) -> anyhow::Result<()> {
    use socket2::{Domain, Protocol, Socket, Type};
    let index = nix::net::if_::if_nametoindex(interface)
        .with_context(|| format!("no interface {interface}"))?;
    let socket = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))
        .context("cannot open an ICMPv6 socket (needs CAP_NET_RAW)")?;
    socket.bind_device(Some(interface.as_bytes()))?;
    // RFC 4861 §6.1.2: hosts drop advertisements whose hop limit is not 255.
    socket.set_multicast_hops_v6(255)?;
    socket.set_unicast_hops_v6(255)?;
    socket.join_multicast_v6(&"ff02::2".parse()?, index)?;
    socket.set_nonblocking(true)?;
    // A datagram socket to tokio: recv_from and send_to are all this one needs.
    let socket = UdpSocket::from_std(std::net::UdpSocket::from(socket))?;
    let all_nodes = SocketAddrV6::new(Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1), 0, 0, index);
    let mut buf = [0u8; 1500];
    let mut last = None::<Instant>;
    loop {
        if let Some(t) = last {
            tokio::time::sleep(Duration::from_secs(1).saturating_sub(t.elapsed())).await;
        }
        socket
            .send_to(&ADVERTISEMENT, all_nodes)
            .await
            .context("cannot send a router advertisement")?;
        tracing::debug!(%interface, "router advertisement sent");
        last = Some(Instant::now());
        // Wait for a solicitation, or the period.
        let _ = tokio::time::timeout(PERIOD, async {
            loop {
                match socket.recv_from(&mut buf).await {
                    Ok((n, _)) if n > 0 && buf[0] == ROUTER_SOLICITATION => return,
                    Ok(_) => continue,
                    Err(e) => {
                        tracing::debug!("reading ICMPv6 failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        })
        .await;
    }
}
