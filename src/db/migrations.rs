//! The database schema, as numbered migrations applied in order at start-up.
//!
//! Each migration runs once, in one transaction together with its row in
//! `payload_guard_migrations`. The whole run holds a transaction-scoped advisory lock, so
//! replicas that start at the same moment apply each migration exactly once (the others wait,
//! then find it applied). A migration is never edited once released: changes are new
//! migrations. A database migrated by a newer binary (versions this one does not know) is left
//! alone and used as is; newer migrations only add.

/// The advisory lock key every replica takes while migrating ("pguard" in ASCII).
const MIGRATION_LOCK: i64 = 0x7067_7561_7264;

/// `(version, name, SQL)`, in order.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "spool",
        r#"
CREATE TABLE payload_guard_spool (
    id              text PRIMARY KEY,
    route           text NOT NULL,
    state           text NOT NULL CHECK (state IN ('ready', 'dead', 'archive')),
    received_at     timestamptz NOT NULL,
    next_attempt_at timestamptz,
    claimed_by      text,
    claim_token     text,
    lease_until     timestamptz,
    body_len        bigint NOT NULL,
    bytes           bigint NOT NULL,
    meta            text NOT NULL
);
CREATE INDEX payload_guard_spool_order ON payload_guard_spool (state, route, received_at, id);
CREATE TABLE payload_guard_spool_chunks (
    record_id text NOT NULL REFERENCES payload_guard_spool (id) ON DELETE CASCADE,
    seq       integer NOT NULL,
    data      bytea NOT NULL,
    PRIMARY KEY (record_id, seq)
);
CREATE TABLE payload_guard_spool_usage (
    shard integer PRIMARY KEY,
    bytes bigint NOT NULL
);
INSERT INTO payload_guard_spool_usage (shard, bytes) SELECT s, 0 FROM generate_series(0, 15) AS s;
"#,
    ),
    (
        2,
        "incidents",
        r#"
CREATE TABLE payload_guard_incidents (
    seq         bigserial PRIMARY KEY,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    replica     text NOT NULL,
    incident    text NOT NULL
);
"#,
    ),
    (
        3,
        "learned limits and dedupe",
        r#"
CREATE TABLE payload_guard_learned_limits (
    route      text PRIMARY KEY,
    state      text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE SEQUENCE payload_guard_dedupe_seq;
CREATE TABLE payload_guard_dedupe (
    route            text NOT NULL,
    id               text NOT NULL,
    hash             text NOT NULL,
    first_request_id text NOT NULL,
    at               bigint NOT NULL,
    seq              bigint NOT NULL DEFAULT nextval('payload_guard_dedupe_seq'),
    PRIMARY KEY (route, id)
);
CREATE INDEX payload_guard_dedupe_by_seq ON payload_guard_dedupe (seq);
"#,
    ),
];

/// Applies the migrations the database lacks; returns the versions applied now.
pub async fn run(client: &mut tokio_postgres::Client) -> Result<Vec<i32>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS payload_guard_migrations (
            version    integer PRIMARY KEY,
            name       text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now()
        )",
    )
    .await?;
    let done: Vec<i32> = tx
        .query("SELECT version FROM payload_guard_migrations", &[])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let mut applied = Vec::new();
    for (version, name, sql) in MIGRATIONS {
        if done.contains(version) {
            continue;
        }
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO payload_guard_migrations (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await?;
        applied.push(*version);
    }
    tx.commit().await?;
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_unique_and_increasing() {
        let versions: Vec<i32> = MIGRATIONS.iter().map(|m| m.0).collect();
        assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
        assert_eq!(versions.first(), Some(&1));
    }
}
