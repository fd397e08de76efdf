//! The data plane's only syscalls: the TUN device (tun-rs, vnet-hdr offloads) and the UDP
//! socket (quinn-udp: GRO and recvmmsg on receive; `sendmmsg` with a UDP GSO segment size
//! per message on send), or a raw socket of IP protocol 50 for plain ESP (RFC 4303 without
//! the RFC 3948 encapsulation).

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use quinn_udp::{RecvMeta, UdpSockRef, UdpSocketState};
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
pub(crate) const SOCKET_BUFFER: usize = 16 << 20;

/// The port-4500 socket with its offload state (or a raw ESP socket). Shared by the data
/// plane's workers; the control plane keeps sending IKE messages on the same socket with
/// plain `send_to`.
pub(crate) struct Udp {
    sock: Arc<UdpSocket>,
    /// `None` for a raw ESP socket: one packet per call, no offloads.
    state: Option<UdpSocketState>,
}

/// IP protocol number of ESP.
const IPPROTO_ESP: i32 = 50;

/// Opens a raw socket of IP protocol 50 on `local` for plain ESP. (Kept in a tokio
/// `UdpSocket`, whose `send_to`/`recv_from` are plain `sendto`/`recvfrom`, which is all a raw
/// socket needs; [`Udp::new`] tells the two kinds apart.) Every raw socket of a protocol gets
/// a copy of each packet, so there is one per data plane, not one per worker.
pub fn bind_raw_esp(local: std::net::IpAddr) -> io::Result<UdpSocket> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(SocketAddr::new(local, 0)),
        socket2::Type::RAW,
        Some(socket2::Protocol::from(IPPROTO_ESP)),
    )?;
    sock.set_nonblocking(true)?;
    sock.bind(&SocketAddr::new(local, 0).into())?;
    UdpSocket::from_std(sock.into())
}

/// Is this a raw socket (plain ESP) rather than a UDP one?
pub(crate) fn is_raw(sock: &UdpSocket) -> bool {
    socket2::SockRef::from(sock)
        .r#type()
        .is_ok_and(|t| t == socket2::Type::RAW)
}

impl Udp {
    /// Turns on GRO (and reads back what GSO the kernel offers) on an open socket.
    pub(crate) fn new(sock: Arc<UdpSocket>) -> io::Result<Self> {
        if is_raw(&sock) {
            return Ok(Self { sock, state: None });
        }
        let state = Some(UdpSocketState::new(UdpSockRef::from(&*sock))?);
        grow_buffers(&sock, SOCKET_BUFFER);
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

    /// Our address and port on the outer side (unspecified when unknown).
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.sock
            .local_addr()
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Our address on the outer side (unspecified when bound to any).
    pub(crate) fn local_ip(&self) -> std::net::IpAddr {
        self.sock
            .local_addr()
            .map_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), |a| a.ip())
    }

    /// How many equal-sized datagrams one send may carry (1 without GSO).
    pub(crate) fn max_gso_segments(&self) -> usize {
        self.state.as_ref().map_or(1, UdpSocketState::max_gso_segments)
    }

    /// Datagrams dropped on this socket so far ([`socket_drops`]).
    pub(crate) fn drops(&self) -> Option<u32> {
        socket_drops(&*self.sock)
    }

    /// Plain ESP over a raw socket (no UDP header, no non-ESP marker, no IKE)?
    pub(crate) fn is_raw(&self) -> bool {
        self.state.is_none()
    }

    /// Receives one or more buffers, each holding one datagram or a GRO batch of datagrams
    /// of `meta.stride` bytes (the last one may be shorter).
    pub(crate) async fn recv(&self, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta]) -> io::Result<usize> {
        let Some(state) = &self.state else {
            return self.recv_raw(bufs, meta).await;
        };
        self.sock
            .async_io(Interest::READABLE, || {
                state.recv(UdpSockRef::from(&*self.sock), bufs, meta)
            })
            .await
    }

    /// [`Self::recv`] without waiting: `WouldBlock` when nothing is queued (always, for a raw
    /// socket).
    pub(crate) fn try_recv(&self, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta]) -> io::Result<usize> {
        let Some(state) = &self.state else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        self.sock.try_io(Interest::READABLE, || {
            state.recv(UdpSockRef::from(&*self.sock), bufs, meta)
        })
    }

    /// One ESP packet from the raw socket, without the IPv4 header the kernel leaves in
    /// front of it (IPv6 raw sockets deliver the payload alone).
    async fn recv_raw(&self, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta]) -> io::Result<usize> {
        let (Some(buf), Some(m)) = (bufs.first_mut(), meta.first_mut()) else {
            return Ok(0);
        };
        let (n, from) = self.sock.recv_from(buf).await?;
        let header = match from {
            SocketAddr::V4(_) => buf
                .get(..n)
                .and_then(|b| b.first())
                .map_or(n, |b| usize::from(b & 0x0f) * 4),
            SocketAddr::V6(_) => 0,
        };
        let len = n.saturating_sub(header);
        buf.copy_within(header.min(n)..n, 0);
        m.addr = from;
        m.len = len;
        m.stride = len;
        Ok(1)
    }
}

/// One datagram, or with `segment` a GSO batch of datagrams of that many bytes, for
/// [`Udp::send_many`].
pub(crate) struct Outgoing<'a> {
    pub to: SocketAddr,
    pub contents: &'a [u8],
    pub segment: Option<usize>,
}

impl<'a> Outgoing<'a> {
    /// The datagrams of a GSO message one by one (itself when it is one datagram): what is
    /// sent again when the kernel refuses the batch (a segment longer than the route's MTU
    /// allows, a device without the offload), for the kernel to fragment each as needed.
    pub(crate) fn datagrams(&self) -> impl Iterator<Item = Outgoing<'a>> + '_ {
        let size = self.segment.unwrap_or(self.contents.len()).max(1);
        self.contents.chunks(size).map(|c| Outgoing {
            to: self.to,
            contents: c,
            segment: None,
        })
    }
}

/// Datagrams queued back to back for one `sendmmsg`: runs of datagrams to one peer with
/// one tag, all of one length but the last (the rule of UDP GSO), each run one message.
pub(crate) struct GsoRuns<T> {
    buf: Vec<u8>,
    runs: Vec<GsoRun<T>>,
    /// Segments per GSO send (1 without GSO).
    gso: usize,
    /// The longest datagram that may be a GSO segment (the path's MTU less the IP and UDP
    /// headers): a longer one goes alone, for the kernel to fragment.
    max_segment: usize,
}

/// One run of [`GsoRuns`].
pub(crate) struct GsoRun<T> {
    pub to: SocketAddr,
    pub tag: T,
    start: usize,
    pub len: usize,
    stride: usize,
    pub count: usize,
    /// A shorter (or unsegmentable) datagram went in last: nothing may follow it.
    closed: bool,
}

impl<T: PartialEq> GsoRuns<T> {
    pub(crate) fn new(gso: usize, max_segment: usize) -> Self {
        Self {
            buf: Vec::new(),
            runs: Vec::new(),
            gso,
            max_segment,
        }
    }

    /// Appends a datagram to `to` that `write` appends to the buffer, joining the last run
    /// when it may; nothing is queued when `write` fails.
    pub(crate) fn append<E>(
        &mut self,
        to: SocketAddr,
        tag: T,
        write: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
    ) -> Result<(), E> {
        let start = self.buf.len();
        if let Err(e) = write(&mut self.buf) {
            self.buf.truncate(start);
            return Err(e);
        }
        let len = self.buf.len() - start;
        let fits = len <= self.max_segment;
        match self.runs.last_mut() {
            Some(r)
                if fits
                    && r.to == to
                    && r.tag == tag
                    && !r.closed
                    && len <= r.stride
                    && r.count < self.gso
                    && r.len + len <= MAX_GSO_BYTES =>
            {
                r.closed = len < r.stride;
                r.len += len;
                r.count += 1;
            }
            _ => self.runs.push(GsoRun {
                to,
                tag,
                start,
                len,
                stride: len,
                count: 1,
                closed: !fits,
            }),
        }
        Ok(())
    }

    /// The runs queued, in order.
    pub(crate) fn runs(&self) -> &[GsoRun<T>] {
        &self.runs
    }

    /// Bytes queued.
    pub(crate) fn bytes(&self) -> usize {
        self.buf.len()
    }

    /// The runs as messages of a `sendmmsg`, in order.
    pub(crate) fn messages(&self) -> Vec<Outgoing<'_>> {
        self.runs
            .iter()
            .map(|r| Outgoing {
                to: r.to,
                contents: &self.buf[r.start..r.start + r.len],
                segment: (r.count > 1).then_some(r.stride),
            })
            .collect()
    }

    pub(crate) fn clear(&mut self) {
        self.runs.clear();
        self.buf.clear();
    }
}

/// Messages per `sendmmsg` call.
const SENDMMSG_MAX: usize = 32;

/// Room for one control message carrying a u16 (CMSG_SPACE(2) is 24 on 64-bit Linux), in
/// units that give it a cmsghdr's alignment.
type CmsgBuf = [u64; 4];

impl Udp {
    /// Sends `msgs` (each to its own peer, each with its own GSO segment size) in as few
    /// `sendmmsg` calls as possible: the egress of many tunnels at once, where one `sendmsg`
    /// per peer would cost a syscall for a few packets. `sent(i, result)` is called once for
    /// each message, in order; a message the kernel refuses (an unreachable peer) does not
    /// hold back the others.
    pub(crate) async fn send_many(&self, msgs: &[Outgoing<'_>], mut sent: impl FnMut(usize, io::Result<()>)) {
        let raw = self.is_raw();
        let mut next = 0;
        while next < msgs.len() {
            let end = msgs.len().min(next + SENDMMSG_MAX);
            let r = self
                .sock
                .async_io(Interest::WRITABLE, || {
                    sendmmsg(self.sock.as_raw_fd(), &msgs[next..end], raw)
                })
                .await;
            account(r, &mut next, &mut sent);
        }
    }
}

/// [`Udp::send_many`] on a non-blocking UDP socket that is not registered with a runtime
/// (a fleet link's): what the kernel cannot take at once (a full send buffer) is reported
/// unsent, not waited for.
pub(crate) fn send_now(
    sock: &impl AsRawFd,
    msgs: &[Outgoing<'_>],
    mut sent: impl FnMut(usize, io::Result<()>),
) {
    let mut next = 0;
    while next < msgs.len() {
        let end = msgs.len().min(next + SENDMMSG_MAX);
        let r = sendmmsg(sock.as_raw_fd(), &msgs[next..end], false);
        if let Err(e) = &r
            && e.kind() == io::ErrorKind::WouldBlock
        {
            for i in next..msgs.len() {
                sent(i, Err(io::ErrorKind::WouldBlock.into()));
            }
            return;
        }
        account(r, &mut next, &mut sent);
    }
}

/// Reports what one `sendmmsg` starting at message `next` did, and moves `next` past it.
fn account(r: io::Result<usize>, next: &mut usize, sent: &mut impl FnMut(usize, io::Result<()>)) {
    match r {
        // The kernel takes at least one message of a non-empty batch; were it none, the
        // first is reported unsent rather than retried forever.
        Ok(0) => {
            sent(*next, Err(io::Error::other("sendmmsg sent nothing")));
            *next += 1;
        }
        Ok(n) => {
            for i in *next..*next + n {
                sent(i, Ok(()));
            }
            *next += n;
        }
        // The first message failed: report it and go on after it.
        Err(e) => {
            sent(*next, Err(e));
            *next += 1;
        }
    }
}

/// Most datagrams the kernel cuts one UDP GSO send into (UDP_MAX_SEGMENTS in older kernels;
/// newer ones take more).
pub(crate) const MAX_GSO_SEGMENTS: usize = 64;

/// Does the kernel cut UDP sends on `sock` into segments (UDP GSO)? Asked by setting a
/// segment size and taking it back.
pub(crate) fn gso_supported(sock: &impl AsRawFd) -> bool {
    set_int_option(sock, libc::SOL_UDP, libc::UDP_SEGMENT, 1200).is_ok()
        && set_int_option(sock, libc::SOL_UDP, libc::UDP_SEGMENT, 0).is_ok()
}

/// The MTU of the interface that holds the address `ip` in this network namespace (`None`
/// when no interface holds it or the kernel does not say).
pub(crate) fn interface_mtu(ip: std::net::IpAddr) -> Option<u32> {
    let name = interface_of(ip)?;
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).ok()?;
    // Safety: all-zero is a valid ifreq; the name is copied in with its terminating NUL
    // (interface names are shorter than IFNAMSIZ), and the ioctl writes only the ifreq.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.as_bytes_with_nul()) {
        *d = *s as libc::c_char;
    }
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFMTU, &raw mut req) };
    if r != 0 {
        return None;
    }
    // Safety: SIOCGIFMTU filled in the MTU member of the union.
    let mtu = unsafe { req.ifr_ifru.ifru_mtu };
    u32::try_from(mtu).ok()
}

/// SO_MEMINFO of asm-generic/socket.h (x86-64, arm64 and most others; the libc crate does
/// not export it).
const SO_MEMINFO: libc::c_int = 55;

/// Datagrams the kernel dropped on `sock` so far because its receive buffer was full (or
/// its filter refused them): the socket's own count, which /proc/net/snmp only sums.
pub(crate) fn socket_drops(sock: &impl AsRawFd) -> Option<u32> {
    let mut info = [0u32; 9];
    let mut len = size_of_val(&info) as libc::socklen_t;
    // Safety: the kernel writes at most `len` bytes into `info` and sets `len` to what it
    // wrote.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &raw mut len,
        )
    };
    let drops = libc::SK_MEMINFO_DROPS as usize;
    (r == 0 && len as usize >= (drops + 1) * size_of::<u32>()).then_some(info[drops])
}

/// The name of the interface that holds the address `ip`.
fn interface_of(ip: std::net::IpAddr) -> Option<std::ffi::CString> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // Safety: getifaddrs allocates the list it points `list` to, freed below.
    if unsafe { libc::getifaddrs(&raw mut list) } != 0 {
        return None;
    }
    let mut found = None;
    let mut at = list;
    while !at.is_null() && found.is_none() {
        // Safety: `at` is a node of the list getifaddrs returned, not yet freed; its address
        // (when there is one) is a sockaddr of the family it names, and its name a C string.
        unsafe {
            let a = &*at;
            let addr = a.ifa_addr;
            if !addr.is_null() {
                let family = i32::from((*addr).sa_family);
                let this = match family {
                    libc::AF_INET => {
                        let v4 = &*addr.cast::<libc::sockaddr_in>();
                        Some(std::net::IpAddr::from(
                            u32::from_be(v4.sin_addr.s_addr).to_be_bytes(),
                        ))
                    }
                    libc::AF_INET6 => {
                        let v6 = &*addr.cast::<libc::sockaddr_in6>();
                        Some(std::net::IpAddr::from(v6.sin6_addr.s6_addr))
                    }
                    _ => None,
                };
                if this == Some(ip) {
                    found = Some(std::ffi::CStr::from_ptr(a.ifa_name).to_owned());
                }
            }
            at = a.ifa_next;
        }
    }
    // Safety: `list` came from getifaddrs and is freed once, after its last use.
    unsafe { libc::freeifaddrs(list) };
    found
}

/// One `sendmmsg` of at most [`SENDMMSG_MAX`] messages; how many the kernel took.
fn sendmmsg(fd: std::os::fd::RawFd, msgs: &[Outgoing<'_>], raw: bool) -> io::Result<usize> {
    let n = msgs.len().min(SENDMMSG_MAX);
    // The kernel adds the IP header of a raw socket; the port means nothing to it.
    let addrs: Vec<socket2::SockAddr> = msgs[..n]
        .iter()
        .map(|m| socket2::SockAddr::from(if raw { SocketAddr::new(m.to.ip(), 0) } else { m.to }))
        .collect();
    // Safety: all-zero is a valid iovec, mmsghdr and control buffer (null pointers, zero
    // lengths); each is filled in below before the call.
    let mut iovs: [libc::iovec; SENDMMSG_MAX] = unsafe { std::mem::zeroed() };
    let mut hdrs: [libc::mmsghdr; SENDMMSG_MAX] = unsafe { std::mem::zeroed() };
    let mut cmsgs: [CmsgBuf; SENDMMSG_MAX] = [[0; 4]; SENDMMSG_MAX];
    // Safety: CMSG_SPACE only computes a length.
    let space = unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as usize;
    debug_assert!(space <= size_of::<CmsgBuf>());
    for (i, m) in msgs[..n].iter().enumerate() {
        iovs[i] = libc::iovec {
            iov_base: m.contents.as_ptr().cast_mut().cast(),
            iov_len: m.contents.len(),
        };
        let h = &mut hdrs[i].msg_hdr;
        h.msg_name = addrs[i].as_ptr().cast_mut().cast();
        h.msg_namelen = addrs[i].len();
        h.msg_iov = &raw mut iovs[i];
        h.msg_iovlen = 1;
        let Some(segment) = m.segment.filter(|_| !raw) else {
            continue;
        };
        let segment = u16::try_from(segment).unwrap_or(u16::MAX);
        h.msg_control = cmsgs[i].as_mut_ptr().cast();
        h.msg_controllen = space;
        // Safety: msg_control points to `space` writable, cmsghdr-aligned bytes, enough for
        // one header and a u16, so CMSG_FIRSTHDR is non-null and CMSG_DATA is in bounds.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(h);
            (*c).cmsg_level = libc::SOL_UDP;
            (*c).cmsg_type = libc::UDP_SEGMENT;
            (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), segment);
        }
    }
    // Safety: the first `n` headers point to addresses, iovecs, contents and control
    // buffers that all live until the call returns.
    let r = unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr(), n as u32, 0) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// Asks for `bytes` of receive and send buffer on `sock`: beyond net.core.[rw]mem_max only
/// with CAP_NET_ADMIN (which the TUN device needs anyway), otherwise as much as the limit
/// allows. Too small a buffer costs throughput (drops under bursts), not correctness, so a
/// refusal is no error.
pub(crate) fn grow_buffers(sock: &impl AsRawFd, bytes: usize) {
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if set_int_option(sock, libc::SOL_SOCKET, force, bytes).is_err() {
            let _ = set_int_option(sock, libc::SOL_SOCKET, plain, bytes);
        }
    }
}

/// Binds a UDP socket of the data plane: with SO_REUSEPORT, so that each worker can have its
/// own socket on the same port (the kernel hashes each peer's address to one of them), and
/// the IKE control plane sends on the first.
pub fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    UdpSocket::from_std(bind_udp_std(addr)?)
}

/// [`bind_udp`] without registering the socket with a runtime yet (each data plane worker
/// has a runtime of its own).
pub(crate) fn bind_udp_std(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    set_fd_option(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    Ok(sock.into())
}

fn set_int_option(
    sock: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: usize,
) -> io::Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every datagram `sock` has queued, as their lengths.
    fn received(sock: &std::net::UdpSocket) -> Vec<usize> {
        let mut buf = [0u8; 2048];
        std::iter::from_fn(|| sock.recv(&mut buf).ok()).collect()
    }

    #[test]
    fn the_loopback_interface_has_an_mtu_and_an_unheld_address_none() {
        assert!(interface_mtu("127.0.0.1".parse().unwrap()).is_some_and(|m| m >= 1280));
        assert_eq!(interface_mtu("192.0.2.77".parse().unwrap()), None);
    }

    #[test]
    fn a_full_receive_buffer_counts_as_drops_on_the_socket() {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert_eq!(socket_drops(&sock), Some(0));
        // The smallest buffer the kernel allows, then more than it holds.
        set_int_option(&sock, libc::SOL_SOCKET, libc::SO_RCVBUF, 1).unwrap();
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for _ in 0..64 {
            sender.send_to(&[0u8; 1200], sock.local_addr().unwrap()).unwrap();
        }
        assert!(socket_drops(&sock).is_some_and(|d| d > 0));
    }

    #[test]
    fn gso_runs_join_equal_datagrams_to_one_peer_and_tag_only() {
        let (a, b) = ("127.0.0.1:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap());
        let mut q = GsoRuns::new(3, 100);
        let put = |q: &mut GsoRuns<u8>, to, tag, n: usize| {
            q.append(to, tag, |buf| {
                buf.extend(std::iter::repeat_n(0, n));
                Ok::<(), ()>(())
            })
        };
        for _ in 0..4 {
            put(&mut q, a, 1, 50).unwrap();
        }
        put(&mut q, a, 2, 50).unwrap(); // another tag
        put(&mut q, a, 2, 40).unwrap(); // shorter: joins, closes
        put(&mut q, a, 2, 40).unwrap();
        put(&mut q, b, 2, 40).unwrap(); // another peer
        put(&mut q, b, 2, 150).unwrap(); // longer than a segment may be: alone
        assert!(
            q.append(b, 2, |buf| {
                buf.push(9);
                Err(())
            })
            .is_err()
        );
        let segments: Vec<_> = q
            .messages()
            .iter()
            .map(|m| (m.contents.len(), m.segment))
            .collect();
        assert_eq!(
            segments,
            [
                (150, Some(50)),
                (50, None),
                (90, Some(50)),
                (40, None),
                (40, None),
                (150, None)
            ]
        );
        assert_eq!(q.bytes(), 520, "the failed write left nothing");
        q.clear();
        assert!(q.messages().is_empty());
    }

    #[test]
    fn a_gso_message_splits_into_its_datagrams() {
        let data = [1u8; 250];
        let to = "127.0.0.1:9".parse().unwrap();
        let gso = Outgoing {
            to,
            contents: &data,
            segment: Some(100),
        };
        let lens: Vec<usize> = gso.datagrams().map(|d| d.contents.len()).collect();
        assert_eq!(lens, [100, 100, 50]);
        assert!(gso.datagrams().all(|d| d.segment.is_none() && d.to == to));
        let one = Outgoing {
            to,
            contents: &data[..10],
            segment: None,
        };
        assert_eq!(
            one.datagrams().map(|d| d.contents.len()).collect::<Vec<_>>(),
            [10]
        );
    }

    #[test]
    fn send_now_sends_gso_batches_from_a_plain_socket() {
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        peer.set_read_timeout(Some(std::time::Duration::from_millis(200)))
            .unwrap();
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_nonblocking(true).unwrap();
        let gso = gso_supported(&sock);
        let data = vec![7u8; 250];
        let msgs = [
            Outgoing {
                to: peer.local_addr().unwrap(),
                contents: &data,
                segment: gso.then_some(100),
            },
            Outgoing {
                to: peer.local_addr().unwrap(),
                contents: &data[..10],
                segment: None,
            },
        ];
        let mut results = Vec::new();
        send_now(&sock, &msgs, |i, r| results.push((i, r.is_ok())));
        assert_eq!(results, [(0, true), (1, true)]);
        if gso {
            assert_eq!(received(&peer), [100, 100, 50, 10]);
        } else {
            assert_eq!(received(&peer), [250, 10]);
        }
    }

    #[tokio::test]
    async fn send_many_sends_each_batch_to_its_peer_cut_at_its_own_segment_size() {
        let peers: Vec<std::net::UdpSocket> = (0..3)
            .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        for p in &peers {
            p.set_read_timeout(Some(std::time::Duration::from_millis(200)))
                .unwrap();
        }
        let addr = |i: usize| peers[i].local_addr().unwrap();
        let udp = Udp::new(Arc::new(bind_udp("127.0.0.1:0".parse().unwrap()).unwrap())).unwrap();
        let gso = udp.max_gso_segments() > 1;
        let (a, b, c) = (vec![1u8; 300], vec![2u8; 80], vec![3u8; 40]);
        let seg = |n| gso.then_some(n);
        let msgs = [
            Outgoing {
                to: addr(0),
                contents: &a,
                segment: seg(100),
            },
            Outgoing {
                to: addr(1),
                contents: &b,
                segment: seg(50),
            },
            Outgoing {
                to: addr(2),
                contents: &c,
                segment: None,
            },
        ];
        let mut results = Vec::new();
        udp.send_many(&msgs, |i, r| results.push((i, r.is_ok()))).await;
        assert_eq!(results, [(0, true), (1, true), (2, true)]);
        if gso {
            assert_eq!(received(&peers[0]), [100, 100, 100]);
            assert_eq!(received(&peers[1]), [50, 30]);
        } else {
            assert_eq!(received(&peers[0]), [300]);
            assert_eq!(received(&peers[1]), [80]);
        }
        assert_eq!(received(&peers[2]), [40]);
    }
}
