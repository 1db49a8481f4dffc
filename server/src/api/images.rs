//! `/v1/images`: create, list, show, update, delete, upload and download content, manifests.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kagami_images::format::{self, DiskFormat};
use kagami_images::manifest::Segment;
use kagami_images::model::{Image, ImageKind, ImagePage};
use kagami_images::{BlockId, Manifest};
use uuid::Uuid;

use std::time::Duration;

use super::{Admin, ApiBytes, ApiJson, ApiQuery, AppState, UrlCaller};
use crate::catalog::blocks;
use crate::catalog::images::{self as catalog_images, ImagePatch, ListQuery, NewImage, parse_id};
use crate::catalog::tenancy::Caller;
use crate::config::Config;
use crate::error::ApiError;
use crate::{ingest, stream};

/// Media type of a manifest bundle (see `kagami_images::manifest`).
pub const MANIFEST_TYPE: &str = "application/vnd.kagami.manifest.v1";
/// Media type of a body of block frames (see `kagami_images::wire`).
pub const FRAMES_TYPE: &str = "application/vnd.kagami.blocks.v1";
/// The header that carries an image's digest on downloads.
pub const DIGEST_HEADER: &str = "x-kagami-digest";

pub fn routes(config: &Config) -> Router<AppState> {
    Router::new()
        .route("/images", get(list).post(create))
        .route("/images/{id}", get(show).patch(update).delete(delete))
        .route("/images/{id}/history", get(history))
        .layer(DefaultBodyLimit::max(config.limits.max_json_bytes))
        .route(
            "/images/{id}/file",
            get(download).put(upload).layer(DefaultBodyLimit::disable()),
        )
        .route(
            "/images/{id}/import",
            post(import).layer(DefaultBodyLimit::disable()),
        )
        .route(
            "/images/{id}/manifest",
            get(manifest)
                .put(commit_manifest)
                .layer(DefaultBodyLimit::max(config.limits.max_block_batch_bytes)),
        )
        .route("/images/{id}/segments/{index}", get(segment))
        .route("/images/{id}/content", get(content))
}

async fn create(
    State(app): State<AppState>,
    caller: Caller,
    ApiJson(new): ApiJson<NewImage>,
) -> Result<(StatusCode, Json<Image>), ApiError> {
    let region = app.config.server.region.clone();
    let image = app
        .catalog
        .run(move |c| catalog_images::create(c, &caller, &region, new))
        .await?;
    Ok((StatusCode::CREATED, Json(image)))
}

async fn list(
    State(app): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<ImagePage>, ApiError> {
    Ok(Json(
        app.catalog
            .run(move |c| catalog_images::list(c, &caller, &q))
            .await?,
    ))
}

async fn show(
    State(app): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Image>, ApiError> {
    let id = parse_id(&id)?;
    Ok(Json(
        app.catalog
            .run(move |c| catalog_images::get(c, &caller, id))
            .await?,
    ))
}

/// The image and the captures before it (`previous` links), newest first.
async fn history(
    State(app): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Vec<Image>>, ApiError> {
    let id = parse_id(&id)?;
    Ok(Json(
        app.catalog
            .run(move |c| catalog_images::history(c, &caller, id))
            .await?,
    ))
}

async fn update(
    State(app): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(patch): ApiJson<ImagePatch>,
) -> Result<Json<Image>, ApiError> {
    let id = parse_id(&id)?;
    Ok(Json(
        app.catalog
            .run(move |c| catalog_images::update(c, &caller, id, patch))
            .await?,
    ))
}

async fn delete(
    State(app): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = parse_id(&id)?;
    app.catalog
        .run(move |c| catalog_images::delete(c, &caller, id))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `PUT /v1/images/{id}/file`: streams raw (or ISO) bytes into the image. The image turns active
/// only if every byte arrived and its manifest committed; otherwise it is `failed` with a reason.
async fn upload(
    State(app): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Body,
) -> Result<Json<Image>, ApiError> {
    let id = parse_id(&id)?;
    let limits = ingest::ReceiveLimits {
        max_bytes: app.config.limits.max_image_bytes,
        idle: Duration::from_secs(app.config.limits.upload_idle_secs),
    };
    let stream = body.into_data_stream();
    let image = run_to_end(async move {
        let image = begin_upload(&app, &caller, id).await?;
        // Raw bytes must be raw; an ISO image must be an ISO. Other formats come through import.
        let claimed = if image.kind == ImageKind::Iso {
            DiskFormat::Iso
        } else {
            DiskFormat::Raw
        };
        let received = ingest::receive(
            app.catalog.clone(),
            app.store.clone(),
            stream,
            limits,
            claimed,
        )
        .await;
        ingest::commit_or_fail(&app.catalog, caller, id, received.map(|(m, _)| m)).await
    })
    .await?;
    Ok(Json(image))
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportQuery {
    /// The format the uploaded file is claimed to be (for a file in the body).
    disk_format: Option<DiskFormat>,
}

/// A JSON body: import from a source URL, as a durable job.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportFromUrl {
    source_url: String,
    disk_format: DiskFormat,
}

/// `POST /v1/images/{id}/import`: either
/// - a file in the body (`?disk_format=F`): staged durably and inspected as F in this request
///   (refused with the inspector's reason otherwise), then read as its logical disk and
///   ingested by a durable job, answered `202`; members may do this for their images; or
/// - JSON `{"source_url": "https://…", "disk_format": "F"}` (admin only: the server fetches the
///   URL, so members must not point it at internal addresses): a durable job, answered `202`
///   with the job to poll at `/v1/jobs/{id}`.
async fn import(
    State(app): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<ImportQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/json"));
    if json {
        let bytes = axum::body::to_bytes(body, app.config.limits.max_json_bytes)
            .await
            .map_err(|_| {
                ApiError::TooLarge("the JSON body is larger than limits.max_json_bytes".into())
            })?;
        let req: ImportFromUrl = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::bad("invalid_body", e.to_string()))?;
        caller.require_admin()?;
        check_source(&req.source_url)?;
        let job = app
            .catalog
            .run(move |c| {
                crate::catalog::jobs::enqueue_import(
                    c,
                    &caller,
                    id,
                    &req.source_url,
                    req.disk_format.as_str(),
                )
            })
            .await?;
        app.job_queued.notify_one();
        return Ok((StatusCode::ACCEPTED, Json(job)).into_response());
    }
    let claimed = q.disk_format.ok_or_else(|| {
        ApiError::bad(
            "invalid_query",
            "say what the file is: ?disk_format=qcow2 (or send JSON with a source_url)",
        )
    })?;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let job = run_to_end(async move {
        crate::jobs::import::accept_upload(&app, caller, id, claimed, declared, body).await
    })
    .await?;
    Ok((StatusCode::ACCEPTED, Json(job)).into_response())
}

/// Source URLs: http or https, with a host; nothing else is fetched.
fn check_source(url: &str) -> Result<(), ApiError> {
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| ApiError::bad("invalid_source", format!("'{url}' is not a URL: {e}")))?;
    match parsed.scheme() {
        "http" | "https" if parsed.host_str().is_some() => Ok(()),
        "http" | "https" => Err(ApiError::bad(
            "invalid_source",
            "the source URL names no host",
        )),
        "s3" => Err(ApiError::bad(
            "invalid_source",
            "s3:// sources come later; use an https:// URL (a presigned one for a private bucket) or upload the file",
        )),
        other => Err(ApiError::bad(
            "invalid_source",
            format!(
                "{other}: source URLs are fetched over http:// or https:// only; upload the file instead"
            ),
        )),
    }
}

/// Runs an upload in its own task, so a client that hangs up at any point cannot leave its
/// image `saving` (or a staged file behind): the task always reaches its end.
async fn run_to_end<T, F>(work: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: Future<Output = Result<T, ApiError>> + Send + 'static,
{
    tokio::spawn(work)
        .await
        .map_err(|e| ApiError::Internal(format!("upload task failed: {e}")))?
}

async fn begin_upload(app: &AppState, caller: &Caller, id: Uuid) -> Result<Image, ApiError> {
    let who = caller.clone();
    app.catalog
        .run(move |c| catalog_images::begin_upload(c, &who, id))
        .await
}

/// `PUT /v1/images/{id}/manifest`: makes an image from blocks already uploaded with
/// `POST /v1/blocks` (capture, copies). Every block must be stored with the length its slot
/// needs, or nothing is committed. Admin only, like the block API: a member able to commit
/// arbitrary block ids could probe for other projects' content.
async fn commit_manifest(
    State(app): State<AppState>,
    Admin(caller): Admin,
    Path(id): Path<String>,
    ApiBytes(body): ApiBytes,
) -> Result<Json<Image>, ApiError> {
    let id = parse_id(&id)?;
    Ok(Json(commit_manifest_body(app, caller, id, body).await?))
}

/// Decodes a manifest bundle and commits it as image `id`'s content (see [`commit_manifest`];
/// agents capturing their host come here too).
pub(super) async fn commit_manifest_body(
    app: AppState,
    caller: Caller,
    id: Uuid,
    body: bytes::Bytes,
) -> Result<Image, ApiError> {
    let manifest =
        Manifest::decode_bundle(&body, app.config.limits.max_image_bytes).map_err(|e| {
            ApiError::bad(
                "invalid_manifest",
                format!("the manifest bundle is invalid: {e}"),
            )
        })?;
    if manifest.virtual_size() == 0 {
        return Err(ApiError::bad(
            "empty_image",
            "the manifest describes an empty disk; an image needs content",
        ));
    }
    run_to_end(async move {
        begin_upload(&app, &caller, id).await?;
        ingest::commit_or_fail(&app.catalog, caller, id, Ok(manifest)).await
    })
    .await
}

async fn load_manifest(
    app: &AppState,
    caller: Caller,
    id: Uuid,
) -> Result<(Image, Arc<Manifest>), ApiError> {
    app.catalog
        .run(move |c| {
            let (image, index) = catalog_images::manifest_index(c, &caller, id)?;
            Ok((image, Arc::new(blocks::load_manifest(c, &index)?)))
        })
        .await
}

fn digest_headers(image: &Image, content_type: &'static str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Some(digest) = &image.digest
        && let (Ok(d), Ok(etag)) = (
            HeaderValue::from_str(digest),
            HeaderValue::from_str(&format!("\"{digest}\"")),
        )
    {
        headers.insert(DIGEST_HEADER, d);
        headers.insert(header::ETAG, etag);
    }
    headers
}

/// `GET /v1/images/{id}/manifest`: the manifest bundle, self-verifying against the digest header.
async fn manifest(
    State(app): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    manifest_response(&app, caller, parse_id(&id)?).await
}

/// A manifest bundle for `caller` (shared with the agent API, which authorizes first).
pub(super) async fn manifest_response(
    app: &AppState,
    caller: Caller,
    id: Uuid,
) -> Result<Response, ApiError> {
    let (image, manifest) = load_manifest(app, caller, id).await?;
    Ok((
        digest_headers(&image, MANIFEST_TYPE),
        manifest.encode_bundle(),
    )
        .into_response())
}

/// `?blocks=` of a segment read: which of its 64 blocks to send, as 16 hex digits (bit `j` is
/// block `j`). An agent rewriting only what changed on a disk fetches just those blocks, through
/// the image it may read (the raw block API is admin-only).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SegmentQuery {
    blocks: Option<String>,
}

/// `GET /v1/images/{id}/segments/{index}[?blocks=MASK]`: the data blocks of one 4 MiB segment
/// (or those in `MASK`) as block frames, in disk order; holes are never sent.
async fn segment(
    State(app): State<AppState>,
    caller: Caller,
    Path((id, index)): Path<(String, String)>,
    ApiQuery(q): ApiQuery<SegmentQuery>,
) -> Result<Response, ApiError> {
    segment_response(&app, caller, parse_id(&id)?, &index, q).await
}

/// A segment read for `caller` (shared with the agent API, which authorizes first).
pub(super) async fn segment_response(
    app: &AppState,
    caller: Caller,
    id: Uuid,
    index: &str,
    q: SegmentQuery,
) -> Result<Response, ApiError> {
    let index: usize = index
        .parse()
        .map_err(|_| ApiError::bad("invalid_segment", "the segment index must be a number"))?;
    let mask = match q.blocks.as_deref() {
        None => u64::MAX,
        Some(hex) if hex.len() == 16 => u64::from_str_radix(hex, 16).map_err(|_| bad_mask())?,
        Some(_) => return Err(bad_mask()),
    };
    let (image, blocks) = app
        .catalog
        .run(move |c| segment_blocks(c, &caller, id, index, mask))
        .await?;
    let reader = app.reader.clone();
    let body = tokio::task::spawn_blocking(move || reader.read_frames(&blocks))
        .await
        .map_err(|e| ApiError::Internal(format!("segment read failed: {e}")))??;
    Ok((digest_headers(&image, FRAMES_TYPE), body).into_response())
}

fn bad_mask() -> ApiError {
    ApiError::bad(
        "invalid_query",
        "blocks= is a 64-bit mask of the segment's blocks as 16 hex digits (bit j = block j)",
    )
}

/// The data blocks of segment `index` of an image that are in `mask`, reading only that
/// segment's body.
fn segment_blocks(
    c: &rusqlite::Connection,
    caller: &Caller,
    id: Uuid,
    index: usize,
    mask: u64,
) -> Result<(Image, Vec<BlockId>), ApiError> {
    let (image, stored) = catalog_images::manifest_index(c, caller, id)?;
    let (_, ids) =
        Manifest::decode_index(&stored, u64::MAX).map_err(|e| ApiError::Internal(e.to_string()))?;
    let seg_id = *ids.get(index).ok_or_else(|| {
        ApiError::NotFound(format!(
            "image {id} has {} segments; segment {index} does not exist",
            ids.len()
        ))
    })?;
    if seg_id.is_hole() {
        return Ok((image, Vec::new()));
    }
    let body: Vec<u8> = c.query_row(
        "SELECT body FROM segments WHERE id = ?1",
        [&seg_id.0[..]],
        |r| r.get(0),
    )?;
    let segment = Segment::decode(seg_id, &body).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok((
        image,
        segment
            .blocks
            .into_iter()
            .enumerate()
            .filter(|(j, b)| mask & (1 << j) != 0 && !b.is_hole())
            .map(|(_, b)| b)
            .collect(),
    ))
}

/// `GET /v1/images/{id}/file`: the raw disk, streamed, with single-range support.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DownloadQuery {
    /// raw (default) or qcow2.
    format: Option<DiskFormat>,
}

async fn download(
    State(app): State<AppState>,
    caller: Caller,
    method: Method,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<DownloadQuery>,
    req_headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let (image, manifest) = load_manifest(&app, caller, id).await?;
    // An ISO's bytes are the ISO file; it is no disk to convert into another format.
    let as_is = |f: &DiskFormat| {
        *f == DiskFormat::Raw || (*f == DiskFormat::Iso && image.kind == ImageKind::Iso)
    };
    if let Some(format) = q.format.filter(|f| !as_is(f)) {
        crate::catalog::iso::refuse_as_disk(&image, &format!("exported as a {format} disk"))?;
        return export(&app, &image, manifest, format);
    }
    Ok(logical_bytes(&app, &image, manifest, &method, &req_headers))
}

/// `GET|HEAD /v1/images/{id}/content`: the image's logical bytes (any kind, ISO included) for
/// clients that read a disk in ranges: iPXE's `sanboot http://…` above all, which sends `HEAD`
/// for the size and then hundreds of small `Range` requests on one kept-alive connection.
///
/// iPXE cannot send an `Authorization` header, so this route (and only this one: it reads, and
/// reads one image) also takes the token as `?token=`. A token in a URL can end up in a proxy's
/// or a shell's history; Kagami logs no request URLs. The scripts of ISO boots (`catalog::iso`)
/// put a per-boot token in the URLs they hand iPXE, never an operator's: it reads that host's
/// ISO and nothing else. Each request is logged at debug level (target `kagami::api::images`).
async fn content(
    State(app): State<AppState>,
    who: UrlCaller,
    method: Method,
    Path(id): Path<String>,
    req_headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let range = req_headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("all");
    let caller = match who {
        UrlCaller::Token(caller) => {
            tracing::debug!(image = %id, %method, range, "content read");
            caller
        }
        UrlCaller::IsoBoot(boot) if boot.image == id => {
            tracing::debug!(image = %id, %method, range, host = %boot.host_id, "content read by an ISO boot");
            Caller::system()
        }
        UrlCaller::IsoBoot(_) => return Err(ApiError::image_not_found(id)),
    };
    let (image, manifest) = load_manifest(&app, caller, id).await?;
    Ok(logical_bytes(&app, &image, manifest, &method, &req_headers))
}

/// The logical disk as an HTTP body, shared by `/file` and `/content`: a single `Range` is
/// honoured (206, or 416 past the end) unless `If-Range` names another version; `HEAD` gets the
/// same headers and no body, and starts no read.
fn logical_bytes(
    app: &AppState,
    image: &Image,
    manifest: Arc<Manifest>,
    method: &Method,
    req_headers: &HeaderMap,
) -> Response {
    let size = manifest.virtual_size();
    let range = match req_headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        Some(text) if if_range_holds(req_headers, image) => match parse_range(text, size) {
            Ok(range) => range,
            Err(e) => return e.into_response(),
        },
        _ => None,
    };
    let (start, end) = range.unwrap_or((0, size));
    let mut headers = digest_headers(image, "application/octet-stream");
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
    let status = if range.is_some() {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{size}", end - 1)) {
            headers.insert(header::CONTENT_RANGE, v);
        }
        StatusCode::PARTIAL_CONTENT
    } else {
        StatusCode::OK
    };
    if method == Method::HEAD {
        return (status, headers).into_response();
    }
    let rx = app.reader.stream_range(manifest, start, end);
    (status, headers, Body::from_stream(stream::body(rx))).into_response()
}

/// Whether a `Range` may be served (RFC 9110 §13.1.5): with no `If-Range`, or one that names
/// this image's entity tag (strong: an image's bytes never change under its digest). A date
/// never matches, since no `Last-Modified` is sent; the client then gets the whole body.
fn if_range_holds(req_headers: &HeaderMap, image: &Image) -> bool {
    let Some(value) = req_headers.get(header::IF_RANGE) else {
        return true;
    };
    let (Ok(value), Some(digest)) = (value.to_str(), image.digest.as_deref()) else {
        return false;
    };
    value
        .trim()
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        == Some(digest)
}

/// Streams the image as an image file of another format (no Range: the file is generated).
fn export(
    app: &AppState,
    image: &Image,
    manifest: Arc<Manifest>,
    format: DiskFormat,
) -> Result<Response, ApiError> {
    let data: format::write::DataMap = manifest.blocks().map(|b| !b.id.is_hole()).collect();
    let export = format::write::export(format, manifest.virtual_size(), data)
        .map_err(|reason| ApiError::bad("unsupported_format", reason))?;
    let mut headers = digest_headers(image, "application/octet-stream");
    if let Some(len) = export.output_len() {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    let name: String = image
        .name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
        .take(100)
        .collect();
    if let Ok(v) = HeaderValue::from_str(&format!(
        "attachment; filename=\"{}.{format}\"",
        if name.is_empty() { "image" } else { &name }
    )) {
        headers.insert(header::CONTENT_DISPOSITION, v);
    }
    let rx = app.reader.stream_export(manifest, export);
    let stream = stream::body(rx);
    Ok((StatusCode::OK, headers, Body::from_stream(stream)).into_response())
}

/// Parses a `Range` header against a body of `size` bytes into `start..end` (end exclusive).
/// `None` means "serve the whole body": RFC 9110 lets a server ignore a malformed or multi-part
/// range. A well-formed range that starts past the end is 416.
pub fn parse_range(text: &str, size: u64) -> Result<Option<(u64, u64)>, ApiError> {
    let Some(spec) = text.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return Ok(None);
    };
    let (first, last) = (first.trim(), last.trim());
    let range = if first.is_empty() {
        // A suffix: the last N bytes.
        let Ok(n) = last.parse::<u64>() else {
            return Ok(None);
        };
        if n == 0 || size == 0 {
            return Err(ApiError::RangeNotSatisfiable { size });
        }
        (size.saturating_sub(n), size)
    } else {
        let Ok(start) = first.parse::<u64>() else {
            return Ok(None);
        };
        let end = if last.is_empty() {
            size
        } else {
            let Ok(l) = last.parse::<u64>() else {
                return Ok(None);
            };
            if l < start {
                return Ok(None);
            }
            l.saturating_add(1).min(size)
        };
        if start >= size {
            return Err(ApiError::RangeNotSatisfiable { size });
        }
        (start, end)
    };
    Ok(Some(range))
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-99", 1000).expect("ok"), Some((0, 100)));
        assert_eq!(
            parse_range("bytes=900-", 1000).expect("ok"),
            Some((900, 1000))
        );
        assert_eq!(
            parse_range("bytes=-10", 1000).expect("ok"),
            Some((990, 1000))
        );
        assert_eq!(
            parse_range("bytes=990-5000", 1000).expect("ok"),
            Some((990, 1000))
        );
        assert_eq!(parse_range("bytes=5-2", 1000).expect("ignored"), None);
        assert_eq!(parse_range("bytes=0-1,5-6", 1000).expect("ignored"), None);
        assert_eq!(parse_range("items=0-1", 1000).expect("ignored"), None);
        assert!(parse_range("bytes=1000-", 1000).is_err());
        assert!(parse_range("bytes=-0", 1000).is_err());
    }
}
