//! Which columns of a user's site table the lookups read. An Egroup maps peer ID, PSK and
//! remote subnet, which the table must have, and two optional address columns: one the Egroup
//! left at its default name is read where the table has it and as NULL where it has not; one
//! the Egroup named must be there. The table's columns are read from the database's catalogue
//! so that a missing column is a configuration error naming that column, found once, instead
//! of a failure of every lookup that the database reports as a bad query.

use concentrator_crds::egroup::{OptionalColumn, SiteTable};

use super::SiteStore;
use super::lookup::{LookupError, sql_error};

/// Which optional columns the table has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Present {
    pub peer_address: bool,
    pub backup_peer_address: bool,
}

impl Present {
    /// Every column the table names is there.
    pub const ALL: Self = Self {
        peer_address: true,
        backup_peer_address: true,
    };
}

/// The column names of `table` (none: there is no such table), from the database's own
/// catalogue: a prepared `SELECT *` would do, but a driver that caches prepared statements
/// answers with the columns the table had when it first prepared it.
pub(super) async fn columns(store: &SiteStore, table: &str) -> Result<Vec<String>, LookupError> {
    let names = match store {
        SiteStore::Sqlite(p) => {
            sqlx::query_scalar("SELECT name FROM pragma_table_info(?)")
                .bind(table)
                .fetch_all(p)
                .await
        }
        SiteStore::MySql(p) => {
            sqlx::query_scalar(
                // Byte for byte, as the server resolves a table name in a statement (on
                // Linux, where lower_case_table_names is 0); the catalogue's own collation
                // would ignore case.
                "SELECT COLUMN_NAME FROM information_schema.COLUMNS \
                 WHERE TABLE_SCHEMA = DATABASE() AND BINARY TABLE_NAME = ?",
            )
            .bind(table)
            .fetch_all(p)
            .await
        }
    }
    .map_err(|e| sql_error(table, e))?;
    if names.is_empty() {
        return Err(LookupError::Schema {
            table: table.to_owned(),
            reason: "the table does not exist".into(),
        });
    }
    Ok(names)
}

/// Checks `columns` (the table's) against what `t` maps; column names compare without case,
/// as both MySQL and SQLite compare them.
pub fn resolve(t: &SiteTable, columns: &[String]) -> Result<Present, LookupError> {
    let has = |name: &str| columns.iter().any(|c| c.eq_ignore_ascii_case(name));
    for (field, name) in [
        ("peerId", &t.peer_id),
        ("psk", &t.psk),
        ("remoteSubnet", &t.remote_subnet),
    ] {
        if !has(name) {
            return Err(missing(t, field, name));
        }
    }
    let optional = |field: &str, c: &OptionalColumn| match (has(&c.name), c.named) {
        (true, _) => Ok(true),
        (false, false) => Ok(false),
        (false, true) => Err(missing(t, field, &c.name)),
    };
    Ok(Present {
        peer_address: optional("peerAddress", &t.peer_address)?,
        backup_peer_address: optional("backupPeerAddress", &t.backup_peer_address)?,
    })
}

fn missing(t: &SiteTable, field: &str, column: &str) -> LookupError {
    LookupError::Schema {
        table: t.table.clone(),
        reason: format!("no column '{column}' (spec.database.columns.{field})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sitedb::testing::sqlite_with;
    use crate::sites::default_table;

    fn cols(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn optional_columns_at_their_default_name_may_be_missing() {
        let t = default_table();
        let p = resolve(&t, &cols(&["peer_id", "PSK", "remote_subnet", "peer_address"])).unwrap();
        assert_eq!(
            p,
            Present {
                peer_address: true,
                backup_peer_address: false
            }
        );
        let p = resolve(&t, &cols(&["peer_id", "psk", "remote_subnet"])).unwrap();
        assert!(!p.peer_address && !p.backup_peer_address);
    }

    #[test]
    fn rejects_a_missing_mandatory_or_named_column_naming_it() {
        let mut t = default_table();
        let e = resolve(&t, &cols(&["peer_id", "remote_subnet"])).unwrap_err();
        assert_eq!(e.kind(), "schema");
        assert!(
            e.to_string()
                .contains("no column 'psk' (spec.database.columns.psk)"),
            "{e}"
        );
        t.backup_peer_address = OptionalColumn::named("backup");
        let e = resolve(&t, &cols(&["peer_id", "psk", "remote_subnet"])).unwrap_err();
        assert!(
            e.to_string()
                .contains("site table 'sites': no column 'backup' (spec.database.columns.backupPeerAddress)"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn reads_the_columns_of_a_sqlite_table_and_names_a_missing_table() {
        let d = tempfile::tempdir().unwrap();
        let store = sqlite_with(
            d.path(),
            &["CREATE TABLE branch (name TEXT, secret BLOB, lan TEXT)"],
        )
        .await;
        assert_eq!(
            columns(&store, "branch").await.unwrap(),
            cols(&["name", "secret", "lan"])
        );
        let e = columns(&store, "nope").await.unwrap_err();
        assert!(
            matches!(e, LookupError::Schema { ref table, .. } if table == "nope"),
            "{e:?}"
        );
    }
}
