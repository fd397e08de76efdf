//! The sans-IO IKEv2 engine of the concentrator. So far: the message codec of RFC 7296
//! section 3 (header, payload chain, every payload of the base protocol, plus RFC 7383
//! fragments).
//!
//! The crate is deterministic: no sockets, no clock, no threads and (for now) no crypto.
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

pub mod message;
pub mod payload;

pub use message::Message;
pub use message::codepoints::*;
pub use message::error::{InvalidMessage, notify_for};
pub use message::header::{Flags, Header};
pub use message::reader::Reader;
pub use payload::Payload;
