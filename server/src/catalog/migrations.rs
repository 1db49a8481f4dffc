//! Schema migrations, applied in order at start-up; `PRAGMA user_version` records how many ran.
//! A migration is never edited once released: add a new one.

use rusqlite::Connection;

const MIGRATIONS: &[&str] = &[
    // 1: tenancy, images, manifests, the block index.
    r#"
    CREATE TABLE projects (
        name        TEXT PRIMARY KEY,
        created_at  INTEGER NOT NULL
    );
    CREATE TABLE tokens (
        id          TEXT PRIMARY KEY,
        -- sha256 of the secret; the secret itself is shown once and never stored.
        secret_hash BLOB NOT NULL UNIQUE,
        project     TEXT NOT NULL REFERENCES projects(name),
        role        TEXT NOT NULL CHECK (role IN ('admin', 'member')),
        description TEXT NOT NULL DEFAULT '',
        created_at  INTEGER NOT NULL
    );
    CREATE TABLE images (
        id                TEXT PRIMARY KEY,
        name              TEXT NOT NULL,
        description       TEXT NOT NULL DEFAULT '',
        owner             TEXT NOT NULL REFERENCES projects(name),
        kind              TEXT NOT NULL,
        visibility        TEXT NOT NULL,
        status            TEXT NOT NULL,
        status_reason     TEXT,
        region            TEXT NOT NULL,
        virtual_size      INTEGER,
        data_size         INTEGER,
        data_blocks       INTEGER,
        digest            TEXT,
        -- The manifest index (header + segment ids); segment bodies live in `segments`.
        manifest          BLOB,
        min_ram_mb        INTEGER NOT NULL DEFAULT 0,
        min_disk_gb       INTEGER NOT NULL DEFAULT 0,
        boot_mode         TEXT,
        architecture      TEXT,
        os_type           TEXT,
        os_distro         TEXT,
        os_version        TEXT,
        tags              TEXT NOT NULL DEFAULT '[]',
        properties        TEXT NOT NULL DEFAULT '{}',
        protected         INTEGER NOT NULL DEFAULT 0,
        -- When the upload in flight began; GC keeps every block touched since then.
        upload_started_at INTEGER,
        created_at        INTEGER NOT NULL,
        updated_at        INTEGER NOT NULL
    );
    CREATE INDEX images_by_owner ON images(owner);
    CREATE INDEX images_by_created ON images(created_at, id);
    CREATE INDEX images_by_name ON images(name, id);
    -- A segment's refcount counts its occurrences in committed manifests.
    -- last_len: bytes in the segment's last slot (65536, or the short tail of a disk whose size
    -- is not a multiple of 64 KiB); checked against the slot on every reuse.
    CREATE TABLE segments (
        id        BLOB PRIMARY KEY,
        body      BLOB NOT NULL,
        refcount  INTEGER NOT NULL CHECK (refcount >= 0),
        last_len  INTEGER NOT NULL
    ) WITHOUT ROWID;
    -- A block's refcount counts its occurrences in stored segments. A block at refcount 0 is
    -- written but unused (an upload in flight, or released); GC drops it after the grace period.
    CREATE TABLE blocks (
        id         BLOB PRIMARY KEY,
        pack       INTEGER NOT NULL,
        offset     INTEGER NOT NULL,
        len        INTEGER NOT NULL,
        refcount   INTEGER NOT NULL DEFAULT 0 CHECK (refcount >= 0),
        touched_at INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX blocks_by_pack ON blocks(pack);
    CREATE INDEX blocks_unreferenced ON blocks(touched_at) WHERE refcount = 0;
    "#,
    // 2: durable jobs (imports from a source URL today).
    r#"
    CREATE TABLE jobs (
        id          TEXT PRIMARY KEY,
        kind        TEXT NOT NULL,
        image_id    TEXT NOT NULL,
        owner       TEXT NOT NULL REFERENCES projects(name),
        source_url  TEXT,
        disk_format TEXT NOT NULL,
        state       TEXT NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed')),
        phase       TEXT,
        bytes_done  INTEGER NOT NULL DEFAULT 0,
        bytes_total INTEGER,
        error       TEXT,
        attempts    INTEGER NOT NULL DEFAULT 0,
        created_at  INTEGER NOT NULL,
        updated_at  INTEGER NOT NULL
    );
    CREATE INDEX jobs_by_state ON jobs(state, created_at);
    CREATE INDEX jobs_by_image ON jobs(image_id);
    "#,
    // 3: a failed job's error code (the API error's stable code), beside its message.
    r#"
    ALTER TABLE jobs ADD COLUMN error_code TEXT;
    "#,
    // 4: hosts (known by MAC), their state history, deployments, per-boot agent tokens.
    r#"
    CREATE TABLE hosts (
        id               TEXT PRIMARY KEY,
        mac              TEXT NOT NULL UNIQUE,
        name             TEXT UNIQUE,
        state            TEXT NOT NULL,
        state_reason     TEXT NOT NULL DEFAULT '',
        inventory        TEXT,
        created_at       INTEGER NOT NULL,
        updated_at       INTEGER NOT NULL,
        state_changed_at INTEGER NOT NULL
    );
    CREATE TABLE host_events (
        host_id TEXT NOT NULL REFERENCES hosts(id) ON DELETE CASCADE,
        at      INTEGER NOT NULL,
        state   TEXT NOT NULL,
        reason  TEXT NOT NULL
    );
    CREATE INDEX host_events_by_host ON host_events(host_id, at);
    CREATE TABLE deployments (
        id          TEXT PRIMARY KEY,
        host_id     TEXT NOT NULL REFERENCES hosts(id) ON DELETE CASCADE,
        state       TEXT NOT NULL CHECK (state IN ('pending', 'running', 'succeeded', 'failed')),
        mode        TEXT NOT NULL,
        -- JSON: [{device, image_id, phase, bytes_done, bytes_total}], progress included.
        disks       TEXT NOT NULL,
        -- JSON: {phase: seconds} as the agent reports them.
        timings     TEXT NOT NULL DEFAULT '{}',
        error       TEXT,
        created_by  TEXT NOT NULL,
        created_at  INTEGER NOT NULL,
        updated_at  INTEGER NOT NULL,
        finished_at INTEGER
    );
    CREATE INDEX deployments_by_host ON deployments(host_id, created_at);
    CREATE TABLE agent_tokens (
        -- sha256 of the secret handed to one boot of the host; never the secret itself.
        secret_hash BLOB PRIMARY KEY,
        host_id     TEXT NOT NULL REFERENCES hosts(id) ON DELETE CASCADE,
        created_at  INTEGER NOT NULL
    );
    "#,
    // 5: leases of the full-mode DHCP server (boot/dhcp): one row per address handed out, one
    // address per MAC. ip is the IPv4 address as an integer; mac is NULL while declined.
    r#"
    CREATE TABLE dhcp_leases (
        ip         INTEGER PRIMARY KEY,
        mac        TEXT UNIQUE,
        expires_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    );
    "#,
    // 6: whole-machine images (a `whole` image groups disk images: parent_id, disk_index) and
    // the lineage of captures (source host and disk, the previous capture of them).
    r#"
    ALTER TABLE images ADD COLUMN parent_id TEXT REFERENCES images(id);
    ALTER TABLE images ADD COLUMN disk_index INTEGER;
    ALTER TABLE images ADD COLUMN source_host TEXT;
    ALTER TABLE images ADD COLUMN source_disk TEXT;
    ALTER TABLE images ADD COLUMN previous_id TEXT;
    CREATE INDEX images_by_parent ON images(parent_id) WHERE parent_id IS NOT NULL;
    CREATE INDEX images_by_source ON images(owner, source_host, created_at) WHERE source_host IS NOT NULL;
    CREATE INDEX images_by_previous ON images(previous_id) WHERE previous_id IS NOT NULL;
    "#,
    // 7: host tasks other than deployments: a capture (the agent reads the host's disks into
    // images) is a row of `deployments` with action 'capture' and its request and result in
    // `capture` (JSON).
    r#"
    ALTER TABLE deployments ADD COLUMN action TEXT NOT NULL DEFAULT 'deploy';
    ALTER TABLE deployments ADD COLUMN capture TEXT;
    "#,
    // 8: ISO transitional boots: the ISO a host in state 'iso' sanboots, until when, and the
    // state it returns to after. A boot token with an image_id is an ISO boot's: it reads that
    // image's content and nothing else (agent tokens have none).
    r#"
    CREATE TABLE iso_boots (
        host_id      TEXT PRIMARY KEY REFERENCES hosts(id) ON DELETE CASCADE,
        image_id     TEXT NOT NULL,
        until        TEXT NOT NULL CHECK (until IN ('release', 'next-boot')),
        return_state TEXT NOT NULL,
        created_by   TEXT NOT NULL,
        created_at   INTEGER NOT NULL
    );
    ALTER TABLE agent_tokens ADD COLUMN image_id TEXT;
    "#,
    // 9: how an ISO boot's iPXE reaches the ISO: 'http' (the content route) or 'iscsi' (the
    // iSCSI target, with CHAP credentials derived from the per-boot token).
    r#"
    ALTER TABLE iso_boots ADD COLUMN via TEXT NOT NULL DEFAULT 'http' CHECK (via IN ('http', 'iscsi'));
    "#,
];

pub fn apply(conn: &mut Connection) -> rusqlite::Result<()> {
    let done: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(done as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}
