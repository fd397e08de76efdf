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
//! The server compares values under its own collation (MySQL's default ignores case and
//! trailing spaces), so a row may answer a key it does not equal byte for byte. Such a row,
//! or more rows than the statement's limit, sends that batch's keys one by one through the
//! single-key statement: the answer is then exactly what a lookup on its own gives.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use concentrator_crds::egroup::SiteTable;
use ipnet::IpNet;
use tokio::sync::oneshot;

use super::lookup::{RawRow, check_row, fetch, malformed, select_in, sql_error};
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
    store: SiteStore,
    table: SiteTable,
    timeout: Duration,
    queues: [Mutex<Queue>; 2],
    /// Statement text per column and size (1, 2, 4, ... `MAX_BATCH`).
    sql: [Vec<String>; 2],
    statements: AtomicU64,
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
    /// Lookups in `table` of `store`, each answered within `timeout` (waiting included).
    pub fn new(store: SiteStore, table: SiteTable, timeout: Duration) -> Self {
        let mysql = matches!(store, SiteStore::MySql(_));
        let statements = |column: &str| -> Vec<String> {
            (0..SIZES)
                .map(|i| select_in(&table, column, mysql, 1 << i))
                .collect()
        };
        let sql = [statements(&table.peer_id), statements(&table.remote_subnet)];
        Self(Arc::new(Inner {
            store,
            timeout,
            queues: Default::default(),
            sql,
            table,
            statements: AtomicU64::new(0),
        }))
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
    async fn run(&self, by: By, batch: &[Waiter]) -> Vec<Answer> {
        let n = batch.len();
        let size = n.next_power_of_two();
        let mut keys: Vec<&str> = batch.iter().map(|w| w.key.as_str()).collect();
        let last = keys[n - 1];
        keys.resize(size, last);
        let sql = &self.sql[by as usize][size.trailing_zeros() as usize];
        self.statements.fetch_add(1, Ordering::Relaxed);
        let rows = match tokio::time::timeout(self.timeout, fetch(&self.store, sql, &keys)).await {
            Err(_) => return vec![Err(LookupError::Timeout(self.timeout)); n],
            Ok(Err(e)) => return vec![Err(sql_error(e)); n],
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
            return self.one_by_one(by, batch).await;
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

    async fn one_by_one(&self, by: By, batch: &[Waiter]) -> Vec<Answer> {
        let column = self.column(by);
        let mut answers = Vec::with_capacity(batch.len());
        for w in batch {
            self.statements.fetch_add(1, Ordering::Relaxed);
            answers.push(
                self.store
                    .lookup(&self.table, column, &w.key, w.prefix, self.timeout)
                    .await,
            );
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

    use crate::sites::default_table as table;

    async fn store(dir: &std::path::Path, rows: usize) -> SiteStore {
        let store = SiteStore::open_embedded(dir).await.unwrap();
        let SiteStore::Sqlite(p) = &store else {
            unreachable!()
        };
        // An operator's own table may allow NULLs, unlike the default schema.
        sqlx::query(
            "CREATE TABLE sites (peer_id TEXT PRIMARY KEY, psk BLOB, remote_subnet TEXT, \
             peer_address TEXT, backup_peer_address TEXT)",
        )
        .execute(p)
        .await
        .unwrap();
        sqlx::query("CREATE INDEX sites_remote_subnet ON sites (remote_subnet)")
            .execute(p)
            .await
            .unwrap();
        for i in 0..rows {
            sqlx::query("INSERT INTO sites VALUES (?, ?, ?, NULL, NULL)")
                .bind(format!("s{i}.sites"))
                .bind(format!("k{i}"))
                .bind(format!("10.{}.{}.0/24", i / 256, i % 256))
                .execute(p)
                .await
                .unwrap();
        }
        // Rows that must fail their own site only.
        sqlx::query(
            "INSERT INTO sites VALUES ('nopsk.sites', '', '10.200.0.0/24', NULL, NULL), \
             ('badnet.sites', 'k', '10.200.1.0/33', NULL, NULL), \
             ('nullnet.sites', 'k', NULL, NULL, NULL), \
             ('twin1.sites', 'k', '10.200.2.0/24', NULL, NULL), \
             ('twin2.sites', 'k', '10.200.2.0/24', NULL, NULL)",
        )
        .execute(p)
        .await
        .unwrap();
        store
    }

    // One thread: every lookup is queued before the first statement completes.
    #[tokio::test]
    async fn concurrent_lookups_share_statements_and_each_get_their_own_answer() {
        let d = tempfile::tempdir().unwrap();
        let store = store(d.path(), 300).await;
        let lookups = SiteLookups::new(store, table(), Duration::from_secs(10));
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
        let lookups = SiteLookups::new(store(d.path(), 3).await, table(), Duration::from_secs(5));
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
        let SiteStore::Sqlite(p) = &store else {
            unreachable!()
        };
        // A column compared case-insensitively, as MySQL's default collation does: the
        // batch's rows then do not equal their keys byte for byte.
        sqlx::query("CREATE TABLE ci (peer_id TEXT COLLATE NOCASE PRIMARY KEY, psk BLOB, remote_subnet TEXT, peer_address TEXT, backup_peer_address TEXT)")
            .execute(p)
            .await
            .unwrap();
        sqlx::query("INSERT INTO ci VALUES ('Upper.Sites', 'k', '10.9.0.0/24', NULL, NULL), ('lower.sites', 'k', '10.9.1.0/24', NULL, NULL)")
            .execute(p)
            .await
            .unwrap();
        let t = SiteTable {
            table: "ci".into(),
            ..table()
        };
        let lookups = SiteLookups::new(store.clone(), t.clone(), Duration::from_secs(5));
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
        let broken = SiteLookups::new(store.clone(), missing, Duration::from_secs(5));
        let (a, b) = tokio::join!(
            broken.by_peer_id("s1.sites", 24),
            broken.by_peer_id("s2.sites", 24)
        );
        assert!(matches!(a, Err(LookupError::Unreachable(_))), "{a:?}");
        assert!(matches!(b, Err(LookupError::Unreachable(_))), "{b:?}");
        let fine = SiteLookups::new(store, table(), Duration::from_secs(5));
        assert_eq!(fine.by_peer_id("s2.sites", 24).await.unwrap().peer_id, "s2.sites");
        // The slots were given back: later lookups on the broken table still get answers.
        assert!(broken.by_peer_id("s1.sites", 24).await.is_err());
        assert_eq!(lock(&broken.0.queues[0]).in_flight, 0);
    }

    #[test]
    fn statements_bind_every_value_and_bound_the_rows() {
        let sql = select_in(&table(), "peer_id", true, 4);
        assert!(sql.ends_with("WHERE `peer_id` IN (?, ?, ?, ?) LIMIT 9"), "{sql}");
        let sql = select_in(&table(), "remote_subnet", false, 1);
        assert!(sql.ends_with("WHERE \"remote_subnet\" IN (?) LIMIT 3"), "{sql}");
    }
}
