//! The sans-IO IKEv2 engine of the concentrator: the message codec of RFC 7296 section 3
//! (header, payload chain, every payload of the base protocol, plus RFC 7383 fragments) in
//! [`message`] and [`payload`]; proposal selection and our offers ([`negotiate`]); what both
//! roles of an IKE SA share ([`sa`]: one [`Config`], [`Event`] and [`Error`], the keys and
//! Message ID windows, CHILD SA and IKE SA rekeys, timers, and the [`sa::snapshot`] that
//! carries an established SA to another endpoint); the two handshakes ([`responder`],
//! [`initiator`], with PSK AUTH in [`auth`] and NAT detection in [`nat`]); and the
//! [`endpoint`] that routes datagrams to SAs by SPI. The cryptography is
//! `concentrator-crypto`.
//!
//! The crate is deterministic: no sockets, no clock, no threads; time is an argument and
//! randomness comes from the caller ([`responder::Entropy`]).
//! Decoding borrows the datagram and never panics on peer input: every length is read through
//! [`Reader`], which hands out sub-slices or `None`. Encoding cannot fail; it appends to a
//! `Vec<u8>` and fills in lengths and the next-payload chain. Codepoints are newtypes with named
//! constants, so values this crate does not know are data, not errors.
//!
//! ```
//! use concentrator_ike::{Message, Payload, PayloadType};
//! # let datagram: &[u8] = &[];
//! if let Ok(msg) = Message::decode(datagram) {
//!     for p in &msg.payloads {
//!         if let Payload::Nonce(n) = p {
//!             println!("nonce of {} bytes", n.data.len());
//!         }
//!     }
//! }
//! # let _ = PayloadType::SA;
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod auth;
pub mod endpoint;
pub mod error;
pub mod initiator;
pub mod message;
pub mod nat;
pub mod negotiate;
pub mod payload;
pub mod redirect;
pub mod responder;
pub mod sa;

pub use error::Error;
pub use initiator::Initiator;
pub use message::Message;
pub use message::codepoints::*;
pub use message::error::{InvalidMessage, notify_for};
pub use message::header::{Flags, Header};
pub use message::reader::Reader;
pub use payload::Payload;
pub use responder::{Config, Event, Responder};
pub use sa::{DeleteReason, Incoming};
