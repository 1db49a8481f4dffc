//! iPXE scripts: what a machine does after iPXE asks `GET /boot/ipxe?mac=…`.
//!
//! A deploying host (or an unknown one, when `provision.unknown_hosts = "discover"`) boots the
//! agent ramdisk, its kernel told where the server is and given a per-boot agent token; every
//! host in an ISO boot `sanboot`s its ISO over HTTP (Range requests) with a per-boot token, or
//! over iSCSI with CHAP credentials derived from that token; every
//! other host exits iPXE so the firmware boots the next device, its own disk. Values written
//! into a script are checked first: a script is code, and nothing from a request may inject
//! commands into it.

/// What the script makes the machine do.
#[derive(Debug, PartialEq, Eq)]
pub enum Boot<'a> {
    /// Boot the agent ramdisk from `base_url`, with `token` for this boot.
    Agent {
        base_url: &'a str,
        token: &'a str,
        kernel_args: &'a str,
    },
    /// Boot ISO image `image` from `base_url`'s content route, reading it with `token`; if
    /// the ISO does not boot, the local disk.
    Sanboot {
        base_url: &'a str,
        image: &'a str,
        token: &'a str,
    },
    /// Boot ISO target `target` (LUN 0) of the iSCSI portal `server`:`port`, logging in with
    /// CHAP `username` and `password` (this boot's); if the ISO does not boot, the local disk.
    SanbootIscsi {
        server: &'a str,
        port: u16,
        target: &'a str,
        username: &'a str,
        password: &'a str,
    },
    /// Fetch the script again with the MAC filled in by iPXE: for a bare script URL handed
    /// out by DHCP or embedded in an iPXE build.
    Chain { base_url: &'a str },
    /// Leave iPXE: the firmware boots the local disk.
    Local,
}

/// Characters allowed in values put into a script: no whitespace, quotes, `$` (setting
/// expansion) or newlines.
fn safe(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 512
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._~:/?#[]@!&'()*+,;=%".contains(c))
}

/// Kernel arguments: words of safe characters separated by spaces.
fn safe_args(args: &str) -> bool {
    args.len() <= 1024 && args.split(' ').all(|w| w.is_empty() || safe(w))
}

/// The script for `boot`; `why` is echoed on the machine's console. Values that are not safe
/// to embed (see [`safe`]) turn the script into a local boot that says so.
pub fn script(boot: &Boot<'_>, why: &str) -> String {
    let why: String = why
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '$' {
                c
            } else {
                ' '
            }
        })
        .take(200)
        .collect();
    match boot {
        Boot::Agent {
            base_url,
            token,
            kernel_args,
        } if safe(base_url) && safe(token) && safe_args(kernel_args) => {
            let base = base_url.trim_end_matches('/');
            format!(
                "#!ipxe\n\
                 echo Kagami: {why}\n\
                 kernel {base}/boot/ramdisk/vmlinuz initrd=initrd.img kagami.url={base} kagami.token={token} {kernel_args}\n\
                 initrd {base}/boot/ramdisk/initrd.img\n\
                 boot\n"
            )
        }
        Boot::Agent { .. } => "#!ipxe\necho Kagami: cannot boot the agent (the advertised URL or \
                               kernel arguments hold characters unsafe in a script); booting the \
                               local disk\nexit\n"
            .to_string(),
        Boot::Sanboot {
            base_url,
            image,
            token,
        } if safe(base_url) && safe(image) && safe(token) => format!(
            "#!ipxe\n\
             echo Kagami: {why}\n\
             sanboot --no-describe {}/v1/images/{image}/content?token={token} || \
             echo Kagami: the ISO did not boot; booting the local disk\n\
             exit\n",
            base_url.trim_end_matches('/')
        ),
        Boot::Sanboot { .. } => "#!ipxe\necho Kagami: cannot boot the ISO (the advertised URL \
                                 holds characters unsafe in a script); booting the local disk\n\
                                 exit\n"
            .to_string(),
        Boot::SanbootIscsi {
            server,
            port,
            target,
            username,
            password,
        } if safe(server) && safe(target) && safe(username) && safe(password) => {
            // iPXE's URI: iscsi:<server>:<protocol>:<port>:<LUN>:<target> (protocol empty: TCP).
            let server = if server.contains(':') {
                format!("[{server}]")
            } else {
                server.to_string()
            };
            format!(
                "#!ipxe\n\
                 echo Kagami: {why}\n\
                 set username {username}\n\
                 set password {password}\n\
                 sanboot --no-describe iscsi:{server}::{port}:0:{target} || \
                 echo Kagami: the ISO did not boot; booting the local disk\n\
                 exit\n"
            )
        }
        Boot::SanbootIscsi { .. } => "#!ipxe\necho Kagami: cannot boot the ISO (the iSCSI \
                                      portal holds characters unsafe in a script); booting the \
                                      local disk\nexit\n"
            .to_string(),
        Boot::Chain { base_url } if safe(base_url) => format!(
            "#!ipxe\nchain {}/boot/ipxe?mac=${{net0/mac}}\n",
            base_url.trim_end_matches('/')
        ),
        Boot::Local | Boot::Chain { .. } => format!("#!ipxe\necho Kagami: {why}\nexit\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_boot_names_kernel_initrd_server_and_token() {
        let s = script(
            &Boot::Agent {
                base_url: "http://10.0.0.1:8470/",
                token: "kgm_abc",
                kernel_args: "console=ttyS0",
            },
            "deploying",
        );
        assert!(s.starts_with("#!ipxe\n"));
        assert!(s.contains(
            "kernel http://10.0.0.1:8470/boot/ramdisk/vmlinuz initrd=initrd.img \
             kagami.url=http://10.0.0.1:8470 kagami.token=kgm_abc console=ttyS0\n"
        ));
        assert!(s.contains("initrd http://10.0.0.1:8470/boot/ramdisk/initrd.img\n"));
        assert!(s.ends_with("boot\n"));
    }

    #[test]
    fn an_iso_boot_sanboots_the_content_route_with_its_token() {
        let s = script(
            &Boot::Sanboot {
                base_url: "http://10.0.0.1:8470/",
                image: "0b6b5e0e-7c1a-4f4e-9d0f-3f1b8f4a2c11",
                token: "kgm_abc",
            },
            "iso",
        );
        assert_eq!(
            s,
            "#!ipxe\necho Kagami: iso\nsanboot --no-describe \
             http://10.0.0.1:8470/v1/images/0b6b5e0e-7c1a-4f4e-9d0f-3f1b8f4a2c11/content?token=kgm_abc \
             || echo Kagami: the ISO did not boot; booting the local disk\nexit\n"
        );
        let s = script(
            &Boot::Sanboot {
                base_url: "http://x y",
                image: "i",
                token: "t",
            },
            "iso",
        );
        assert!(!s.contains("sanboot") && s.ends_with("exit\n"), "{s}");
    }

    #[test]
    fn an_iscsi_iso_boot_sets_chap_credentials_and_sanboots_the_target() {
        let target = "iqn.2026-11.io.kagami:0b6b5e0e-7c1a-4f4e-9d0f-3f1b8f4a2c11";
        let boot = |server| Boot::SanbootIscsi {
            server,
            port: 3260,
            target,
            username: "kagami-0123456789abcdef",
            password: "00112233445566778899aabbccddeeff",
        };
        assert_eq!(
            script(&boot("10.0.0.1"), "iso"),
            format!(
                "#!ipxe\necho Kagami: iso\nset username kagami-0123456789abcdef\n\
                 set password 00112233445566778899aabbccddeeff\n\
                 sanboot --no-describe iscsi:10.0.0.1::3260:0:{target} \
                 || echo Kagami: the ISO did not boot; booting the local disk\nexit\n"
            )
        );
        assert!(script(&boot("fd00::1"), "iso").contains("iscsi:[fd00::1]::3260:0:"));
        let s = script(&boot("x y"), "iso");
        assert!(!s.contains("sanboot") && s.ends_with("exit\n"), "{s}");
    }

    #[test]
    fn a_bare_request_chains_to_itself_with_the_mac() {
        let s = script(
            &Boot::Chain {
                base_url: "http://10.0.2.2:8470",
            },
            "",
        );
        assert_eq!(
            s,
            "#!ipxe\nchain http://10.0.2.2:8470/boot/ipxe?mac=${net0/mac}\n"
        );
    }

    #[test]
    fn nothing_from_outside_can_add_a_command() {
        for url in ["http://x\nshell", "http://x ${net0/mac}", "http://a b", ""] {
            let s = script(
                &Boot::Agent {
                    base_url: url,
                    token: "t",
                    kernel_args: "",
                },
                "x",
            );
            assert!(
                s.ends_with("exit\n") && !s.contains("\nkernel "),
                "{url:?}: {s}"
            );
        }
        let s = script(&Boot::Local, "evil\nshell ${x}");
        assert_eq!(s.lines().count(), 3, "{s}");
        assert!(!s.contains('$'));
    }
}

/// The host part of `base_url` (`http://HOST[:PORT]/…`), brackets of an IPv6 address removed:
/// the address a machine reached the server by.
pub fn url_host(base_url: &str) -> &str {
    let rest = base_url.split_once("://").map_or(base_url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or_default();
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().unwrap_or_default();
    }
    authority.rsplit_once(':').map_or(authority, |(h, _)| h)
}

#[cfg(test)]
mod url_tests {
    #[test]
    fn the_host_of_a_base_url() {
        assert_eq!(super::url_host("http://10.0.0.1:8470"), "10.0.0.1");
        assert_eq!(super::url_host("http://boot.example/x"), "boot.example");
        assert_eq!(super::url_host("https://[fd00::1]:8470/"), "fd00::1");
        assert_eq!(super::url_host("10.0.0.2"), "10.0.0.2");
    }
}
