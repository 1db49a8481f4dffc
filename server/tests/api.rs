//! The API's contract: tenancy, error codes for bad input, batched blocks, listing.

mod common;

use common::{BLOCK, Server, noise, same_bytes};
use kagami_images::split::split_bytes;
use kagami_images::wire;
use serde_json::Value;

fn json_post(s: &Server, token: Option<&str>, path: &str, body: &str) -> common::Response {
    s.curl(
        token,
        "POST",
        path,
        &[
            "-H",
            "content-type: application/json",
            "--data-binary",
            body,
        ],
    )
}

#[test]
fn projects_see_only_their_own_and_public_images() {
    let s = Server::start();
    let alice = s.member_of("alice");
    let bob = s.member_of("bob");
    let file = s.dir.path().join("a.raw");
    common::write_file(&file, &noise(1, 2 << 20));
    let out = s.cli_as(
        &alice,
        &[
            "image",
            "import",
            file.to_str().expect("path"),
            "--name",
            "alice-os",
            "--output",
            "json",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let image: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(image["owner"], "alice");
    let id = image["id"].as_str().expect("id");

    // Bob cannot see, fetch, change or delete it: all 404, as if it did not exist.
    for (method, path) in [
        ("GET", format!("/v1/images/{id}")),
        ("GET", format!("/v1/images/{id}/file")),
        ("GET", format!("/v1/images/{id}/manifest")),
        ("GET", format!("/v1/images/{id}/segments/0")),
        ("DELETE", format!("/v1/images/{id}")),
    ] {
        let r = s.curl(Some(&bob), method, &path, &[]);
        assert_eq!(r.status, 404, "{method} {path}");
        assert_eq!(r.code(), "not_found");
    }
    // A hidden image and one that never existed answer alike.
    let nobody = uuid::Uuid::new_v4().to_string();
    let hidden = s.curl(Some(&bob), "GET", &format!("/v1/images/{id}"), &[]);
    let missing = s.curl(Some(&bob), "GET", &format!("/v1/images/{nobody}"), &[]);
    assert_eq!(
        hidden.text().replace(id, "ID"),
        missing.text().replace(&nobody, "ID")
    );
    let listed = s.curl(Some(&bob), "GET", "/v1/images", &[]).json();
    assert_eq!(listed["images"].as_array().expect("list").len(), 0);
    // A marker naming an invisible image does not reveal it either.
    assert_eq!(
        s.curl(Some(&bob), "GET", &format!("/v1/images?marker={id}"), &[])
            .status,
        404
    );

    // Made public, Bob sees and downloads it but still cannot change it.
    s.cli_as(&alice, &["image", "update", id, "--visibility", "public"]);
    assert_eq!(
        s.curl(Some(&bob), "GET", &format!("/v1/images/{id}"), &[])
            .status,
        200
    );
    let got = s.dir.path().join("bob.raw");
    assert_eq!(
        s.curl_into(
            Some(&bob),
            "GET",
            &format!("/v1/images/{id}/file"),
            &[],
            &got
        )
        .status,
        200
    );
    assert!(same_bytes(&file, &got));
    let r = s.curl(
        Some(&bob),
        "PATCH",
        &format!("/v1/images/{id}"),
        &[
            "-H",
            "content-type: application/json",
            "-d",
            r#"{"name":"mine"}"#,
        ],
    );
    assert_eq!(r.status, 403);
    assert_eq!(
        s.curl(Some(&bob), "DELETE", &format!("/v1/images/{id}"), &[])
            .status,
        403
    );
    assert_eq!(
        s.curl(Some(&bob), "GET", "/v1/images", &[]).json()["images"]
            .as_array()
            .expect("list")
            .len(),
        1
    );

    // Members cannot administer; no token or a wrong one is 401.
    assert_eq!(
        json_post(&s, Some(&bob), "/v1/projects", r#"{"name":"evil"}"#).status,
        403
    );
    assert_eq!(
        json_post(
            &s,
            Some(&bob),
            "/v1/tokens",
            r#"{"project":"alice","role":"admin"}"#
        )
        .status,
        403
    );
    assert_eq!(s.curl(Some(&bob), "GET", "/v1/store", &[]).status, 403);
    assert_eq!(
        s.curl(
            Some(&bob),
            "POST",
            "/v1/blocks/missing",
            &["--data-binary", ""]
        )
        .status,
        403
    );
    let none = s.curl(None, "GET", "/v1/images", &[]);
    assert_eq!(
        (none.status, none.code()),
        (401, "unauthorized".to_string())
    );
    assert_eq!(
        s.curl(Some("kgm_wrong"), "GET", "/v1/images", &[]).status,
        401
    );
    // A revoked token stops working.
    let tokens = s.cli_json(&["token", "list"]);
    let bob_token = tokens
        .as_array()
        .expect("list")
        .iter()
        .find(|t| t["project"] == "bob")
        .expect("bob's token");
    s.cli(&["token", "revoke", bob_token["id"].as_str().expect("id")]);
    assert_eq!(s.curl(Some(&bob), "GET", "/v1/images", &[]).status, 401);
}

#[test]
fn bad_input_gets_a_4xx_with_a_code_and_changes_nothing() {
    let s = Server::start();
    let t = Some(s.token.as_str());
    let ten_mb = s.dir.path().join("ten-mb-name.json");
    common::write_file(
        &ten_mb,
        format!(r#"{{"name":"{}"}}"#, "x".repeat(10 << 20)).as_bytes(),
    );
    let ten_mb_name = format!("@{}", ten_mb.display());
    let long_name = format!(r#"{{"name":"{}"}}"#, "x".repeat(300));
    let cases: Vec<(&str, &str, Vec<&str>, u16, &str)> = vec![
        (
            "POST",
            "/v1/images",
            vec!["-H", "content-type: application/json", "-d", "{not json"],
            400,
            "malformed_json",
        ),
        (
            "POST",
            "/v1/images",
            vec![
                "-H",
                "content-type: application/json",
                "-d",
                r#"{"name": 5}"#,
            ],
            400,
            "invalid_body",
        ),
        (
            "POST",
            "/v1/images",
            vec![
                "-H",
                "content-type: application/json",
                "-d",
                r#"{"name":"a","kind":"floppy"}"#,
            ],
            400,
            "invalid_body",
        ),
        (
            "POST",
            "/v1/images",
            vec![
                "-H",
                "content-type: application/json",
                "-d",
                r#"{"name":"a","colour":"red"}"#,
            ],
            400,
            "invalid_body",
        ),
        (
            "POST",
            "/v1/images",
            vec![
                "-H",
                "content-type: application/json",
                "-d",
                r#"{"name":"a","min_ram_mb":-1}"#,
            ],
            400,
            "invalid_body",
        ),
        (
            "POST",
            "/v1/images",
            vec![
                "-H",
                "content-type: application/json",
                "-d",
                r#"{"name":""}"#,
            ],
            400,
            "invalid_name",
        ),
        (
            "POST",
            "/v1/images",
            vec!["-H", "content-type: application/json", "-d", &long_name],
            400,
            "field_too_long",
        ),
        (
            "POST",
            "/v1/images",
            vec![
                "-H",
                "content-type: application/json",
                // curl asks `Expect: 100-continue` for a body this big and, after 1 s without
                // an answer (a loaded machine), starts sending anyway: the server's 413 then
                // races the upload into a broken pipe. Waiting for the answer makes the
                // refusal, which comes from Content-Length alone, what the test sees.
                "--expect100-timeout",
                "60",
                "--data-binary",
                &ten_mb_name,
            ],
            413,
            "too_large",
        ),
        (
            "POST",
            "/v1/images",
            vec!["-d", r#"{"name":"a"}"#],
            415,
            "unsupported_media_type",
        ),
        ("GET", "/v1/images/not-a-uuid", vec![], 400, "invalid_id"),
        (
            "GET",
            "/v1/images/not-a-uuid/file",
            vec![],
            400,
            "invalid_id",
        ),
        ("GET", "/v1/images?limit=0", vec![], 400, "invalid_limit"),
        ("GET", "/v1/images?limit=lots", vec![], 400, "invalid_query"),
        ("GET", "/v1/images?sort=colour", vec![], 400, "invalid_sort"),
        (
            "GET",
            "/v1/images?kind=floppy",
            vec![],
            400,
            "invalid_query",
        ),
        ("GET", "/v1/images?marker=zzz", vec![], 400, "invalid_id"),
        ("GET", "/v1/nothing-here", vec![], 404, "no_route"),
        ("PUT", "/v1/images", vec![], 405, "method_not_allowed"),
        (
            "POST",
            "/v1/blocks/missing",
            vec!["--data-binary", "short"],
            400,
            "invalid_ids",
        ),
        (
            "POST",
            "/v1/projects",
            vec![
                "-H",
                "content-type: application/json",
                "-d",
                r#"{"name":"Bad Name!"}"#,
            ],
            400,
            "invalid_project_name",
        ),
        (
            "POST",
            "/v1/tokens",
            vec![
                "-H",
                "content-type: application/json",
                "-d",
                r#"{"project":"nope","role":"member"}"#,
            ],
            404,
            "not_found",
        ),
        (
            "POST",
            "/v1/tokens",
            vec![
                "-H",
                "content-type: application/json",
                "-d",
                r#"{"project":"admin","role":"god"}"#,
            ],
            400,
            "invalid_body",
        ),
    ];
    for (method, path, extra, status, code) in &cases {
        let r = s.curl(t, method, path, extra);
        assert_eq!(r.status, *status, "{method} {path}: {}", r.text());
        assert_eq!(r.code(), *code, "{method} {path}");
        assert!(
            !r.json()["error"]["message"]
                .as_str()
                .unwrap_or("")
                .is_empty()
        );
    }
    assert_eq!(
        s.curl(t, "GET", "/v1/images", &[]).json()["images"]
            .as_array()
            .expect("list")
            .len(),
        0,
        "no bad request created an image"
    );

    // State mistakes: uploading into an active image, reading one that has no data yet.
    let file = s.dir.path().join("x.raw");
    common::write_file(&file, &noise(2, BLOCK * 3));
    let image = s.import(&file, "x");
    let id = image["id"].as_str().expect("id");
    let r = s.curl(
        t,
        "PUT",
        &format!("/v1/images/{id}/file"),
        &["--data-binary", "more"],
    );
    assert_eq!((r.status, r.code()), (409, "wrong_state".to_string()));
    let queued = s.cli_json(&["image", "create", "--name", "empty"]);
    let r = s.curl(
        t,
        "GET",
        &format!("/v1/images/{}/file", queued["id"].as_str().expect("id")),
        &[],
    );
    assert_eq!((r.status, r.code()), (409, "not_active".to_string()));
    let r = s.curl(
        t,
        "PATCH",
        &format!("/v1/images/{id}"),
        &[
            "-H",
            "content-type: application/json",
            "-d",
            r#"{"boot_mode":"coreboot"}"#,
        ],
    );
    assert_eq!((r.status, r.code()), (400, "invalid_body".to_string()));
    assert_eq!(
        s.curl(t, "GET", &format!("/v1/images/{id}"), &[]).json()["digest"],
        image["digest"]
    );
}

#[test]
fn updates_change_only_what_is_given() {
    let s = Server::start();
    let image = s.cli_json(&[
        "image",
        "create",
        "--name",
        "deb",
        "--boot-mode",
        "bios",
        "--tag",
        "a",
        "--property",
        "k=v",
    ]);
    let id = image["id"].as_str().expect("id");
    let r = s.admin(
        "PATCH",
        &format!("/v1/images/{id}"),
        &["-H", "content-type: application/json", "-d", r#"{"description":"Debian 13","min_ram_mb":2048,"boot_mode":"uefi","os_distro":"debian"}"#],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["name"], "deb");
    assert_eq!(v["description"], "Debian 13");
    assert_eq!(v["min_ram_mb"], 2048);
    assert_eq!(v["boot_mode"], "uefi");
    assert_eq!(v["os_distro"], "debian");
    assert_eq!(v["tags"], serde_json::json!(["a"]));
    assert_eq!(v["properties"]["k"], "v");
    // null clears an optional field.
    let v = s
        .admin(
            "PATCH",
            &format!("/v1/images/{id}"),
            &[
                "-H",
                "content-type: application/json",
                "-d",
                r#"{"boot_mode":null}"#,
            ],
        )
        .json();
    assert_eq!(v["boot_mode"], Value::Null);
    assert_eq!(v["min_ram_mb"], 2048);
}

#[test]
fn listing_filters_sorts_and_pages() {
    let s = Server::start();
    for (name, kind, tag) in [
        ("e", "system", "x"),
        ("c", "data", "x"),
        ("a", "system", "y"),
        ("d", "iso", "x"),
        ("b", "system", "x"),
    ] {
        s.cli(&[
            "image", "create", "--name", name, "--kind", kind, "--tag", tag,
        ]);
    }
    let names = |v: &Value| -> Vec<String> {
        v["images"]
            .as_array()
            .expect("list")
            .iter()
            .map(|i| i["name"].as_str().expect("name").to_string())
            .collect()
    };
    let all = s.admin("GET", "/v1/images?sort=name:desc", &[]).json();
    assert_eq!(names(&all), ["e", "d", "c", "b", "a"]);
    let systems = s
        .admin("GET", "/v1/images?kind=system&tag=x&sort=name", &[])
        .json();
    assert_eq!(names(&systems), ["b", "e"]);
    assert_eq!(
        names(&s.admin("GET", "/v1/images?status=active", &[]).json()).len(),
        0
    );
    // Pages of two, in creation order, follow markers to the end with nothing repeated.
    let mut seen = Vec::new();
    let mut marker: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &marker {
            Some(m) => format!("/v1/images?limit=2&marker={m}"),
            None => "/v1/images?limit=2".to_string(),
        };
        let page = s.admin("GET", &path, &[]).json();
        seen.extend(names(&page));
        pages += 1;
        match page["next_marker"].as_str() {
            Some(m) => marker = Some(m.to_string()),
            None => break,
        }
    }
    assert_eq!(seen, ["e", "c", "a", "d", "b"]);
    assert_eq!(pages, 3);
    // The CLI follows the pages too.
    let listed = s.cli_json(&["image", "list", "--limit", "2", "--sort", "name"]);
    assert_eq!(listed.as_array().expect("list").len(), 5);
}

#[test]
fn blocks_move_in_batches_and_lies_are_refused() {
    let s = Server::start();
    let t = Some(s.token.as_str());
    let dir = s.dir.path();
    // A disk made of a known image's data plus new data: the server lacks only the new blocks.
    let known = noise(31, 4 * BLOCK);
    let known_file = dir.join("known.raw");
    common::write_file(&known_file, &known);
    s.import(&known_file, "known");
    let disk = [
        known.clone(),
        vec![0u8; 2 * BLOCK],
        noise(32, 3 * BLOCK + 100),
    ]
    .concat();
    let manifest = split_bytes(&disk);
    let ids: Vec<_> = manifest.blocks().map(|b| b.id).collect();
    let ids_file = dir.join("ids.bin");
    common::write_file(&ids_file, &wire::encode_ids(&ids));
    let r = s.curl(
        t,
        "POST",
        "/v1/blocks/missing",
        &["--data-binary", &format!("@{}", ids_file.display())],
    );
    assert_eq!(r.status, 200);
    let missing = wire::decode_ids(&r.body).expect("ids");
    assert_eq!(
        missing.len(),
        4,
        "only the 4 new data blocks are missing (holes never are)"
    );

    // One body of frames; a frame whose bytes do not match its id is refused, nothing stored.
    let mut frames = Vec::new();
    let blocks: Vec<_> = manifest
        .blocks()
        .filter(|b| missing.contains(&b.id))
        .collect();
    for b in &blocks {
        wire::encode_frame(
            &mut frames,
            &b.id,
            &disk[b.offset as usize..b.offset as usize + b.len],
        );
    }
    let mut lie = frames.clone();
    let last = lie.len() - 1;
    lie[last] ^= 1;
    let lie_file = dir.join("lie.bin");
    common::write_file(&lie_file, &lie);
    let before = s.store_stats();
    let r = s.curl(
        t,
        "POST",
        "/v1/blocks",
        &["--data-binary", &format!("@{}", lie_file.display())],
    );
    assert_eq!((r.status, r.code()), (400, "invalid_frame".to_string()));
    assert_eq!(s.store_stats()["blocks"], before["blocks"]);

    // Committing a manifest whose blocks are not all stored is refused and leaves the image failed.
    let image = s.cli_json(&["image", "create", "--name", "assembled"]);
    let id = image["id"].as_str().expect("id");
    let bundle = dir.join("manifest.bin");
    common::write_file(&bundle, &manifest.encode_bundle());
    let r = s.curl(
        t,
        "PUT",
        &format!("/v1/images/{id}/manifest"),
        &["--data-binary", &format!("@{}", bundle.display())],
    );
    assert_eq!((r.status, r.code()), (409, "missing_blocks".to_string()));
    assert_eq!(
        s.admin("GET", &format!("/v1/images/{id}"), &[]).json()["status"],
        "failed"
    );

    let good_file = dir.join("frames.bin");
    common::write_file(&good_file, &frames);
    let r = s.curl(
        t,
        "POST",
        "/v1/blocks",
        &["--data-binary", &format!("@{}", good_file.display())],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["new_blocks"], 4);
    let r = s.curl(
        t,
        "PUT",
        &format!("/v1/images/{id}/manifest"),
        &["--data-binary", &format!("@{}", bundle.display())],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["digest"], format!("sha256:{}", manifest.digest()));
    let out = dir.join("assembled.raw");
    let disk_file = dir.join("disk.raw");
    common::write_file(&disk_file, &disk);
    assert_eq!(
        s.curl_into(t, "GET", &format!("/v1/images/{id}/file"), &[], &out)
            .status,
        200
    );
    assert!(same_bytes(&disk_file, &out));

    // The manifest reads back whole; a segment and a list of blocks come back as verified frames.
    let r = s.admin("GET", &format!("/v1/images/{id}/manifest"), &[]);
    assert_eq!(r.body, manifest.encode_bundle());
    let r = s.admin("GET", &format!("/v1/images/{id}/segments/0"), &[]);
    let frames = wire::decode_frames(&r.body).expect("frames");
    assert_eq!(
        frames.len(),
        4 + 4,
        "segment 0 holds every data block of this small disk"
    );
    // A mask asks for some blocks only: the data blocks among them, in disk order.
    let data_blocks: Vec<u64> = manifest
        .segment_blocks(0)
        .filter(|b| !b.id.is_hole())
        .map(|b| b.index)
        .collect();
    let mask = (1u64 << data_blocks[1]) | (1u64 << data_blocks[5]) | 1 << 63;
    let r = s.admin(
        "GET",
        &format!("/v1/images/{id}/segments/0?blocks={mask:016x}"),
        &[],
    );
    let masked = wire::decode_frames(&r.body).expect("frames");
    assert_eq!(
        masked.iter().map(|f| f.0).collect::<Vec<_>>(),
        vec![frames[1].0, frames[5].0],
        "only the asked-for data blocks come back (a hole asked for is not sent)"
    );
    for bad in ["zz", "123", "00000000000000000g"] {
        let r = s.admin(
            "GET",
            &format!("/v1/images/{id}/segments/0?blocks={bad}"),
            &[],
        );
        assert_eq!(r.status, 400, "{bad}");
        assert_eq!(r.json()["error"]["code"], "invalid_query");
    }
    assert_eq!(
        s.admin("GET", &format!("/v1/images/{id}/segments/1"), &[])
            .status,
        404
    );
    let want_file = dir.join("want.bin");
    common::write_file(&want_file, &wire::encode_ids(&missing[..2]));
    let r = s.curl(
        t,
        "POST",
        "/v1/blocks/read",
        &["--data-binary", &format!("@{}", want_file.display())],
    );
    let frames = wire::decode_frames(&r.body).expect("frames");
    assert_eq!(frames.iter().map(|f| f.0).collect::<Vec<_>>(), missing[..2]);
}

#[test]
fn a_mistyped_config_key_stops_start_up_and_names_the_key() {
    let dir = tempfile::tempdir().expect("tmp");
    let config = dir.path().join("kagami.toml");
    common::write_file(&config, b"[server]\nlisten_address = \"127.0.0.1:1\"\n");
    let out = std::process::Command::new(common::kagami())
        .args(["serve", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("listen_address"), "{err}");
}

#[test]
fn a_manifest_cannot_put_a_block_in_a_slot_of_another_length() {
    let s = Server::start();
    let t = Some(s.token.as_str());
    let dir = s.dir.path();
    // An image whose last block is 100 bytes long.
    let data = noise(60, BLOCK + 100);
    let file = dir.join("tail.raw");
    common::write_file(&file, &data);
    s.import(&file, "tail");
    let real = split_bytes(&data);
    let tail = real.blocks().last().expect("block").id;
    // A 64 KiB disk whose one (full) slot names the 100-byte block: refused, nothing committed.
    let mut forged = Vec::new();
    forged.extend_from_slice(&real.encode_index()[..24]);
    forged.extend_from_slice(&(BLOCK as u64).to_le_bytes());
    let body = wire::encode_ids(&[tail]);
    forged.extend_from_slice(&kagami_images::BlockId::hash(&body).0);
    forged.extend_from_slice(&body);
    let bundle = dir.join("forged.bin");
    common::write_file(&bundle, &forged);
    let image = s.cli_json(&["image", "create", "--name", "forged"]);
    let id = image["id"].as_str().expect("id");
    let r = s.curl(
        t,
        "PUT",
        &format!("/v1/images/{id}/manifest"),
        &["--data-binary", &format!("@{}", bundle.display())],
    );
    assert_eq!(
        (r.status, r.code()),
        (400, "invalid_manifest".to_string()),
        "{}",
        r.text()
    );
    assert_eq!(
        s.admin("GET", &format!("/v1/images/{id}"), &[]).json()["status"],
        "failed"
    );
    // Members may not commit manifests at all (they could probe other projects' blocks).
    let member = s.member_of("m");
    let r = s.curl(
        Some(&member),
        "PUT",
        &format!("/v1/images/{id}/manifest"),
        &["--data-binary", &format!("@{}", bundle.display())],
    );
    assert_eq!(r.status, 403);
}

#[test]
fn auth_follows_the_rfc_and_a_lost_admin_token_comes_back() {
    let mut s = Server::start();
    let r = s.curl(None, "GET", "/v1/images", &[]);
    assert_eq!(r.status, 401);
    assert!(
        r.header("www-authenticate")
            .is_some_and(|v| v.starts_with("bearer"))
    );
    let lower = s.curl(
        None,
        "GET",
        "/v1/images",
        &["-H", &format!("Authorization: bearer {}", s.token)],
    );
    assert_eq!(lower.status, 200, "the scheme is case-insensitive");
    // Revoke the only admin token: the next start writes a new one (and says so).
    let first = s.token.clone();
    let tokens = s.cli_json(&["token", "list"]);
    let id = tokens[0]["id"].as_str().expect("id").to_string();
    s.cli(&["token", "revoke", &id]);
    s.restart();
    assert_ne!(s.token, first);
    assert_eq!(s.admin("GET", "/v1/store", &[]).status, 200);
    let mode = std::fs::metadata(s.data_dir().join("admin.token")).expect("file");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );
    let dir = std::fs::metadata(s.data_dir()).expect("data dir");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&dir.permissions()) & 0o777,
        0o700
    );
}
