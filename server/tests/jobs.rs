//! Durable import jobs: from a source URL (served by a real HTTP(S) server in the test), and of
//! files uploaded with the request.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// A static file server that sends `chunk` bytes every `delay` seconds (0: full speed).
struct FileServer {
    child: Child,
    port: u16,
    scheme: &'static str,
}

impl FileServer {
    fn start(dir: &Path, chunk: usize, delay: f64) -> FileServer {
        FileServer::launch(dir, chunk, delay, None)
    }

    /// Serves https with `cert` and `key` (PEM files).
    fn start_tls(dir: &Path, cert: &Path, key: &Path) -> FileServer {
        FileServer::launch(dir, 1 << 20, 0.0, Some((cert, key)))
    }

    fn launch(dir: &Path, chunk: usize, delay: f64, tls: Option<(&Path, &Path)>) -> FileServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let script = format!(
            "import http.server, functools, time\n\
             class H(http.server.SimpleHTTPRequestHandler):\n\
             \x20   def log_message(self, *a): pass\n\
             \x20   def copyfile(self, src, dst):\n\
             \x20       while True:\n\
             \x20           b = src.read({chunk})\n\
             \x20           if not b: break\n\
             \x20           dst.write(b); time.sleep({delay})\n\
             srv = http.server.ThreadingHTTPServer(('127.0.0.1', {port}), functools.partial(H, directory='{}'))\n\
             {}\
             srv.serve_forever()\n",
            dir.display(),
            match tls {
                None => String::new(),
                Some((cert, key)) => format!(
                    "import ssl\n\
                     ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)\n\
                     ctx.load_cert_chain('{}', '{}')\n\
                     srv.socket = ctx.wrap_socket(srv.socket, server_side=True)\n",
                    cert.display(),
                    key.display()
                ),
            }
        );
        let child = Command::new("python3")
            .args(["-c", &script])
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("python3");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "file server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        let scheme = if tls.is_some() { "https" } else { "http" };
        FileServer {
            child,
            port,
            scheme,
        }
    }

    fn url(&self, name: &str) -> String {
        format!("{}://127.0.0.1:{}/{name}", self.scheme, self.port)
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn qcow2_of(dir: &Path, name: &str, disk: &[u8]) {
    let raw = dir.join(format!("{name}.raw"));
    std::fs::write(&raw, disk).expect("write");
    common::convert_raw(&raw, &dir.join(name), "qcow2", &[]);
}

fn wait_job(s: &common::Server, id: &str, until: impl Fn(&Value) -> bool) -> Value {
    poll(
        60,
        || s.admin("GET", &format!("/v1/jobs/{id}"), &[]).json(),
        until,
    )
}

/// `get()` once `until` holds for it, asked every 50 ms for up to `secs` seconds.
fn poll(secs: u64, get: impl Fn() -> Value, until: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let got = get();
        if until(&got) {
            return got;
        }
        assert!(Instant::now() < deadline, "never got there: {got}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_image_imports_from_a_url_and_a_bad_source_fails_cleanly() {
    let s = common::Server::start();
    let files = tempfile::tempdir().expect("tmp");
    let mut disk = vec![0u8; 12 << 20];
    disk[..5 << 20].copy_from_slice(&common::noise(7, 5 << 20));
    qcow2_of(files.path(), "disk.qcow2", &disk);
    let web = FileServer::start(files.path(), 1 << 20, 0.0);

    // The CLI creates the image, starts the job and follows it to the end.
    let image = s.cli_json(&[
        "image",
        "import",
        "--source",
        &web.url("disk.qcow2"),
        "--format",
        "qcow2",
        "--name",
        "web",
    ]);
    assert_eq!(image["status"], "active");
    assert_eq!(image["virtual_size"], disk.len() as u64);
    let raw = s.import(&files.path().join("disk.qcow2.raw"), "local");
    assert_eq!(image["digest"], raw["digest"]);
    let jobs = s.admin("GET", "/v1/jobs", &[]).json();
    assert_eq!(jobs[0]["state"], "succeeded");
    assert_eq!(jobs[0]["bytes_done"], jobs[0]["bytes_total"]);

    // A missing source: the job fails with the reason, the image fails, nothing is kept.
    let img = s.cli_json(&["image", "create", "--name", "missing"]);
    let id = img["id"].as_str().expect("id");
    let body = json!({"source_url": web.url("nope.qcow2"), "disk_format": "qcow2"}).to_string();
    let r = s.admin(
        "POST",
        &format!("/v1/images/{id}/import"),
        &["-H", "content-type: application/json", "-d", &body],
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let job = wait_job(&s, r.json()["id"].as_str().expect("job id"), |j| {
        j["state"] == "failed"
    });
    assert!(
        job["error"].as_str().expect("error").contains("404"),
        "{job}"
    );
    assert_eq!(job["error_code"], "source_unavailable");
    assert_eq!(
        s.admin("GET", &format!("/v1/images/{id}"), &[]).json()["status"],
        "failed"
    );

    // Credentials in a source URL are used, never shown.
    let img = s.cli_json(&["image", "create", "--name", "with-password"]);
    let secret_url = web
        .url("missing.qcow2")
        .replace("http://", "http://user:s3cr3t@");
    let body = json!({"source_url": secret_url, "disk_format": "qcow2"}).to_string();
    let r = s.admin(
        "POST",
        &format!("/v1/images/{}/import", img["id"].as_str().expect("id")),
        &["-H", "content-type: application/json", "-d", &body],
    );
    assert!(!r.text().contains("s3cr3t"), "{}", r.text());
    let job = wait_job(&s, r.json()["id"].as_str().expect("job id"), |j| {
        j["state"] == "failed"
    });
    assert!(!job.to_string().contains("s3cr3t"), "{job}");
    assert!(
        job["source_url"]
            .as_str()
            .expect("url")
            .contains("redacted"),
        "{job}"
    );

    // Redirects are not followed (they could lead anywhere the source check never saw): the
    // file server answers a directory without its slash with a 301.
    std::fs::create_dir(files.path().join("dir")).expect("mkdir");
    let img = s.cli_json(&["image", "create", "--name", "redirected"]);
    let moved = json!({"source_url": web.url("dir"), "disk_format": "qcow2"}).to_string();
    let r = s.admin(
        "POST",
        &format!("/v1/images/{}/import", img["id"].as_str().expect("id")),
        &["-H", "content-type: application/json", "-d", &moved],
    );
    let job = wait_job(&s, r.json()["id"].as_str().expect("job id"), |j| {
        j["state"] == "failed"
    });
    assert!(
        job["error"].as_str().expect("error").contains("301"),
        "{job}"
    );

    // Only admins make the server fetch URLs, and only http:// ones.
    let member = s.member_of("team");
    let out = s.cli_as(
        &member,
        &["image", "create", "--name", "mine", "--output", "json"],
    );
    let mine: Value = serde_json::from_slice(&out.stdout).expect("json");
    let r = s.curl(
        Some(&member),
        "POST",
        &format!("/v1/images/{}/import", mine["id"].as_str().expect("id")),
        &["-H", "content-type: application/json", "-d", &body],
    );
    assert_eq!(r.status, 403);
    let img = s.cli_json(&["image", "create", "--name", "file-url"]);
    let file_url = json!({"source_url": "file:///etc/passwd", "disk_format": "raw"}).to_string();
    let r = s.admin(
        "POST",
        &format!("/v1/images/{}/import", img["id"].as_str().expect("id")),
        &["-H", "content-type: application/json", "-d", &file_url],
    );
    assert_eq!((r.status, r.code()), (400, "invalid_source".to_string()));
}

#[test]
fn a_job_interrupted_by_a_restart_runs_again_to_the_end() {
    let mut s = common::Server::start();
    let files = tempfile::tempdir().expect("tmp");
    let disk = common::noise(9, 16 << 20);
    qcow2_of(files.path(), "slow.qcow2", &disk);
    // ~16 MiB at 2 MiB/s: the first attempt is still downloading when the server dies.
    let web = FileServer::start(files.path(), 256 << 10, 0.125);
    let img = s.cli_json(&["image", "create", "--name", "slow"]);
    let id = img["id"].as_str().expect("id").to_string();
    let body = json!({"source_url": web.url("slow.qcow2"), "disk_format": "qcow2"}).to_string();
    let r = s.admin(
        "POST",
        &format!("/v1/images/{id}/import"),
        &["-H", "content-type: application/json", "-d", &body],
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let job_id = r.json()["id"].as_str().expect("job").to_string();
    wait_job(&s, &job_id, |j| j["bytes_done"].as_u64().unwrap_or(0) > 0);
    s.kill();
    s.restart();
    // Still saving (its job will finish it), not failed like an interrupted upload.
    assert_eq!(
        s.admin("GET", &format!("/v1/images/{id}"), &[]).json()["status"],
        "saving"
    );
    let job = wait_job(&s, &job_id, |j| {
        j["state"] == "succeeded" || j["state"] == "failed"
    });
    assert_eq!(job["state"], "succeeded", "{job}");
    assert!(job["attempts"].as_u64().expect("attempts") >= 2);
    let image = s.admin("GET", &format!("/v1/images/{id}"), &[]).json();
    assert_eq!(image["status"], "active");
    let out = files.path().join("out.raw");
    s.cli(&["image", "download", &id, "-o", out.to_str().expect("p")]);
    assert!(common::same_bytes(
        &files.path().join("slow.qcow2.raw"),
        &out
    ));
    // The first attempt's staged file was cleared at start-up, the second's with its job.
    assert_eq!(
        std::fs::read_dir(s.data_dir().join("staging"))
            .map(|d| d.count())
            .unwrap_or(0),
        0
    );
    s.gc_now();
    assert_eq!(s.store_stats()["unreferenced_blocks"], 0);
}

/// A test CA (`ca.pem`) and a certificate it signed for 127.0.0.1 (`server.pem`, `server.key`),
/// made with the openssl CLI.
fn make_ca_and_cert(dir: &Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509", "-days", "2", "-subj", "/CN=Kagami test CA"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    run(&ca);
    let mut csr = vec!["req", "-subj", "/CN=127.0.0.1"];
    csr.extend(ec);
    csr.extend(["-keyout", "server.key", "-out", "server.csr"]);
    run(&csr);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .expect("ext");
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-days",
        "2",
        "-set_serial",
        "2",
        "-extfile",
        "server.ext",
        "-out",
        "server.pem",
    ]);
}

#[test]
fn https_sources_are_trusted_through_the_configured_ca_and_refused_without_it() {
    let pki = tempfile::tempdir().expect("tmp");
    make_ca_and_cert(pki.path());
    let files = tempfile::tempdir().expect("tmp");
    let mut disk = vec![0u8; 12 << 20];
    disk[3 << 20..7 << 20].copy_from_slice(&common::noise(21, 4 << 20));
    qcow2_of(files.path(), "disk.qcow2", &disk);
    let web = FileServer::start_tls(
        files.path(),
        &pki.path().join("server.pem"),
        &pki.path().join("server.key"),
    );
    let url = web.url("disk.qcow2");
    assert!(url.starts_with("https://"), "{url}");

    // With the site CA configured, the https import is the same image as a local import.
    let ca = pki.path().join("ca.pem");
    let s = common::Server::start_with(&[("KAGAMI__IMPORT__CA_FILE", ca.to_str().expect("p"))]);
    let image = s.cli_json(&[
        "image", "import", "--source", &url, "--format", "qcow2", "--name", "tls",
    ]);
    assert_eq!(image["status"], "active", "{image}");
    let local = s.import(&files.path().join("disk.qcow2.raw"), "local");
    assert_eq!(image["digest"], local["digest"]);

    // s3:// is not fetched yet, and says so.
    let img = s.cli_json(&["image", "create", "--name", "s3"]);
    let body = json!({"source_url": "s3://bucket/disk.qcow2", "disk_format": "qcow2"}).to_string();
    let r = s.admin(
        "POST",
        &format!("/v1/images/{}/import", img["id"].as_str().expect("id")),
        &["-H", "content-type: application/json", "-d", &body],
    );
    assert_eq!((r.status, r.code()), (400, "invalid_source".to_string()));
    assert!(r.text().contains("later"), "{}", r.text());

    // Without it, the certificate is refused at once (no retries), and the job says why.
    let plain = common::Server::start();
    let img = plain.cli_json(&["image", "create", "--name", "untrusted"]);
    let id = img["id"].as_str().expect("id");
    let body = json!({"source_url": url, "disk_format": "qcow2"}).to_string();
    let r = plain.admin(
        "POST",
        &format!("/v1/images/{id}/import"),
        &["-H", "content-type: application/json", "-d", &body],
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let started = Instant::now();
    let job = wait_job(&plain, r.json()["id"].as_str().expect("job id"), |j| {
        j["state"] == "failed" || j["state"] == "succeeded"
    });
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["error_code"], "source_untrusted");
    let error = job["error"].as_str().expect("error");
    assert!(
        error.contains("certificate") && error.contains("import.ca_file"),
        "{error}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "retried: {error}"
    );
    assert_eq!(
        plain.admin("GET", &format!("/v1/images/{id}"), &[]).json()["status"],
        "failed"
    );

    // A CA file that cannot be used stops start-up with its name.
    let data = tempfile::tempdir().expect("tmp");
    let out = Command::new(common::kagami())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data.path())
        .env("KAGAMI__IMPORT__CA_FILE", files.path().join("disk.qcow2"))
        .output()
        .expect("kagami serve");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("import.ca_file"), "{stderr}");
}

/// Folders of jobs under the data directory (uploads staged for their jobs).
fn job_folders(s: &common::Server) -> Vec<String> {
    std::fs::read_dir(s.data_dir().join("jobs"))
        .map(|d| {
            d.map(|e| e.expect("entry").file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn an_uploaded_file_is_converted_by_a_job_and_a_broken_upload_leaves_nothing() {
    let s = common::Server::start();
    let files = tempfile::tempdir().expect("tmp");
    let mut disk = vec![0u8; 20 << 20];
    disk[1 << 20..6 << 20].copy_from_slice(&common::noise(31, 5 << 20));
    qcow2_of(files.path(), "disk.qcow2", &disk);
    let qcow2 = files.path().join("disk.qcow2");

    // A member imports a file into its project's image: 202 and a job, which ends active.
    let member = s.member_of("team");
    let out = s.cli_as(
        &member,
        &["image", "create", "--name", "up", "--output", "json"],
    );
    let image: Value = serde_json::from_slice(&out.stdout).expect("json");
    let id = image["id"].as_str().expect("id");
    let r = s.curl(
        Some(&member),
        "POST",
        &format!("/v1/images/{id}/import?disk_format=qcow2"),
        &["--data-binary", &format!("@{}", qcow2.display())],
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let job = r.json();
    assert_eq!(job["image_id"], id);
    assert_eq!(job["source_url"], Value::Null);
    assert_eq!(job["disk_format"], "qcow2");
    let job = wait_job(&s, job["id"].as_str().expect("job id"), |j| {
        j["state"] == "succeeded" || j["state"] == "failed"
    });
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["bytes_done"], disk.len() as u64, "{job}");
    assert_eq!(job["bytes_total"], disk.len() as u64, "{job}");
    let done = s.admin("GET", &format!("/v1/images/{id}"), &[]).json();
    assert_eq!(done["status"], "active");
    let raw = s.import(&files.path().join("disk.qcow2.raw"), "raw");
    assert_eq!(done["digest"], raw["digest"]);
    assert!(job_folders(&s).is_empty(), "{:?}", job_folders(&s));

    // The CLI follows the job to the end.
    let image = s.cli_json(&[
        "image",
        "import",
        qcow2.to_str().expect("p"),
        "--format",
        "qcow2",
        "--name",
        "by-cli",
    ]);
    assert_eq!(image["status"], "active");
    assert_eq!(image["digest"], raw["digest"]);

    // A body without a length (chunked): the job learns the file's size only at its end, and
    // converts it then.
    let img = s.cli_json(&["image", "create", "--name", "chunked"]);
    let id = img["id"].as_str().expect("id");
    let r = s.admin(
        "POST",
        &format!("/v1/images/{id}/import?disk_format=qcow2"),
        &[
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            &format!("@{}", qcow2.display()),
        ],
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let job = wait_job(&s, r.json()["id"].as_str().expect("job id"), |j| {
        j["state"] == "succeeded" || j["state"] == "failed"
    });
    assert_eq!(job["state"], "succeeded", "{job}");
    let image = s.admin("GET", &format!("/v1/images/{id}"), &[]).json();
    assert_eq!(image["digest"], raw["digest"]);

    // An upload cut off half way: the image and its job (started with the upload, converting
    // while it arrives) fail with the reason; no file is left.
    let img = s.cli_json(&["image", "create", "--name", "cut"]);
    let id = img["id"].as_str().expect("id");
    let mut conn = upload_conn(&s, id, "qcow2", 20 << 20);
    conn.write_all(&std::fs::read(&qcow2).expect("read")[..1 << 20])
        .expect("body");
    drop(conn);
    let deadline = Instant::now() + Duration::from_secs(30);
    let image = loop {
        let image = s.admin("GET", &format!("/v1/images/{id}"), &[]).json();
        if image["status"] == "failed" {
            break image;
        }
        assert!(Instant::now() < deadline, "never failed: {image}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        image["status_reason"]
            .as_str()
            .expect("reason")
            .contains("upload broke"),
        "{image}"
    );
    let job = job_of_image(&s, id, |j| {
        j["state"] != "queued" && j["state"] != "running"
    });
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["error_code"], "upload_interrupted", "{job}");
    assert_eq!(job["error"], image["status_reason"], "{job}");
    assert!(job_folders(&s).is_empty(), "{:?}", job_folders(&s));
}

/// Starts an upload of `len` bytes in `format` into image `id` over a raw connection (the caller
/// sends the body, or part of it, and reads the answer; the server closes after answering).
fn upload_conn(s: &common::Server, id: &str, format: &str, len: usize) -> TcpStream {
    let mut conn = TcpStream::connect(("127.0.0.1", s.port)).expect("connect");
    let head = format!(
        "POST /v1/images/{id}/import?disk_format={format} HTTP/1.1\r\nHost: kagami\r\n\
         Authorization: Bearer {}\r\nContent-Type: application/octet-stream\r\n\
         Connection: close\r\nContent-Length: {len}\r\n\r\n",
        s.token
    );
    conn.write_all(head.as_bytes()).expect("head");
    conn
}

/// Sends `body[..sent]` on `conn` (an upload into image `id`), waits until the image's job,
/// still running, satisfies `converted`, then sends the rest; returns the answer, the job once
/// it ended, and the image.
fn upload_in_two(
    s: &common::Server,
    conn: &mut TcpStream,
    id: &str,
    body: &[u8],
    sent: usize,
    converted: fn(&Value) -> bool,
) -> (String, Value, Value) {
    conn.write_all(&body[..sent]).expect("body");
    let job = job_of_image(s, id, converted);
    assert_eq!(job["state"], "running", "{id}: {job}");
    conn.write_all(&body[sent..]).expect("body");
    let mut answer = String::new();
    std::io::Read::read_to_string(conn, &mut answer).expect("answer");
    let job = job_of_image(s, id, |j| j["state"] != "running" && j["state"] != "queued");
    let image = s.admin("GET", &format!("/v1/images/{id}"), &[]).json();
    (answer, job, image)
}

/// A job that has converted its whole disk (and waits for its upload's verdict).
fn converted_whole(job: &Value) -> bool {
    job["bytes_total"].as_u64().is_some_and(|t| t > 0) && job["bytes_done"] == job["bytes_total"]
}

/// The image's one job, once `until` holds for it.
fn job_of_image(s: &common::Server, image: &str, until: impl Fn(&Value) -> bool) -> Value {
    let find = || {
        let jobs = s.admin("GET", "/v1/jobs", &[]).json();
        let mine = jobs
            .as_array()
            .expect("jobs")
            .iter()
            .find(|j| j["image_id"] == image);
        mine.cloned().unwrap_or(Value::Null)
    };
    poll(30, find, |j| !j.is_null() && until(j))
}

#[test]
fn an_upload_converts_while_it_arrives_and_nothing_is_kept_if_its_end_is_refused() {
    let s = common::Server::start();
    let files = tempfile::tempdir().expect("tmp");
    let disk = common::noise(41, 32 << 20);
    qcow2_of(files.path(), "disk.qcow2", &disk);
    let qcow2 = std::fs::read(files.path().join("disk.qcow2")).expect("read");
    let raw = s.import(&files.path().join("disk.qcow2.raw"), "raw");
    // The same qcow2 with a VHD footer's cookie at the end of the file: two formats at once,
    // which only the file's last bytes show. (4 MiB of padding before it, so the job's reads,
    // some of which run past the qcow2's last byte, never need the footer.)
    let mut tail = vec![0u8; (4 << 20) + 512];
    tail[4 << 20..(4 << 20) + 8].copy_from_slice(b"conectix");
    for (name, tail) in [("whole", Vec::new()), ("ambiguous", tail)] {
        let img = s.cli_json(&["image", "create", "--name", name]);
        let id = img["id"].as_str().expect("id");
        let body = [qcow2.clone(), tail.clone()].concat();
        let mut conn = upload_conn(&s, id, "qcow2", body.len());
        let referenced = || {
            let stats = s.store_stats();
            stats["blocks"].as_u64().expect("n") - stats["unreferenced_blocks"].as_u64().expect("n")
        };
        let before = referenced();
        // Before the body ends, its job converts what arrived: three quarters of the file; or,
        // with the footer still to come, the whole disk — the job then waits for the verdict.
        let (sent, converted): (usize, fn(&Value) -> bool) = if tail.is_empty() {
            (body.len() * 3 / 4, |j| {
                j["bytes_done"].as_u64().unwrap_or(0) > 0
            })
        } else {
            (body.len() - 512, converted_whole)
        };
        let (answer, job, image) = upload_in_two(&s, &mut conn, id, &body, sent, converted);
        if tail.is_empty() {
            assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
            assert_eq!(job["state"], "succeeded", "{job}");
            assert_eq!(image["status"], "active", "{image}");
            assert_eq!(image["digest"], raw["digest"], "the disk, exactly");
        } else {
            // Refused by the whole file's inspection, after most of it was converted: the
            // answer, the job and the image all say why, and nothing is committed.
            assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
            assert!(answer.contains("format_ambiguous"), "{answer}");
            assert_eq!(job["state"], "failed", "{job}");
            assert_eq!(job["error_code"], "format_ambiguous", "{job}");
            assert_eq!(image["status"], "failed", "{image}");
            assert_eq!(referenced(), before, "no block of it is referenced");
            assert!(
                image["status_reason"]
                    .as_str()
                    .expect("reason")
                    .contains("several formats"),
                "{image}"
            );
        }
        assert!(job_folders(&s).is_empty(), "{name}: {:?}", job_folders(&s));
    }
}

#[test]
fn a_dynamic_vhd_converts_before_its_footer_arrives_and_the_footer_still_decides() {
    let s = common::Server::start();
    let files = tempfile::tempdir().expect("tmp");
    let disk = common::noise(43, 16 << 20);
    let raw_path = files.path().join("disk.raw");
    common::write_file(&raw_path, &disk);
    let vhd_path = files.path().join("disk.vhd");
    common::convert_raw(&raw_path, &vhd_path, "vpc", &["-o", "subformat=dynamic"]);
    let vhd = std::fs::read(&vhd_path).expect("read");
    let expected = s.cli_json(&["image", "inspect", vhd_path.to_str().expect("utf-8")]);
    // The VHD's virtual disk (qemu rounds it up to a CHS geometry: zeroes after the noise).
    let mut logical = disk.clone();
    let size = expected["info"]["virtual_size"].as_u64().expect("size");
    logical.resize(size as usize, 0);
    common::write_file(&raw_path, &logical);
    let raw = s.import(&raw_path, "raw");
    // The footer at the end says the disk is fixed: it disagrees with its copy at the start,
    // which the job converted by.
    let mut disagreeing = vhd.clone();
    let footer = disagreeing.len() - 512;
    disagreeing[footer + 60..footer + 64].copy_from_slice(&2u32.to_be_bytes());
    // Its checksum: the complement of the sum of its bytes but the checksum's own.
    disagreeing[footer + 64..footer + 68].fill(0);
    let sum = disagreeing[footer..]
        .iter()
        .fold(0u32, |s, b| s.wrapping_add(u32::from(*b)));
    disagreeing[footer + 64..footer + 68].copy_from_slice(&(!sum).to_be_bytes());
    for (name, body) in [("whole", vhd), ("disagreeing", disagreeing)] {
        let img = s.cli_json(&["image", "create", "--name", name]);
        let id = img["id"].as_str().expect("id");
        let mut conn = upload_conn(&s, id, "vhd", body.len());
        // All but the footer: the job converts the whole disk, then waits for the verdict.
        let sent = body.len() - 512;
        let (answer, job, image) = upload_in_two(&s, &mut conn, id, &body, sent, converted_whole);
        if name == "whole" {
            assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
            assert_eq!(job["state"], "succeeded", "{job}");
            assert_eq!(image["digest"], raw["digest"], "the disk, exactly");
        } else {
            assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
            assert!(answer.contains("disagrees on the disk type"), "{answer}");
            assert_eq!(job["state"], "failed", "{job}");
            assert_eq!(image["status"], "failed", "{image}");
        }
    }
}

/// Takes the server's one upload-conversion slot (`import.upload_conversions = 1`) with an
/// upload sent half way, whose conversion waits for the rest; then uploads an 8 GiB qcow2 (data
/// only at both ends), whose job is caught waiting for the slot — a conversion of mostly
/// unallocated clusters is over too fast to catch running. Returns the image id, the upload
/// job's id, the raw disk, its size, and the half upload's connection (its slot is held while
/// it is open; a restart fails its job, whose file never arrived whole).
fn upload_waiting_for_a_slot(
    s: &common::Server,
    files: &Path,
) -> (String, String, std::path::PathBuf, u64, TcpStream) {
    let conn = hold_the_slot(s, files);
    let size: u64 = 8 << 30;
    let raw = common::sparse_file(
        files,
        "big.raw",
        size,
        &[(0, 3 << 20), (size - (2 << 20), 2 << 20)],
        41,
    );
    let qcow2 = files.join("big.qcow2");
    common::convert_raw(&raw, &qcow2, "qcow2", &[]);
    let img = s.cli_json(&["image", "create", "--name", "big"]);
    let id = img["id"].as_str().expect("id").to_string();
    let r = s.admin(
        "POST",
        &format!("/v1/images/{id}/import?disk_format=qcow2"),
        &["--data-binary", &format!("@{}", qcow2.display())],
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let job_id = r.json()["id"].as_str().expect("job").to_string();
    let job = s.admin("GET", &format!("/v1/jobs/{job_id}"), &[]).json();
    assert_eq!(job["state"], "running", "{job}");
    assert_eq!(job["phase"], "waiting for a conversion slot", "{job}");
    assert_eq!(job["bytes_done"], 0, "{job}");
    (id, job_id, raw, size, conn)
}

/// Takes the server's one upload-conversion slot with a qcow2 upload sent half way, whose
/// conversion waits for the rest; the slot is held while the returned connection is open.
fn hold_the_slot(s: &common::Server, files: &Path) -> TcpStream {
    qcow2_of(files, "holder.qcow2", &common::noise(9, 16 << 20));
    let holder = std::fs::read(files.join("holder.qcow2")).expect("read");
    let img = s.cli_json(&["image", "create", "--name", "holder"]);
    let holder_id = img["id"].as_str().expect("id");
    let mut conn = upload_conn(s, holder_id, "qcow2", holder.len());
    conn.write_all(&holder[..holder.len() / 2]).expect("body");
    job_of_image(s, holder_id, |j| j["phase"] == "converting");
    conn
}

#[test]
fn a_refused_upload_waiting_for_a_slot_never_touches_its_image_again() {
    let s = common::Server::start_with(&[("KAGAMI__IMPORT__UPLOAD_CONVERSIONS", "1")]);
    let files = tempfile::tempdir().expect("tmp");
    let holder = hold_the_slot(&s, files.path());
    let img = s.cli_json(&["image", "create", "--name", "retried"]);
    let id = img["id"].as_str().expect("id");
    // A qcow2 with a VHD cookie at its end, refused while its job waits for the slot: the
    // answer, the job and the image fail at once (a restart never runs that job again).
    let disk = common::noise(51, 8 << 20);
    qcow2_of(files.path(), "disk.qcow2", &disk);
    let mut bad = std::fs::read(files.path().join("disk.qcow2")).expect("read");
    let mut footer = vec![0u8; 512];
    footer[..8].copy_from_slice(b"conectix");
    bad.extend_from_slice(&footer);
    common::write_file(&files.path().join("bad.qcow2"), &bad);
    let path = format!("/v1/images/{id}/import?disk_format=qcow2");
    let bad_file = format!("@{}", files.path().join("bad.qcow2").display());
    let r = s.admin("POST", &path, &["--data-binary", &bad_file]);
    assert_eq!((r.status, r.code()), (400, "format_ambiguous".to_string()));
    let refused = job_of_image(&s, id, |_| true);
    assert_eq!(refused["state"], "failed", "{refused}");
    assert_eq!(refused["error_code"], "format_ambiguous", "{refused}");
    // Its job ends without waiting for the slot: nothing holds its staged file open.
    let refused_id = refused["id"].as_str().expect("id").to_string();
    poll(
        10,
        || Value::from(s.open_files(&refused_id)),
        |open| open.as_array().is_some_and(Vec::is_empty),
    );
    // The retry, waiting behind the refused job for the slot.
    let good_file = format!("@{}", files.path().join("disk.qcow2").display());
    let r = s.admin("POST", &path, &["--data-binary", &good_file]);
    assert_eq!(r.status, 202, "{}", r.text());
    let retry = r.json()["id"].as_str().expect("job").to_string();
    // The holder goes; the refused job gets the slot first and must leave the image alone.
    drop(holder);
    let job = wait_job(&s, &retry, |j| {
        j["state"] == "succeeded" || j["state"] == "failed"
    });
    assert_eq!(job["state"], "succeeded", "{job}");
    let image = s.admin("GET", &format!("/v1/images/{id}"), &[]).json();
    assert_eq!(image["status"], "active", "{image}");
    let raw = s.import(&files.path().join("disk.qcow2.raw"), "raw");
    assert_eq!(image["digest"], raw["digest"]);
    let refused = wait_job(&s, refused["id"].as_str().expect("id"), |_| true);
    assert_eq!(refused["state"], "failed", "{refused}");
    assert_eq!(refused["error_code"], "format_ambiguous", "{refused}");
}

/// Waits for the marker that says the file staged for `job` (fsynced in the background, after
/// the 202) is on disk.
fn wait_durable(s: &common::Server, job: &str) {
    let marker = s.data_dir().join("jobs").join(job).join("durable");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !marker.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            marker.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_upload_job_interrupted_by_a_restart_converts_its_staged_file_again() {
    let mut s = common::Server::start_with(&[
        ("KAGAMI__IMPORT__DURABLE_AFTER_SECS", "1"),
        ("KAGAMI__IMPORT__UPLOAD_CONVERSIONS", "1"),
    ]);
    let files = tempfile::tempdir().expect("tmp");
    let (id, job_id, raw, size, _holder) = upload_waiting_for_a_slot(&s, files.path());
    // Waiting for longer than import.durable_after_secs: the file is made durable meanwhile.
    wait_durable(&s, &job_id);
    s.kill();
    // After the restart the half upload's job fails (its file never arrived whole) and the
    // worker runs the upload's job from its staged file.
    assert!(
        job_folders(&s).contains(&job_id),
        "the staged file survives: {:?}",
        job_folders(&s)
    );
    s.restart();
    // Saving until the job ends (which, the job now first in the queue, may be before we look);
    // never failed, never anything else.
    let status = s.admin("GET", &format!("/v1/images/{id}"), &[]).json()["status"].clone();
    assert!(status == "saving" || status == "active", "{status}");
    let job = wait_job(&s, &job_id, |j| {
        j["state"] == "succeeded" || j["state"] == "failed"
    });
    assert_eq!(job["state"], "succeeded", "{job}");
    // Started by its request, where it never got a slot, then run by the worker after the
    // restart: the staged file on disk is what it ran from.
    assert_eq!(job["attempts"], 2, "{job}");
    let image = s.admin("GET", &format!("/v1/images/{id}"), &[]).json();
    assert_eq!(image["status"], "active");
    assert_eq!(image["virtual_size"], size);
    // Both ends of the disk came through (a range each: the whole disk is 8 GiB).
    for (start, len) in [(0u64, 3u64 << 20), (size - (2 << 20), 2 << 20)] {
        let r = s.admin(
            "GET",
            &format!("/v1/images/{id}/file"),
            &["-H", &format!("Range: bytes={start}-{}", start + len - 1)],
        );
        assert_eq!(r.status, 206);
        let f = std::fs::File::open(&raw).expect("raw");
        let mut expected = vec![0u8; len as usize];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut expected, start).expect("read");
        assert!(r.body == expected, "bytes {start}+{len} differ");
    }
    assert!(job_folders(&s).is_empty(), "{:?}", job_folders(&s));
    s.gc_now();
    assert_eq!(s.store_stats()["unreferenced_blocks"], 0);
}

#[test]
fn an_upload_job_whose_file_never_reached_the_disk_fails_after_a_restart() {
    let mut s = common::Server::start_with(&[
        ("KAGAMI__IMPORT__DURABLE_AFTER_SECS", "1"),
        ("KAGAMI__IMPORT__UPLOAD_CONVERSIONS", "1"),
    ]);
    let files = tempfile::tempdir().expect("tmp");
    let (id, job_id, _, _, _holder) = upload_waiting_for_a_slot(&s, files.path());
    wait_durable(&s, &job_id);
    s.kill();
    // As if the power went before the background fsync ended: the file may be torn.
    let folder = s.data_dir().join("jobs").join(&job_id);
    std::fs::remove_file(folder.join("durable")).expect("remove the marker");
    s.restart();
    // Decided at start-up, before the API answers: the job and its image failed, no folder.
    let job = s.admin("GET", &format!("/v1/jobs/{job_id}"), &[]).json();
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["error_code"], "upload_not_durable", "{job}");
    assert_eq!(
        job["error"], "the upload was not yet on disk when the server stopped; upload again",
        "{job}"
    );
    let image = s.admin("GET", &format!("/v1/images/{id}"), &[]).json();
    assert_eq!(image["status"], "failed", "{image}");
    assert_eq!(
        image["status_reason"],
        "the upload was not yet on disk when the server stopped; upload again",
        "{image}"
    );
    assert!(job_folders(&s).is_empty(), "{:?}", job_folders(&s));
    // It stays that way: the worker never picks the job up again (its one attempt was its
    // request's), nothing turns active.
    std::thread::sleep(Duration::from_secs(2));
    let job = s.admin("GET", &format!("/v1/jobs/{job_id}"), &[]).json();
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["attempts"], 1, "{job}");
    let image = s.admin("GET", &format!("/v1/images/{id}"), &[]).json();
    assert_eq!(image["status"], "failed", "{image}");
    // The image takes a new upload.
    let small = files.path().join("small.raw");
    common::write_file(&small, &common::noise(7, 1 << 20));
    let r = s.admin(
        "POST",
        &format!("/v1/images/{id}/import?disk_format=raw"),
        &["--data-binary", &format!("@{}", small.display())],
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let job = wait_job(&s, r.json()["id"].as_str().expect("job"), |j| {
        j["state"] == "succeeded" || j["state"] == "failed"
    });
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(
        s.admin("GET", &format!("/v1/images/{id}"), &[]).json()["status"],
        "active"
    );
    s.gc_now();
    assert_eq!(s.store_stats()["unreferenced_blocks"], 0);
}
