//! The send path of an IKE worker: what one wake-up of the engine queued goes out in one
//! `sendmmsg` per socket, not one `sendto` per message (the syscall per message was a good
//! part of the kernel's 46% of the gateway's CPU under a flood of new sites).

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Messages per `sendmmsg` call.
const BATCH: usize = 32;

/// Sends each `(to, datagram)` of `msgs` on `sock`, in as few calls as the kernel allows;
/// `failed(to, error)` for each one it refuses (an unreachable peer: the others still go).
pub(super) async fn send_batch(
    sock: &UdpSocket,
    msgs: &[(SocketAddr, Vec<u8>)],
    mut failed: impl FnMut(SocketAddr, io::Error),
) {
    if let [(to, datagram)] = msgs {
        if let Err(e) = sock.send_to(datagram, *to).await {
            failed(*to, e);
        }
        return;
    }
    let mut next = 0;
    while let Some(rest) = msgs.get(next..).filter(|r| !r.is_empty()) {
        let chunk = &rest[..rest.len().min(BATCH)];
        let r = sock
            .async_io(Interest::WRITABLE, || sendmmsg(sock.as_raw_fd(), chunk))
            .await;
        match r {
            Ok(n) if n > 0 => next += n,
            // None taken: the first is given up on rather than retried forever.
            Ok(_) => {
                failed(chunk[0].0, io::Error::other("sendmmsg sent nothing"));
                next += 1;
            }
            // The first message failed: reported, and the rest go on after it.
            Err(e) => {
                failed(chunk[0].0, e);
                next += 1;
            }
        }
    }
}

/// One `sendmmsg` of at most [`BATCH`] messages; how many the kernel took.
fn sendmmsg(fd: std::os::fd::RawFd, msgs: &[(SocketAddr, Vec<u8>)]) -> io::Result<usize> {
    let n = msgs.len().min(BATCH);
    let addrs: Vec<socket2::SockAddr> = msgs[..n].iter().map(|(to, _)| (*to).into()).collect();
    // Safety: all-zero is a valid iovec and mmsghdr (null pointers, zero lengths); each is
    // filled in below before the call.
    let mut iovs: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
    let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
    for (i, (_, datagram)) in msgs[..n].iter().enumerate() {
        iovs[i] = libc::iovec {
            iov_base: datagram.as_ptr().cast_mut().cast(),
            iov_len: datagram.len(),
        };
        let h = &mut hdrs[i].msg_hdr;
        h.msg_name = addrs[i].as_ptr().cast_mut().cast();
        h.msg_namelen = addrs[i].len();
        h.msg_iov = &raw mut iovs[i];
        h.msg_iovlen = 1;
    }
    // Safety: the first `n` headers point to addresses, iovecs and datagrams that all live
    // until the call returns; the kernel only reads them.
    let r = unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr(), n as u32, 0) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_batch_arrives_whole_and_in_order() {
        let rx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let to = rx.local_addr().unwrap();
        let msgs: Vec<_> = (0..70u8).map(|i| (to, vec![i; 1 + usize::from(i)])).collect();
        let mut failures = 0;
        send_batch(&tx, &msgs, |_, _| failures += 1).await;
        assert_eq!(failures, 0);
        let mut buf = [0u8; 128];
        for i in 0..70u8 {
            let n = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(&buf[..n], &vec![i; 1 + usize::from(i)][..]);
        }
    }

    #[tokio::test]
    async fn a_refused_message_does_not_hold_back_the_others() {
        let rx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let to = rx.local_addr().unwrap();
        // An IPv6 destination on an IPv4 socket: refused by the kernel at once.
        let bad: SocketAddr = "[::1]:9".parse().unwrap();
        let msgs = vec![(to, vec![1]), (bad, vec![2]), (to, vec![3])];
        let mut failed = Vec::new();
        send_batch(&tx, &msgs, |a, _| failed.push(a)).await;
        assert_eq!(failed, vec![bad]);
        let mut buf = [0u8; 8];
        for want in [1u8, 3] {
            let n = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(&buf[..n], &[want]);
        }
    }
}
