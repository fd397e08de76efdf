//! The fleet (DESIGN.md §5), not written yet: this room is where it goes, so that it does
//! not grow inside the IKE driver ([`crate::control`]).
//!
//! What will live here:
//! - **Membership**: an etcd lease per pod (TTL about 3 s), its small member ID (the
//!   StatefulSet ordinal) and load reports under the lease. etcd holds membership, ownership
//!   and elections only: never per-packet or per-message state, never SA keys.
//! - **Shard ownership**: the shard map `shard -> owner, replica, epoch` written by an
//!   elected leader and watched by every pod; a site claimed by a compare-and-create
//!   transaction, so that two pods never own one dynamic eroute.
//! - **SPI routing and forwarding**: every SPI a pod allocates carries its shard; IKE or ESP
//!   for another shard's SA is forwarded to its owner over the pod network, and the answer
//!   goes back out through the pod that received the flow.
//! - **SA replication and takeover**: each shard's SAs streamed to its replica (snapshots at
//!   setup and rekey, message IDs, inbound high-water marks, deletes), outbound sequence
//!   numbers reserved ahead, hand-over on scale-in, rekeys after a takeover.
//! - **Redirect decisions** (VIP mode): the elected director's choice of the least-loaded
//!   pod for new sites (today a fixed `--redirect-to`).
//!
//! Where the driver will call it, room by room (`crate::control::*`):
//! - `driver`: before a datagram reaches the engine, to forward one for another shard's SA
//!   (and to send back out what the owner answers);
//! - `policy`: to claim a site's dynamic eroute before it is authenticated or acquired,
//!   and to release it with the SA; to pick where a new site is redirected;
//! - `events` and `install`: on IKE and CHILD SA establishment, rekey and deletion, to
//!   replicate the SA to its shard's replica.
//!
//! The cluster will run on tasks of its own and exchange values with the driver over
//! channels, as the site lookups and the route installer do: the IKE task never waits for
//! etcd or a peer pod.
