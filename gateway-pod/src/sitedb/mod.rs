//! Site store: where per-site facts (peer ID, PSK, remote subnet, addresses) live. SQLite under
//! the data directory by default; MySQL/MariaDB when a `mysql://` URL is given.

pub mod batch;
pub mod cache;
mod lookup;
pub mod schema;

pub use batch::SiteLookups;
pub use cache::{Key, LookupCache};
pub use lookup::{LookupError, Site, check_row};

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

/// Errors of the site store. Never carries the URL: it may hold a password.
#[derive(Debug, thiserror::Error)]
pub enum SiteDbError {
    #[error("site database URL scheme '{0}' is not supported; use sqlite:, mysql:// or mariadb://")]
    Scheme(String),
    #[error("site database URL is malformed: {0}")]
    Url(String),
    #[error("cannot create data directory {path}: {source}")]
    DataDir { path: String, source: std::io::Error },
    #[error("site database: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("site database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// An open site store.
#[derive(Clone, Debug)]
pub enum SiteStore {
    Sqlite(SqlitePool),
    MySql(MySqlPool),
}

/// File name of the embedded store inside `--data-dir`.
pub const EMBEDDED_FILE: &str = "sites.db";

impl SiteStore {
    /// Opens (creating if needed) the embedded SQLite store in `data_dir`.
    pub async fn open_embedded(data_dir: &Path) -> Result<Self, SiteDbError> {
        std::fs::create_dir_all(data_dir).map_err(|source| SiteDbError::DataDir {
            path: data_dir.display().to_string(),
            source,
        })?;
        let opts = SqliteConnectOptions::new()
            .filename(data_dir.join(EMBEDDED_FILE))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await?;
        Ok(Self::Sqlite(pool))
    }

    /// Opens a store by URL (`sqlite:PATH`, `mysql://...`, `mariadb://...`). MySQL pools connect
    /// lazily so that a database outage at start does not keep the gateway from serving
    /// the tunnels that need no lookup.
    pub async fn open_url(url: &str, connect_timeout: Duration) -> Result<Self, SiteDbError> {
        let scheme = url.split_once(':').map_or("", |(s, _)| s);
        match scheme {
            "sqlite" => {
                let opts = SqliteConnectOptions::from_str(url)
                    .map_err(|e| SiteDbError::Url(redact(&e.to_string(), url)))?
                    .create_if_missing(true);
                Ok(Self::Sqlite(
                    SqlitePoolOptions::new()
                        .max_connections(4)
                        .connect_with(opts)
                        .await?,
                ))
            }
            "mysql" | "mariadb" => {
                let normalized = if scheme == "mariadb" {
                    format!("mysql{}", &url[scheme.len()..])
                } else {
                    url.to_owned()
                };
                let opts = MySqlConnectOptions::from_str(&normalized)
                    .map_err(|e| SiteDbError::Url(redact(&e.to_string(), url)))?;
                let pool = MySqlPoolOptions::new()
                    .max_connections(16)
                    .acquire_timeout(connect_timeout)
                    .connect_lazy_with(opts);
                Ok(Self::MySql(pool))
            }
            other => Err(SiteDbError::Scheme(other.chars().take(16).collect())),
        }
    }

    /// Creates the default site table and its indexes if they do not exist.
    pub async fn migrate(&self) -> Result<(), SiteDbError> {
        match self {
            Self::Sqlite(p) => sqlx::migrate!("./migrations/sqlite").run(p).await?,
            Self::MySql(p) => sqlx::migrate!("./migrations/mysql").run(p).await?,
        }
        Ok(())
    }

    /// Number of sites in the default table.
    pub async fn count_sites(&self) -> Result<u64, SiteDbError> {
        let n: i64 = match self {
            Self::Sqlite(p) => {
                sqlx::query_scalar("SELECT COUNT(*) FROM sites")
                    .fetch_one(p)
                    .await?
            }
            Self::MySql(p) => {
                sqlx::query_scalar("SELECT COUNT(*) FROM sites")
                    .fetch_one(p)
                    .await?
            }
        };
        Ok(u64::try_from(n).unwrap_or(0))
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "sqlite",
            Self::MySql(_) => "mysql",
        }
    }

    pub async fn close(&self) {
        match self {
            Self::Sqlite(p) => p.close().await,
            Self::MySql(p) => p.close().await,
        }
    }
}

/// sqlx's URL errors can quote the URL; keep the password out of anything we print.
fn redact(message: &str, url: &str) -> String {
    let mut out = message.replace(url, "<url>");
    if let Some((_, rest)) = url.split_once("://")
        && let Some((userinfo, _)) = rest.split_once('@')
        && let Some((_, pass)) = userinfo.split_once(':')
        && !pass.is_empty()
    {
        out = out.replace(pass, "<redacted>");
    }
    out
}

/// Helpers shared by the site store tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// The pool of an embedded store.
    pub(crate) fn sqlite(store: &SiteStore) -> &SqlitePool {
        let SiteStore::Sqlite(p) = store else {
            unreachable!("not an embedded store")
        };
        p
    }

    /// A new embedded store in `dir` (not migrated) on which `statements` ran.
    pub(crate) async fn sqlite_with(dir: &Path, statements: &[&'static str]) -> SiteStore {
        let store = SiteStore::open_embedded(dir).await.unwrap();
        execute(&store, statements).await;
        store
    }

    /// Runs each of `statements`, in order, on an embedded store.
    pub(crate) async fn execute(store: &SiteStore, statements: &[&'static str]) {
        for sql in statements {
            sqlx::query(*sql).execute(sqlite(store)).await.unwrap();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn embedded_store_migrates_and_counts() {
        let d = tempfile::tempdir().unwrap();
        let s = SiteStore::open_embedded(&d.path().join("data")).await.unwrap();
        s.migrate().await.unwrap();
        s.migrate().await.unwrap(); // idempotent
        assert_eq!(s.count_sites().await.unwrap(), 0);
        if let SiteStore::Sqlite(p) = &s {
            sqlx::query("INSERT INTO sites (peer_id, psk, remote_subnet) VALUES (?, ?, ?)")
                .bind("a.sites.example.com")
                .bind("k")
                .bind("10.128.1.0/24")
                .execute(p)
                .await
                .unwrap();
        }
        assert_eq!(s.count_sites().await.unwrap(), 1);
        assert!(d.path().join("data").join(EMBEDDED_FILE).exists());
        s.close().await;
    }

    #[tokio::test]
    async fn rejects_unknown_scheme_without_echoing_url() {
        let e = SiteStore::open_url("postgres://u:hunter2@h/db", Duration::from_secs(1))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("'postgres'") && !e.contains("hunter2"), "{e}");
    }

    #[test]
    fn redact_hides_password() {
        assert_eq!(redact("bad mysql://u:pw@h/db", "mysql://u:pw@h/db"), "bad <url>");
        assert_eq!(
            redact("port in u:pw@h", "mysql://u:pw@h"),
            "port in u:<redacted>@h"
        );
    }
}
