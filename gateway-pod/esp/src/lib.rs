//! ESP for the userspace data plane: tunnel-mode packets (RFC 4303) sealed and opened in the
//! caller's buffers, the anti-replay window with extended sequence numbers, and the RFC 3948
//! demultiplexing of UDP port 4500, traffic-selector checks and SA lifetimes. No sockets here:
//! the I/O workers own those.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod encap;
pub mod icmp;
pub mod ip;
pub mod mss;
pub mod packet;
pub mod replay;
pub mod sa;

pub use packet::{EspError, Inbound, Opened, Outbound, SendCounter, SharedInbound};
pub use replay::ReplayWindow;
