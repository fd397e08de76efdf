//! The VIP front's director (docs/fleet.md, "The VIP front"): one member, elected in etcd,
//! answers new sites that support RFC 5685 with a REDIRECT to the least-loaded member's own
//! stable address.
//!
//! The election is a key under the member's lease, `P/fleet/director` (its member ID),
//! created by compare-and-create: when the director's lease ends (the pod died, or a replica
//! revoked it), etcd deletes the key, every member's watch sees it go, and the first to
//! create it again directs. So a new director is in place within the lease TTL.
//!
//! Behind a Kubernetes Service a pod sees its own pod IP as the destination of whatever the
//! front DNAT'd to it, the VIP's flows and its per-pod Service's alike, so where a new site
//! goes is decided from the IKE_SA_INIT itself: one that announces REDIRECT_SUPPORTED and was
//! not redirected yet goes to the director; one with REDIRECTED_FROM was sent here by the
//! director and is served where it arrived; one without either is placed as in the SLB front.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use concentrator_fleet::MemberId;
use concentrator_fleet::director::address_in_file;
use concentrator_ike::redirect::inspect_init;
use etcd_client::{Compare, CompareOp, EventType, PutOptions, Txn, TxnOp, WatchOptions};
use tokio::sync::watch;

use super::forward::IkeRoute;
use super::view::{SharedView, View};
use super::{FleetError, FleetMetrics, SessionLease};

/// Pause before the election is tried again after an etcd error.
const RETRY: Duration = Duration::from_millis(500);

/// The VIP front.
#[derive(Clone, Copy, Debug)]
pub struct VipOptions {
    /// The address sites are configured with (`--fleet-vip`).
    pub address: IpAddr,
    /// Overloaded members redirect established sites (`--fleet-rebalance`).
    pub rebalance: bool,
    /// The director redirects new sites in IKE_AUTH, once authenticated
    /// (`--fleet-redirect-in-auth`), not in IKE_SA_INIT.
    pub in_auth: bool,
}

/// Where this member's own redirect address comes from.
#[derive(Debug, Default)]
pub enum RedirectAddress {
    /// None: the director never sends a site here.
    #[default]
    None,
    /// `--fleet-redirect-address`.
    Fixed(IpAddr),
    /// `--fleet-redirect-addresses-file`: the line of our member name, read again when the
    /// file changes (the operator fills it in as per-pod Services get their addresses).
    File {
        /// The file.
        path: PathBuf,
        /// Its modification time and our address in it when it was read last.
        seen: Mutex<Option<(SystemTime, Option<IpAddr>)>>,
    },
}

impl Clone for RedirectAddress {
    fn clone(&self) -> Self {
        match self {
            Self::None => Self::None,
            Self::Fixed(a) => Self::Fixed(*a),
            Self::File { path, .. } => Self::File {
                path: path.clone(),
                seen: Mutex::new(None),
            },
        }
    }
}

impl RedirectAddress {
    pub(super) fn from_cli(opts: &crate::cli::Options) -> Self {
        match (opts.fleet_redirect_address, &opts.fleet_redirect_addresses_file) {
            (Some(a), _) => Self::Fixed(a),
            (None, Some(path)) => Self::File {
                path: path.clone(),
                seen: Mutex::new(None),
            },
            (None, None) => Self::None,
        }
    }

    /// Our address now; member `member`'s line for a file.
    pub(super) fn resolve(&self, member: &str) -> Option<IpAddr> {
        let (path, seen) = match self {
            Self::None => return None,
            Self::Fixed(a) => return Some(*a),
            Self::File { path, seen } => (path, seen),
        };
        let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
        let last = seen.and_then(|(_, address)| address);
        // A file that cannot be read now (kubelet swaps a volume's files, an operator
        // mistake) keeps the address we had: only a file that says otherwise changes it, so
        // that the member does not stop being a redirect target for a moment's error.
        let Ok(modified) = std::fs::metadata(path).and_then(|m| m.modified()) else {
            return last;
        };
        // Read once per change of the file, not at every record the session builds.
        if let Some((at, address)) = *seen
            && at == modified
        {
            return address;
        }
        let Ok(text) = std::fs::read_to_string(path) else {
            return last;
        };
        let address = address_in_file(&text, member);
        if address.is_none() {
            tracing::warn!(file = %path.display(), member, "no redirect address for this member in the file yet");
        }
        *seen = Some((modified, address));
        address
    }
}

/// Where an IKE_SA_INIT request goes in the VIP front; `None`: as in the SLB front
/// (placement), for a site that does not support redirects, and for any site when there is
/// no VIP front or no director.
pub(super) fn route_init(view: &View, me: MemberId, datagram: &[u8]) -> Option<IkeRoute> {
    if !view.vip_front() {
        return None;
    }
    let init = inspect_init(datagram)?;
    if init.redirected {
        // The director sent it to our own address: served here, wherever placement would
        // put it, or the redirect would have been for nothing.
        return Some(IkeRoute::Local);
    }
    if !init.redirectable() {
        return None;
    }
    Some(match view.director()? {
        d if d == me => IkeRoute::Local,
        d => view
            .address(d)
            .map_or(IkeRoute::Local, |a| IkeRoute::Forward(d, a, 0)),
    })
}

/// Runs the director election while the fleet runs: in each etcd session, campaign, then
/// watch the key until it goes (and campaign again) or the session ends.
pub(super) async fn run(
    prefix: String,
    mut sessions: watch::Receiver<Option<SessionLease>>,
    view: SharedView,
    metrics: FleetMetrics,
    mut stop: watch::Receiver<bool>,
) {
    let key = format!("{}/fleet/director", prefix.trim_end_matches('/'));
    loop {
        let session = sessions.borrow_and_update().clone();
        let r = match session {
            Some(s) => tokio::select! {
                r = elect(&key, &s, &view, &metrics) => r,
                r = sessions.changed() => match r {
                    Ok(()) => Ok(()),
                    Err(_) => break,
                },
                _ = stop.changed() => break,
            },
            None => tokio::select! {
                r = sessions.changed() => match r {
                    Ok(()) => Ok(()),
                    Err(_) => break,
                },
                _ = stop.changed() => break,
            },
        };
        set_director(&view, &metrics, None);
        if let Err(e) = r {
            metrics.count_etcd_error("director");
            tracing::warn!(error = %e, "director election interrupted: trying again");
            tokio::select! {
                () = tokio::time::sleep(RETRY) => {}
                _ = stop.changed() => break,
            }
        }
    }
    set_director(&view, &metrics, None);
}

/// One session's election: never returns `Ok` (the session's end stops it from outside).
async fn elect(key: &str, s: &SessionLease, view: &View, metrics: &FleetMetrics) -> Result<(), FleetError> {
    let mut client = s.client.clone();
    loop {
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key,
                s.me.0.to_string(),
                Some(PutOptions::new().with_lease(s.lease)),
            )]);
        let won = client.txn(txn).await?;
        let (holder, revision) = if won.succeeded() {
            (Some(s.me), won.header().map_or(0, |h| h.revision()))
        } else {
            let got = client.get(key, None).await?;
            let holder = got.kvs().first().and_then(|kv| parse_member(kv.value()));
            (holder, got.header().map_or(0, |h| h.revision()))
        };
        set_director(view, metrics, holder);
        if holder.is_none() {
            // Deleted between the two requests: campaign again.
            continue;
        }
        let mut events = client
            .watch(key, Some(WatchOptions::new().with_start_revision(revision + 1)))
            .await?;
        'watch: loop {
            let resp = events.message().await?.ok_or(FleetError::WatchClosed)?;
            if resp.canceled() {
                return Err(FleetError::WatchClosed);
            }
            for ev in resp.events() {
                if ev.event_type() == EventType::Delete {
                    set_director(view, metrics, None);
                    break 'watch;
                }
                if let Some(kv) = ev.kv() {
                    set_director(view, metrics, parse_member(kv.value()));
                }
            }
        }
    }
}

/// Publishes the director, logging changes.
fn set_director(view: &View, metrics: &FleetMetrics, director: Option<MemberId>) {
    let before = view.director();
    view.set_director(director);
    let me = view.me();
    metrics
        .director
        .set(i64::from(director.is_some() && director == me));
    if before != director {
        match director {
            Some(d) if Some(d) == me => tracing::info!(member = %d, "elected VIP director"),
            Some(d) => tracing::info!(member = %d, "VIP director"),
            None => tracing::info!("no VIP director: new sites are placed as in the SLB front"),
        }
    }
}

fn parse_member(b: &[u8]) -> Option<MemberId> {
    let s = std::str::from_utf8(b).ok()?;
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    s.parse::<u16>()
        .ok()
        .filter(|n| *n <= MemberId::MAX)
        .map(MemberId)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IKE_SA_INIT request with `notifies` and a nonce.
    fn init(notifies: &[(concentrator_ike::NotifyType, &[u8])]) -> Vec<u8> {
        use concentrator_ike::payload::{Nonce, Notify, Payload};
        use concentrator_ike::{ExchangeType, Flags, Header, Message};
        let mut payloads: Vec<Payload<'_>> = notifies
            .iter()
            .map(|(t, d)| Payload::Notify(Notify::new(*t, d)))
            .collect();
        payloads.push(Payload::Nonce(Nonce { data: &[7; 32] }));
        Message {
            header: Header::new(9, 0, ExchangeType::IKE_SA_INIT, Flags::INITIATOR, 0),
            payloads,
        }
        .to_vec()
    }

    /// Members 0 and 1 in the view, member 0 (us) directing or not.
    fn view(vip: bool, director: Option<u16>) -> View {
        use concentrator_fleet::ShardMap;
        use concentrator_fleet::member::{Load, MemberRecord};
        let view = View::new();
        view.set_me(Some(MemberId(0)));
        let members = (0..2u8)
            .map(|n| {
                let r = MemberRecord {
                    name: format!("gw-{n}"),
                    address: std::net::SocketAddr::from(([10, 0, 0, n + 1], 4510)),
                    load: Load::default(),
                    map_version: 0,
                    occupied: concentrator_fleet::ShardSet::new().to_hex(),
                    admin: None,
                    redirect: None,
                };
                (MemberId(u16::from(n)), r)
            })
            .collect();
        view.apply(&ShardMap::new(), members);
        view.set_vip_front(vip);
        view.set_director(director.map(MemberId));
        view
    }

    #[test]
    fn new_sites_that_can_be_redirected_go_to_the_director() {
        use concentrator_ike::NotifyType;
        let me = MemberId(0);
        let fresh = init(&[(NotifyType::REDIRECT_SUPPORTED, &[])]);
        let from = concentrator_ike::redirect::encode_redirected_from(
            &concentrator_ike::redirect::GatewayId::Ip(IpAddr::from([192, 0, 2, 2])),
        );
        let sent_here = init(&[(NotifyType::REDIRECTED_FROM, &from)]);
        let plain = init(&[]);

        // The SLB front: placement decides.
        assert_eq!(route_init(&view(false, Some(1)), me, &fresh), None);
        // To the director, wherever it entered.
        assert_eq!(
            route_init(&view(true, Some(1)), me, &fresh),
            Some(IkeRoute::Forward(
                MemberId(1),
                "10.0.0.2:4510".parse().unwrap(),
                0
            ))
        );
        assert_eq!(
            route_init(&view(true, Some(0)), me, &fresh),
            Some(IkeRoute::Local)
        );
        // Sent here by the director: served here, whoever directs.
        assert_eq!(
            route_init(&view(true, Some(1)), me, &sent_here),
            Some(IkeRoute::Local)
        );
        // No redirect support, no director, or not an IKE_SA_INIT request: placement.
        assert_eq!(route_init(&view(true, Some(1)), me, &plain), None);
        assert_eq!(route_init(&view(true, None), me, &fresh), None);
        assert_eq!(route_init(&view(true, Some(1)), me, &fresh[..30]), None);
        assert_eq!(route_init(&view(true, Some(1)), me, b""), None);
    }

    #[test]
    fn director_values_parse_strictly() {
        assert_eq!(parse_member(b"2"), Some(MemberId(2)));
        assert_eq!(parse_member(b"00012"), Some(MemberId(12)));
        for bad in [&b""[..], b"-1", b"65535", b"123456", b"x", b"1 "] {
            assert_eq!(parse_member(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn redirect_addresses_come_from_the_flag_or_the_file() {
        assert_eq!(RedirectAddress::None.resolve("gw-0"), None);
        let a: IpAddr = "192.0.2.20".parse().unwrap();
        assert_eq!(RedirectAddress::Fixed(a).resolve("gw-0"), Some(a));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("addresses");
        let file = RedirectAddress::File {
            path: path.clone(),
            seen: Mutex::new(None),
        };
        assert_eq!(file.resolve("gw-1"), None);
        std::fs::write(&path, "gw-0 192.0.2.20\ngw-1 192.0.2.21\n").unwrap();
        assert_eq!(file.resolve("gw-1"), Some("192.0.2.21".parse().unwrap()));
        assert_eq!(file.clone().resolve("gw-0"), Some(a));
        // Gone for a moment: the address stays.
        std::fs::remove_file(&path).unwrap();
        assert_eq!(file.resolve("gw-1"), Some("192.0.2.21".parse().unwrap()));
        // A file that no longer names us takes it away.
        std::fs::write(&path, "gw-0 192.0.2.20\n# gw-1 went\n").unwrap();
        assert_eq!(file.resolve("gw-1"), None);
    }
}
