//! `--tcp-mss-clamp`: the MSS that TCP SYNs through a tunnel announce, lowered so that full
//! segments need no IP fragments on the way. In a fleet, a site's ESP packet whose flow
//! enters another member crosses the pod network in a frame that adds
//! [`concentrator_fleet::wire::OVERHEAD`] bytes: without the clamp, every full-size packet
//! of a 1500-byte site path is cut in two there, and fragments can be neither GSO'd nor
//! GRO'd (measured: the forwarded path's main cost, BENCHMARKS.md).

use std::str::FromStr;

use concentrator_esp::mss;

/// How the MSS of tunnelled TCP flows is clamped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MssClamp {
    /// Not clamped.
    #[default]
    Off,
    /// To at most this many bytes, on every tunnel.
    Fixed(u16),
    /// So that a full-size segment, sealed by the tunnel's transform, is an ESP datagram of
    /// at most this many bytes (in a fleet: what fits one frame on the pod network).
    Fit(usize),
}

/// What `--tcp-mss-clamp` says, before the fleet's MTU is known.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MssClampOption {
    /// In a fleet, [`MssClamp::Fit`] the pod network; standalone, off.
    #[default]
    Auto,
    Off,
    Fixed(u16),
}

impl FromStr for MssClampOption {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "off" => Ok(Self::Off),
            n => match n.parse::<u16>() {
                Ok(m) if m >= 536 => Ok(Self::Fixed(m)),
                _ => Err(format!("{n:?}: auto, off, or an MSS in bytes (at least 536)")),
            },
        }
    }
}

impl MssClampOption {
    /// The clamp to apply: `fleet_datagram` is the longest site datagram a frame carries
    /// unfragmented, in a fleet.
    pub fn resolve(self, fleet_datagram: Option<usize>) -> MssClamp {
        match (self, fleet_datagram) {
            (Self::Auto, Some(d)) => MssClamp::Fit(d),
            (Self::Auto | Self::Off, _) => MssClamp::Off,
            (Self::Fixed(m), _) => MssClamp::Fixed(m),
        }
    }
}

impl MssClamp {
    /// Clamps the SYN in `packet` (inner, about to be sealed or just opened) for a tunnel
    /// whose longest inner packet in `max_sealed` bytes of ESP `max_inner` says; whether it
    /// changed. Costs a few byte reads for any packet that is not a TCP SYN.
    pub fn apply(self, packet: &mut [u8], max_inner: impl FnOnce(usize) -> usize) -> bool {
        let max = match self {
            Self::Off => return false,
            Self::Fixed(m) => m,
            Self::Fit(datagram) => {
                if !mss::is_syn(packet) {
                    return false;
                }
                // IP and TCP headers without options: the MSS counts the payload alone.
                let headers = if packet.first().is_some_and(|b| b >> 4 == 6) {
                    40 + 20
                } else {
                    20 + 20
                };
                // Never below IPv4's minimum MSS, whatever a tiny pod MTU says.
                let inner = max_inner(datagram).saturating_sub(headers).max(536);
                u16::try_from(inner).unwrap_or(u16::MAX)
            }
        };
        mss::clamp(packet, max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_option_parses_and_resolves() {
        assert_eq!("auto".parse(), Ok(MssClampOption::Auto));
        assert_eq!("off".parse(), Ok(MssClampOption::Off));
        assert_eq!("1360".parse(), Ok(MssClampOption::Fixed(1360)));
        assert!("100".parse::<MssClampOption>().is_err());
        assert!("big".parse::<MssClampOption>().is_err());
        assert_eq!(MssClampOption::Auto.resolve(Some(1378)), MssClamp::Fit(1378));
        assert_eq!(MssClampOption::Auto.resolve(None), MssClamp::Off);
        assert_eq!(MssClampOption::Off.resolve(Some(1378)), MssClamp::Off);
        assert_eq!(MssClampOption::Fixed(1300).resolve(None), MssClamp::Fixed(1300));
    }
}
