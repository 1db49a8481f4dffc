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
/// Largest segment answer: 64 blocks of 64 KiB plus their frame headers.
const MAX_SEGMENT: usize = 64 * (65536 + 36);

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
}

impl Client {
    pub fn new(server: &str, token: &str) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .read_timeout(Duration::from_secs(60))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Client {
            http,
            base: server.trim_end_matches('/').to_string(),
            token: token.to_string(),
        })
    }

    async fn get(
        &self,
        path: &str,
        limit: usize,
    ) -> Result<(reqwest::header::HeaderMap, Bytes), FetchError> {
        let url = format!("{}/v1{path}", self.base);
        let response = self
            .http
            .get(&url)
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| FetchError::Transient(format!("GET {url}: {}", chain(&e))))?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            let message = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                .unwrap_or(body);
            let e = format!("GET {url}: {status}: {message}");
            return Err(
                if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
                    FetchError::Transient(e)
                } else {
                    FetchError::Fatal(e)
                },
            );
        }
        if response.content_length().is_some_and(|n| n > limit as u64) {
            return Err(FetchError::Fatal(format!(
                "GET {url}: the answer is larger than {limit} bytes"
            )));
        }
        let headers = response.headers().clone();
        let body = response
            .bytes()
            .await
            .map_err(|e| FetchError::Transient(format!("GET {url}: {}", chain(&e))))?;
        if body.len() > limit {
            return Err(FetchError::Fatal(format!(
                "GET {url}: the answer is larger than {limit} bytes"
            )));
        }
        Ok((headers, body))
    }

    /// The image's manifest, checked against the digest the server states for the image.
    pub async fn manifest(&self, image: &str) -> Result<Manifest, FetchError> {
        let (headers, body) = self
            .get(&format!("/images/{image}/manifest"), MAX_MANIFEST)
            .await?;
        let manifest = Manifest::decode_bundle(&body, u64::MAX).map_err(|e| {
            FetchError::Fatal(format!("the manifest of image {image} is invalid: {e}"))
        })?;
        let stated = headers.get(DIGEST_HEADER).and_then(|v| v.to_str().ok());
        let actual = format!("sha256:{}", manifest.digest());
        if stated != Some(actual.as_str()) {
            return Err(FetchError::Fatal(format!(
                "the manifest of image {image} hashes to {actual}, but the server states {}",
                stated.unwrap_or("no digest")
            )));
        }
        Ok(manifest)
    }

    /// The frames of segment `index`'s data blocks whose bit is set in `mask`, unverified.
    pub async fn segment(&self, image: &str, index: usize, mask: u64) -> Result<Bytes, FetchError> {
        let path = if mask == u64::MAX {
            format!("/images/{image}/segments/{index}")
        } else {
            format!("/images/{image}/segments/{index}?blocks={mask:016x}")
        };
        Ok(self.get(&path, MAX_SEGMENT).await?.1)
    }
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

/// Retries `attempt` with exponential backoff (0.25 s doubling to 5 s) while it fails
/// transiently and `patience` has not run out since the last success of any request, which
/// `last_progress` tracks across concurrent fetches.
pub async fn with_retry<T, F, Fut>(
    what: &str,
    patience: Duration,
    retries: &std::sync::atomic::AtomicU64,
    mut attempt: F,
) -> Result<T, FetchError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, FetchError>>,
{
    let started = Instant::now();
    let mut delay = Duration::from_millis(250);
    loop {
        match attempt().await {
            Err(FetchError::Transient(e)) if started.elapsed() < patience => {
                retries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!("{what}: {e}; retrying in {delay:?}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(FetchError::Transient(e)) => {
                return Err(FetchError::Fatal(format!(
                    "{what}: still failing after {}: {e}",
                    humantime::format_duration(Duration::from_secs(started.elapsed().as_secs()))
                )));
            }
            other => return other,
        }
    }
}
