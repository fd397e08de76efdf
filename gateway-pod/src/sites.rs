//! `concentrator-gateway sites import FILE`, and the admin API's `ImportSites`: bulk-loads
//! sites from CSV into the site store. Every row is checked as a lookup would check it, and
//! the whole file goes in one transaction: a bad row names its line and nothing is written.
//! Both paths read the file with [`parse`], so they accept and refuse the same rows with the
//! same messages.

use std::path::Path;

use concentrator_crds::egroup::{OptionalColumn, SiteTable};

use crate::sitedb::{Site, SiteStore, check_row};

/// Errors of an import. Never carries a PSK.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read {0}: {1}")]
    Read(String, String),
    #[error("line {line}: {message}")]
    Row { line: u64, message: String },
    #[error(
        "the CSV header must name peer_id, psk and remote_subnet (optional: peer_address, backup_peer_address); missing {0}"
    )]
    Header(&'static str),
    #[error("site database: {0}")]
    Sql(#[from] sqlx::Error),
}

impl ImportError {
    /// The file is at fault (not the database): importing it again cannot succeed.
    pub fn is_bad_file(&self) -> bool {
        !matches!(self, Self::Sql(_))
    }
}

/// The default table layout, which imports write to.
pub fn default_table() -> SiteTable {
    SiteTable {
        table: "sites".into(),
        peer_id: "peer_id".into(),
        psk: "psk".into(),
        remote_subnet: "remote_subnet".into(),
        peer_address: OptionalColumn::default_name("peer_address"),
        backup_peer_address: OptionalColumn::default_name("backup_peer_address"),
    }
}

/// The sites of a CSV file, every row checked: what [`write`] puts in the store.
#[derive(Debug)]
pub struct Checked(Vec<Site>);

impl Checked {
    /// How many sites.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// No site (a header alone).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Reads and checks the CSV file at `path` (see [`parse`]).
pub fn read_file(path: &Path, prefix: Option<u8>) -> Result<Checked, ImportError> {
    let shown = path.display().to_string();
    let r = csv_reader()
        .from_path(path)
        .map_err(|e| ImportError::Read(shown.clone(), e.to_string()))?;
    check(r, &shown, prefix)
}

/// Checks the CSV in `csv`; `origin` names it in errors as the path does for a file. With
/// `prefix`, every subnet must have that prefix length (the Egroup's remoteSubnetPrefix).
pub fn parse(csv: &[u8], origin: &str, prefix: Option<u8>) -> Result<Checked, ImportError> {
    check(csv_reader().from_reader(csv), origin, prefix)
}

fn csv_reader() -> csv::ReaderBuilder {
    let mut b = csv::ReaderBuilder::new();
    b.trim(csv::Trim::All);
    b
}

fn check<R: std::io::Read>(
    mut r: csv::Reader<R>,
    shown: &str,
    prefix: Option<u8>,
) -> Result<Checked, ImportError> {
    let headers = r
        .headers()
        .map_err(|e| ImportError::Read(shown.to_owned(), e.to_string()))?
        .clone();
    let col = |name: &'static str| headers.iter().position(|h| h == name);
    let (Some(ip), Some(ik), Some(is)) = (col("peer_id"), col("psk"), col("remote_subnet")) else {
        let missing = ["peer_id", "psk", "remote_subnet"]
            .into_iter()
            .find(|n| col(n).is_none());
        return Err(ImportError::Header(missing.unwrap_or("peer_id")));
    };
    let (ia, ib) = (col("peer_address"), col("backup_peer_address"));
    let table = default_table();
    let mut sites = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for rec in r.records() {
        let rec = rec.map_err(|e| ImportError::Read(shown.to_owned(), e.to_string()))?;
        let line = rec.position().map_or(0, csv::Position::line);
        let get = |i: Option<usize>| {
            i.and_then(|i| rec.get(i))
                .map(str::to_owned)
                .filter(|s| !s.is_empty())
        };
        let raw = (
            get(Some(ip)),
            get(Some(ik)).map(String::into_bytes),
            get(Some(is)),
            get(ia),
            get(ib),
        );
        let subnet_prefix = raw
            .2
            .as_deref()
            .and_then(|s| s.parse::<ipnet::IpNet>().ok())
            .map(|n| n.prefix_len());
        let expected = prefix.or(subnet_prefix).unwrap_or(0);
        let site = check_row(&table, raw, expected).map_err(|e| ImportError::Row {
            line,
            message: e.to_string(),
        })?;
        if !seen.insert(site.peer_id.clone()) {
            return Err(ImportError::Row {
                line,
                message: format!("peer_id '{}' appears twice", site.peer_id),
            });
        }
        sites.push(site);
    }
    Ok(Checked(sites))
}

/// Writes `sites` into the default table in one transaction, replacing rows with the same
/// peer ID. Returns the number of sites written.
pub async fn write(store: &SiteStore, sites: &Checked) -> Result<usize, ImportError> {
    macro_rules! write_all {
        ($pool:expr, $sql:expr) => {{
            let mut tx = $pool.begin().await?;
            for s in &sites.0 {
                sqlx::query($sql)
                    .bind(&s.peer_id)
                    .bind(String::from_utf8_lossy(s.psk.expose()).into_owned())
                    .bind(s.remote_subnet.to_string())
                    .bind(&s.peer_address)
                    .bind(&s.backup_peer_address)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
        }};
    }
    match store {
        SiteStore::Sqlite(p) => write_all!(
            p,
            "INSERT INTO sites (peer_id, psk, remote_subnet, peer_address, backup_peer_address) VALUES (?, ?, ?, ?, ?) \
             ON CONFLICT(peer_id) DO UPDATE SET psk = excluded.psk, remote_subnet = excluded.remote_subnet, \
             peer_address = excluded.peer_address, backup_peer_address = excluded.backup_peer_address"
        ),
        SiteStore::MySql(p) => write_all!(
            p,
            "INSERT INTO sites (peer_id, psk, remote_subnet, peer_address, backup_peer_address) VALUES (?, ?, ?, ?, ?) \
             ON DUPLICATE KEY UPDATE psk = VALUES(psk), remote_subnet = VALUES(remote_subnet), \
             peer_address = VALUES(peer_address), backup_peer_address = VALUES(backup_peer_address)"
        ),
    }
    Ok(sites.len())
}

/// Imports `path` into the default table, replacing rows with the same peer ID. With
/// `prefix`, every subnet must have that prefix length (the Egroup's remoteSubnetPrefix).
/// Returns the number of sites written.
pub async fn import(store: &SiteStore, path: &Path, prefix: Option<u8>) -> Result<usize, ImportError> {
    write(store, &read_file(path, prefix)?).await
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    async fn store() -> (tempfile::TempDir, SiteStore) {
        let d = tempfile::tempdir().unwrap();
        let s = SiteStore::open_embedded(d.path()).await.unwrap();
        s.migrate().await.unwrap();
        (d, s)
    }

    fn csv(d: &tempfile::TempDir, body: impl AsRef<[u8]>) -> std::path::PathBuf {
        let p = d.path().join("sites.csv");
        std::fs::write(&p, body).unwrap();
        p
    }

    #[tokio::test]
    async fn imports_and_updates_sites() {
        let (d, s) = store().await;
        let f = csv(
            &d,
            "peer_id,psk,remote_subnet,peer_address\na.sites,k1,10.128.1.0/24,192.0.2.1\nb.sites,k2,10.128.2.0/24,\n",
        );
        assert_eq!(import(&s, &f, Some(24)).await.unwrap(), 2);
        let t = default_table();
        let b = s
            .site_by_peer_id(&t, "b.sites", 24, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!((b.psk.expose(), b.peer_address), (&b"k2"[..], None));
        let f = csv(&d, "peer_id,remote_subnet,psk\na.sites,10.128.9.0/24,new\n");
        assert_eq!(import(&s, &f, None).await.unwrap(), 1);
        let a = s
            .site_by_subnet(&t, "10.128.9.0/24".parse().unwrap(), Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!((a.peer_id.as_str(), a.psk.expose()), ("a.sites", &b"new"[..]));
        assert_eq!(s.count_sites().await.unwrap(), 2);
    }

    #[tokio::test]
    async fn a_bad_row_names_its_line_and_writes_nothing() {
        let (d, s) = store().await;
        let f = csv(
            &d,
            "peer_id,psk,remote_subnet\nok.sites,hunter2,10.128.1.0/24\nbad.sites,k,10.128.2.0/25\n",
        );
        let e = import(&s, &f, Some(24)).await.unwrap_err().to_string();
        assert!(e.starts_with("line 3:") && e.contains("remote_subnet"), "{e}");
        assert!(!e.contains("hunter2"));
        assert_eq!(s.count_sites().await.unwrap(), 0, "all or nothing");
        let f = csv(
            &d,
            "peer_id,psk,remote_subnet\nx,k,10.0.0.0/24\nx,k,10.0.1.0/24\n",
        );
        assert!(
            import(&s, &f, None)
                .await
                .unwrap_err()
                .to_string()
                .contains("appears twice")
        );
        let f = csv(&d, "peer,psk,remote_subnet\n");
        assert!(matches!(
            import(&s, &f, None).await,
            Err(ImportError::Header("peer_id"))
        ));
    }

    #[tokio::test]
    async fn bytes_and_files_are_checked_alike() {
        let (d, s) = store().await;
        for (body, prefix) in [
            (
                &b"peer_id,psk,remote_subnet\nok.sites,k,10.128.1.0/24\nbad.sites,k,10.128.2.0/25\n"[..],
                Some(24),
            ),
            (
                b"peer_id,psk,remote_subnet\nx,k,10.0.0.0/24\nx,k,10.0.1.0/24\n",
                None,
            ),
            (b"peer_id,psk,remote_subnet\nnopsk.sites,,10.0.0.0/24\n", None),
            (b"peer_id,remote_subnet\n", None),
            (b"", None),
            (b"peer_id,psk,remote_subnet\na,k,10.0.0.0/24,extra\n", None),
            (b"peer_id,psk,remote_subnet\na,k\xff,10.0.0.0/24\n", None),
        ] {
            let f = csv(&d, body);
            let from_file = read_file(&f, prefix).unwrap_err().to_string();
            let from_bytes = parse(body, &f.display().to_string(), prefix)
                .unwrap_err()
                .to_string();
            assert_eq!(from_file, from_bytes, "{}", String::from_utf8_lossy(body));
        }
        let sites = parse(
            b"peer_id,psk,remote_subnet,backup_peer_address\nb.sites,k,10.128.3.0/24,192.0.2.9\n",
            "-",
            Some(24),
        )
        .unwrap();
        assert_eq!(write(&s, &sites).await.unwrap(), 1);
        let b = s
            .site_by_peer_id(&default_table(), "b.sites", 24, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(b.backup_peer_address.as_deref(), Some("192.0.2.9"));
    }
}
