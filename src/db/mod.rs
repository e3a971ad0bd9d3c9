//! PostgreSQL for the state that replicas share (the spool, the incident log): a connection
//! pool built from a URL in the environment (never from the config file, never logged with
//! its password), TLS through rustls with the same roots as upstream connections, and the
//! schema migrations ([`migrations`]) that every replica runs at start-up.
//!
//! A [`Database`] connects lazily: building one never touches the network, and the first
//! use (or [`Database::migrate`] at start-up) connects and migrates. While the database is
//! unreachable every call fails fast with [`DbError::Unavailable`] and the next call tries
//! again, so a replica started before its database comes up serves non-database routes and
//! recovers on its own.

pub mod migrations;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use tokio_postgres_rustls::MakeRustlsConnect;

/// The environment variable the database URL is read from unless the config names another.
pub const DEFAULT_URL_ENV: &str = "PAYLOAD_GUARD_DATABASE_URL";

/// How long to wait for a connection (new or pooled) before calling the database unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one spool or incident operation may take before it counts as failed.
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(15);

/// What can go wrong reaching PostgreSQL. Messages never contain the URL's password.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DbError {
    /// The URL's environment variable is not set.
    #[error(
        "environment variable {0} is not set: set it to the database URL, e.g. postgres://payload_guard@db.internal/payload_guard"
    )]
    MissingUrl(String),
    /// The URL does not parse.
    #[error("environment variable {name} is not a valid PostgreSQL URL: {reason}")]
    BadUrl {
        /// The environment variable.
        name: String,
        /// What is wrong (never the URL itself).
        reason: String,
    },
    /// The database did not answer, or refused.
    #[error("database {database} is unavailable: {reason}")]
    Unavailable {
        /// The database, without password.
        database: String,
        /// Why.
        reason: String,
    },
}

/// A pooled, lazily connected, migrated-once PostgreSQL database.
#[derive(Clone)]
pub struct Database {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    display: String,
    migrated: tokio::sync::OnceCell<()>,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database")
            .field("database", &self.inner.display)
            .finish_non_exhaustive()
    }
}

impl Database {
    /// A pool for the URL in the environment variable `url_env` (at most `max_connections`).
    pub fn from_env(url_env: &str, max_connections: usize) -> Result<Database, DbError> {
        let url = std::env::var(url_env).map_err(|_| DbError::MissingUrl(url_env.to_owned()))?;
        Database::from_url(url_env, &url, max_connections)
    }

    /// A pool for `url` (`source` names where it came from, for messages).
    pub fn from_url(source: &str, url: &str, max_connections: usize) -> Result<Database, DbError> {
        let mut pg = tokio_postgres::Config::from_str(url).map_err(|e| DbError::BadUrl {
            name: source.to_owned(),
            reason: e.to_string(),
        })?;
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(CONNECT_TIMEOUT);
        }
        pg.keepalives_idle(Duration::from_secs(30));
        if pg.get_application_name().is_none() {
            pg.application_name("payload-guard");
        }
        let display = redacted(&pg);
        let manager = Manager::from_config(
            pg,
            tls()?,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(max_connections.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| DbError::BadUrl {
                name: source.to_owned(),
                reason: e.to_string(),
            })?;
        Ok(Database {
            inner: Arc::new(Inner {
                pool,
                display,
                migrated: tokio::sync::OnceCell::new(),
            }),
        })
    }

    /// The database as `postgres://user@host:port/dbname` (no password), for messages.
    pub fn display(&self) -> &str {
        &self.inner.display
    }

    /// A connection from the pool, after the schema is migrated (once per process).
    pub async fn client(&self) -> Result<Object, DbError> {
        self.migrate().await?;
        self.raw_client().await
    }

    async fn raw_client(&self) -> Result<Object, DbError> {
        self.inner
            .pool
            .get()
            .await
            .map_err(|e| self.unavailable(&e.to_string()))
    }

    /// Runs the migrations this binary knows and the database lacks (see [`migrations`]);
    /// once it succeeds, later calls return at once.
    pub async fn migrate(&self) -> Result<(), DbError> {
        self.inner
            .migrated
            .get_or_try_init(|| async {
                let mut client = self.raw_client().await?;
                let applied = tokio::time::timeout(OPERATION_TIMEOUT, migrations::run(&mut client))
                    .await
                    .map_err(|_| self.unavailable("migrations timed out"))?
                    .map_err(|e| self.error(&e))?;
                if !applied.is_empty() {
                    tracing::info!(database = %self.inner.display, versions = ?applied, "database schema migrated");
                }
                Ok(())
            })
            .await
            .map(|_| ())
    }

    /// Whether the database answers a trivial query within `timeout`.
    pub async fn ping(&self, timeout: Duration) -> bool {
        let probe = async {
            let client = self.client().await.ok()?;
            client.simple_query("SELECT 1").await.ok()
        };
        matches!(tokio::time::timeout(timeout, probe).await, Ok(Some(_)))
    }

    /// A database error as [`DbError::Unavailable`].
    pub fn error(&self, err: &tokio_postgres::Error) -> DbError {
        self.unavailable(&error_text(err))
    }

    /// `reason` as [`DbError::Unavailable`] for this database.
    pub fn unavailable(&self, reason: &str) -> DbError {
        DbError::Unavailable {
            database: self.inner.display.clone(),
            reason: reason.to_owned(),
        }
    }
}

/// A database error with its server message, when there is one.
pub fn error_text(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => match std::error::Error::source(err) {
            Some(source) => format!("{err}: {source}"),
            None => err.to_string(),
        },
    }
}

/// TLS for database connections (used when the URL's `sslmode` asks for it; `prefer`, the
/// default, falls back to plain TCP when the server does not offer TLS).
fn tls() -> Result<MakeRustlsConnect, DbError> {
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| DbError::BadUrl {
        name: "tls".into(),
        reason: e.to_string(),
    })?
    .with_root_certificates(crate::forward::base_roots().clone())
    .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// `postgres://user@host:port/dbname`, without the password.
fn redacted(pg: &tokio_postgres::Config) -> String {
    let user = pg.get_user().map(|u| format!("{u}@")).unwrap_or_default();
    let host = match pg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
        None => "localhost".to_owned(),
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    let db = pg.get_dbname().or(pg.get_user()).unwrap_or("postgres");
    format!("postgres://{user}{host}:{port}/{db}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_never_contains_the_password() {
        let db = Database::from_url(
            "TEST_URL",
            "postgres://guard:s3cret-pw@db.internal:6543/hooks?sslmode=require",
            2,
        )
        .unwrap();
        assert_eq!(db.display(), "postgres://guard@db.internal:6543/hooks");
        assert!(!format!("{db:?}").contains("s3cret"));
        let err = db.unavailable("connection refused").to_string();
        assert!(!err.contains("s3cret"), "{err}");
    }

    #[test]
    fn bad_urls_name_the_variable_not_the_value() {
        let err = Database::from_url("MY_DB_URL", "postgres://u:pw@h/db?bogus_option=1", 2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("MY_DB_URL"), "{err}");
        assert!(!err.contains("pw@"), "{err}");
        let missing = Database::from_env("PAYLOAD_GUARD_TEST_SURELY_UNSET_VAR", 2)
            .unwrap_err()
            .to_string();
        assert!(missing.contains("PAYLOAD_GUARD_TEST_SURELY_UNSET_VAR is not set"));
    }
}
