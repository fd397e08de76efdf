//! Batched site lookups. With many sites connecting at once, a statement per lookup costs
//! more than the index lookup itself: a round trip, a statement execution on the server,
//! and a pooled connection, decoding and a wakeup on our side, for one row. Here lookups of
//! one column of one site table queue up while a statement is in flight, and the next
//! statement asks for all of them at once (`WHERE column IN (?, ...)`, at most
//! [`MAX_BATCH`] values); its rows are handed back to each waiter. A lookup that finds
//! nothing in flight goes out at once, so an idle gateway answers as fast as before.
//!
//! What stays per lookup: each has its own deadline (queueing included), and each row is
//! checked on its own, so a NULL or malformed row fails its site only. A statement that
//! fails or times out fails the lookups it carried, each with that error.
//!
//! The statements are built once the table's columns are known (`schema`): on the first
//! lookup, and again after a statement names a column or table the server does not have. A
//! table that does not fit the Egroup fails its lookups with the `schema` reason, is logged
//! once, and is asked again every [`SCHEMA_RETRY`], so fixing the table needs no restart.
//!
//! The server compares values under its own collation (MySQL's default ignores case and
//! trailing spaces), so a row may answer a key it does not equal byte for byte. Such a row,
//! or more rows than the statement's limit, sends that batch's keys one by one through the
//! single-key statement: the answer is then exactly what a lookup on its own gives.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use concentrator_crds::egroup::SiteTable;
use ipnet::IpNet;
use tokio::sync::oneshot;

use super::lookup::{RawRow, check_row, fetch, malformed, select_in, sql_error};
use super::schema::{self, Present};
use super::{LookupError, Site, SiteStore};

/// Values per statement at most.
pub const MAX_BATCH: usize = 64;
/// Statements in flight per column of one table at most. Two keep the server busy while
/// our side decodes the other's rows; more only split the waiting lookups into smaller,
/// costlier batches.
pub const MAX_IN_FLIGHT: usize = 2;

/// Statement sizes are rounded up to a power of two (the last key repeated), so a pooled
/// connection prepares at most this many statements per column.
const SIZES: usize = MAX_BATCH.trailing_zeros() as usize + 1;

/// How long a table that does not fit the Egroup is taken as such before it is read again.
pub const SCHEMA_RETRY: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum By {
    PeerId = 0,
    Subnet = 1,
}

type Answer = Result<Site, LookupError>;

struct Waiter {
    key: String,
    /// The `/len` the row's subnet must have.
    prefix: u8,
    tx: oneshot::Sender<Answer>,
}

#[derive(Default)]
struct Queue {
    waiting: VecDeque<Waiter>,
    in_flight: usize,
}

struct Inner {
    /// The egroup, for log lines.
    egroup: String,
    store: SiteStore,
    table: SiteTable,
    timeout: Duration,
    queues: [Mutex<Queue>; 2],
    /// Held while the table's columns are read, so that one statement does it.
    schema: tokio::sync::Mutex<Schema>,
    statements: AtomicU64,
}

/// The statements of a table whose columns are known.
struct Statements {
    present: Present,
    /// Statement text per column and size (1, 2, 4, ... `MAX_BATCH`).
    sql: [Vec<String>; 2],
}

#[derive(Default)]
struct Schema {
    state: SchemaState,
    /// The configuration error last logged, so each is logged once.
    reported: Option<String>,
}

#[derive(Default)]
enum SchemaState {
    #[default]
    Unknown,
    Ready(Arc<Statements>),
    Broken {
        error: LookupError,
        at: Instant,
    },
}

/// Batched lookups in one site table (one per egroup). Cheap to clone.
#[derive(Clone)]
pub struct SiteLookups(Arc<Inner>);

impl std::fmt::Debug for SiteLookups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SiteLookups")
            .field("table", &self.0.table.table)
            .field("store", &self.0.store.kind())
            .finish_non_exhaustive()
    }
}

impl SiteLookups {
    /// Lookups of `egroup` in `table` of `store`, each answered within `timeout` (waiting
    /// included).
    pub fn new(egroup: &str, store: SiteStore, table: SiteTable, timeout: Duration) -> Self {
        Self(Arc::new(Inner {
            egroup: egroup.to_owned(),
            store,
            timeout,
            queues: Default::default(),
            schema: Default::default(),
            table,
            statements: AtomicU64::new(0),
        }))
    }

    /// Reads the table's columns if they are not known yet, and checks them against the
    /// Egroup: `Err` with the `schema` reason when the table does not fit (logged once), or
    /// why the database could not tell.
    pub async fn check_schema(&self) -> Result<(), LookupError> {
        self.0.prepared().await.map(|_| ())
    }

    /// The site whose peer ID is `peer_id` (responder path); its subnet must be a
    /// `/expected_prefix`.
    pub async fn by_peer_id(&self, peer_id: &str, expected_prefix: u8) -> Answer {
        self.lookup(By::PeerId, peer_id.to_owned(), expected_prefix).await
    }

    /// The site whose remote subnet is `subnet` (initiator path).
    pub async fn by_subnet(&self, subnet: IpNet) -> Answer {
        self.lookup(By::Subnet, subnet.trunc().to_string(), subnet.prefix_len())
            .await
    }

    /// Statements sent so far (batches, and single lookups where a batch was redone).
    pub fn statements(&self) -> u64 {
        self.0.statements.load(Ordering::Relaxed)
    }

    async fn lookup(&self, by: By, key: String, prefix: u8) -> Answer {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut q = lock(&self.0.queues[by as usize]);
            q.waiting.push_back(Waiter { key, prefix, tx });
            let start = q.in_flight < MAX_IN_FLIGHT;
            if start {
                q.in_flight += 1;
            }
            start
        };
        if start {
            // A task of its own: a caller that gives up must not take the batch with it.
            tokio::spawn(drain(Slot {
                inner: self.0.clone(),
                by,
                held: true,
            }));
        }
        let timeout = self.0.timeout;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(LookupError::Unreachable("lookup abandoned".into())),
            Err(_) => Err(LookupError::Timeout(timeout)),
        }
    }
}

/// One of the `MAX_IN_FLIGHT` statement slots of a queue; given back when the queue is
/// empty, or if the task ends any other way (so the queue never stalls).
struct Slot {
    inner: Arc<Inner>,
    by: By,
    held: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.held {
            lock(&self.inner.queues[self.by as usize]).in_flight -= 1;
        }
    }
}

/// Sends statements for the waiting lookups, oldest first, until none wait.
async fn drain(mut slot: Slot) {
    let inner = slot.inner.clone();
    let by = slot.by;
    loop {
        let batch: Vec<Waiter> = {
            let mut q = lock(&inner.queues[by as usize]);
            // Lookups that timed out meanwhile need no answer.
            q.waiting.retain(|w| !w.tx.is_closed());
            if q.waiting.is_empty() {
                // Given back under the lock a new lookup checks, so none is left waiting.
                q.in_flight -= 1;
                slot.held = false;
                return;
            }
            let n = q.waiting.len().min(MAX_BATCH);
            q.waiting.drain(..n).collect()
        };
        let answers = inner.run(by, &batch).await;
        for (w, answer) in batch.into_iter().zip(answers) {
            let _ = w.tx.send(answer);
        }
    }
}

impl Inner {
    fn column(&self, by: By) -> &str {
        match by {
            By::PeerId => &self.table.peer_id,
            By::Subnet => &self.table.remote_subnet,
        }
    }

    /// One statement for `batch`; an answer per waiter, in order.
    /// The statements for the table's columns, reading them first if they are not known.
    async fn prepared(&self) -> Result<Arc<Statements>, LookupError> {
        let mut schema = self.schema.lock().await;
        match &schema.state {
            SchemaState::Ready(st) => return Ok(st.clone()),
            SchemaState::Broken { error, at } if at.elapsed() < SCHEMA_RETRY => return Err(error.clone()),
            _ => {}
        }
        let read = tokio::time::timeout(self.timeout, schema::columns(&self.store, &self.table.table))
            .await
            .map_err(|_| LookupError::Timeout(self.timeout))
            .and_then(|columns| schema::resolve(&self.table, &columns?));
        let t = &self.table.table;
        match read {
            Ok(present) => {
                if schema.reported.take().is_some() {
                    tracing::info!(egroup = %self.egroup, table = %t, "site table fits the Egroup now");
                }
                let st = Arc::new(self.statements_for(present));
                schema.state = SchemaState::Ready(st.clone());
                Ok(st)
            }
            Err(error @ LookupError::Schema { .. }) => {
                let shown = error.to_string();
                if schema.reported.as_ref() != Some(&shown) {
                    tracing::error!(
                        egroup = %self.egroup,
                        table = %t,
                        error = %shown,
                        "site table does not fit the Egroup: its sites are refused until it is fixed"
                    );
                    schema.reported = Some(shown);
                }
                schema.state = SchemaState::Broken {
                    error: error.clone(),
                    at: Instant::now(),
                };
                Err(error)
            }
            // The database could not tell: ask again with the next lookup.
            Err(other) => Err(other),
        }
    }

    fn statements_for(&self, present: Present) -> Statements {
        let sizes = |column: &str| -> Vec<String> {
            (0..SIZES)
                .map(|i| select_in(&self.table, present, column, 1 << i))
                .collect()
        };
        Statements {
            present,
            sql: [sizes(&self.table.peer_id), sizes(&self.table.remote_subnet)],
        }
    }

    /// A statement met a table that changed under it: read its columns again.
    async fn forget_schema(&self) {
        self.schema.lock().await.state = SchemaState::Unknown;
    }

    async fn run(&self, by: By, batch: &[Waiter]) -> Vec<Answer> {
        let n = batch.len();
        let st = match self.prepared().await {
            Ok(st) => st,
            Err(e) => return vec![Err(e); n],
        };
        let size = n.next_power_of_two();
        let mut keys: Vec<&str> = batch.iter().map(|w| w.key.as_str()).collect();
        let last = keys[n - 1];
        keys.resize(size, last);
        let sql = &st.sql[by as usize][size.trailing_zeros() as usize];
        self.statements.fetch_add(1, Ordering::Relaxed);
        let rows = match tokio::time::timeout(self.timeout, fetch(&self.store, sql, &keys)).await {
            Err(_) => return vec![Err(LookupError::Timeout(self.timeout)); n],
            Ok(Err(e)) => {
                let e = sql_error(&self.table.table, e);
                if matches!(e, LookupError::Schema { .. }) {
                    self.forget_schema().await;
                }
                return vec![Err(e); n];
            }
            Ok(Ok(rows)) => rows,
        };
        let mut matched: HashMap<&str, Vec<usize>> = HashMap::with_capacity(n);
        for w in batch {
            matched.entry(w.key.as_str()).or_default();
        }
        let mut exact = rows.len() <= 2 * size;
        for (i, row) in rows.iter().enumerate() {
            match key_of(row, by).and_then(|k| matched.get_mut(k)) {
                Some(v) => v.push(i),
                None => exact = false,
            }
        }
        if !exact {
            return self.one_by_one(by, batch, st.present).await;
        }
        let column = self.column(by);
        batch
            .iter()
            .map(|w| match matched.get(w.key.as_str()).map(Vec::as_slice) {
                None | Some([]) => Err(LookupError::NotFound),
                Some([i]) => check_row(&self.table, rows[*i].clone(), w.prefix),
                Some(_) => Err(malformed(column, format!("more than one row for '{}'", w.key))),
            })
            .collect()
    }

    async fn one_by_one(&self, by: By, batch: &[Waiter], present: Present) -> Vec<Answer> {
        let column = self.column(by);
        let mut answers = Vec::with_capacity(batch.len());
        for w in batch {
            self.statements.fetch_add(1, Ordering::Relaxed);
            answers.push(
                self.store
                    .lookup(&self.table, present, column, &w.key, w.prefix, self.timeout)
                    .await,
            );
        }
        if answers
            .iter()
            .any(|a| matches!(a, Err(LookupError::Schema { .. })))
        {
            self.forget_schema().await;
        }
        answers
    }
}

fn key_of(row: &RawRow, by: By) -> Option<&str> {
    match by {
        By::PeerId => row.0.as_deref(),
        By::Subnet => row.2.as_deref(),
    }
}

// Entries are pushed and drained whole: the queue is consistent even after a panic.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::sitedb::testing::{execute, sqlite, sqlite_with};
    use crate::sites::default_table as table;
    use concentrator_crds::egroup::OptionalColumn;

    async fn store(dir: &std::path::Path, rows: usize) -> SiteStore {
        // An operator's own table may allow NULLs, unlike the default schema.
        let store = sqlite_with(
            dir,
            &[
                "CREATE TABLE sites (peer_id TEXT PRIMARY KEY, psk BLOB, remote_subnet TEXT, \
                 peer_address TEXT, backup_peer_address TEXT)",
                "CREATE INDEX sites_remote_subnet ON sites (remote_subnet)",
            ],
        )
        .await;
        for i in 0..rows {
            sqlx::query("INSERT INTO sites VALUES (?, ?, ?, NULL, NULL)")
                .bind(format!("s{i}.sites"))
                .bind(format!("k{i}"))
                .bind(format!("10.{}.{}.0/24", i / 256, i % 256))
                .execute(sqlite(&store))
                .await
                .unwrap();
        }
        // Rows that must fail their own site only.
        execute(
            &store,
            &[
                "INSERT INTO sites VALUES ('nopsk.sites', '', '10.200.0.0/24', NULL, NULL), \
                 ('badnet.sites', 'k', '10.200.1.0/33', NULL, NULL), \
                 ('nullnet.sites', 'k', NULL, NULL, NULL), \
                 ('twin1.sites', 'k', '10.200.2.0/24', NULL, NULL), \
                 ('twin2.sites', 'k', '10.200.2.0/24', NULL, NULL)",
            ],
        )
        .await;
        store
    }

    // One thread: every lookup is queued before the first statement completes.
    #[tokio::test]
    async fn concurrent_lookups_share_statements_and_each_get_their_own_answer() {
        let d = tempfile::tempdir().unwrap();
        let store = store(d.path(), 300).await;
        let lookups = SiteLookups::new("g", store, table(), Duration::from_secs(10));
        let mut set = tokio::task::JoinSet::new();
        for i in 0..300usize {
            let l = lookups.clone();
            set.spawn(async move {
                let by_peer = l.by_peer_id(&format!("s{i}.sites"), 24).await;
                let net: IpNet = format!("10.{}.{}.0/24", i / 256, i % 256).parse().unwrap();
                let by_net = l.by_subnet(net).await;
                (i, by_peer, by_net)
            });
        }
        for name in ["nopsk", "badnet", "nullnet", "missing"] {
            let l = lookups.clone();
            set.spawn(async move {
                let r = l.by_peer_id(&format!("{name}.sites"), 24).await;
                (usize::MAX, r, Err(LookupError::NotFound))
            });
        }
        let mut failures = Vec::new();
        while let Some(r) = set.join_next().await {
            let (i, by_peer, by_net) = r.unwrap();
            if i == usize::MAX {
                failures.push(by_peer.unwrap_err());
                continue;
            }
            let s = by_peer.unwrap();
            assert_eq!(
                (s.peer_id.as_str(), s.psk.expose()),
                (format!("s{i}.sites").as_str(), format!("k{i}").as_bytes())
            );
            assert_eq!(by_net.unwrap().peer_id, format!("s{i}.sites"));
        }
        failures.sort_by_key(|e| format!("{e:?}"));
        let columns: Vec<_> = failures
            .iter()
            .map(|e| match e {
                LookupError::Malformed { column, .. } => column.as_str(),
                LookupError::NotFound => "not found",
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(columns.len(), 4);
        assert_eq!(
            columns.iter().filter(|c| **c == "remote_subnet").count(),
            2,
            "{failures:?}"
        );
        assert!(
            columns.contains(&"psk") && columns.contains(&"not found"),
            "{failures:?}"
        );
        let statements = lookups.statements();
        assert!(statements * 8 < 604, "{statements} statements for 604 lookups");
    }

    #[tokio::test]
    async fn two_rows_for_one_subnet_fail_that_site_only() {
        let d = tempfile::tempdir().unwrap();
        let lookups = SiteLookups::new("g", store(d.path(), 3).await, table(), Duration::from_secs(5));
        let (twin, one) = tokio::join!(
            lookups.by_subnet("10.200.2.0/24".parse().unwrap()),
            lookups.by_subnet("10.0.1.0/24".parse().unwrap())
        );
        assert!(
            matches!(twin, Err(LookupError::Malformed { ref column, .. }) if column == "remote_subnet"),
            "{twin:?}"
        );
        assert_eq!(one.unwrap().peer_id, "s1.sites");
    }

    #[tokio::test]
    async fn rows_the_server_matches_loosely_are_asked_one_by_one() {
        let d = tempfile::tempdir().unwrap();
        let store = store(d.path(), 3).await;
        // A column compared case-insensitively, as MySQL's default collation does: the
        // batch's rows then do not equal their keys byte for byte.
        execute(
            &store,
            &[
                "CREATE TABLE ci (peer_id TEXT COLLATE NOCASE PRIMARY KEY, psk BLOB, remote_subnet TEXT, peer_address TEXT, backup_peer_address TEXT)",
                "INSERT INTO ci VALUES ('Upper.Sites', 'k', '10.9.0.0/24', NULL, NULL), ('lower.sites', 'k', '10.9.1.0/24', NULL, NULL)",
            ],
        )
        .await;
        let t = SiteTable {
            table: "ci".into(),
            ..table()
        };
        let lookups = SiteLookups::new("g", store.clone(), t.clone(), Duration::from_secs(5));
        let (a, b, c) = tokio::join!(
            lookups.by_peer_id("upper.sites", 24),
            lookups.by_peer_id("lower.sites", 24),
            lookups.by_peer_id("nobody.sites", 24)
        );
        let single = store
            .site_by_peer_id(&t, "upper.sites", 24, Duration::from_secs(5))
            .await;
        assert_eq!(a, single, "as a lookup on its own");
        assert_eq!(a.unwrap().peer_id, "Upper.Sites");
        assert_eq!(b.unwrap().peer_id, "lower.sites");
        assert_eq!(c, Err(LookupError::NotFound));
    }

    #[tokio::test]
    async fn a_failed_statement_fails_each_lookup_and_the_queue_recovers() {
        let d = tempfile::tempdir().unwrap();
        let store = store(d.path(), 3).await;
        let missing = SiteTable {
            table: "no_such_table".into(),
            ..table()
        };
        let broken = SiteLookups::new("g", store.clone(), missing, Duration::from_secs(5));
        let (a, b) = tokio::join!(
            broken.by_peer_id("s1.sites", 24),
            broken.by_peer_id("s2.sites", 24)
        );
        // The server answered: a missing table is a configuration error, not an outage.
        assert!(matches!(a, Err(LookupError::Schema { .. })), "{a:?}");
        assert!(matches!(b, Err(LookupError::Schema { .. })), "{b:?}");
        let fine = SiteLookups::new("g", store, table(), Duration::from_secs(5));
        assert_eq!(fine.by_peer_id("s2.sites", 24).await.unwrap().peer_id, "s2.sites");
        // The slots were given back: later lookups on the broken table still get answers.
        assert!(broken.by_peer_id("s1.sites", 24).await.is_err());
        assert_eq!(lock(&broken.0.queues[0]).in_flight, 0);
    }

    #[tokio::test]
    async fn a_table_of_its_own_shape_is_read_and_a_missing_named_column_is_named() {
        let d = tempfile::tempdir().unwrap();
        // The user's names, and no backup address column.
        let store = sqlite_with(
            d.path(),
            &[
                "CREATE TABLE branch (ident TEXT, secret BLOB, lan TEXT, wan TEXT)",
                "INSERT INTO branch VALUES ('b1.sites', 'k', '10.7.1.0/24', '192.0.2.9')",
            ],
        )
        .await;
        let own = SiteTable {
            table: "branch".into(),
            peer_id: "ident".into(),
            psk: "secret".into(),
            remote_subnet: "lan".into(),
            peer_address: OptionalColumn::named("wan"),
            backup_peer_address: OptionalColumn::default_name("backup_peer_address"),
        };
        let lookups = SiteLookups::new("g", store.clone(), own.clone(), Duration::from_secs(5));
        let (a, b) = tokio::join!(
            lookups.by_peer_id("b1.sites", 24),
            lookups.by_subnet("10.7.1.0/24".parse().unwrap())
        );
        let a = a.unwrap();
        assert_eq!(
            (a.peer_address.as_deref(), a.backup_peer_address),
            (Some("192.0.2.9"), None)
        );
        assert_eq!(b.unwrap().peer_id, "b1.sites");

        // Named, but not in the table: every lookup fails with the schema reason, naming it.
        let named = SiteTable {
            backup_peer_address: OptionalColumn::named("wan2"),
            ..own.clone()
        };
        let broken = SiteLookups::new("g", store.clone(), named, Duration::from_secs(5));
        let e = broken.check_schema().await.unwrap_err();
        assert_eq!(e.kind(), "schema");
        assert!(e.to_string().contains("'wan2'"), "{e}");
        assert_eq!(broken.by_peer_id("b1.sites", 24).await, Err(e));
        assert_eq!(
            broken.statements(),
            0,
            "no lookup statement for a table that does not fit"
        );

        // A column dropped while the gateway runs: the failed statement makes the next
        // lookup read the columns again.
        execute(&store, &["ALTER TABLE branch DROP COLUMN wan"]).await;
        let first = lookups.by_peer_id("b1.sites", 24).await.unwrap_err();
        assert_eq!(first.kind(), "schema", "{first:?}");
        let again = lookups.by_peer_id("b1.sites", 24).await.unwrap_err();
        assert!(again.to_string().contains("no column 'wan'"), "{again}");
    }

    #[test]
    fn statements_bind_every_value_and_bound_the_rows() {
        let sql = select_in(&table(), Present::ALL, "peer_id", 4);
        assert!(sql.ends_with("WHERE `peer_id` IN (?, ?, ?, ?) LIMIT 9"), "{sql}");
        let sql = select_in(&table(), Present::ALL, "remote_subnet", 1);
        assert!(sql.ends_with("WHERE `remote_subnet` IN (?) LIMIT 3"), "{sql}");
    }
}
