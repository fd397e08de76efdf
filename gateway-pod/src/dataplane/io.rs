//! The data plane's only syscalls: the TUN device (tun-rs, vnet-hdr offloads) and the UDP
//! socket (quinn-udp: UDP GSO on send, GRO and recvmmsg on receive).

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Most bytes of ESP one GSO send carries: a UDP datagram's length field is 16 bits, and the
/// kernel counts the whole batch against it.
pub(crate) const MAX_GSO_BYTES: usize = 65_000;

/// The longest datagram (or GRO batch of datagrams) the kernel hands to one receive buffer.
pub(crate) const RECV_BUF_LEN: usize = 65_536;

/// Socket buffer sizes asked for: a GRO batch is up to 64 KiB, and a burst of a few
/// multi-Gbit/s flows fills the kernel's default (about 200 KiB) in well under a
/// millisecond, which then drops whole batches (`UdpRcvbufErrors`).
const SOCKET_BUFFER: usize = 16 << 20;

/// The port-4500 socket with its offload state. Shared by the data plane's workers; the
/// control plane keeps sending IKE messages on the same socket with plain `send_to`.
pub(crate) struct Udp {
    sock: Arc<UdpSocket>,
    state: UdpSocketState,
}

impl Udp {
    /// Turns on GRO (and reads back what GSO the kernel offers) on an open socket.
    pub(crate) fn new(sock: Arc<UdpSocket>) -> io::Result<Self> {
        let state = UdpSocketState::new(UdpSockRef::from(&*sock))?;
        for (force, plain) in [
            (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
            (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
        ] {
            // Beyond net.core.[rw]mem_max only with CAP_NET_ADMIN (which the TUN device
            // needs anyway); otherwise as much as the limit allows. Too small a buffer
            // costs throughput, not correctness, so a refusal is no error.
            if set_int_option(&sock, libc::SOL_SOCKET, force, SOCKET_BUFFER).is_err() {
                let _ = set_int_option(&sock, libc::SOL_SOCKET, plain, SOCKET_BUFFER);
            }
        }
        // quinn-udp forbids fragmentation (DF, for QUIC's path MTU probing). An ESP packet
        // too long for the path is better fragmented on the way than lost, as it was before
        // GSO: no DF on the outer IPv4 header. GSO sends are cut at the device MTU either way.
        if sock.local_addr()?.is_ipv4() {
            set_int_option(
                &sock,
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                libc::IP_PMTUDISC_DONT as usize,
            )?;
        }
        Ok(Self { sock, state })
    }

    /// Our address on the outer side (unspecified when bound to any).
    pub(crate) fn local_ip(&self) -> std::net::IpAddr {
        self.sock
            .local_addr()
            .map_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), |a| a.ip())
    }

    /// How many equal-sized datagrams one send may carry (1 without GSO).
    pub(crate) fn max_gso_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    /// Receives one or more buffers, each holding one datagram or a GRO batch of datagrams
    /// of `meta.stride` bytes (the last one may be shorter).
    pub(crate) async fn recv(&self, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta]) -> io::Result<usize> {
        self.sock
            .async_io(Interest::READABLE, || {
                self.state.recv(UdpSockRef::from(&*self.sock), bufs, meta)
            })
            .await
    }

    /// Sends `contents` to `to`: one datagram, or with `segment` a GSO batch of datagrams of
    /// `segment` bytes each (the last may be shorter).
    pub(crate) async fn send(
        &self,
        to: SocketAddr,
        contents: &[u8],
        segment: Option<usize>,
    ) -> io::Result<()> {
        let transmit = Transmit {
            destination: to,
            ecn: None,
            contents,
            segment_size: segment,
            src_ip: None,
        };
        self.sock
            .async_io(Interest::WRITABLE, || {
                self.state.try_send(UdpSockRef::from(&*self.sock), &transmit)
            })
            .await
    }
}

/// Binds a UDP socket of the data plane: with SO_REUSEPORT, so that each worker can have its
/// own socket on the same port (the kernel hashes each peer's address to one of them), and
/// the IKE control plane sends on the first.
pub fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    set_fd_option(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    UdpSocket::from_std(sock.into())
}

fn set_int_option(sock: &UdpSocket, level: libc::c_int, name: libc::c_int, value: usize) -> io::Result<()> {
    set_fd_option(sock.as_raw_fd(), level, name, value)
}

fn set_fd_option(
    fd: std::os::fd::RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: usize,
) -> io::Result<()> {
    let value = libc::c_int::try_from(value).unwrap_or(libc::c_int::MAX);
    // Safety: the caller's descriptor is open while it is borrowed for this call, and the
    // option value points to a live c_int whose size is passed along.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
