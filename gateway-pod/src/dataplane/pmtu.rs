//! How long an outer datagram toward a peer may be: the kernel's path MTU for that
//! destination (the MTU of the route's device, or less once the kernel learnt a smaller
//! path MTU), asked of a UDP socket connected to the peer (`IP_MTU`, `IPV6_MTU`) when the SA
//! first carries a packet, and asked again every [`REFRESH`] while it carries traffic. (Not
//! when the SA is installed: asking takes a socket of its own, which cost each data plane
//! thread more than the rest of an install, for SAs that may never carry a packet.)

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// How often a peer's path MTU is asked again (a route or a device MTU may change).
const REFRESH: Duration = Duration::from_secs(10);

/// What is assumed when the kernel cannot say (no route yet): Ethernet.
const FALLBACK_MTU: usize = 1500;

/// The path MTU toward one peer, as last asked.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PathMtu {
    mtu: usize,
    /// When the kernel was last asked; `None`: not yet.
    checked: Option<Instant>,
}

impl PathMtu {
    /// Not asked yet: the first [`Self::get`] asks.
    pub(crate) fn unprobed() -> Self {
        Self {
            mtu: FALLBACK_MTU,
            checked: None,
        }
    }

    /// Asks the kernel now.
    pub(crate) fn probe(local: IpAddr, peer: SocketAddr, now: Instant) -> Self {
        Self {
            mtu: query(local, peer).unwrap_or(FALLBACK_MTU),
            checked: Some(now),
        }
    }

    /// The path MTU, asked if never asked or if the last answer is older than [`REFRESH`].
    pub(crate) fn get(&mut self, local: IpAddr, peer: SocketAddr, now: Instant) -> usize {
        if self
            .checked
            .is_none_or(|c| now.saturating_duration_since(c) >= REFRESH)
        {
            *self = Self::probe(local, peer, now);
        }
        self.mtu
    }
}

/// Bytes the outer IP header and (unless `raw`, plain ESP) UDP header add to an ESP packet
/// toward `peer`.
pub(crate) fn outer_overhead(peer: SocketAddr, raw: bool) -> usize {
    let ip = match peer {
        SocketAddr::V4(_) => 20,
        SocketAddr::V6(_) => 40,
    };
    if raw { ip } else { ip + 8 }
}

fn query(local: IpAddr, peer: SocketAddr) -> io::Result<usize> {
    // The same source address as the data plane's socket, so the same route is asked about.
    let bind = match (local, peer) {
        (IpAddr::V4(a), SocketAddr::V4(_)) => SocketAddr::new(IpAddr::V4(a), 0),
        (IpAddr::V6(a), SocketAddr::V6(_)) => SocketAddr::new(IpAddr::V6(a), 0),
        (_, SocketAddr::V4(_)) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        (_, SocketAddr::V6(_)) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
    };
    let sock = std::net::UdpSocket::bind(bind)?;
    sock.connect(peer)?;
    let (level, name) = match peer {
        SocketAddr::V4(_) => (libc::IPPROTO_IP, libc::IP_MTU),
        SocketAddr::V6(_) => (libc::IPPROTO_IPV6, libc::IPV6_MTU),
    };
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // Safety: the descriptor is open while `sock` lives; `value` and `len` are live locals
    // of the size passed, which the kernel writes at most.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&raw mut value).cast(),
            &raw mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    usize::try_from(value)
        .ok()
        .filter(|m| *m >= 68)
        .ok_or_else(|| io::Error::other("implausible path MTU"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_path_mtu_is_the_loopback_devices() {
        let now = Instant::now();
        let mut p = PathMtu::probe(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            "127.0.0.1:4500".parse().unwrap(),
            now,
        );
        // The loopback device's MTU is 65536 by default; what matters is that it was asked.
        assert!(
            p.get(
                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                "127.0.0.1:4500".parse().unwrap(),
                now
            ) > FALLBACK_MTU
        );
        // Installed without asking: the first packet asks.
        let mut lazy = PathMtu::unprobed();
        assert!(lazy.checked.is_none());
        assert!(
            lazy.get(
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                "127.0.0.1:4500".parse().unwrap(),
                now
            ) > FALLBACK_MTU
        );
        assert_eq!(lazy.checked, Some(now));
        assert_eq!(outer_overhead("192.0.2.1:4500".parse().unwrap(), false), 28);
        assert_eq!(outer_overhead("[2001:db8::1]:4500".parse().unwrap(), false), 48);
        assert_eq!(outer_overhead("192.0.2.1:4500".parse().unwrap(), true), 20);
    }
}
