//! Black-box harness: starts the real `kagami serve` on a free loopback port with a temporary
//! data directory, and drives it with curl and the `kagami` CLI, as an operator would.

#![allow(
    dead_code,
    reason = "each test file uses a different part of the harness"
)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The `kagami` binary. Cargo names it to the server's own tests; other packages' tests (the
/// agent's) find it beside their test executable, in `target/<profile>/`, where the same
/// `cargo test --workspace` built it.
pub fn kagami() -> PathBuf {
    if let Some(path) = option_env!("CARGO_BIN_EXE_kagami") {
        return path.into();
    }
    let exe = std::env::current_exe().expect("test executable");
    let path = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps")
        .join("kagami");
    assert!(
        path.exists(),
        "{} is missing: build the server first (`cargo build --workspace`; scripts/test does)",
        path.display()
    );
    path
}

#[derive(Debug)]
pub struct Server {
    child: Option<Child>,
    env: Vec<(String, String)>,
    args: Vec<String>,
    /// Run inside this network namespace (`ip netns exec`), listening on all of its addresses
    /// (machines on its bridges reach the API); the CLI and curl run inside it too, and
    /// start-up is read from the log.
    netns: Option<String>,
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub url: String,
    /// The first admin token, read from the data directory.
    pub token: String,
    log: PathBuf,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

impl Server {
    pub fn start() -> Server {
        Server::start_with(&[])
    }

    /// Starts with extra environment, e.g. `KAGAMI__STORE__PACK_BYTES`.
    pub fn start_with(env: &[(&str, &str)]) -> Server {
        Server::start_with_args(env, &[])
    }

    /// Starts with extra environment and extra `kagami serve` flags (e.g. `--tftp-listen`).
    pub fn start_with_args(env: &[(&str, &str)], args: &[&str]) -> Server {
        Server::start_in(None, env, args)
    }

    /// Starts inside network namespace `netns` (or not), with extra environment and flags.
    pub fn start_in(netns: Option<&str>, env: &[(&str, &str)], args: &[&str]) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("serve.log");
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut server = Server {
            child: None,
            env,
            args: args.iter().map(|a| a.to_string()).collect(),
            netns: netns.map(str::to_string),
            dir,
            port: 0,
            url: String::new(),
            token: String::new(),
            log,
        };
        server.launch();
        server
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The files the server process holds open whose paths contain `needle` (deleted ones
    /// still count: their space is not freed while they are open).
    pub fn open_files(&self, needle: &str) -> Vec<String> {
        let Some(pid) = self.child.as_ref().map(Child::id) else {
            return Vec::new();
        };
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|fds| {
                fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
                    .map(|target| target.display().to_string())
                    .filter(|target| target.contains(needle))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn launch(&mut self) {
        self.port = free_port();
        self.url = format!("http://127.0.0.1:{}", self.port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let started = self.log_text().matches("kagami: serving").count();
        let host = if self.netns.is_some() {
            "0.0.0.0"
        } else {
            "127.0.0.1"
        };
        let child = self
            .command(kagami())
            .args([
                "serve",
                "--listen",
                &format!("{host}:{}", self.port),
                "--data-dir",
            ])
            .arg(self.data_dir())
            .args(&self.args)
            // No background GC: tests run it on demand and assert what it did.
            .env("KAGAMI__GC__INTERVAL_SECS", "0")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn kagami serve");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        let up = |s: &Server| match s.netns {
            Some(_) => s.log_text().matches("kagami: serving").count() > started,
            None => TcpStream::connect(("127.0.0.1", s.port)).is_ok(),
        };
        while !up(self) {
            assert!(
                Instant::now() < deadline,
                "kagami serve did not start:\n{}",
                self.log_text()
            );
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("kagami serve exited with {status}:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.token = std::fs::read_to_string(self.data_dir().join("admin.token"))
            .expect("admin.token")
            .trim()
            .to_string();
    }

    /// `program`, run in the server's namespace when it has one.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns]).arg(program);
                cmd
            }
            None => Command::new(program),
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: no chance to clean up, as after a power cut or an OOM kill.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    /// Runs the `kagami` CLI against this server with `token`.
    pub fn cli_as(&self, token: &str, args: &[&str]) -> Output {
        self.command(kagami())
            .args(args)
            .env("KAGAMI_URL", &self.url)
            .env("KAGAMI_TOKEN", token)
            .current_dir(self.dir.path())
            .output()
            .expect("run kagami")
    }

    /// Runs the CLI as admin and insists it succeeds; returns stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = self.cli_as(&self.token, args);
        assert!(
            out.status.success(),
            "kagami {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    }

    /// Runs the CLI as admin with `--output json` and parses its answer.
    pub fn cli_json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        serde_json::from_str(&self.cli(&all)).expect("json output")
    }

    /// Imports a file with the CLI; returns the image JSON.
    pub fn import(&self, file: &Path, name: &str) -> Value {
        self.cli_json(&[
            "image",
            "import",
            file.to_str().expect("path"),
            "--name",
            name,
        ])
    }

    pub fn curl(&self, token: Option<&str>, method: &str, path: &str, extra: &[&str]) -> Response {
        let body = tempfile::NamedTempFile::new().expect("tmp");
        self.curl_into(token, method, path, extra, body.path())
    }

    /// Like [`Server::curl`], with the body written to `out` (read back into the response).
    pub fn curl_into(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        extra: &[&str],
        out: &Path,
    ) -> Response {
        let mut cmd = self.command("curl");
        cmd.args(["-s", "-S", "-X", method, "-o"]).arg(out).args([
            "-D",
            "-",
            "-w",
            "\n%{http_code}",
        ]);
        if let Some(t) = token {
            cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
        }
        cmd.args(extra).arg(format!("{}{path}", self.url));
        let done = cmd.output().expect("run curl");
        assert!(
            done.status.success(),
            "curl failed: {}",
            String::from_utf8_lossy(&done.stderr)
        );
        let text = String::from_utf8_lossy(&done.stdout).to_string();
        let (headers, status) = text.rsplit_once('\n').expect("status line");
        let mut data = Vec::new();
        std::fs::File::open(out)
            .expect("body")
            .read_to_end(&mut data)
            .expect("read body");
        Response {
            status: status.trim().parse().expect("status"),
            headers: headers.to_lowercase(),
            body: data,
        }
    }

    /// curl as admin.
    pub fn admin(&self, method: &str, path: &str, extra: &[&str]) -> Response {
        self.curl(Some(&self.token.clone()), method, path, extra)
    }

    pub fn store_stats(&self) -> Value {
        self.admin("GET", "/v1/store", &[]).json()
    }

    pub fn gc_now(&self) -> Value {
        let r = self.admin(
            "POST",
            "/v1/store/gc",
            &[
                "-H",
                "content-type: application/json",
                "-d",
                r#"{"grace_secs":0}"#,
            ],
        );
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    }

    /// The open NBD and iSCSI sessions `token` may see (`GET /v1/exports`).
    pub fn sessions(&self, token: &str) -> Vec<Value> {
        let r = self.curl(Some(token), "GET", "/v1/exports", &[]);
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["sessions"]
            .as_array()
            .cloned()
            .unwrap_or_else(|| panic!("no sessions in {}", r.text()))
    }

    /// Waits up to 10 s for the sessions an admin sees to satisfy `done`; returns them.
    pub fn sessions_until(&self, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let sessions = self.sessions(&self.token);
            if done(&sessions) {
                return sessions;
            }
            assert!(Instant::now() < deadline, "{what}: {sessions:#?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Creates a project and a member token for it; returns the token.
    pub fn member_of(&self, project: &str) -> String {
        self.cli(&["project", "create", project]);
        let t = self.cli_json(&["token", "create", "--project", project, "--role", "member"]);
        t["secret"].as_str().expect("secret").to_string()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// Raw response headers, lower-cased.
    pub headers: String,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }

    /// The `code` of an API error body.
    pub fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("no error code in {}", self.text()))
            .to_string()
    }

    pub fn header(&self, name: &str) -> Option<String> {
        let prefix = format!("{}:", name.to_lowercase());
        self.headers
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix(&prefix).map(|v| v.trim().to_string()))
    }
}

pub const BLOCK: usize = 65536;

/// Deterministic pseudo-random bytes (xorshift), so images differ in content but tests repeat.
/// Runs `cmd` to its end; panics only if it cannot start.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs `cmd`, which must succeed; its standard output.
pub fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// A whole copy of the disk at `url` (nbd:// or iscsi://) into `dest` with qemu-img, which must
/// succeed.
pub fn qemu_img_copy(url: &str, dest: &Path) {
    ok(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", url])
        .arg(dest));
}

/// `kagami image <command> ID` fails, naming `flag`, on a server whose listener for it is off.
pub fn cli_says_when_off(command: &str, flag: &str) {
    let s = Server::start();
    let disk = sparse_file(s.dir.path(), "x.raw", 1 << 20, &[(0, 4096)], 1);
    let image = s.import(&disk, "x");
    let out = s.cli_as(
        &s.token.clone(),
        &["image", command, image["id"].as_str().expect("id")],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(flag), "{err}");
}

pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A sparse file of `size` bytes with `extents` of (offset, length) filled with noise.
pub fn sparse_file(
    dir: &Path,
    name: &str,
    size: u64,
    extents: &[(u64, usize)],
    seed: u64,
) -> PathBuf {
    use std::os::unix::fs::FileExt;
    let path = dir.join(name);
    let f = std::fs::File::create(&path).expect("create");
    f.set_len(size).expect("set_len");
    for (i, (offset, len)) in extents.iter().enumerate() {
        f.write_all_at(&noise(seed + i as u64, *len), *offset)
            .expect("write");
    }
    path
}

/// Counts the 64 KiB blocks of a file that are not all zero, and their bytes.
pub fn data_blocks(path: &Path) -> (u64, u64) {
    let mut f = std::fs::File::open(path).expect("open");
    let mut buf = vec![0u8; BLOCK];
    let (mut n, mut bytes) = (0, 0);
    loop {
        let mut filled = 0;
        while filled < BLOCK {
            let r = f.read(&mut buf[filled..]).expect("read");
            if r == 0 {
                break;
            }
            filled += r;
        }
        if filled == 0 {
            break;
        }
        if buf[..filled].iter().any(|&b| b != 0) {
            n += 1;
            bytes += filled as u64;
        }
        if filled < BLOCK {
            break;
        }
    }
    (n, bytes)
}

/// True when two files hold the same bytes (compared in streaming fashion).
pub fn same_bytes(a: &Path, b: &Path) -> bool {
    let status = Command::new("cmp")
        .arg("-s")
        .arg(a)
        .arg(b)
        .status()
        .expect("cmp");
    status.success()
}

pub fn write_file(path: &Path, data: &[u8]) {
    std::fs::File::create(path)
        .expect("create")
        .write_all(data)
        .expect("write");
}

/// Runs qemu-img (qemu-utils is on every machine of this project) and insists it works.
pub fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img convert -q -f raw -O <format> [opts] <raw> <out>`.
pub fn convert_raw(raw: &Path, out: &Path, format: &str, opts: &[&str]) {
    let mut args = vec!["convert", "-q", "-f", "raw", "-O", format];
    args.extend_from_slice(opts);
    args.extend([
        raw.to_str().expect("utf-8 path"),
        out.to_str().expect("utf-8 path"),
    ]);
    qemu_img(&args);
}

/// A 1 MiB qcow2 at `path` whose backing file is `backing`: a hostile image (a reader that
/// follows it reads `backing`).
pub fn backed_qcow2(path: &str, backing: &str) {
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", backing, "-F", "raw", path, "1M",
    ]);
}
