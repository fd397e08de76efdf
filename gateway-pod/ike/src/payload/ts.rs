//! Traffic Selector payloads TSi and TSr (RFC 7296 section 3.13).

use std::net::{Ipv4Addr, Ipv6Addr};

use super::len_u8;
use crate::message::codepoints::TsType;
use crate::message::error::InvalidMessage;
use crate::message::reader::{OrTruncated, Reader, with_u16_len};

/// TSi or TSr payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ts<'a> {
    /// The traffic selectors.
    pub selectors: Vec<TrafficSelector<'a>>,
}

/// One traffic selector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrafficSelector<'a> {
    /// TS_IPV4_ADDR_RANGE.
    V4(TsRange<Ipv4Addr>),
    /// TS_IPV6_ADDR_RANGE.
    V6(TsRange<Ipv6Addr>),
    /// Another type (e.g. RFC 4595 Fibre Channel, RFC 9478 security labels), kept opaque.
    Other {
        /// TS Type.
        ts_type: TsType,
        /// The octet after the type (IP Protocol ID for address ranges, reserved otherwise).
        second: u8,
        /// Everything after the Selector Length field.
        data: &'a [u8],
    },
}

/// An address range with protocol and port range (RFC 7296 section 3.13.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TsRange<A> {
    /// IP Protocol ID (0: any).
    pub ip_proto: u8,
    /// Start Port.
    pub start_port: u16,
    /// End Port.
    pub end_port: u16,
    /// Starting Address.
    pub start: A,
    /// Ending Address.
    pub end: A,
}

/// Selector Length of an IPv4 range.
const V4_LEN: usize = 16;
/// Selector Length of an IPv6 range.
const V6_LEN: usize = 40;

/// The two address families of a range.
trait Addr: Sized {
    fn read(r: &mut Reader<'_>) -> Option<Self>;
    fn write(&self, out: &mut Vec<u8>);
}

impl Addr for Ipv4Addr {
    fn read(r: &mut Reader<'_>) -> Option<Self> {
        r.array::<4>().map(Self::from)
    }
    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.octets());
    }
}

impl Addr for Ipv6Addr {
    fn read(r: &mut Reader<'_>) -> Option<Self> {
        r.array::<16>().map(Self::from)
    }
    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.octets());
    }
}

fn decode_range<A: Addr>(ip_proto: u8, r: &mut Reader<'_>) -> Result<TsRange<A>, InvalidMessage> {
    let start_port = r.u16().or_truncated("traffic selector")?;
    let end_port = r.u16().or_truncated("traffic selector")?;
    let start = A::read(r).or_truncated("traffic selector")?;
    let end = A::read(r).or_truncated("traffic selector")?;
    Ok(TsRange {
        ip_proto,
        start_port,
        end_port,
        start,
        end,
    })
}

fn encode_range<A: Addr>(range: &TsRange<A>, out: &mut Vec<u8>) {
    out.extend_from_slice(&range.start_port.to_be_bytes());
    out.extend_from_slice(&range.end_port.to_be_bytes());
    range.start.write(out);
    range.end.write(out);
}

impl<'a> TrafficSelector<'a> {
    /// The TS Type.
    pub fn ts_type(&self) -> TsType {
        match self {
            Self::V4(_) => TsType::IPV4_ADDR_RANGE,
            Self::V6(_) => TsType::IPV6_ADDR_RANGE,
            Self::Other { ts_type, .. } => *ts_type,
        }
    }

    /// Decodes one traffic selector substructure.
    fn decode(r: &mut Reader<'a>) -> Result<Self, InvalidMessage> {
        let ts_type = TsType(r.u8().or_truncated("traffic selector")?);
        let second = r.u8().or_truncated("traffic selector")?;
        let len = usize::from(r.u16().or_truncated("traffic selector")?);
        // RFC 7296 section 3.13.1, Selector Length: "Specifies the length of this Traffic
        // Selector substructure including the header." Fixed for the address range types.
        let expected = match ts_type {
            TsType::IPV4_ADDR_RANGE => Some(V4_LEN),
            TsType::IPV6_ADDR_RANGE => Some(V6_LEN),
            _ => None,
        };
        if expected.is_some_and(|e| e != len) {
            return Err(InvalidMessage::BadLength("traffic selector"));
        }
        let body_len = len
            .checked_sub(4)
            .ok_or(InvalidMessage::BadLength("traffic selector"))?;
        let mut sub = r.sub(body_len).or_truncated("traffic selector")?;
        Ok(match ts_type {
            TsType::IPV4_ADDR_RANGE => Self::V4(decode_range(second, &mut sub)?),
            TsType::IPV6_ADDR_RANGE => Self::V6(decode_range(second, &mut sub)?),
            ts_type => Self::Other {
                ts_type,
                second,
                data: sub.rest(),
            },
        })
    }

    fn encode(&self, out: &mut Vec<u8>) {
        let second = match self {
            Self::V4(range) => range.ip_proto,
            Self::V6(range) => range.ip_proto,
            Self::Other { second, .. } => *second,
        };
        out.extend_from_slice(&[self.ts_type().0, second]);
        with_u16_len(out, 2, |out| match self {
            Self::V4(range) => encode_range(range, out),
            Self::V6(range) => encode_range(range, out),
            Self::Other { data, .. } => out.extend_from_slice(data),
        });
    }
}

impl<'a> Ts<'a> {
    /// Decodes a TSi or TSr payload body.
    pub fn decode(body: &'a [u8]) -> Result<Self, InvalidMessage> {
        let mut r = Reader::new(body);
        let count = r.u8().or_truncated("TS")?;
        r.take(3).or_truncated("TS")?;
        let selectors = (0..count)
            .map(|_| TrafficSelector::decode(&mut r))
            .collect::<Result<_, _>>()?;
        // "Number of TSs" and the payload length must agree.
        r.finish("traffic selectors")?;
        Ok(Self { selectors })
    }

    /// Appends the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&[len_u8(self.selectors.len()), 0, 0, 0]);
        for ts in &self.selectors {
            ts.encode(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::testing::{assert_prefixes_rejected, body};

    fn ts() -> Ts<'static> {
        Ts {
            selectors: vec![
                TrafficSelector::V4(TsRange {
                    ip_proto: 0,
                    start_port: 0,
                    end_port: 65535,
                    start: Ipv4Addr::new(10, 1, 0, 0),
                    end: Ipv4Addr::new(10, 1, 0, 255),
                }),
                TrafficSelector::V6(TsRange {
                    ip_proto: 17,
                    start_port: 500,
                    end_port: 500,
                    start: "2001:db8::".parse().unwrap(),
                    end: "2001:db8::ffff".parse().unwrap(),
                }),
                TrafficSelector::Other {
                    ts_type: TsType(10),
                    second: 0,
                    data: &[1, 2, 3],
                },
            ],
        }
    }

    #[test]
    fn round_trip() {
        let b = body(|o| ts().encode(o));
        assert_eq!(b.len(), 4 + 16 + 40 + 7);
        assert_eq!(&b[..12], &[3, 0, 0, 0, 7, 0, 0, 16, 0, 0, 0xff, 0xff]);
        assert_eq!(Ts::decode(&b), Ok(ts()));
    }

    #[test]
    fn rejects_truncated_ts() {
        assert_prefixes_rejected(&body(|o| ts().encode(o)), Ts::decode);
    }

    #[test]
    fn rejects_trailing_bytes_and_wrong_count() {
        let mut b = body(|o| ts().encode(o));
        b.push(0);
        assert_eq!(
            Ts::decode(&b),
            Err(InvalidMessage::TrailingBytes("traffic selectors"))
        );
        let mut b = body(|o| ts().encode(o));
        b[0] = 2;
        assert_eq!(
            Ts::decode(&b),
            Err(InvalidMessage::TrailingBytes("traffic selectors"))
        );
    }

    #[test]
    fn rejects_selector_length_not_matching_type() {
        let mut b = body(|o| ts().encode(o));
        b[7] = 40; // IPv4 range claiming the IPv6 length
        assert_eq!(Ts::decode(&b), Err(InvalidMessage::BadLength("traffic selector")));
        // An unknown type with a length below its own header.
        assert_eq!(
            Ts::decode(&[1, 0, 0, 0, 10, 0, 0, 3]),
            Err(InvalidMessage::BadLength("traffic selector"))
        );
    }
}
