//! Site lookups for the two paths of DESIGN.md: by peer ID (a site initiates) and by remote
//! subnet (traffic toward a site). Parameterised queries only: the values are bound, and the
//! identifiers (table, columns) were held to plain SQL identifiers when the Egroup was
//! validated. Rows are checked before use: a NULL or malformed field is an error naming the
//! column, never a half-built site.

use std::time::Duration;

use concentrator_crds::egroup::SiteTable;
use ipnet::IpNet;
use sqlx::Row;

use super::SiteStore;
use super::schema::Present;
use crate::secret::Secret;

/// One row of the site table, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    pub peer_id: String,
    /// Never printed: `Secret` redacts itself.
    pub psk: Secret,
    pub remote_subnet: IpNet,
    pub peer_address: Option<String>,
    pub backup_peer_address: Option<String>,
}

/// Why a lookup gave no usable site. Clone, so coalesced waiters can share one answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    #[error("no site row")]
    NotFound,
    #[error("site database did not answer within {0:?}")]
    Timeout(Duration),
    /// The database cannot be reached: no connection, the network, TLS, a pool closed.
    #[error("site database unreachable: {0}")]
    Unreachable(String),
    /// The table, or a column the Egroup needs, does not exist: a configuration error.
    #[error("site table '{table}': {reason}")]
    Schema { table: String, reason: String },
    /// The server refused us (credentials, privileges).
    #[error("site database denied access: {0}")]
    Denied(String),
    /// The server answered the statement with another error.
    #[error("site database refused the query: {0}")]
    Query(String),
    #[error("site row malformed: column {column}: {reason}")]
    Malformed { column: String, reason: String },
}

impl LookupError {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NotFound => "not_found",
            Self::Timeout(_) => "timeout",
            Self::Unreachable(_) => "unreachable",
            Self::Schema { .. } => "schema",
            Self::Denied(_) => "denied",
            Self::Query(_) => "query",
            Self::Malformed { .. } => "malformed",
        }
    }
}

pub(super) fn malformed(column: &str, reason: impl Into<String>) -> LookupError {
    LookupError::Malformed {
        column: column.to_owned(),
        reason: reason.into(),
    }
}

/// Raw column values of one row, in the order of [`select`].
pub(super) type RawRow = (
    Option<String>,
    Option<Vec<u8>>,
    Option<String>,
    Option<String>,
    Option<String>,
);

/// Builds and checks a site from a row; `expected_prefix` is the Egroup's remoteSubnetPrefix.
pub fn check_row(t: &SiteTable, row: RawRow, expected_prefix: u8) -> Result<Site, LookupError> {
    let (peer_id, psk, subnet, addr, backup) = row;
    let peer_id = peer_id
        .filter(|p| !p.is_empty())
        .ok_or_else(|| malformed(&t.peer_id, "NULL or empty"))?;
    let psk = psk
        .filter(|p| !p.is_empty())
        .ok_or_else(|| malformed(&t.psk, "NULL or empty"))?;
    let subnet = subnet.ok_or_else(|| malformed(&t.remote_subnet, "NULL"))?;
    let remote_subnet: IpNet = subnet
        .trim()
        .parse()
        .map_err(|_| malformed(&t.remote_subnet, format!("'{subnet}' is not a CIDR subnet")))?;
    if remote_subnet.trunc() != remote_subnet {
        return Err(malformed(
            &t.remote_subnet,
            format!("'{subnet}' has host bits set"),
        ));
    }
    if remote_subnet.prefix_len() != expected_prefix {
        return Err(malformed(
            &t.remote_subnet,
            format!("'{subnet}' is not a /{expected_prefix} as the Egroup's remoteSubnetPrefix says"),
        ));
    }
    let address = |column: &str, v: Option<String>| -> Result<Option<String>, LookupError> {
        match v.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()) {
            None => Ok(None),
            Some(a) => concentrator_crds::eroute::validate_address(column, &a)
                .map(|()| Some(a))
                .map_err(|e| malformed(column, e.message)),
        }
    };
    Ok(Site {
        peer_id,
        psk: Secret::new(psk),
        remote_subnet,
        peer_address: address(&t.peer_address.name, addr)?,
        backup_peer_address: address(&t.backup_peer_address.name, backup)?,
    })
}

/// The SELECT for one lookup column. Identifiers are quoted on top of the identifier check,
/// so a column named like a keyword still works; with backquotes in both dialects, since
/// SQLite reads a double-quoted name that is no column as a string literal (a missing `psk`
/// column would read as the PSK "psk").
fn select(t: &SiteTable, present: Present, by: &str) -> String {
    format!("{} = ? LIMIT 2", select_where(t, present, by))
}

/// The SELECT for `n` values of one lookup column at once (`IN (?, ...)`). At most two rows
/// per value are of any use (a second one makes the site ambiguous), so more than `2n` rows
/// in all is cut off at `2n + 1`, which tells the caller to ask value by value.
pub(super) fn select_in(t: &SiteTable, present: Present, by: &str, n: usize) -> String {
    let marks = vec!["?"; n.max(1)].join(", ");
    format!(
        "{} IN ({marks}) LIMIT {}",
        select_where(t, present, by),
        2 * n + 1
    )
}

/// An optional column the table lacks is read as NULL, so every statement has the columns of
/// [`RawRow`].
fn select_where(t: &SiteTable, present: Present, by: &str) -> String {
    let q = |s: &str| format!("`{s}`");
    let optional = |there: bool, name: &str| if there { q(name) } else { "NULL".to_owned() };
    format!(
        "SELECT {}, {}, {}, {}, {} FROM {} WHERE {}",
        q(&t.peer_id),
        q(&t.psk),
        q(&t.remote_subnet),
        optional(present.peer_address, &t.peer_address.name),
        optional(present.backup_peer_address, &t.backup_peer_address.name),
        q(&t.table),
        q(by)
    )
}

/// What a failed statement on `table` means for the lookup: only an error on the way to the
/// server is "unreachable"; one the server answered names its cause.
pub(super) fn sql_error(table: &str, e: sqlx::Error) -> LookupError {
    match e {
        sqlx::Error::PoolTimedOut => LookupError::Unreachable("no connection available".into()),
        // Column types the row cannot be read as are a schema problem, not an outage.
        sqlx::Error::ColumnDecode { index, source } => malformed(&index, source.to_string()),
        sqlx::Error::Database(db) => database_error(table, db.as_ref()),
        // Never the URL: sqlx errors carry the server's message, not the connection string.
        other => LookupError::Unreachable(other.to_string()),
    }
}

/// MySQL/MariaDB error numbers, and SQLite's messages (its codes do not tell these apart).
fn database_error(table: &str, db: &dyn sqlx::error::DatabaseError) -> LookupError {
    const NO_SUCH_TABLE: u16 = 1146; // ER_NO_SUCH_TABLE
    const BAD_FIELD: u16 = 1054; // ER_BAD_FIELD_ERROR
    const DENIED: [u16; 4] = [1044, 1045, 1142, 1143]; // DB, user, table, column access
    let message = db.message().to_owned();
    let schema = |reason: String| LookupError::Schema {
        table: table.to_owned(),
        reason,
    };
    if let Some(my) = db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
        return match my.number() {
            NO_SUCH_TABLE => schema("the table does not exist".into()),
            BAD_FIELD => schema(message),
            n if DENIED.contains(&n) => LookupError::Denied(message),
            _ => LookupError::Query(message),
        };
    }
    if message.starts_with("no such table") {
        schema("the table does not exist".into())
    } else if message.starts_with("no such column") {
        schema(message)
    } else {
        LookupError::Query(message)
    }
}

/// Runs `sql` with `keys` bound in order.
pub(super) async fn fetch(store: &SiteStore, sql: &str, keys: &[&str]) -> Result<Vec<RawRow>, sqlx::Error> {
    // PSKs may be stored as text or binary; read as bytes either way.
    fn raw<R: Row>(r: &R) -> Result<RawRow, sqlx::Error>
    where
        for<'c> &'c str: sqlx::ColumnIndex<R>,
        usize: sqlx::ColumnIndex<R>,
        Option<String>: for<'r> sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
        Option<Vec<u8>>: for<'r> sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    {
        Ok((
            r.try_get(0)?,
            r.try_get(1)?,
            r.try_get(2)?,
            r.try_get(3)?,
            r.try_get(4)?,
        ))
    }
    // The text is ours (quoted, pre-checked identifiers); every value is a bound parameter.
    let sql = || sqlx::AssertSqlSafe(sql.to_owned());
    match store {
        SiteStore::Sqlite(p) => {
            let mut q = sqlx::query(sql());
            for k in keys {
                q = q.bind(*k);
            }
            q.fetch_all(p).await?.iter().map(raw).collect()
        }
        SiteStore::MySql(p) => {
            let mut q = sqlx::query(sql());
            for k in keys {
                q = q.bind(*k);
            }
            q.fetch_all(p).await?.iter().map(raw).collect()
        }
    }
}

impl SiteStore {
    /// One site by one value of column `by`, in a statement of its own.
    pub(super) async fn lookup(
        &self,
        t: &SiteTable,
        present: Present,
        by: &str,
        key: &str,
        expected_prefix: u8,
        timeout: Duration,
    ) -> Result<Site, LookupError> {
        let sql = select(t, present, by);
        let rows = tokio::time::timeout(timeout, fetch(self, &sql, &[key]))
            .await
            .map_err(|_| LookupError::Timeout(timeout))?
            .map_err(|e| sql_error(&t.table, e))?;
        match rows.len() {
            0 => Err(LookupError::NotFound),
            1 => check_row(t, rows.into_iter().next().unwrap_or_default(), expected_prefix),
            _ => Err(malformed(by, format!("more than one row for '{key}'"))),
        }
    }

    /// The site whose peer ID is `peer_id` (responder path), in a table that has every
    /// column `t` names ([`SiteLookups`](super::SiteLookups) finds out which it has).
    pub async fn site_by_peer_id(
        &self,
        t: &SiteTable,
        peer_id: &str,
        expected_prefix: u8,
        timeout: Duration,
    ) -> Result<Site, LookupError> {
        self.lookup(t, Present::ALL, &t.peer_id, peer_id, expected_prefix, timeout)
            .await
    }

    /// The site whose remote subnet is `subnet` (initiator path: destination & Egroup mask),
    /// in a table that has every column `t` names.
    pub async fn site_by_subnet(
        &self,
        t: &SiteTable,
        subnet: IpNet,
        timeout: Duration,
    ) -> Result<Site, LookupError> {
        let key = subnet.trunc().to_string();
        self.lookup(
            t,
            Present::ALL,
            &t.remote_subnet,
            &key,
            subnet.prefix_len(),
            timeout,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sitedb::testing::execute;
    use crate::sites::default_table as table;

    fn row(subnet: &str, psk: &[u8]) -> RawRow {
        (
            Some("a.sites".into()),
            Some(psk.to_vec()),
            Some(subnet.into()),
            Some("192.0.2.7".into()),
            None,
        )
    }

    #[test]
    fn checks_every_field_naming_the_column() {
        let t = table();
        let s = check_row(&t, row("10.128.7.0/24", b"k"), 24).unwrap();
        assert_eq!(s.remote_subnet.to_string(), "10.128.7.0/24");
        assert_eq!(s.peer_address.as_deref(), Some("192.0.2.7"));
        let col = |e: LookupError| match e {
            LookupError::Malformed { column, .. } => column,
            other => panic!("{other:?}"),
        };
        for (subnet, psk, column) in [
            ("10.128.7.0/24", &b""[..], "psk"),
            ("10.128.7.0/33", b"k", "remote_subnet"),
            ("10.128.7.1/24", b"k", "remote_subnet"),
            ("10.128.7.0/25", b"k", "remote_subnet"),
        ] {
            assert_eq!(
                col(check_row(&t, row(subnet, psk), 24).unwrap_err()),
                column,
                "{subnet}"
            );
        }
        let mut r = row("10.128.7.0/24", b"k");
        r.0 = None;
        assert_eq!(col(check_row(&t, r, 24).unwrap_err()), "peer_id");
        let mut r = row("10.128.7.0/24", b"k");
        r.3 = Some("not an address!".into());
        assert_eq!(col(check_row(&t, r, 24).unwrap_err()), "peer_address");
    }

    #[test]
    fn malformed_errors_never_show_the_psk() {
        let e = check_row(&table(), row("bad", b"hunter2"), 24).unwrap_err();
        assert!(!format!("{e} {e:?}").contains("hunter2"));
        let s = check_row(&table(), row("10.0.0.0/24", b"hunter2"), 24).unwrap();
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn queries_bind_values_and_quote_identifiers() {
        let sql = select(&table(), Present::ALL, "peer_id");
        assert_eq!(
            sql,
            "SELECT `peer_id`, `psk`, `remote_subnet`, `peer_address`, `backup_peer_address` FROM `sites` WHERE `peer_id` = ? LIMIT 2"
        );
        assert!(
            select(&table(), Present::ALL, "remote_subnet")
                .contains("FROM `sites` WHERE `remote_subnet` = ?")
        );
        let without_backup = Present {
            peer_address: true,
            backup_peer_address: false,
        };
        assert_eq!(
            select(&table(), without_backup, "peer_id"),
            "SELECT `peer_id`, `psk`, `remote_subnet`, `peer_address`, NULL FROM `sites` WHERE `peer_id` = ? LIMIT 2"
        );
    }

    #[tokio::test]
    async fn looks_up_sqlite_by_peer_id_and_subnet() {
        let d = tempfile::tempdir().unwrap();
        let store = SiteStore::open_embedded(d.path()).await.unwrap();
        store.migrate().await.unwrap();
        execute(
            &store,
            &[
                "INSERT INTO sites VALUES ('a.sites', 'k1', '10.128.1.0/24', '192.0.2.1', NULL), \
                 ('b.sites', '', '10.128.2.0/24', NULL, NULL)",
            ],
        )
        .await;
        let t = table();
        let to = Duration::from_secs(2);
        let s = store.site_by_peer_id(&t, "a.sites", 24, to).await.unwrap();
        assert_eq!(s.psk.expose(), b"k1");
        let s = store
            .site_by_subnet(&t, "10.128.1.0/24".parse().unwrap(), to)
            .await
            .unwrap();
        assert_eq!(s.peer_id, "a.sites");
        assert_eq!(
            store.site_by_peer_id(&t, "zzz", 24, to).await,
            Err(LookupError::NotFound)
        );
        assert!(matches!(
            store.site_by_peer_id(&t, "b.sites", 24, to).await,
            Err(LookupError::Malformed { .. })
        ));
        // An injection attempt is just a peer ID that matches nothing.
        assert_eq!(
            store.site_by_peer_id(&t, "' OR '1'='1", 24, to).await,
            Err(LookupError::NotFound)
        );
    }
}
