//! The import worker: claims queued import jobs, downloads the source (http or https) into the
//! staging folder (resuming with `Range` after a broken connection), and converts it through
//! [`ingest::convert_file`] — the same path an uploaded file takes. A job interrupted by a restart
//! is queued again and starts over; its image stays `saving` until the job ends.

use std::io::SeekFrom;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use kagami_images::format::DiskFormat;
use kagami_images::model::ImageStatus;
use reqwest::StatusCode;
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

use crate::api::AppState;
use crate::catalog::images;
use crate::catalog::jobs::{self, Job};
use crate::catalog::tenancy::{Caller, Role};
use crate::config::ImportConfig;
use crate::error::ApiError;
use crate::ingest;

/// Attempts at fetching a source before the job fails.
const FETCH_ATTEMPTS: u32 = 4;

/// Runs forever: one job at a time (imports are disk- and CPU-bound already).
pub async fn worker(app: AppState) {
    loop {
        match app.catalog.run(jobs::claim).await {
            Ok(Some(job)) => {
                let id = job.id;
                tracing::info!(job = %id, image = %job.image_id, source = ?job.source_url, "import started");
                let outcome = run(&app, job).await;
                let error = outcome.as_ref().err().map(ToString::to_string);
                match &error {
                    None => tracing::info!(job = %id, "import done"),
                    Some(e) => tracing::warn!(job = %id, "import failed: {e}"),
                }
                if let Err(e) = app
                    .catalog
                    .run(move |c| jobs::finish(c, id, error.as_deref()))
                    .await
                {
                    tracing::error!(job = %id, "cannot record the job's end: {e}");
                }
            }
            Ok(None) => tokio::time::sleep(Duration::from_millis(300)).await,
            Err(e) => {
                tracing::error!("cannot claim a job: {e}");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
}

async fn run(app: &AppState, job: Job) -> Result<(), ApiError> {
    // The job acts for the project that asked for it.
    let caller = Caller {
        project: job.owner.clone(),
        role: Role::Member,
    };
    let image_id = job.image_id;
    let who = caller.clone();
    let image = app
        .catalog
        .run(move |c| images::get(c, &who, image_id))
        .await;
    // A crash between the image's commit and the job's end: the work is done.
    if let Ok(image) = &image
        && image.status == ImageStatus::Active
    {
        return Ok(());
    }
    let received = async {
        let image = image?;
        let claimed: DiskFormat = job
            .disk_format
            .parse()
            .map_err(|e: String| ApiError::bad("invalid_format", e))?;
        ingest::check_kind(&image, claimed)?;
        let id = job.id;
        let url = app.catalog.run(move |c| jobs::source(c, id)).await?;
        let (staged, fetched) = fetch(app, &job, &url).await?;
        let id = job.id;
        app.catalog
            .run(move |c| jobs::progress(c, id, "converting", fetched, Some(fetched)))
            .await?;
        let file = staged.reopen()?;
        ingest::convert_file(
            &app.catalog,
            &app.store,
            &app.config.limits,
            &image,
            claimed,
            file,
        )
        .await
    }
    .await;
    // Every outcome goes through here, so the image never stays `saving` after its job ends.
    ingest::commit_or_fail(&app.catalog, caller, image_id, received)
        .await
        .map(|_| ())
}

/// The client that fetches sources: http or https (the system's roots plus `import.ca_file`),
/// and no redirects — one could lead anywhere the source check never saw. `serve` builds one at
/// start-up, so a bad CA file stops the server instead of failing every job.
pub fn source_client(config: &ImportConfig) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(15))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("kagami/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = config.ca_file() {
        builder = builder.tls_certs_merge(crate::tls::load_ca_file(path)?);
    }
    Ok(builder.build()?)
}

/// Downloads `url` into a staged file, reporting progress and resuming after failures; returns
/// the file and its length.
async fn fetch(
    app: &AppState,
    job: &Job,
    source: &str,
) -> Result<(tempfile::NamedTempFile, u64), ApiError> {
    // Messages (stored in the job, shown to people) name the URL without its credentials.
    let url = &jobs::redact(source);
    let (staged, mut out) = ingest::staged_file(&app.config.server.data_dir).await?;
    let client = source_client(&app.config.import)
        .map_err(|e| ApiError::Internal(format!("http client: {e:#}")))?;
    let idle = Duration::from_secs(app.config.limits.upload_idle_secs);
    let max = app.config.limits.max_image_bytes;
    let mut done = 0u64;
    let mut total: Option<u64> = None;
    // What identifies the source's version, so a resumed range comes from the same file.
    let mut validator: Option<String> = None;
    let mut last_error = String::new();
    for attempt in 0..FETCH_ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_secs(1 << attempt)).await;
        }
        let mut req = client.get(source);
        if done > 0 {
            req = req.header(reqwest::header::RANGE, format!("bytes={done}-"));
            if let Some(v) = &validator {
                req = req.header(reqwest::header::IF_RANGE, v);
            }
        }
        let resp = match req.send().await {
            Ok(r) => r,
            // A refused certificate stays refused: fail now, not after every retry.
            Err(e) if crate::tls::is_certificate_error(&e) => {
                return Err(ApiError::bad(
                    "source_untrusted",
                    format!("cannot fetch {url}: {}", crate::tls::describe(e)),
                ));
            }
            Err(e) => {
                last_error = format!("cannot fetch {url}: {}", crate::tls::describe(e));
                continue;
            }
        };
        let resumed_at = resp
            .headers()
            .get(reqwest::header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("bytes "))
            .and_then(|v| v.split('-').next())
            .and_then(|v| v.parse::<u64>().ok());
        match resp.status() {
            // The source sent the whole file (it ignored the range, or the file changed and
            // If-Range said so): start over.
            StatusCode::OK if done > 0 => {
                done = 0;
                total = None;
                out.set_len(0).await?;
            }
            StatusCode::PARTIAL_CONTENT if resumed_at != Some(done) => {
                last_error = format!("{url} resumed at the wrong offset; starting over");
                done = 0;
                total = None;
                validator = None;
                out.set_len(0).await?;
                continue;
            }
            StatusCode::OK | StatusCode::PARTIAL_CONTENT => {}
            s if s.is_server_error() => {
                last_error = format!("{url} answered {s}");
                continue;
            }
            s => {
                return Err(ApiError::bad(
                    "source_unavailable",
                    format!("{url} answered {s}; nothing was imported"),
                ));
            }
        }
        if done == 0 {
            let h = resp.headers();
            validator = h
                .get(reqwest::header::ETAG)
                .or_else(|| h.get(reqwest::header::LAST_MODIFIED))
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
        }
        total = total.or(resp.content_length().map(|len| len + done));
        out.seek(SeekFrom::Start(done)).await?;
        let mut body = resp.bytes_stream();
        let mut reported = Instant::now();
        let broke = loop {
            let chunk = match tokio::time::timeout(idle, body.next()).await {
                Err(_) => break Some(format!("no data from {url} for {} s", idle.as_secs())),
                Ok(None) => break None,
                Ok(Some(Err(e))) => {
                    break Some(format!(
                        "the download of {url} broke after {done} bytes: {e}"
                    ));
                }
                Ok(Some(Ok(c))) => c,
            };
            done += chunk.len() as u64;
            if done > max {
                return Err(ApiError::TooLarge(format!(
                    "{url} is larger than limits.max_image_bytes ({max} bytes)"
                )));
            }
            out.write_all(&chunk).await?;
            if reported.elapsed() > Duration::from_millis(500) {
                reported = Instant::now();
                let id = job.id;
                app.catalog
                    .run(move |c| jobs::progress(c, id, "downloading", done, total))
                    .await?;
            }
        };
        match broke {
            // Complete — even if the connection broke after the last byte.
            _ if total == Some(done) || (broke.is_none() && total.is_none()) => {
                out.flush().await?;
                let id = job.id;
                app.catalog
                    .run(move |c| jobs::progress(c, id, "downloading", done, total))
                    .await?;
                return Ok((staged, done));
            }
            None => {
                last_error = format!("{url} ended after {done} of {} bytes", total.unwrap_or(0))
            }
            Some(e) => last_error = e,
        }
    }
    Err(ApiError::bad(
        "source_unavailable",
        format!("{last_error} (after {FETCH_ATTEMPTS} attempts)"),
    ))
}
