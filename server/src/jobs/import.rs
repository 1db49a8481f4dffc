//! Import jobs: an image file inspected, opened as its logical disk and converted through
//! [`ingest::convert`]. The file is either downloaded from the job's source URL (http or https)
//! into the staging folder by the worker, which runs queued jobs one at a time, resuming with
//! `Range` after a broken connection; or uploaded with the request, whose job
//! ([`accept_upload`]) converts while the file arrives (see [`super::arriving`]).
//!
//! An uploaded file lives in `<data_dir>/jobs/<job id>/`, not in the staging folder start-up
//! clears, and goes when its job ends (start-up removes any folder whose job is not queued or
//! running). It is not fsynced on the request's path: once the file is whole and inspected, a
//! background task fsyncs it and its folders, then writes the folder's `durable` marker
//! (fsynced too). The job converts before that, from the page cache: its blocks are made
//! durable by the store, and the image turns `active` only when the conversion ends. A job interrupted by a restart is queued again and starts over — a download
//! from the first byte, an upload from its staged file if the marker says it reached the disk;
//! its image stays `saving` until the job ends. An upload job without the marker fails at
//! start-up ([`fail_unsynced`]): its file may be torn.

use std::collections::HashMap;
use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use kagami_images::format::{self, DiskFormat};
use kagami_images::model::ImageStatus;
use reqwest::StatusCode;
use tokio::io::{AsyncSeekExt, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, oneshot};
use uuid::Uuid;

use crate::api::AppState;
use crate::catalog::jobs::{self, Job};
use crate::catalog::tenancy::{Caller, Role};
use crate::catalog::{Catalog, images};
use crate::config::ImportConfig;
use crate::error::ApiError;
use crate::ingest;
use crate::jobs::arriving::{Arriving, ArrivingFile, Refusal, VerdictDue};

/// Attempts at fetching a source before the job fails.
const FETCH_ATTEMPTS: u32 = 4;

/// The file in a job's folder saying its staged upload (file and folders) reached the disk.
const DURABLE: &str = "durable";

/// Why an upload job without the [`DURABLE`] marker fails at start-up.
pub const NOT_DURABLE: &str =
    "the upload was not yet on disk when the server stopped; upload again";

/// The background tasks making staged uploads durable, by job, with the sender that tells one
/// its job ended; the job's end waits for its task (so the folder is not removed under a task
/// still writing the marker).
#[expect(clippy::type_complexity, reason = "one map, used in two places")]
static SYNCING: LazyLock<Mutex<HashMap<Uuid, (oneshot::Sender<()>, tokio::task::JoinHandle<()>)>>> =
    LazyLock::new(Mutex::default);

/// Runs forever: the queued jobs (imports from a source URL, and uploads a restart queued
/// again), one at a time (imports are disk- and CPU-bound already). A fresh upload's job is
/// run by its request instead ([`accept_upload`]), so a slow uploader never holds this queue.
pub async fn worker(app: AppState) {
    loop {
        match app.catalog.run(jobs::claim).await {
            Ok(Some(job)) => run_to_end(&app, job, None).await,
            Ok(None) => {
                let _ =
                    tokio::time::timeout(Duration::from_secs(1), app.job_queued.notified()).await;
            }
            Err(e) => {
                tracing::error!("cannot claim a job: {e}");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
}

/// Runs a claimed job (see [`run`] for `slot`), records its end, and removes its folder.
async fn run_to_end(app: &AppState, job: Job, slot: Option<OwnedSemaphorePermit>) {
    let id = job.id;
    tracing::info!(job = %id, image = %job.image_id, source = ?job.source_url, "import started");
    let error = run(app, job, slot).await.err();
    match &error {
        None => tracing::info!(job = %id, "import done"),
        Some(e) => tracing::warn!(job = %id, "import failed: {e}"),
    }
    if let Err(e) = app
        .catalog
        .run(move |c| jobs::finish(c, id, error.as_ref()))
        .await
    {
        tracing::error!(job = %id, "cannot record the job's end: {e}");
    }
    // An uploaded file goes with its job (start-up removes any left by a crash), once its
    // fsync, if still running, is over: nothing writes in the folder then.
    end_syncing(id).await;
    Arriving::forget(id);
    remove_job_dir(&job_dir(&app.config.server.data_dir, id), id).await;
}

/// Runs one job. `slot` (an upload conversion's) is let go once the conversion ends, before
/// the job waits for its upload's verdict.
async fn run(app: &AppState, job: Job, slot: Option<OwnedSemaphorePermit>) -> Result<(), ApiError> {
    // An upload the request refused (a broken body, a refused file) before its job got here:
    // the request normally failed the image and the job already, and the image may be another
    // upload's by now; see `refused`.
    let arriving = Arriving::of(job.id);
    if let Some(Err(why)) = arriving.as_ref().and_then(|a| a.verdict_now()) {
        return refused(app, &job, why).await;
    }
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
        let limits = app.config.limits.formats();
        match app.catalog.run(move |c| jobs::source(c, id)).await? {
            Some(url) => {
                let (staged, _) = fetch(app, &job, &url).await?;
                // Unlinked now; the open handle keeps the bytes until the conversion ends.
                let file = staged.reopen()?;
                drop(staged);
                let disk = open(file, claimed, limits, format::inspect).await?;
                convert(app, &job, &image, disk).await
            }
            // The upload is still arriving (or arrived while the job was queued): convert as
            // it comes, and keep the result only if the request's verdict on the whole file
            // accepts it — a refusal's reason is the one to report.
            None if let Some(arriving) = arriving.clone() => {
                let file = ArrivingFile(arriving.clone());
                let converted = match open(file, claimed, limits, format::inspect_claimed).await {
                    Ok(disk) => convert(app, &job, &image, disk).await,
                    Err(e) => Err(e),
                };
                drop(slot);
                let verdict = tokio::task::spawn_blocking(move || arriving.verdict())
                    .await
                    .map_err(|e| ApiError::Internal(format!("upload verdict lost: {e}")))?;
                verdict.map_err(ApiError::from)?;
                converted
            }
            // After a restart: the staged file, whole (and durable).
            None => {
                let path = upload_path(&app.config.server.data_dir, id);
                let file = std::fs::File::open(path).map_err(|e| {
                    ApiError::Internal(format!("the file staged for job {id} is gone: {e}"))
                })?;
                let disk = open(file, claimed, limits, format::inspect).await?;
                convert(app, &job, &image, disk).await
            }
        }
    }
    .await;
    // Refused while this job converted: as above.
    if let Some(Err(why)) = arriving.and_then(|a| a.verdict_now()) {
        return refused(app, &job, why).await;
    }
    // Every outcome goes through here, so the image never stays `saving` after its job ends.
    ingest::commit_or_fail(&app.catalog, caller, image_id, received)
        .await
        .map(|_| ())
}

/// Ends a job whose upload was refused: the image fails only if the job is still running —
/// that is, the request could not fail them together (it panicked, or its transaction failed);
/// otherwise both ended already and the image may be a retry's.
async fn refused(app: &AppState, job: &Job, why: Refusal) -> Result<(), ApiError> {
    let (image, id, reason) = (job.image_id, job.id, why.message.clone());
    app.catalog
        .run(move |c| images::fail_upload_of_job(c, image, id, &reason))
        .await?;
    Err(why.into())
}

/// How a file is inspected before it is read: [`format::inspect`], or — for an upload still
/// arriving — [`format::inspect_claimed`].
type Inspect = fn(
    &dyn format::ReadAt,
    DiskFormat,
    &format::Limits,
) -> Result<format::DiskInfo, format::FormatError>;

/// Inspects `file` as `claimed` with `inspect` (refused with the inspector's reason) and opens
/// it as its logical disk.
async fn open(
    file: impl format::ReadAt + Send + 'static,
    claimed: DiskFormat,
    limits: format::Limits,
    inspect: Inspect,
) -> Result<Box<dyn format::read::Logical>, ApiError> {
    tokio::task::spawn_blocking(move || {
        let info = inspect(&file, claimed, &limits)?;
        format::read::open(file, &info, &limits)
    })
    .await
    .map_err(|e| ApiError::Internal(format!("inspection failed: {e}")))?
    .map_err(|e| ApiError::bad(e.code(), format!("the image was refused: {e}")))
}

/// Converts `disk`, reporting how far it got into the job every half second.
async fn convert(
    app: &AppState,
    job: &Job,
    image: &kagami_images::model::Image,
    disk: Box<dyn format::read::Logical>,
) -> Result<kagami_images::Manifest, ApiError> {
    let progress = Arc::new(ingest::Progress::default());
    let report = |progress: &ingest::Progress| {
        let id = job.id;
        let done = progress.done.load(Ordering::Relaxed);
        let total = Some(progress.total.load(Ordering::Relaxed)).filter(|t| *t > 0);
        app.catalog
            .run(move |c| jobs::progress(c, id, "converting", done, total))
    };
    report(&progress).await?;
    let work = ingest::convert(
        &app.catalog,
        &app.store,
        &app.config.limits,
        image,
        disk,
        &progress,
    );
    tokio::pin!(work);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            manifest = &mut work => {
                if manifest.is_ok() {
                    report(&progress).await?;
                }
                return manifest;
            }
            _ = tick.tick() => report(&progress).await?,
        }
    }
}

/// Where the file uploaded for job `id` is staged (in the folder [`job_dir`]).
pub fn upload_path(data_dir: &Path, id: Uuid) -> PathBuf {
    job_dir(data_dir, id).join("upload")
}

/// The marker written in job `id`'s folder once its staged upload is durable.
pub fn durable_path(data_dir: &Path, id: Uuid) -> PathBuf {
    job_dir(data_dir, id).join(DURABLE)
}

/// The folder a job owns under the data directory; removed when the job ends.
pub fn job_dir(data_dir: &Path, id: Uuid) -> PathBuf {
    jobs_dir(data_dir).join(id.to_string())
}

fn jobs_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("jobs")
}

/// `POST /v1/images/{id}/import?disk_format=F` with a file: in one transaction the image turns
/// `saving` and a job starts, claimed by this request, which converts (up to one upload per
/// core at once; the others wait for a slot) while the body is staged in the job's folder (see
/// [`Arriving`]). When the body ends the whole file is inspected as `claimed`:
/// a refusal is answered `400` with the inspector's reason and fails the image and the job; an
/// accepted file is answered `202`, and a background task makes it durable (see
/// [`make_durable`]) so a restart can run the job again.
///
/// Any failure once the body is being received (a broken or stalled upload, a refused file)
/// turns the image and its job `failed` with the reason and leaves no file; the blocks a
/// conversion wrote before it are unreferenced, for GC.
pub async fn accept_upload(
    app: &AppState,
    caller: Caller,
    image_id: Uuid,
    claimed: DiskFormat,
    declared: Option<u64>,
    body: axum::body::Body,
) -> Result<Job, ApiError> {
    let who = caller.clone();
    let image = app
        .catalog
        .run(move |c| images::check_uploadable(c, &who, image_id))
        .await?;
    ingest::check_kind(&image, claimed)?;
    let id = Uuid::new_v4();
    let data_dir = &app.config.server.data_dir;
    let dir = job_dir(data_dir, id);
    let opened: Result<_, ApiError> = async {
        tokio::fs::create_dir_all(&dir).await?;
        let out = tokio::fs::File::create(upload_path(data_dir, id)).await?;
        let reader = std::fs::File::open(upload_path(data_dir, id))?;
        let arriving = Arriving::register(id, reader, declared);
        let job = app
            .catalog
            .run(move |c| jobs::start_upload(c, &caller, id, image_id, claimed.as_str()))
            .await?;
        Ok((out, job, arriving))
    }
    .await;
    let (mut out, job, arriving) = match opened {
        Ok(opened) => opened,
        Err(e) => {
            Arriving::forget(id);
            remove_job_dir(&dir, id).await;
            return Err(e);
        }
    };
    let _due = VerdictDue(arriving.clone());
    let task = {
        let (app, job, arriving_job) = (app.clone(), job.clone(), arriving.clone());
        async move {
            // Slow uploads each hold a slot while they trail their sender; the others wait here,
            // saying so, while their files are staged. One refused meanwhile ends at once (run
            // sees the refusal first), not when a slot frees: its file goes with it.
            let slot = match app.upload_slots.clone().try_acquire_owned() {
                Ok(slot) => Some(slot),
                Err(_) => {
                    let report = app.catalog.run(move |c| {
                        jobs::progress(c, id, "waiting for a conversion slot", 0, None)
                    });
                    if let Err(e) = report.await {
                        tracing::warn!(job = %id, "cannot report the job's wait: {e}");
                    }
                    // Never closed; were it, the job would run without a slot.
                    tokio::select! {
                        slot = app.upload_slots.clone().acquire_owned() => slot.ok(),
                        _ = arriving_job.refusal() => None,
                    }
                }
            };
            run_to_end(&app, job, slot).await;
        }
    };
    tokio::spawn(task);
    let accepted: Result<(), ApiError> = async {
        let idle = Duration::from_secs(app.config.limits.upload_idle_secs);
        let max = app.config.limits.max_image_bytes;
        let len = ingest::write_body(body, &mut out, idle, max, |n| arriving.wrote(n)).await?;
        // The job reads up to the declared length; the request inspects what arrived.
        if let Some(declared) = declared
            && declared != len
        {
            return Err(ApiError::bad(
                "upload_interrupted",
                format!("the upload carried {len} bytes, not the {declared} it declared"),
            ));
        }
        arriving.ended(len);
        let file = std::fs::File::open(upload_path(data_dir, id))?;
        let limits = app.config.limits.formats();
        tokio::task::spawn_blocking(move || format::inspect(&file, claimed, &limits))
            .await
            .map_err(|e| ApiError::Internal(format!("inspection failed: {e}")))?
            .map_err(|e| ApiError::bad(e.code(), format!("the image was refused: {e}")))?;
        Ok(())
    }
    .await;
    if let Err(e) = accepted {
        // The job's reads fail from now on and it touches nothing more; the image and the job
        // say why at once, in one transaction (so a restart never runs the job again), and the
        // file goes (the job's open handles keep what they read).
        let refusal = Refusal::from(&e);
        arriving.refuse(refusal.clone());
        let reason = e.to_string();
        let why = ApiError::from(refusal);
        app.catalog
            .run(move |c| {
                let tx = c.transaction()?;
                images::fail_upload_of_job(&tx, image_id, id, &reason)?;
                jobs::finish(&tx, id, Some(&why))?;
                tx.commit()?;
                Ok(())
            })
            .await?;
        remove_job_dir(&dir, id).await;
        return Err(e);
    }
    // Registered before the verdict lets the job commit, so a job that ends at once finds it.
    schedule_durable(app, id);
    arriving.accept();
    Ok(job)
}

/// Makes job `id`'s staged upload durable off the request's path, and only if the job has not
/// ended by then (registered in [`SYNCING`]; [`end_syncing`] ends it).
fn schedule_durable(app: &AppState, id: Uuid) {
    // Made durable off the request's path, and only if the job has not ended by then. A job
    // that ends within `import.durable_after_secs` (most do: it converts as the file arrives)
    // deletes a file that never needed the disk — writing it would double an import's disk
    // writes; a queued or long job's file is made durable after that, so a restart can run it
    // again. A crash inside the window fails the job with [`NOT_DURABLE`] ("upload again"), as
    // one before its fsync ended always did.
    let root = app.config.server.data_dir.clone();
    let wait = Duration::from_secs(app.config.import.durable_after_secs);
    let (ended, job_ended) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        tokio::select! {
            _ = job_ended => return,
            () = tokio::time::sleep(wait) => {}
        }
        let synced = tokio::task::spawn_blocking(move || make_durable(&root, id)).await;
        match synced.map_err(std::io::Error::other).and_then(|r| r) {
            Ok(()) => tracing::debug!(job = %id, "the staged upload is on disk"),
            // The job ended and took its folder first: nothing is left to make durable.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            // The job still runs; a restart before its end fails it.
            Err(e) => tracing::error!(job = %id, "cannot make the staged upload durable: {e}"),
        }
    });
    SYNCING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .insert(id, (ended, task));
}

/// Removes job `id`'s folder, if any (logged, not returned: the caller is already failing).
async fn remove_job_dir(dir: &Path, id: Uuid) {
    if let Err(e) = tokio::fs::remove_dir_all(dir).await
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::error!(job = %id, "cannot remove {}: {e}", dir.display());
    }
}

/// Tells job `id`'s durability task (if any) that the job ended and waits for it — an fsync
/// already running ends first — so nothing writes in the job's folder afterwards.
async fn end_syncing(id: Uuid) {
    let syncing = SYNCING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .remove(&id);
    if let Some((ended, task)) = syncing {
        let _ = ended.send(());
        let _ = task.await;
    }
}

/// Makes job `id`'s staged upload durable, then says so: fsyncs the file, its folder and the
/// folder's entry in `jobs/`, then creates the [`DURABLE`] marker and fsyncs it and the folder.
/// The marker is on disk only if everything before it is.
fn make_durable(data_dir: &Path, id: Uuid) -> std::io::Result<()> {
    let dir = job_dir(data_dir, id);
    std::fs::File::open(upload_path(data_dir, id))?.sync_all()?;
    std::fs::File::open(&dir)?.sync_all()?;
    std::fs::File::open(jobs_dir(data_dir))?.sync_all()?;
    std::fs::File::create(dir.join(DURABLE))?.sync_all()?;
    std::fs::File::open(&dir)?.sync_all()
}

/// At start-up, after the last run's running jobs are queued again and before any job runs or
/// upload arrives: an upload job whose folder lacks the [`DURABLE`] marker may have a torn or
/// missing file, so it fails with [`NOT_DURABLE`] and its `saving` image fails too (nothing
/// partial ever turns active). Its folder goes with the other ended jobs' ([`remove_orphans`]).
/// Returns how many failed.
pub async fn fail_unsynced(catalog: &Catalog, data_dir: &Path) -> Result<usize, ApiError> {
    let waiting = catalog.run(|c| jobs::unfinished_uploads(c)).await?;
    let lost: Vec<(Uuid, Uuid)> = waiting
        .into_iter()
        .filter(|(id, _)| !durable_path(data_dir, *id).exists())
        .collect();
    let count = lost.len();
    for (id, image) in lost {
        tracing::warn!(job = %id, %image, "{NOT_DURABLE}");
        catalog
            .run(move |c| {
                let tx = c.transaction()?;
                jobs::finish(
                    &tx,
                    id,
                    Some(&ApiError::conflict("upload_not_durable", NOT_DURABLE)),
                )?;
                images::fail_upload(&tx, image, NOT_DURABLE)?;
                tx.commit()?;
                Ok(())
            })
            .await?;
    }
    Ok(count)
}

/// At start-up, before any job runs or upload arrives: removes the folders of jobs that ended
/// (or never committed: an upload cut short by the stop). Returns how many went.
pub fn remove_orphans(data_dir: &Path, unfinished: &[Uuid]) -> std::io::Result<usize> {
    let dir = jobs_dir(data_dir);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry?;
        let keep = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<Uuid>().ok())
            .is_some_and(|id| unfinished.contains(&id));
        if !keep {
            let path = entry.path();
            if path.is_dir() {
                std::fs::remove_dir_all(&path)?;
            } else {
                std::fs::remove_file(&path)?;
            }
            removed += 1;
        }
    }
    Ok(removed)
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
