//! TLS for outgoing requests (import sources, and the CLI talking to an https server): rustls with
//! the `ring` provider, never aws-lc. reqwest is built with `rustls-no-provider`, so
//! [`install_provider`] must run before any client is built — `main` does it first thing.
//!
//! Trust: the system's roots (through rustls-platform-verifier) plus, for import sources, an
//! operator's CA file (`import.ca_file`), for mirrors signed by a site CA.

use std::path::Path;

use anyhow::Context;

/// Makes ring the process's rustls provider. Idempotent: a second call changes nothing.
pub fn install_provider() {
    // Err means a provider is installed already, which is all we need.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The certificates of a PEM file (one or more `BEGIN CERTIFICATE` blocks).
pub fn load_ca_file(path: &Path) -> anyhow::Result<Vec<reqwest::Certificate>> {
    let pem = std::fs::read(path).with_context(|| {
        format!(
            "cannot read the CA file {} (import.ca_file)",
            path.display()
        )
    })?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).with_context(|| {
        format!(
            "the CA file {} (import.ca_file) is not PEM certificates",
            path.display()
        )
    })?;
    if certs.is_empty() {
        anyhow::bail!(
            "the CA file {} (import.ca_file) holds no certificate",
            path.display()
        );
    }
    Ok(certs)
}

/// A request error as people should read it: reqwest's own message hides the cause (a refused
/// certificate reads "error sending request"), so the causes are appended. The URL is left out
/// (`without_url`): callers name the source themselves, without its credentials.
pub fn describe(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    if is_certificate_error(&e) {
        text.push_str(
            " (the source's TLS certificate is not trusted: if a site CA signed it, set \
             import.ca_file to that CA's PEM file)",
        );
    }
    text
}

/// True when the TLS handshake refused the peer's certificate: retrying cannot help.
pub fn is_certificate_error(e: &reqwest::Error) -> bool {
    refuses_certificate(e)
}

fn refuses_certificate(e: &(dyn std::error::Error + 'static)) -> bool {
    if let Some(
        rustls::Error::InvalidCertificate(_)
        | rustls::Error::NoCertificatesPresented
        | rustls::Error::InvalidCertRevocationList(_),
    ) = e.downcast_ref::<rustls::Error>()
    {
        return true;
    }
    // io::Error's `source` skips the error it wraps (which may be another io::Error): look
    // inside it explicitly.
    if let Some(inner) = e
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
        && refuses_certificate(inner)
    {
        return true;
    }
    e.source().is_some_and(refuses_certificate)
}
