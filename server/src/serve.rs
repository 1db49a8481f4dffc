//! `kagami serve`: opens the data directory, recovers from the previous run, and serves the API.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::api::{self, AppState};
use crate::catalog::{Catalog, images, jobs, tenancy};
use crate::config::Config;
use crate::jobs::gc;
use crate::store::PackStore;
use crate::stream::Reader;
use crate::stream::sessions::Sessions;

pub async fn serve(config: Config) -> anyhow::Result<()> {
    let dir = config.server.data_dir.clone();
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create the data directory {}", dir.display()))?;
    // The catalog holds token hashes and every image's metadata: the owner only.
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .with_context(|| format!("cannot restrict {} to its owner", dir.display()))?;
    // A CA file that cannot be used stops start-up, rather than failing every https import.
    crate::jobs::import::source_client(&config.import)
        .context("cannot build the client for import sources")?;
    let catalog = Catalog::open(&dir.join("catalog.db"))
        .with_context(|| format!("cannot open the catalog in {}", dir.display()))?;

    let data_dir = dir.clone();
    if let Some(path) = catalog
        .run(move |c| tenancy::bootstrap(c, &data_dir))
        .await?
    {
        tracing::info!(
            "first start: an admin token was written to {} (mode 0600)",
            path.display()
        );
        eprintln!(
            "kagami: first start; the admin token is in {}",
            path.display()
        );
    }
    // Staged files belong to requests and jobs of the last run: none can be in use now.
    let staging = crate::ingest::staging_dir(&dir);
    if staging.is_dir() {
        std::fs::remove_dir_all(&staging)
            .with_context(|| format!("cannot clear {}", staging.display()))?;
    }
    // Jobs the last run was working on start over; their images stay `saving` for them.
    let requeued = catalog.run(|c| jobs::requeue_running(c)).await?;
    if requeued > 0 {
        tracing::info!(
            requeued,
            "jobs interrupted by the last stop were queued again"
        );
    }
    // Upload jobs whose staged file never reached the disk fail (it may be torn); their images too.
    let unsynced = crate::jobs::import::fail_unsynced(&catalog, &dir).await?;
    if unsynced > 0 {
        tracing::warn!(unsynced, "{}", crate::jobs::import::NOT_DURABLE);
    }
    // Folders of jobs that ended, or of uploads the stop cut short before their job existed.
    let unfinished = catalog.run(|c| jobs::unfinished(c)).await?;
    let orphans = crate::jobs::import::remove_orphans(&dir, &unfinished)
        .context("cannot clear the folders of ended jobs")?;
    if orphans > 0 {
        tracing::info!(orphans, "folders of ended jobs were removed");
    }
    // Uploads cut short by the last stop can never finish: they turn failed, never active.
    let interrupted = catalog.run(|c| images::fail_interrupted(c)).await?;
    if interrupted > 0 {
        tracing::warn!(
            interrupted,
            "uploads in flight when the server last stopped were marked failed"
        );
    }

    let store = Arc::new(
        PackStore::open(&dir.join("packs"), config.store.pack_bytes)
            .context("cannot open the block store")?,
    );
    for (pack, good, size) in store.torn_tails()? {
        tracing::warn!(
            pack = format!("{pack:016x}"),
            good,
            size,
            "the newest pack ends in a torn record (a crash during a write); its tail is ignored"
        );
    }
    let reader = Reader {
        catalog: catalog.clone(),
        store: store.clone(),
        verify: config.store.verify_reads,
    };
    let config = Arc::new(config);
    let state = AppState {
        config: config.clone(),
        catalog: catalog.clone(),
        store: store.clone(),
        reader,
        job_queued: Arc::default(),
        sessions: Sessions::default(),
        upload_slots: Arc::new(tokio::sync::Semaphore::new(config.import.upload_slots())),
    };

    tokio::spawn(crate::jobs::import::worker(state.clone()));
    if config.gc.interval_secs > 0 {
        tokio::spawn(gc_loop(catalog, store, config.clone()));
    }

    // TFTP before the API: a client that reaches the API finds TFTP up too.
    if let Some(tftp) = crate::boot::tftp::Server::from_config(&config).await? {
        tokio::spawn(tftp.run());
    }

    // NBD before the API too: an address the API reports is one that answers.
    if let Some(nbd) = crate::stream::nbd::Server::from_config(
        &config,
        state.reader.clone(),
        state.sessions.clone(),
    )
    .await?
    {
        tracing::info!(addr = %nbd.local_addr()?, "serving images over NBD (read-only)");
        tokio::spawn(nbd.run());
    }

    // iSCSI likewise.
    if let Some(iscsi) = crate::stream::iscsi::Server::from_config(
        &config,
        state.reader.clone(),
        state.sessions.clone(),
    )
    .await?
    {
        tracing::info!(addr = %iscsi.local_addr()?, "serving images over iSCSI (read-only)");
        tokio::spawn(iscsi.run());
    }

    // DHCP before the API too: "serving" means PXE clients are answered.
    if let Some(dhcp) =
        crate::boot::dhcp::Server::from_config(&config, state.catalog.clone()).await?
    {
        tokio::spawn(dhcp.run());
    }

    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (server.listen / --listen)",
                config.server.listen
            )
        })?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, data_dir = %dir.display(), region = %config.server.region, "kagami is serving");
    eprintln!("kagami: serving http://{addr} (data in {})", dir.display());
    // The SIGTERM handler is in place before systemd hears READY=1: a stop right after start
    // is a clean stop, not the default action (death by signal).
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot handle SIGTERM")?;
    crate::notify::ready(&format!("serving http://{addr}"));
    axum::serve(listener, api::router(state))
        .with_graceful_shutdown(shutdown(term))
        .await?;
    Ok(())
}

async fn gc_loop(catalog: Catalog, store: Arc<PackStore>, config: Arc<Config>) {
    let mut tick = tokio::time::interval(Duration::from_secs(config.gc.interval_secs));
    tick.tick().await;
    loop {
        tick.tick().await;
        let (c, s) = (catalog.clone(), store.clone());
        let grace = config.gc.grace_secs;
        let fraction = config.gc.rewrite_below_live_fraction;
        match tokio::task::spawn_blocking(move || gc::collect(&c, &s, grace, fraction)).await {
            Ok(Ok(report)) => tracing::info!(?report, "garbage collection done"),
            Ok(Err(e)) => tracing::error!("garbage collection failed: {e}"),
            Err(e) => tracing::error!("garbage collection panicked: {e}"),
        }
    }
}

async fn shutdown(mut term: tokio::signal::unix::Signal) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
    tracing::info!("shutting down");
    crate::notify::stopping();
}
