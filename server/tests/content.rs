//! `GET|HEAD /v1/images/{id}/content`: what iPXE's HTTP `sanboot` reads — ranges, `If-Range`,
//! `HEAD`, a token in the URL, many requests on one connection.

mod common;

use std::process::Command;

use common::{BLOCK, Server, sparse_file};

/// A server with one imported sparse image: (server, image id, its bytes).
fn with_image() -> (Server, String, Vec<u8>) {
    let s = Server::start();
    let size: u64 = 20 * BLOCK as u64 + 333; // a short last block
    let disk = sparse_file(
        s.dir.path(),
        "c.raw",
        size,
        &[(BLOCK as u64 - 10, 3 * BLOCK), (size - 300, 300)],
        7,
    );
    let image = s.import(&disk, "iso-like");
    let id = image["id"].as_str().expect("id").to_string();
    let bytes = std::fs::read(&disk).expect("read");
    (s, id, bytes)
}

#[test]
fn ranges_head_and_if_range_with_a_token_in_the_url() {
    let (s, id, content) = with_image();
    let size = content.len() as u64;
    let path = format!("/v1/images/{id}/content?token={}", s.token);

    let whole = s.curl(None, "GET", &path, &[]);
    assert_eq!(whole.status, 200, "{}", whole.text());
    assert_eq!(whole.body, content);
    assert_eq!(whole.header("accept-ranges").as_deref(), Some("bytes"));

    for (spec, start, end) in [
        ("0-511", 0u64, 512u64),
        ("65530-200000", 65530, 200_001), // data into a hole
        (&format!("{}-", size - 500), size - 500, size),
        ("-7", size - 7, size),
    ] {
        let r = s.curl(None, "GET", &path, &["-H", &format!("Range: bytes={spec}")]);
        assert_eq!(r.status, 206, "range {spec}");
        assert_eq!(
            r.body,
            content[start as usize..end as usize],
            "range {spec}"
        );
        assert_eq!(
            r.header("content-length"),
            Some((end - start).to_string()),
            "range {spec}"
        );
        assert_eq!(
            r.header("content-range"),
            Some(format!("bytes {start}-{}/{size}", end - 1))
        );
    }

    let r = s.curl(
        None,
        "GET",
        &path,
        &["-H", &format!("Range: bytes={size}-")],
    );
    assert_eq!(r.status, 416);
    assert_eq!(r.header("content-range"), Some(format!("bytes */{size}")));

    // HEAD: the length and no body (curl -I sends HEAD and expects none).
    let head = s.curl(None, "HEAD", &path, &["-I"]);
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some(size.to_string()));
    assert!(head.header("etag").is_some());
    let head = s.curl(None, "HEAD", &path, &["-I", "-H", "Range: bytes=10-19"]);
    assert_eq!(head.status, 206);
    assert_eq!(head.header("content-length").as_deref(), Some("10"));

    // If-Range: the current entity tag keeps the range; any other one (or a date) gets it all.
    let etag = whole.header("etag").expect("etag");
    let r = s.curl(
        None,
        "GET",
        &path,
        &["-H", "Range: bytes=0-9", "-H", &format!("If-Range: {etag}")],
    );
    assert_eq!((r.status, r.body.len()), (206, 10));
    for other in ["\"0000\"", "Wed, 21 Oct 2015 07:28:00 GMT"] {
        let r = s.curl(
            None,
            "GET",
            &path,
            &[
                "-H",
                "Range: bytes=0-9",
                "-H",
                &format!("If-Range: {other}"),
            ],
        );
        assert_eq!(r.status, 200, "If-Range: {other}");
        assert_eq!(r.body, content);
    }

    // The bearer header still works; the route takes no other parameter.
    let r = s.admin("GET", &format!("/v1/images/{id}/content"), &["-r", "0-0"]);
    assert_eq!((r.status, r.body.len()), (206, 1));
    let r = s.admin("GET", &format!("/v1/images/{id}/content?format=qcow2"), &[]);
    assert_eq!(r.status, 400);
}

#[test]
fn a_missing_wrong_or_foreign_token_is_refused() {
    let (s, id, _) = with_image();
    let path = format!("/v1/images/{id}/content");
    assert_eq!(s.curl(None, "GET", &path, &[]).status, 401);
    let r = s.curl(None, "GET", &format!("{path}?token=kgm_nope"), &[]);
    assert_eq!(r.status, 401);
    // A member of another project cannot see the (private) image, in the URL or the header.
    let member = s.member_of("other");
    let r = s.curl(None, "GET", &format!("{path}?token={member}"), &[]);
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(s.curl(Some(&member), "GET", &path, &[]).status, 404);
    // Other routes never take a token in the URL.
    let r = s.curl(
        None,
        "GET",
        &format!("/v1/images/{id}?token={}", s.token),
        &[],
    );
    assert_eq!(r.status, 401);
}

/// iPXE reads the whole ISO through one connection: the server keeps it open between ranges.
#[test]
fn ranges_share_one_kept_alive_connection() {
    let (s, id, _) = with_image();
    let url = format!("{}/v1/images/{id}/content?token={}", s.url, s.token);
    let mut cmd = Command::new("curl");
    cmd.args([
        "-s",
        "-S",
        "-v",
        "-o",
        "/dev/null",
        "-o",
        "/dev/null",
        "-o",
        "/dev/null",
    ]);
    cmd.args(["-r", "0-4095"]).args([&url, &url, &url]);
    let out = cmd.output().expect("curl");
    assert!(out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        log.matches("Re-using existing connection").count(),
        2,
        "every request after the first reuses the connection:\n{log}"
    );
    assert_eq!(log.matches("HTTP/1.1 206").count(), 3, "{log}");
}
