//! `Egroup`: binds an eroute to a site database. Each row of the site table becomes a dynamic
//! eroute on demand.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{SecretKeyRef, ValidationError, duration};

/// Default bound on dynamic eroutes per gateway pod.
pub const DEFAULT_MAX_DYNAMIC_EROUTES: u32 = 10_000;
/// Default time a site lookup may take before the negotiation is refused.
pub const DEFAULT_DB_TIMEOUT: Duration = Duration::from_secs(2);

/// Binds an eroute to a table of sites.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "vpn.concentrator.io",
    version = "v1alpha1",
    kind = "Egroup",
    namespaced,
    status = "EgroupStatus",
    shortname = "eg",
    category = "concentrator",
    printcolumn = r#"{"name":"Eroute","type":"string","jsonPath":".spec.eroute"}"#,
    printcolumn = r#"{"name":"Prefix","type":"integer","jsonPath":".spec.remoteSubnetPrefix"}"#,
    printcolumn = r#"{"name":"Max","type":"integer","jsonPath":".spec.maxDynamicEroutes"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Dynamic","type":"integer","jsonPath":".status.dynamicEroutes"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct EgroupSpec {
    /// Name of the base `Eroute` (same namespace).
    #[schemars(length(min = 1, max = 253))]
    pub eroute: String,
    /// Prefix length of every site's remote subnet (all sites of a group share it): the
    /// initiator path looks a site up by `destination & mask`.
    #[schemars(range(max = 128))]
    pub remote_subnet_prefix: u8,
    /// Where the sites are.
    #[serde(default)]
    pub database: DatabaseSpec,
    /// Upper bound on dynamic eroutes of this group per gateway pod. Default: 10000.
    #[serde(default = "default_max", skip_serializing_if = "is_default_max")]
    #[schemars(range(min = 1))]
    pub max_dynamic_eroutes: u32,
}

fn default_max() -> u32 {
    DEFAULT_MAX_DYNAMIC_EROUTES
}

fn is_default_max(v: &u32) -> bool {
    *v == DEFAULT_MAX_DYNAMIC_EROUTES
}

/// Location and shape of the site table.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseSpec {
    /// Database URL without a password (`mysql://user@host/db`, `sqlite:/path`); a URL with
    /// a password is refused: put it in a Secret (`urlSecretRef`). Neither set: the gateway's
    /// embedded SQLite store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Secret key holding the database URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_secret_ref: Option<SecretKeyRef>,
    /// Table of sites. Default: `sites`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
    /// Column names of the site table.
    #[serde(default)]
    pub columns: ColumnsSpec,
    /// Longest a lookup may take (`2s`). Default: 2s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
}

/// Column names of the site table; each defaults to the name in the default schema. Peer ID,
/// PSK and remote subnet must exist in the table. The two address columns are optional: one
/// left unnamed is read where the table has its default name and as empty where it has not;
/// one named here must exist in the table.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ColumnsSpec {
    /// Default: `peer_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_id: Option<String>,
    /// Default: `psk`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psk: Option<String>,
    /// Default: `remote_subnet`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_subnet: Option<String>,
    /// Optional. Default: `peer_address`, if the table has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_address: Option<String>,
    /// Optional. Default: `backup_peer_address`, if the table has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_peer_address: Option<String>,
}

/// What the concentrator observed for an egroup.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EgroupStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Dynamic eroutes of this group across the fleet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dynamic_eroutes: Option<u64>,
    /// Failed site lookups since the pods started, across the fleet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lookup_failures: Option<u64>,
}

/// Where the site table lives, once validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DatabaseLocation {
    /// The gateway's embedded SQLite store under its data directory.
    Embedded,
    /// A URL given inline. Kept out of Debug output: it may hold a password.
    Url(RedactedUrl),
    /// A URL to be read from a Secret.
    Secret(SecretKeyRef),
}

/// A database URL whose Debug and Display hide everything but the scheme.
#[derive(Clone, PartialEq, Eq)]
pub struct RedactedUrl(String);

impl RedactedUrl {
    pub fn new(url: String) -> Self {
        Self(url)
    }

    /// The URL itself, for the one place that connects.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn scheme(&self) -> &str {
        self.0.split_once(':').map_or("", |(s, _)| s)
    }
}

impl std::fmt::Debug for RedactedUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://<redacted>", self.scheme())
    }
}

/// Site table layout, once validated: every identifier is safe to put in SQL text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SiteTable {
    pub table: String,
    pub peer_id: String,
    pub psk: String,
    pub remote_subnet: String,
    pub peer_address: OptionalColumn,
    pub backup_peer_address: OptionalColumn,
}

/// An optional column of the site table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OptionalColumn {
    pub name: String,
    /// The Egroup named it: the table must have it. Otherwise `name` is the default, read
    /// only where the table has it.
    pub named: bool,
}

impl OptionalColumn {
    /// A column the table must have.
    pub fn named(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            named: true,
        }
    }

    /// A default name, read where the table has it.
    pub fn default_name(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            named: false,
        }
    }
}

/// A validated egroup spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidatedEgroup {
    pub eroute: String,
    pub remote_subnet_prefix: u8,
    pub database: DatabaseLocation,
    pub site_table: SiteTable,
    pub timeout: Duration,
    pub max_dynamic_eroutes: u32,
}

/// URL schemes the site store can open.
pub const SUPPORTED_SCHEMES: &[&str] = &["mysql", "mariadb", "sqlite"];

/// Checks a database URL's scheme without ever echoing the URL (it may hold a password).
pub fn validate_db_url(field: &str, url: &str) -> Result<(), ValidationError> {
    let scheme = url.split_once(':').map(|(s, _)| s).unwrap_or("");
    if !SUPPORTED_SCHEMES.contains(&scheme) {
        let shown = if scheme.is_empty() || scheme.len() > 16 {
            "no scheme".to_owned()
        } else {
            format!("scheme '{scheme}'")
        };
        return Err(ValidationError::new(
            field,
            format!("database URL has {shown}; use mysql://, mariadb:// or sqlite:"),
        ));
    }
    Ok(())
}

/// Whether a database URL carries a password: in its user info (`user:pass@`), where an
/// unencoded `/` in the password must not hide it, or as a `password=` query parameter.
pub fn url_has_password(url: &str) -> bool {
    let Some((_, rest)) = url.split_once("://") else {
        return false;
    };
    let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
    let in_userinfo = before_query
        .rsplit_once('@')
        .and_then(|(userinfo, _)| userinfo.split_once(':'))
        .is_some_and(|(_, password)| !password.is_empty());
    let in_query = query.split('&').any(|kv| {
        let key = kv.split('=').next().unwrap_or_default();
        key.eq_ignore_ascii_case("password") || key.eq_ignore_ascii_case("pass")
    });
    in_userinfo || in_query
}

fn optional_column(
    field: &str,
    given: Option<&str>,
    default: &str,
) -> Result<OptionalColumn, ValidationError> {
    Ok(OptionalColumn {
        name: sql_identifier(field, given, default)?,
        named: given.is_some(),
    })
}

/// Table and column names go into SQL text (identifiers cannot be bound as parameters), so
/// they are held to a plain identifier syntax.
fn sql_identifier(field: &str, given: Option<&str>, default: &str) -> Result<String, ValidationError> {
    let name = given.unwrap_or(default);
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(name.to_owned())
    } else {
        Err(ValidationError::new(
            field,
            format!(
                "'{name}' is not a plain SQL identifier (letters, digits and '_', not starting with a digit, at most 64)"
            ),
        ))
    }
}

impl EgroupSpec {
    /// Validates the spec on its own; whether `eroute` exists is checked by the set.
    pub fn validate(&self) -> Result<ValidatedEgroup, ValidationError> {
        if !crate::secret::is_dns_subdomain(&self.eroute) {
            return Err(ValidationError::new(
                "spec.eroute",
                format!("'{}' is not a valid Eroute name", self.eroute),
            ));
        }
        if self.remote_subnet_prefix > 128 {
            return Err(ValidationError::new(
                "spec.remoteSubnetPrefix",
                format!(
                    "{} is not a prefix length (0-32 for IPv4, 0-128 for IPv6)",
                    self.remote_subnet_prefix
                ),
            ));
        }
        if self.max_dynamic_eroutes == 0 {
            return Err(ValidationError::new(
                "spec.maxDynamicEroutes",
                "must be at least 1",
            ));
        }
        let db = &self.database;
        let database = match (&db.url, &db.url_secret_ref) {
            (Some(_), Some(_)) => {
                return Err(ValidationError::new(
                    "spec.database",
                    "set either url or urlSecretRef, not both",
                ));
            }
            (Some(url), None) => {
                validate_db_url("spec.database.url", url)?;
                if url_has_password(url) {
                    return Err(ValidationError::new(
                        "spec.database.url",
                        "an inline database URL may not hold a password: it would be stored and \
                         shown in plain text (the Egroup, the gateways' rendered ConfigMap). Put \
                         the URL in a Secret and name it with urlSecretRef instead (kubectl \
                         create secret generic NAME --from-literal=url=mysql://...)",
                    ));
                }
                DatabaseLocation::Url(RedactedUrl::new(url.clone()))
            }
            (None, Some(r)) => {
                r.validate("spec.database.urlSecretRef")?;
                DatabaseLocation::Secret(r.clone())
            }
            (None, None) => DatabaseLocation::Embedded,
        };
        let c = &db.columns;
        let site_table = SiteTable {
            table: sql_identifier("spec.database.table", db.table.as_deref(), "sites")?,
            peer_id: sql_identifier("spec.database.columns.peerId", c.peer_id.as_deref(), "peer_id")?,
            psk: sql_identifier("spec.database.columns.psk", c.psk.as_deref(), "psk")?,
            remote_subnet: sql_identifier(
                "spec.database.columns.remoteSubnet",
                c.remote_subnet.as_deref(),
                "remote_subnet",
            )?,
            peer_address: optional_column(
                "spec.database.columns.peerAddress",
                c.peer_address.as_deref(),
                "peer_address",
            )?,
            backup_peer_address: optional_column(
                "spec.database.columns.backupPeerAddress",
                c.backup_peer_address.as_deref(),
                "backup_peer_address",
            )?,
        };
        let timeout = duration::parse_or("spec.database.timeout", db.timeout.as_deref(), DEFAULT_DB_TIMEOUT)?;
        Ok(ValidatedEgroup {
            eroute: self.eroute.clone(),
            remote_subnet_prefix: self.remote_subnet_prefix,
            database,
            site_table,
            timeout,
            max_dynamic_eroutes: self.max_dynamic_eroutes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> EgroupSpec {
        serde_yaml::from_str("eroute: branches\nremoteSubnetPrefix: 24\n").unwrap()
    }

    #[test]
    fn defaults_to_embedded_store_and_default_schema() {
        let v = spec().validate().unwrap();
        assert_eq!(v.database, DatabaseLocation::Embedded);
        assert_eq!(v.site_table.table, "sites");
        assert_eq!(v.site_table.peer_id, "peer_id");
        assert_eq!(
            v.site_table.peer_address,
            OptionalColumn::default_name("peer_address")
        );
        assert_eq!(v.max_dynamic_eroutes, DEFAULT_MAX_DYNAMIC_EROUTES);
        assert_eq!(v.timeout, DEFAULT_DB_TIMEOUT);
    }

    #[test]
    fn optional_columns_know_whether_they_were_named() {
        let mut s = spec();
        s.database.columns.peer_address = Some("addr".into());
        let t = s.validate().unwrap().site_table;
        assert_eq!(t.peer_address, OptionalColumn::named("addr"));
        assert_eq!(
            t.backup_peer_address,
            OptionalColumn::default_name("backup_peer_address")
        );
        let mut s = spec();
        s.database.columns.backup_peer_address = Some("a b".into());
        assert_eq!(
            s.validate().unwrap_err().field,
            "spec.database.columns.backupPeerAddress"
        );
    }

    #[test]
    fn rejects_sql_injection_in_identifiers() {
        let mut s = spec();
        s.database.columns.psk = Some("psk; DROP TABLE sites".into());
        assert_eq!(s.validate().unwrap_err().field, "spec.database.columns.psk");
        let mut s = spec();
        s.database.table = Some("1sites".into());
        assert_eq!(s.validate().unwrap_err().field, "spec.database.table");
    }

    #[test]
    fn rejects_url_and_secret_together_and_bad_scheme_without_leaking() {
        let mut s = spec();
        s.database.url = Some("mysql://u:p@h/db".into());
        s.database.url_secret_ref = Some(SecretKeyRef {
            name: "db".into(),
            key: "url".into(),
        });
        assert_eq!(s.validate().unwrap_err().field, "spec.database");
        let mut s = spec();
        s.database.url = Some("postgres://u:hunter2@h/db".into());
        let e = s.validate().unwrap_err();
        assert_eq!(e.field, "spec.database.url");
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    #[test]
    fn rejects_an_inline_url_with_a_password_and_says_use_the_secret() {
        for url in [
            "mysql://u:hunter2@db:3306/sites",
            "mariadb://u:hun/ter2@db/sites",
            "mysql://u@db/sites?password=hunter2",
        ] {
            let mut s = spec();
            s.database.url = Some(url.into());
            let e = s.validate().unwrap_err();
            assert_eq!(e.field, "spec.database.url", "{url}");
            let msg = e.to_string();
            assert!(msg.contains("urlSecretRef") && msg.contains("password"), "{msg}");
            assert!(!msg.contains("hunter2") && !msg.contains("ter2"), "{msg}");
        }
        for url in [
            "mysql://u@db/sites",
            "mysql://db/sites?socket=/run/mysqld.sock",
            "sqlite:/var/lib/sites.db",
        ] {
            let mut s = spec();
            s.database.url = Some(url.into());
            assert!(s.validate().is_ok(), "{url}");
        }
    }

    #[test]
    fn redacted_url_hides_password() {
        let u = RedactedUrl::new("mysql://u:hunter2@h/db".into());
        assert_eq!(format!("{u:?}"), "mysql://<redacted>");
    }

    #[test]
    fn rejects_bad_prefix_and_zero_max() {
        let mut s = spec();
        s.remote_subnet_prefix = 129;
        assert_eq!(s.validate().unwrap_err().field, "spec.remoteSubnetPrefix");
        let mut s = spec();
        s.max_dynamic_eroutes = 0;
        assert_eq!(s.validate().unwrap_err().field, "spec.maxDynamicEroutes");
    }
}
