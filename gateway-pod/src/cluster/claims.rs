//! Sites claimed by one pod at a time.
//!
//! A site (the peer ID of a dynamic eroute, or a peer of a static eroute) is held by exactly
//! one pod: the pod that would hold it creates `P/sites/<scope>/<peer>` with its member ID,
//! under its lease, in a compare-and-create transaction, so of two pods racing for a site
//! one wins and the other learns who did. The claim ends with the SA (released), with the
//! pod (its lease), or when the site's dynamic eroute is evicted or idles out.

use std::fmt;
use std::time::{Duration, Instant};

use concentrator_fleet::MemberId;
use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};
use tokio::sync::watch;

use super::session::Keys;
use super::view::SharedView;
use super::{FleetError, FleetMetrics, SessionLease};
use crate::metrics::ReasonLabel;

/// How long a claim may wait for etcd before the site is refused (its IKE_AUTH waits that
/// long at most; the peer retransmits after 2 s or more).
const CLAIM_TIMEOUT: Duration = Duration::from_millis(1500);

/// A site's name in etcd: its scope (egroup or eroute) and peer ID, percent-escaped so that
/// any peer ID (slashes, spaces, `=` in a DN) makes one key.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SiteKey(String);

impl SiteKey {
    /// A key as [`fmt::Display`] wrote it (carried beside a replicated SA).
    pub fn from_raw(key: String) -> Self {
        Self(key)
    }

    /// The key of `peer_id` in `scope`.
    pub fn new(scope: &str, peer_id: &str) -> Self {
        Self(format!("{}/{}", escape(scope), escape(peer_id)))
    }
}

impl fmt::Display for SiteKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SiteKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SiteKey({})", self.0)
    }
}

/// Puts our claim on `key` (our member ID, under our lease) if `compare` holds.
fn claim_if(key: &str, me: MemberId, lease: i64, compare: Compare) -> Txn {
    Txn::new().when([compare]).and_then([TxnOp::put(
        key,
        me.0.to_string(),
        Some(PutOptions::new().with_lease(lease)),
    )])
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.@".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The member a claim's value names, if it names one.
fn member_of(value: &[u8]) -> Option<MemberId> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|n| *n <= MemberId::MAX)
        .map(MemberId)
}

/// The outcome of a claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claimed {
    /// The site is ours now.
    Won,
    /// It was ours already.
    Mine,
    /// Another member holds it.
    HeldBy(MemberId),
}

/// Claims and releases sites (cheap to clone).
#[derive(Clone)]
pub struct Claims {
    keys: Keys,
    lease: watch::Receiver<Option<SessionLease>>,
    view: SharedView,
    metrics: FleetMetrics,
}

impl fmt::Debug for Claims {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Claims")
            .field("prefix", &self.keys.sites)
            .finish_non_exhaustive()
    }
}

impl Claims {
    pub(super) fn new(
        prefix: &str,
        lease: watch::Receiver<Option<SessionLease>>,
        view: SharedView,
        metrics: FleetMetrics,
    ) -> Self {
        Self {
            keys: Keys::new(prefix),
            lease,
            view,
            metrics,
        }
    }

    fn session(&self) -> Result<SessionLease, FleetError> {
        match &*self.lease.borrow() {
            Some(s) if self.view.available() => Ok(s.clone()),
            _ => Err(FleetError::Unavailable),
        }
    }

    /// The session to claim `site` in, and the site's key in etcd.
    fn session_for(&self, site: &SiteKey) -> Result<(SessionLease, String), FleetError> {
        Ok((self.session()?, format!("{}{}", self.keys.sites, site.0)))
    }

    /// Claims `site` for this pod.
    pub async fn claim(&self, site: &SiteKey) -> Result<Claimed, FleetError> {
        let started = Instant::now();
        let r = match tokio::time::timeout(CLAIM_TIMEOUT, self.try_claim(site)).await {
            Ok(r) => r,
            Err(_) => Err(FleetError::Timeout),
        };
        self.metrics.claim_seconds.inc_by(started.elapsed().as_secs_f64());
        let label = match &r {
            Ok(Claimed::Won) => "won",
            Ok(Claimed::Mine) => "mine",
            Ok(Claimed::HeldBy(_)) => "held",
            Err(FleetError::Unavailable) => "unavailable",
            Err(e) => {
                self.metrics.count_etcd_error(e.kind());
                "error"
            }
        };
        self.metrics
            .claims
            .get_or_create(&ReasonLabel { reason: label.into() })
            .inc();
        r
    }

    async fn try_claim(&self, site: &SiteKey) -> Result<Claimed, FleetError> {
        let (
            SessionLease {
                mut client,
                me,
                lease,
            },
            key,
        ) = self.session_for(site)?;
        let put_if = |compare: Compare| claim_if(&key, me, lease, compare);
        // Twice at most: a claim released between our compare and our read is tried again.
        for _ in 0..2 {
            let created = put_if(Compare::create_revision(key.as_str(), CompareOp::Equal, 0))
                .or_else([TxnOp::get(key.as_str(), None)]);
            let resp = client.txn(created).await?;
            if resp.succeeded() {
                return Ok(Claimed::Won);
            }
            let held = resp.op_responses().into_iter().find_map(|r| match r {
                TxnOpResponse::Get(g) => g.kvs().first().cloned(),
                _ => None,
            });
            let Some(kv) = held else { continue };
            let holder = member_of(kv.value());
            match holder {
                Some(h) if h == me && kv.lease() == lease => return Ok(Claimed::Mine),
                Some(h) if h != me => return Ok(Claimed::HeldBy(h)),
                Some(_) => {}
                None => {
                    self.metrics.count_bad_record("claim");
                    tracing::warn!(site = %site, "a site claim in etcd does not name a member: replaced");
                }
            }
            // Ours from an earlier session (same member ID, older lease: moved to this one,
            // so that it ends with this session), or garbled: taken over at that revision.
            let at = Compare::mod_revision(key.as_str(), CompareOp::Equal, kv.mod_revision());
            if client.txn(put_if(at)).await?.succeeded() {
                return Ok(if holder.is_some() {
                    Claimed::Mine
                } else {
                    Claimed::Won
                });
            }
        }
        Err(FleetError::Contended)
    }

    /// Takes `site` over from `from`, which held it when we claimed it: the site has since
    /// authenticated here (a site that restarted and came back through another member), so
    /// the newest IKE SA holds it. Nothing changes if `from` no longer holds it.
    pub async fn take_over(&self, site: &SiteKey, from: MemberId) -> Result<bool, FleetError> {
        let (
            SessionLease {
                mut client,
                me,
                lease,
            },
            key,
        ) = self.session_for(site)?;
        let txn = claim_if(
            &key,
            me,
            lease,
            Compare::value(key.as_str(), CompareOp::Equal, from.0.to_string()),
        );
        let taken = tokio::time::timeout(CLAIM_TIMEOUT, client.txn(txn))
            .await
            .map_err(|_| FleetError::Timeout)??
            .succeeded();
        if taken {
            self.metrics
                .claims
                .get_or_create(&ReasonLabel {
                    reason: "taken_over".into(),
                })
                .inc();
        }
        Ok(taken)
    }

    /// The member that holds `site`, if one does: a read, which claims nothing (traffic
    /// toward a site we may not initiate to only learns where its tunnel is).
    pub async fn holder(&self, site: &SiteKey) -> Result<Option<MemberId>, FleetError> {
        let r = match tokio::time::timeout(CLAIM_TIMEOUT, self.read_holder(site)).await {
            Ok(r) => r,
            Err(_) => Err(FleetError::Timeout),
        };
        if let Err(e) = &r
            && !matches!(e, FleetError::Unavailable)
        {
            self.metrics.count_etcd_error(e.kind());
        }
        r
    }

    async fn read_holder(&self, site: &SiteKey) -> Result<Option<MemberId>, FleetError> {
        let (SessionLease { mut client, .. }, key) = self.session_for(site)?;
        let resp = client.get(key.as_str(), None).await?;
        let Some(kv) = resp.kvs().first() else {
            return Ok(None);
        };
        let holder = member_of(kv.value());
        if holder.is_none() {
            // Names no member: nobody to send the traffic to (the next claim replaces it).
            self.metrics.count_bad_record("claim");
        }
        Ok(holder)
    }

    /// Changes each time this pod's etcd session begins anew (a new lease): the claims of
    /// the old one end with its lease, so the sites held must be claimed again.
    pub(crate) fn sessions(&self) -> watch::Receiver<Option<SessionLease>> {
        self.lease.clone()
    }

    /// Gives `site` up, if it is ours.
    pub async fn release(&self, site: &SiteKey) -> Result<(), FleetError> {
        let SessionLease { mut client, me, .. } = match &*self.lease.borrow() {
            Some(s) => s.clone(),
            None => return Err(FleetError::Unavailable),
        };
        let key = format!("{}{}", self.keys.sites, site.0);
        let txn = Txn::new()
            .when([Compare::value(key.as_str(), CompareOp::Equal, me.0.to_string())])
            .and_then([TxnOp::delete(key.as_str(), None)]);
        tokio::time::timeout(CLAIM_TIMEOUT, client.txn(txn))
            .await
            .map_err(|_| FleetError::Timeout)??;
        Ok(())
    }
}
