//! The agent's view of the Kagami server: an image's manifest and its segments' blocks, over
//! keep-alive HTTP, with every failure sorted into "retry" (the network or the server is away)
//! or "stop" (the server said no).

use std::time::{Duration, Instant};

use bytes::Bytes;
use kagami_images::Manifest;
use reqwest::StatusCode;

/// The header carrying an image's digest (the sha256 of its manifest).
const DIGEST_HEADER: &str = "x-kagami-digest";
/// Largest manifest bundle accepted: 32 bytes per 64 KiB block, so 64 MiB covers 128 GiB of
/// data blocks.
const MAX_MANIFEST: usize = 64 << 20;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Worth retrying: a connection refused or dropped, a timeout, a 5xx, 429, a short body.
    #[error("{0}")]
    Transient(String),
    /// Not worth retrying: the server refused (4xx) or sent something invalid.
    #[error("{0}")]
    Fatal(String),
}

#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
    /// Where images are read: `/images`, or `/agent/images` for a per-boot agent token.
    images: &'static str,
}

impl Client {
    pub fn new(server: &str, token: &str) -> anyhow::Result<Self> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .read_timeout(Duration::from_secs(60))
            .redirect(reqwest::redirect::Policy::none());
        if server.starts_with("http://") {
            // No TLS to set up: and a ramdisk has no system CA store to load (the platform
            // verifier fails without one).
            builder = builder.tls_certs_only(Vec::new());
        }
        let http = builder.build()?;
        Ok(Client {
            http,
            base: server.trim_end_matches('/').to_string(),
            token: token.to_string(),
            images: "/images",
        })
    }

    /// Reads images under `path` (see [`Client::images`]).
    pub fn images_at(mut self, path: &'static str) -> Self {
        self.images = path;
        self
    }

    /// A JSON GET under `/v1`.
    pub async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
    ) -> Result<T, FetchError> {
        let response = self.send(path).await?;
        response
            .json()
            .await
            .map_err(|e| FetchError::Transient(format!("GET {path}: {}", chain(&e))))
    }

    /// A request under `/v1` with a body; the answer's bytes.
    pub async fn send_body(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Bytes,
        content_type: &str,
    ) -> Result<Bytes, FetchError> {
        let url = format!("{}/v1{path}", self.base);
        let response = self
            .http
            .request(method.clone(), &url)
            .bearer_auth(&self.token)
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(body)
            .send()
            .await
            .map_err(|e| FetchError::Transient(format!("{method} {url}: {}", chain(&e))))?;
        check(response, method.as_str(), &url)
            .await?
            .bytes()
            .await
            .map_err(|e| FetchError::Transient(format!("{method} {url}: {}", chain(&e))))
    }

    /// A JSON POST under `/v1`; the answer is discarded.
    pub async fn post_json<B: serde::Serialize>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<(), FetchError> {
        let url = format!("{}/v1{path}", self.base);
        let response = self
            .http
            .post(&url)
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await
            .map_err(|e| FetchError::Transient(format!("POST {url}: {}", chain(&e))))?;
        check(response, "POST", &url).await.map(drop)
    }

    /// Sends a GET and checks its status; the body is left to the caller.
    async fn send(&self, path: &str) -> Result<reqwest::Response, FetchError> {
        let url = format!("{}/v1{path}", self.base);
        let response = self
            .http
            .get(&url)
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| FetchError::Transient(format!("GET {url}: {}", chain(&e))))?;
        check(response, "GET", &url).await
    }

    /// The image's manifest, checked against the digest the server states for the image.
    pub async fn manifest(&self, image: &str) -> Result<Manifest, FetchError> {
        let mut response = self
            .send(&format!("{}/{image}/manifest", self.images))
            .await?;
        let stated = response
            .headers()
            .get(DIGEST_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut body = Vec::new();
        while let Some(chunk) = next_chunk(&mut response).await? {
            if body.len() + chunk.len() > MAX_MANIFEST {
                return Err(FetchError::Fatal(format!(
                    "the manifest of image {image} is larger than {MAX_MANIFEST} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        let manifest = Manifest::decode_bundle(&body, u64::MAX).map_err(|e| {
            FetchError::Fatal(format!("the manifest of image {image} is invalid: {e}"))
        })?;
        let actual = format!("sha256:{}", manifest.digest());
        if stated.as_deref() != Some(actual.as_str()) {
            return Err(FetchError::Fatal(format!(
                "the manifest of image {image} hashes to {actual}, but the server states {}",
                stated.as_deref().unwrap_or("no digest")
            )));
        }
        Ok(manifest)
    }

    /// The answer for segment `index`'s data blocks whose bit is set in `mask`: block frames,
    /// to be read chunk by chunk with [`next_chunk`] (never held whole in memory).
    pub async fn segment(
        &self,
        image: &str,
        index: usize,
        mask: u64,
    ) -> Result<reqwest::Response, FetchError> {
        let path = if mask == u64::MAX {
            format!("{}/{image}/segments/{index}", self.images)
        } else {
            format!(
                "{}/{image}/segments/{index}?blocks={mask:016x}",
                self.images
            )
        };
        self.send(&path).await
    }
}

/// The response if its status is a success; otherwise the server's message, transient for a
/// 5xx or 429 and fatal for any other refusal — and for a block the server found corrupt in
/// its own store (`block_corrupt`), which asking again cannot mend.
async fn check(
    response: reqwest::Response,
    method: &str,
    url: &str,
) -> Result<reqwest::Response, FetchError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body = response.text().await.unwrap_or_default();
    let error = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .map(|v| v["error"].clone());
    let field = |key: &str| {
        error
            .as_ref()
            .and_then(|e| e[key].as_str().map(str::to_string))
    };
    let message = field("message").unwrap_or(body);
    let e = format!("{method} {url}: {status}: {message}");
    let corrupt = field("code").as_deref() == Some("block_corrupt");
    Err(
        if !corrupt && (status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS) {
            FetchError::Transient(e)
        } else {
            FetchError::Fatal(e)
        },
    )
}

/// The next piece of a body; a connection lost half way is transient.
pub async fn next_chunk(response: &mut reqwest::Response) -> Result<Option<Bytes>, FetchError> {
    let url = response.url().clone();
    response
        .chunk()
        .await
        .map_err(|e| FetchError::Transient(format!("reading {url}: {}", chain(&e))))
}

/// An error and its causes on one line ("error sending request: connection refused").
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Backoff between attempts at a request that fails transiently: 0.25 s doubling to 5 s, for
/// at most `patience` since the first failure.
#[derive(Debug)]
pub struct Backoff {
    patience: Duration,
    first_failure: Option<Instant>,
    delay: Duration,
}

impl Backoff {
    pub fn new(patience: Duration) -> Self {
        Backoff {
            patience,
            first_failure: None,
            delay: Duration::from_millis(250),
        }
    }

    /// After a failure: waits and returns `Ok` to try again, or the error to give up with —
    /// at once for a fatal one, after `patience` for a transient one.
    pub async fn wait(&mut self, what: &str, error: FetchError) -> Result<(), FetchError> {
        let e = match error {
            FetchError::Transient(e) => e,
            fatal => return Err(fatal),
        };
        let since = *self.first_failure.get_or_insert_with(Instant::now);
        if since.elapsed() >= self.patience {
            return Err(FetchError::Fatal(format!(
                "{what}: still failing after {}: {e}",
                humantime::format_duration(Duration::from_secs(since.elapsed().as_secs()))
            )));
        }
        tracing::warn!("{what}: {e}; retrying in {:?}", self.delay);
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).min(Duration::from_secs(5));
        Ok(())
    }
}

/// Calls `f` until it succeeds, waiting out transient failures with a [`Backoff`] of
/// `patience`; a fatal failure, or running out of patience, is returned.
pub async fn retrying<T, F, Fut>(what: &str, patience: Duration, mut f: F) -> Result<T, FetchError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, FetchError>>,
{
    let mut backoff = Backoff::new(patience);
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) => backoff.wait(what, e).await?,
        }
    }
}
