//! The fleet's sans-IO core (DESIGN.md §5): what gateway pods agree on through etcd and
//! send each other, with no socket, clock or etcd client inside, so that every decoder can be
//! fuzzed and every decision tested as a function.
//!
//! - [`shard`]: the 1024 shards and the fixed SPI bits that carry them, so any pod maps an
//!   IKE or ESP packet to its shard with no lookup.
//! - [`member`]: a member's ID and the record it keeps under its etcd lease (address, load,
//!   which shards hold SAs).
//! - [`map`]: the shard map (`shard -> owner, epoch`, and moves in progress), its binary
//!   codec, and [`map::plan`], the elected leader's pure decision of the next map.
//! - [`replication`]: the stream on which a shard's owner replicates its SAs to the shard's
//!   replica, and [`map::replica`], which member that is.
//! - [`director`]: the VIP front's director, which picks by load the member a new site is
//!   redirected to.
//! - [`wire`]: the frames pods forward packets in, authenticated and encrypted with keys
//!   derived from the fleet key.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod director;
pub mod map;
pub mod member;
pub mod replication;
pub mod shard;
pub mod wire;

pub use map::ShardMap;
pub use member::MemberId;
pub use shard::{SHARDS, Shard, ShardSet};
