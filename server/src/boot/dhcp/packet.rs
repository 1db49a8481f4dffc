//! DHCP packets as pure functions over bytes (the `dhcproto` codec): who is asking — a PXE ROM,
//! UEFI HTTP boot, iPXE or a plain DHCP client —, which boot file it gets, and the bytes of the
//! reply.
//!
//! This file depends on `std` and `dhcproto` alone, so the cargo-fuzz target
//! (`fuzz/fuzz_targets/dhcp.rs`) includes it as it is; [`fuzz`] is the entry point that target
//! and the seeded property test below share. Nothing here panics on any bytes, though dhcproto
//! 0.15 can: its option decoders `debug_assert!` lengths (and one unwraps a prefix length), so
//! [`parse`] hands it only the options Kagami reads ([`KEPT`]), whose decoders check their
//! lengths; and `Message::chaddr` slices by the wire's `hlen` (a panic past 16), so it is read
//! only once `hlen` is known to be 6.

use std::net::Ipv4Addr;

use dhcproto::v4::{DhcpOption, Flags, HType, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Encodable};

/// Room for any datagram on an Ethernet link; a longer one is cut and refused by the decoder.
pub const MAX_PACKET: usize = 1500;

/// The boot file a network-booting client needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Firmware {
    /// A BIOS PXE ROM (architecture 0): iPXE for BIOS (`undionly.kpxe`) over TFTP.
    Bios,
    /// UEFI x64 PXE (architectures 7 and 9): `ipxe.efi` over TFTP.
    Efi,
    /// UEFI HTTP boot (architecture 16): `ipxe.efi` as an HTTP URL.
    EfiHttp,
    /// iPXE itself (user class `iPXE` or option 175): the boot script's URL.
    Ipxe,
}

/// What kind of client sent a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Client {
    /// No PXE, HTTP boot or iPXE marks: an ordinary DHCP client.
    Plain,
    /// A network-booting client Kagami has a boot file for.
    Boot(Firmware),
    /// A network-booting client of an architecture Kagami has nothing for (e.g. ARM64).
    UnsupportedArch(u16),
}

/// A decoded client request: the parts the server decides on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub kind: MessageType,
    pub mac: [u8; 6],
    pub xid: u32,
    pub flags: u16,
    pub ciaddr: Ipv4Addr,
    pub giaddr: Ipv4Addr,
    /// Option 50.
    pub requested: Option<Ipv4Addr>,
    /// Option 54: the server the client chose.
    pub server_id: Option<Ipv4Addr>,
    pub client: Client,
    /// Option 97 (the machine's UUID), echoed back: PXE ROMs may drop an offer without it.
    pub machine_id: Option<Vec<u8>>,
}

/// The options [`parse`] reads: message type, requested address, server identifier, vendor
/// class, user class, client architecture, machine identifier, iPXE's encapsulated options.
const KEPT: [u8; 8] = [53, 50, 54, 60, 77, 93, 97, 175];
/// The fixed header (236 bytes) and the magic cookie before the options.
const HEADER: usize = 240;
const MAGIC: [u8; 4] = [99, 130, 83, 99];

/// The packet with only the [`KEPT`] options (in their order, split ones still split), ended.
fn keep_options(bytes: &[u8]) -> Result<Vec<u8>, String> {
    if bytes.len() < HEADER || bytes[HEADER - 4..HEADER] != MAGIC {
        return Err(format!("not DHCP ({} bytes, no magic cookie)", bytes.len()));
    }
    let mut out = bytes[..HEADER].to_vec();
    let mut at = HEADER;
    while let Some(&code) = bytes.get(at) {
        match code {
            0 => at += 1,
            255 => break,
            _ => {
                let len = *bytes.get(at + 1).ok_or("an option is cut short")? as usize;
                let option = bytes
                    .get(at..at + 2 + len)
                    .ok_or("an option is cut short")?;
                if KEPT.contains(&code) {
                    out.extend_from_slice(option);
                }
                at += 2 + len;
            }
        }
    }
    out.push(255);
    Ok(out)
}

/// Decodes a datagram sent to the server. `Err` says why it is not a request to answer.
pub fn parse(bytes: &[u8]) -> Result<Request, String> {
    let msg =
        Message::from_bytes(&keep_options(bytes)?).map_err(|e| format!("undecodable: {e}"))?;
    if msg.opcode() != Opcode::BootRequest {
        return Err("not a BOOTREQUEST".into());
    }
    if msg.htype() != HType::Eth || msg.hlen() != 6 {
        return Err(format!(
            "not an Ethernet client (htype {:?}, hlen {})",
            msg.htype(),
            msg.hlen()
        ));
    }
    let mac: [u8; 6] = msg
        .chaddr()
        .try_into()
        .map_err(|_| "bad hardware address length".to_string())?;
    let opts = msg.opts();
    let kind = opts
        .msg_type()
        .ok_or_else(|| "no DHCP message type (BOOTP is not served)".to_string())?;
    let bytes_of = |code: OptionCode| match opts.get(code) {
        Some(DhcpOption::ClassIdentifier(v) | DhcpOption::UserClass(v)) => Some(v.as_slice()),
        Some(DhcpOption::Unknown(u)) => Some(u.data()),
        _ => None,
    };
    let vendor = bytes_of(OptionCode::ClassIdentifier).unwrap_or_default();
    let ipxe = bytes_of(OptionCode::UserClass).is_some_and(|u| u.windows(4).any(|w| w == b"iPXE"))
        || opts.get(OptionCode::from(175u8)).is_some();
    let http = vendor.starts_with(b"HTTPClient");
    let arch = match opts.get(OptionCode::ClientSystemArchitecture) {
        Some(DhcpOption::ClientSystemArchitecture(a)) => a.0,
        // Old PXE ROMs send no option 93: they are BIOS.
        _ => 0,
    };
    let client = if ipxe {
        Client::Boot(Firmware::Ipxe)
    } else if !(http || vendor.starts_with(b"PXEClient")) {
        Client::Plain
    } else {
        match arch {
            16 => Client::Boot(Firmware::EfiHttp),
            _ if http => Client::UnsupportedArch(arch),
            0 => Client::Boot(Firmware::Bios),
            7 | 9 => Client::Boot(Firmware::Efi),
            other => Client::UnsupportedArch(other),
        }
    };
    let ip = |code: OptionCode| match opts.get(code) {
        Some(DhcpOption::RequestedIpAddress(a) | DhcpOption::ServerIdentifier(a)) => Some(*a),
        _ => None,
    };
    Ok(Request {
        kind,
        mac,
        xid: msg.xid(),
        flags: msg.flags().into(),
        ciaddr: msg.ciaddr(),
        giaddr: msg.giaddr(),
        requested: ip(OptionCode::RequestedIpAddress),
        server_id: ip(OptionCode::ServerIdentifier),
        client,
        machine_id: match opts.get(OptionCode::ClientMachineIdentifier) {
            Some(DhcpOption::ClientMachineIdentifier(v)) => Some(v.clone()),
            _ => None,
        },
    })
}

/// The boot file names and URLs a server hands out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootFiles {
    /// TFTP name for BIOS PXE (`undionly.kpxe`).
    pub bios: String,
    /// TFTP name for UEFI PXE (`ipxe.efi`).
    pub efi: String,
    /// HTTP URL of `ipxe.efi` for UEFI HTTP boot.
    pub efi_url: String,
    /// The iPXE script's URL (`…/boot/ipxe?mac=${net0/mac}`; iPXE expands the setting).
    pub script_url: String,
}

impl BootFiles {
    pub fn for_firmware(&self, firmware: Firmware) -> &str {
        match firmware {
            Firmware::Bios => &self.bios,
            Firmware::Efi => &self.efi,
            Firmware::EfiHttp => &self.efi_url,
            Firmware::Ipxe => &self.script_url,
        }
    }
}

/// The address part of a full-mode answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub addr: Ipv4Addr,
    pub mask: Ipv4Addr,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub secs: u32,
}

/// One answer: an OFFER or ACK (with or without an address) or a NAK.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer<'a> {
    pub kind: MessageType,
    /// The server's own address: option 54, and `siaddr` (next server) for boot files.
    pub server: Ipv4Addr,
    /// `None`: proxyDHCP, no address handed out (`yiaddr` 0).
    pub lease: Option<&'a Lease>,
    /// The boot file and the firmware it is for.
    pub boot: Option<(Firmware, &'a str)>,
    /// A proxyDHCP answer: PXE clients are told to boot the file named, with no boot server
    /// discovery (option 43, PXE_DISCOVERY_CONTROL = 8).
    pub proxy: bool,
}

/// The `file` field holds 128 bytes with its terminating zero; longer names go in option 67 only.
const FILE_FIELD: usize = 127;

/// The reply's bytes.
pub fn reply(req: &Request, answer: &Answer<'_>) -> Result<Vec<u8>, String> {
    let mut msg = Message::default();
    msg.set_opcode(Opcode::BootReply)
        .set_htype(HType::Eth)
        .set_chaddr(&req.mac)
        .set_xid(req.xid)
        .set_flags(Flags::new(req.flags))
        .set_giaddr(req.giaddr);
    if answer.kind != MessageType::Nak {
        msg.set_ciaddr(req.ciaddr);
    }
    let opts = msg.opts_mut();
    opts.insert(DhcpOption::MessageType(answer.kind));
    opts.insert(DhcpOption::ServerIdentifier(answer.server));
    if answer.kind == MessageType::Nak {
        return msg.to_vec().map_err(|e| e.to_string());
    }
    if let Some(lease) = answer.lease {
        opts.insert(DhcpOption::AddressLeaseTime(lease.secs));
        opts.insert(DhcpOption::Renewal(lease.secs / 2));
        opts.insert(DhcpOption::Rebinding(lease.secs / 8 * 7));
        opts.insert(DhcpOption::SubnetMask(lease.mask));
        if let Some(router) = lease.router {
            opts.insert(DhcpOption::Router(vec![router]));
        }
        if !lease.dns.is_empty() {
            opts.insert(DhcpOption::DomainNameServer(lease.dns.clone()));
        }
    }
    if let Some((firmware, file)) = answer.boot {
        let class: &[u8] = if firmware == Firmware::EfiHttp {
            b"HTTPClient"
        } else {
            b"PXEClient"
        };
        opts.insert(DhcpOption::ClassIdentifier(class.to_vec()));
        opts.insert(DhcpOption::BootfileName(file.as_bytes().to_vec()));
        if answer.proxy && matches!(firmware, Firmware::Bios | Firmware::Efi) {
            opts.insert(DhcpOption::VendorExtensions(vec![6, 1, 8, 255]));
        }
        if let Some(id) = &req.machine_id {
            opts.insert(DhcpOption::ClientMachineIdentifier(id.clone()));
        }
    }
    if let Some(lease) = answer.lease {
        msg.set_yiaddr(lease.addr);
    }
    if let Some((_, file)) = answer.boot {
        msg.set_siaddr(answer.server);
        if file.len() <= FILE_FIELD {
            msg.set_fname_str(file);
        }
    }
    msg.to_vec().map_err(|e| e.to_string())
}

/// The shared entry point of the fuzz target and the property test: any bytes decode or are
/// refused, and every answer to what decodes encodes and decodes again to the same client.
#[cfg_attr(
    not(test),
    expect(
        dead_code,
        reason = "the fuzz target's entry point; the server never calls it"
    )
)]
pub fn fuzz(data: &[u8]) {
    let Ok(req) = parse(data) else { return };
    let files = BootFiles {
        bios: "undionly.kpxe".into(),
        efi: "ipxe.efi".into(),
        efi_url: "http://10.0.0.1:8470/boot/files/ipxe.efi".into(),
        script_url: format!(
            "http://10.0.0.1:8470/boot/ipxe?mac=${{net0/mac}}&{}",
            "x".repeat(200)
        ),
    };
    let lease = Lease {
        addr: Ipv4Addr::new(10, 0, 0, 9),
        mask: Ipv4Addr::new(255, 255, 255, 0),
        router: Some(Ipv4Addr::new(10, 0, 0, 1)),
        dns: vec![Ipv4Addr::new(10, 0, 0, 1); 3],
        secs: 3600,
    };
    let firmware = match req.client {
        Client::Boot(f) => Some(f),
        _ => None,
    };
    for kind in [MessageType::Offer, MessageType::Ack, MessageType::Nak] {
        for (lease, proxy) in [(None, true), (Some(&lease), false)] {
            let answer = Answer {
                kind,
                server: Ipv4Addr::new(10, 0, 0, 1),
                lease,
                boot: firmware.map(|f| (f, files.for_firmware(f))),
                proxy,
            };
            let bytes = reply(&req, &answer).unwrap_or_else(|e| panic!("encode failed: {e}"));
            let back = Message::from_bytes(&bytes).unwrap_or_else(|e| panic!("re-decode: {e}"));
            assert_eq!(back.xid(), req.xid);
            assert_eq!(back.hlen(), 6);
            assert_eq!(back.chaddr(), &req.mac[..]);
            assert_eq!(back.opts().msg_type(), Some(kind));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dhcproto::v4::{Architecture, UnknownOption};
    use kagami_images::fuzzing::Rng;

    /// An option dhcproto does not name (e.g. 175, iPXE's encapsulated options).
    fn raw_option(code: u8, data: &[u8]) -> DhcpOption {
        DhcpOption::Unknown(UnknownOption::new(code.into(), data.to_vec()))
    }

    /// Option 93's value for an architecture number.
    fn arch_option(arch: u16) -> DhcpOption {
        DhcpOption::ClientSystemArchitecture(Architecture(arch))
    }

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

    fn request(kind: MessageType, extra: Vec<DhcpOption>) -> Vec<u8> {
        let mut msg = Message::default();
        msg.set_chaddr(&MAC).set_xid(0x1234_5678);
        msg.opts_mut().insert(DhcpOption::MessageType(kind));
        for o in extra {
            msg.opts_mut().insert(o);
        }
        msg.to_vec().expect("encode")
    }

    fn pxe(arch: u16) -> Vec<DhcpOption> {
        vec![
            DhcpOption::ClassIdentifier(b"PXEClient:Arch:00000:UNDI:002001".to_vec()),
            arch_option(arch),
            DhcpOption::ClientMachineIdentifier(vec![0; 17]),
        ]
    }

    #[test]
    fn clients_are_told_apart() {
        let client = |opts| {
            parse(&request(MessageType::Discover, opts))
                .expect("parse")
                .client
        };
        assert_eq!(client(vec![]), Client::Plain);
        assert_eq!(
            client(vec![DhcpOption::ClassIdentifier(b"udhcp 1.35.0".to_vec())]),
            Client::Plain
        );
        assert_eq!(client(pxe(0)), Client::Boot(Firmware::Bios));
        assert_eq!(client(pxe(7)), Client::Boot(Firmware::Efi));
        assert_eq!(client(pxe(9)), Client::Boot(Firmware::Efi));
        assert_eq!(client(pxe(16)), Client::Boot(Firmware::EfiHttp));
        assert_eq!(client(pxe(11)), Client::UnsupportedArch(11));
        assert_eq!(
            client(vec![
                DhcpOption::ClassIdentifier(b"HTTPClient:Arch:00016".to_vec()),
                arch_option(16)
            ]),
            Client::Boot(Firmware::EfiHttp)
        );
        let mut ipxe = pxe(7);
        ipxe.push(DhcpOption::UserClass(b"iPXE".to_vec()));
        assert_eq!(client(ipxe), Client::Boot(Firmware::Ipxe));
        let mut ipxe = pxe(0);
        ipxe.push(raw_option(175, &[1, 1, 1]));
        assert_eq!(client(ipxe), Client::Boot(Firmware::Ipxe));
    }

    #[test]
    fn a_proxy_offer_hands_out_no_address() {
        let req = parse(&request(MessageType::Discover, pxe(0))).expect("parse");
        let server = Ipv4Addr::new(10, 1, 0, 1);
        let bytes = reply(
            &req,
            &Answer {
                kind: MessageType::Offer,
                server,
                lease: None,
                boot: Some((Firmware::Bios, "undionly.kpxe")),
                proxy: true,
            },
        )
        .expect("reply");
        let msg = Message::from_bytes(&bytes).expect("decode");
        assert_eq!(msg.opcode(), Opcode::BootReply);
        assert_eq!(msg.yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(msg.siaddr(), server);
        // dhcproto 0.15 keeps the terminating zero.
        assert_eq!(msg.fname(), Some(&b"undionly.kpxe\0"[..]));
        assert_eq!(
            msg.opts().get(OptionCode::ClassIdentifier),
            Some(&DhcpOption::ClassIdentifier(b"PXEClient".to_vec()))
        );
        assert!(
            msg.opts()
                .get(OptionCode::ClientMachineIdentifier)
                .is_some()
        );
        assert!(msg.opts().get(OptionCode::AddressLeaseTime).is_none());
    }

    #[test]
    fn a_long_url_goes_in_option_67_only() {
        let req = parse(&request(MessageType::Discover, pxe(16))).expect("parse");
        let url = format!("http://h/{}", "a".repeat(200));
        let bytes = reply(
            &req,
            &Answer {
                kind: MessageType::Offer,
                server: Ipv4Addr::LOCALHOST,
                lease: None,
                boot: Some((Firmware::EfiHttp, &url)),
                proxy: true,
            },
        )
        .expect("reply");
        let msg = Message::from_bytes(&bytes).expect("decode");
        assert_eq!(msg.fname(), None);
        assert_eq!(
            msg.opts().get(OptionCode::BootfileName),
            Some(&DhcpOption::BootfileName(url.into_bytes()))
        );
    }

    #[test]
    fn options_nobody_reads_are_dropped_before_dhcproto_sees_them() {
        // Option 121 with a prefix length of 33 makes dhcproto 0.15 unwrap an error; option 91
        // with a short length trips its debug assertions.
        let mut p = request(MessageType::Discover, pxe(7));
        p.pop();
        p.extend([121, 5, 33, 10, 0, 0, 1, 91, 1, 0, 0, 0, 255]);
        let req = parse(&p).expect("parse");
        assert_eq!(req.client, Client::Boot(Firmware::Efi));
        p.truncate(p.len() - 4);
        assert!(parse(&p).is_err(), "an option cut short");
    }

    #[test]
    fn what_is_not_a_client_request_is_refused() {
        assert!(parse(b"").is_err());
        assert!(parse(&[0u8; 300]).is_err());
        let mut reply = request(MessageType::Discover, vec![]);
        reply[0] = 2;
        assert!(parse(&reply).is_err());
        // hlen 200: dhcproto would panic slicing chaddr; refused first.
        let mut long = request(MessageType::Discover, vec![]);
        long[2] = 200;
        assert!(parse(&long).is_err());
        let mut msg = Message::default();
        msg.set_chaddr(&MAC);
        assert!(parse(&msg.to_vec().expect("encode")).is_err(), "BOOTP");
    }

    /// The fuzz target's entry point, bounded and seeded: requests of every kind mutated many
    /// ways (bit flips, truncations, bytes inserted, lengths stretched) decode or are refused,
    /// and what decodes is answered without a panic.
    #[test]
    fn hostile_packets_never_panic() {
        let mut ipxe = pxe(7);
        ipxe.push(DhcpOption::UserClass(b"iPXE".to_vec()));
        ipxe.push(raw_option(175, &[0xb1, 1, 1, 0x13, 1, 1]));
        let seeds = [
            request(MessageType::Discover, vec![]),
            request(MessageType::Discover, pxe(0)),
            request(MessageType::Request, pxe(16)),
            request(MessageType::Request, ipxe),
            request(
                MessageType::Decline,
                vec![DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 0, 0, 5))],
            ),
            request(
                MessageType::Release,
                vec![DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 0, 0, 1))],
            ),
        ];
        let mut rng = Rng(0x4011_0067_0068_0093);
        for _ in 0..20_000 {
            let mut p = seeds[rng.below(seeds.len())].clone();
            for _ in 0..=rng.below(4) {
                match rng.below(5) {
                    0 if !p.is_empty() => {
                        let i = rng.below(p.len());
                        p[i] ^= 1 << rng.below(8);
                    }
                    1 => p.truncate(rng.below(p.len() + 1)),
                    2 if !p.is_empty() => {
                        // Mostly in the fixed header and the first options.
                        let i = rng.below(p.len().min(260));
                        p[i] = rng.next_u64() as u8;
                    }
                    3 => {
                        let i = rng.below(p.len() + 1);
                        p.insert(i, rng.next_u64() as u8);
                    }
                    _ => p.extend(std::iter::repeat_n(rng.next_u64() as u8, rng.below(600))),
                }
            }
            fuzz(&p);
        }
    }
}
