//! Policy: which eroute a tunnel belongs to, and when we start one.
//!
//! - [`responder`]: the eroute a peer's identity selects, its key (a static eroute's Secret,
//!   or a site row looked up on a task of its own), and the proposal check.
//! - [`ownership`]: one IKE SA per static peer and per dynamic eroute, the egroup's table
//!   of dynamic eroutes and its LRU evictions.
//! - [`acquire`]: traffic toward a site without a tunnel: the site's row by subnet, then
//!   an IKE SA to it.
//! - [`locate`]: in a fleet, traffic toward a site we may not initiate to: the member that
//!   holds its tunnel, from its claim.
//! - [`auto`]: eroutes we keep up or connect on demand: backoff, redirects (RFC 5685).

mod acquire;
mod auto;
mod locate;
mod ownership;
mod responder;

pub(super) use acquire::PendingAcquires;
pub(super) use auto::AutoConnects;
pub(super) use locate::Located;
pub(super) use ownership::Owners;

use crate::sitedb::{LookupError, Site};

/// A finished site lookup, back on the IKE task: for a site that authenticates to us (`id`
/// is its SA), or for traffic toward a site (`id` is `None`, the initiator path).
pub(super) struct LookupDone {
    id: Option<u64>,
    egroup: String,
    base_eroute: String,
    result: Result<Site, LookupError>,
}
