//! The HTTP client behind the CLI: base URL, bearer token, and API errors turned into messages.

use std::path::Path;

use anyhow::{Context, bail};
use reqwest::{Method, RequestBuilder, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Where the server is and who we are.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    /// `token` comes from `--token`/`KAGAMI_TOKEN`; failing that, a local operator's
    /// `./kagami-data/admin.token` (the default data directory) is used if readable.
    pub fn new(url: &str, token: Option<String>) -> anyhow::Result<Client> {
        let token = match token {
            Some(t) => t,
            None => std::fs::read_to_string(Path::new("kagami-data").join("admin.token"))
                .map(|t| t.trim().to_string())
                .map_err(|_| anyhow::anyhow!("no token: set KAGAMI_TOKEN or pass --token (the first admin token is in the server's data directory, admin.token)"))?,
        };
        let http = reqwest::Client::builder()
            .user_agent(concat!("kagami/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Client {
            http,
            base: url.trim_end_matches('/').to_string(),
            token,
        })
    }

    /// The server's base URL, as given.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The bearer token in use (export names carry it: see `kagami image export-nbd`).
    pub fn token(&self) -> &str {
        &self.token
    }

    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token)
    }

    /// Sends a request and fails with the API's code and message on any non-2xx answer.
    pub async fn send(&self, req: RequestBuilder) -> anyhow::Result<Response> {
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach the Kagami server at {}", self.base))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let parsed: Option<(String, String)> = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| {
                let e = v.get("error")?;
                Some((
                    e.get("code")?.as_str()?.to_string(),
                    e.get("message")?.as_str()?.to_string(),
                ))
            });
        match parsed {
            Some((code, message)) => bail!("{message} ({code}, HTTP {})", status.as_u16()),
            None => bail!(
                "the server answered HTTP {status}: {}",
                text.chars().take(500).collect::<String>()
            ),
        }
    }

    pub async fn json<T: DeserializeOwned>(&self, req: RequestBuilder) -> anyhow::Result<T> {
        Ok(self.send(req).await?.json().await?)
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.json(self.request(Method::GET, path)).await
    }

    pub async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        self.json(self.request(method, path).json(body)).await
    }
}
