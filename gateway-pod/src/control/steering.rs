//! Which socket of a port's SO_REUSEPORT group the kernel gives a datagram: a classic BPF
//! program attached to the group (`SO_ATTACH_REUSEPORT_CBPF`).
//!
//! Port 4500 carries ESP and IKE (behind the non-ESP marker, RFC 3948). Without a program the
//! kernel spreads datagrams over the group by their addresses, so IKE landed on the data
//! plane's sockets and each message woke a data plane thread that then woke an IKE worker
//! (under a load of new sites, the data plane threads took 27-29% of the gateway's CPU for
//! that: BENCHMARKS.md "IKE on every core"). With the program, ESP goes to the data plane's
//! sockets (spread by the site's address and port, as the kernel would) and IKE to the IKE
//! workers' own sockets, each message to the worker that holds its SA, as
//! [`super::workers::IkeRouter`] would send it. On port 500 (IKE alone) the same choice of
//! worker spares the hop between workers.
//!
//! The kernel runs the program with the packet's data starting at the UDP payload; it
//! returns the index of a socket in the group, in the order the sockets were bound. An index
//! past the group's end (or a program that cannot be attached) leaves the kernel's own spread
//! in force; whatever reaches the wrong socket is still passed on in userspace.

use std::os::fd::AsRawFd;

use concentrator_fleet::shard::SHARD_BITS;

use crate::dataplane::shared::SITE_MIX;

/// Where the sockets of a group sit (by bind order) and what the datagrams look like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Group {
    /// Sockets `0..data` are the data plane's (ESP); none on port 500.
    pub(super) data: u32,
    /// Sockets `data..data + ike` are the IKE workers', in worker order.
    pub(super) ike: u32,
    /// Port 4500: IKE behind the non-ESP marker, anything else ESP.
    pub(super) nat_t: bool,
}

/// The secret the choice of worker for a new IKE SA is keyed with, so that a flood of
/// IKE_SA_INITs cannot be aimed at one worker (the initiator picks its SPI freely).
#[derive(Clone, Copy, Debug)]
pub(crate) struct InitKey([u32; 2]);

impl InitKey {
    /// A key drawn from the process's random seed.
    pub(crate) fn random() -> Self {
        use std::hash::BuildHasher;
        let r = std::hash::RandomState::new().hash_one(0x5eed_u32);
        Self([(r >> 32) as u32, r as u32])
    }

    /// The worker, of `n`, that takes the new IKE SA whose initiator SPI is `spi_i`: the
    /// program computes the same in the kernel. Every bit of the SPI moves the result (a
    /// multiplication alone carries only low bits upward: a flood that fixed the low bits
    /// of each half would land on one worker whatever the key).
    pub(crate) fn worker(&self, n: usize, spi_i: u64) -> usize {
        let [k0, k1] = self.0;
        let h = fmix((spi_i >> 32) as u32 ^ k0);
        let h = fmix(h ^ spi_i as u32 ^ k1);
        (h % n.max(1) as u32) as usize
    }
}

/// MurmurHash3's 32-bit finalizer (a bijection in which each input bit flips each output
/// bit with probability about one half).
fn fmix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(FMIX_1);
    h ^= h >> 13;
    h = h.wrapping_mul(FMIX_2);
    h ^ (h >> 16)
}

const FMIX_1: u32 = 0x85eb_ca6b;
const FMIX_2: u32 = 0xc2b2_ae35;

/// The IKE header's flags octet and its original-initiator bit (RFC 7296 §3.1).
const FLAGS_OFFSET: u32 = 19;
const FLAG_INITIATOR: u32 = 0x08;
const IKE_HEADER_LEN: u32 = 28;

/// The program for `g`, with `key` for new IKE SAs.
pub(super) fn program(g: Group, key: InitKey) -> Vec<libc::sock_filter> {
    let mut p = Asm::default();
    let m = if g.nat_t { 4 } else { 0 };
    // Too short for a marker or an SPI (a NAT keepalive): the first socket, which drops it.
    p.stmt(LD | LEN, 0);
    p.jump(JGE, 4, Next, Label::Ret0);
    if g.nat_t {
        p.stmt(LD | ABS | W, 0);
        p.jump(JEQ, 0, Label::Ike, Next);
        // ESP: by the site's address and port over the data plane's sockets. Not by SPI:
        // the SAs of one site share its address and port, and the kernel's GRO joins their
        // datagrams into one batch whatever their SPIs; a batch is steered by its first, so
        // one SA's packets would go to two threads by turns and arrive out of order.
        if g.data > 1 {
            p.stmt(LD | ABS | B, NET);
            p.stmt(ALU | RSH | K, 4);
            p.jump(JEQ, 6, Label::V6, Next);
            // IPv4: the source address, then the port behind a header of IHL words.
            p.stmt(LD | ABS | W, NET + 12);
            p.stmt(ST, 0);
            p.stmt(LDX | MSH | B, NET);
            p.stmt(LD | IND | H, NET);
            p.stmt(MISC | TAX, 0);
            p.stmt(LD | MEM, 0);
            p.jump(JA, 0, Label::Spread, Label::Spread);
            // IPv6 (UDP right behind the fixed header): the source's last word, the port.
            p.label(Label::V6);
            p.stmt(LD | ABS | W, NET + 20);
            p.stmt(MISC | TAX, 0);
            p.stmt(LD | ABS | H, NET + 40);
            p.label(Label::Spread);
            p.stmt(ALU | XOR | X, 0);
            p.stmt(ALU | MUL | K, SITE_MIX);
            p.stmt(ALU | RSH | K, 16);
            p.stmt(ALU | MOD | K, g.data);
            p.stmt(RET | A, 0);
        } else {
            p.stmt(RET | K, 0);
        }
        p.label(Label::Ike);
    }
    let base = if g.nat_t { g.data } else { 0 };
    if g.ike <= 1 {
        p.stmt(RET | K, base);
        return p.finish();
    }
    // A message too short for a header is dropped (and counted) by any worker: the first.
    p.stmt(LD | LEN, 0);
    p.jump(JGE, m + IKE_HEADER_LEN, Next, Label::RetBase);
    p.stmt(LD | ABS | B, m + FLAGS_OFFSET);
    p.jump(JSET, FLAG_INITIATOR, Next, Label::SpiI);
    // From the original initiator: our SPI is the responder's, unless it is zero (a new SA).
    p.stmt(LD | ABS | W, m + 8);
    p.jump(JEQ, 0, Next, Label::SpiR);
    p.stmt(LD | ABS | W, m + 12);
    p.jump(JEQ, 0, Label::New, Label::SpiR);
    // The shard is in the top bits of the SPI we allocated; the worker is shard mod n.
    p.label(Label::SpiR);
    p.stmt(LD | ABS | W, m + 8);
    p.jump(JA, 0, Label::Shard, Label::Shard);
    p.label(Label::SpiI);
    p.stmt(LD | ABS | W, m);
    p.label(Label::Shard);
    p.stmt(ALU | RSH | K, 32 - SHARD_BITS);
    p.jump(JA, 0, Label::Worker, Label::Worker);
    // A new SA: InitKey::worker, step by step.
    p.label(Label::New);
    let [k0, k1] = key.0;
    p.stmt(LD | ABS | W, m);
    p.stmt(ALU | XOR | K, k0);
    p.fmix();
    p.stmt(MISC | TAX, 0);
    p.stmt(LD | ABS | W, m + 4);
    p.stmt(ALU | XOR | X, 0);
    p.stmt(ALU | XOR | K, k1);
    p.fmix();
    p.label(Label::Worker);
    p.stmt(ALU | MOD | K, g.ike);
    p.stmt(ALU | ADD | K, base);
    p.stmt(RET | A, 0);
    p.label(Label::RetBase);
    p.stmt(RET | K, base);
    p.finish()
}

/// Attaches `program` to the SO_REUSEPORT group of `sock` (it applies to the whole group).
pub(super) fn attach(sock: &impl AsRawFd, program: &[libc::sock_filter]) -> std::io::Result<()> {
    let len =
        u16::try_from(program.len()).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let fprog = libc::sock_fprog {
        len,
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: `fprog` points at `program`, alive for the call; the kernel copies it.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            std::ptr::from_ref(&fprog).cast(),
            size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

// Classic BPF opcodes (linux/filter.h), as u16 for `sock_filter::code`.
const LD: u16 = libc::BPF_LD as u16;
const LDX: u16 = libc::BPF_LDX as u16;
const ST: u16 = libc::BPF_ST as u16;
const H: u16 = libc::BPF_H as u16;
const IND: u16 = libc::BPF_IND as u16;
const MEM: u16 = libc::BPF_MEM as u16;
const MSH: u16 = libc::BPF_MSH as u16;
/// Loads relative to the network header (the outer IP header) rather than the payload.
const NET: u32 = libc::SKF_NET_OFF as u32;
const ALU: u16 = libc::BPF_ALU as u16;
const JMP: u16 = libc::BPF_JMP as u16;
const RET: u16 = libc::BPF_RET as u16;
const MISC: u16 = libc::BPF_MISC as u16;
const W: u16 = libc::BPF_W as u16;
const B: u16 = libc::BPF_B as u16;
const ABS: u16 = libc::BPF_ABS as u16;
const LEN: u16 = libc::BPF_LEN as u16;
const K: u16 = libc::BPF_K as u16;
const X: u16 = libc::BPF_X as u16;
const A: u16 = libc::BPF_A as u16;
const ADD: u16 = libc::BPF_ADD as u16;
const MUL: u16 = libc::BPF_MUL as u16;
const RSH: u16 = libc::BPF_RSH as u16;
const MOD: u16 = libc::BPF_MOD as u16;
const XOR: u16 = libc::BPF_XOR as u16;
const TAX: u16 = libc::BPF_TAX as u16;
const JEQ: u16 = JMP | libc::BPF_JEQ as u16 | K;
const JGE: u16 = JMP | libc::BPF_JGE as u16 | K;
const JSET: u16 = JMP | libc::BPF_JSET as u16 | K;
const JA: u16 = JMP | libc::BPF_JA as u16;

/// Jump targets of the program; `Next` is the instruction after the jump.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Label {
    Ret0,
    Ike,
    V6,
    Spread,
    SpiR,
    SpiI,
    Shard,
    New,
    Worker,
    RetBase,
}

use Target::Next;

#[derive(Clone, Copy, Debug)]
enum Target {
    Next,
    To(Label),
}

impl From<Label> for Target {
    fn from(l: Label) -> Self {
        Self::To(l)
    }
}

/// A program being written: instructions, jumps to labels resolved at the end.
#[derive(Default)]
struct Asm {
    code: Vec<(u16, u32, Target, Target)>,
    labels: Vec<(Label, usize)>,
}

impl Asm {
    fn stmt(&mut self, code: u16, k: u32) {
        self.code.push((code, k, Next, Next));
    }

    fn jump(&mut self, code: u16, k: u32, t: impl Into<Target>, f: impl Into<Target>) {
        self.code.push((code, k, t.into(), f.into()));
    }

    /// A = [`fmix`](A), with X as scratch.
    fn fmix(&mut self) {
        for (shift, mul) in [(16, Some(FMIX_1)), (13, Some(FMIX_2)), (16, None)] {
            // A ^= A >> shift
            self.stmt(MISC | TAX, 0);
            self.stmt(ALU | RSH | K, shift);
            self.stmt(ALU | XOR | X, 0);
            if let Some(mul) = mul {
                self.stmt(ALU | MUL | K, mul);
            }
        }
    }

    fn label(&mut self, l: Label) {
        self.labels.push((l, self.code.len()));
    }

    fn finish(mut self) -> Vec<libc::sock_filter> {
        if !self.labels.iter().any(|(l, _)| *l == Label::Ret0) {
            self.label(Label::Ret0);
            self.stmt(RET | K, 0);
        }
        let at = |l: Label| self.labels.iter().find(|(m, _)| *m == l).map(|(_, i)| *i);
        self.code
            .iter()
            .enumerate()
            .map(|(i, &(code, k, t, f))| {
                let off = |t: Target| match t {
                    Next => 0,
                    // Jumps only go forward; the program is a few dozen instructions.
                    Target::To(l) => at(l).map_or(0, |to| to.saturating_sub(i + 1)) as u8,
                };
                if code == JA {
                    // An unconditional jump takes its distance in `k`.
                    libc::sock_filter {
                        code,
                        jt: 0,
                        jf: 0,
                        k: u32::from(off(t)),
                    }
                } else {
                    libc::sock_filter {
                        code,
                        jt: off(t),
                        jf: off(f),
                        k,
                    }
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;
    use std::time::{Duration, Instant};

    use concentrator_fleet::Shard;

    use super::*;
    use crate::control::workers::{IkeRouter, shard_for_worker, worker_of_spi};

    use crate::dataplane::shared::site_worker as esp_socket;

    /// A group of `g.data + g.ike` sockets on one loopback port, the program attached.
    fn group(g: Group, key: InitKey) -> Vec<UdpSocket> {
        group_on("127.0.0.1:0", g, key)
    }

    fn group_on(local: &str, g: Group, key: InitKey) -> Vec<UdpSocket> {
        let first = crate::dataplane::io::bind_udp_std(local.parse().unwrap()).unwrap();
        let addr = first.local_addr().unwrap();
        let mut socks = vec![first];
        for _ in 1..g.data + g.ike {
            socks.push(crate::dataplane::io::bind_udp_std(addr).unwrap());
        }
        attach(&socks[0], &program(g, key)).unwrap();
        for s in &socks {
            s.set_nonblocking(true).unwrap();
        }
        socks
    }

    /// Sends `datagram` to the group and says which socket got it.
    fn landed(socks: &[UdpSocket], from: &UdpSocket, datagram: &[u8]) -> usize {
        from.send_to(datagram, socks[0].local_addr().unwrap()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = [0u8; 2048];
        loop {
            for (i, s) in socks.iter().enumerate() {
                if let Ok(n) = s.recv(&mut buf) {
                    assert_eq!(&buf[..n], datagram);
                    return i;
                }
            }
            assert!(Instant::now() < deadline, "datagram never arrived");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn ike(spi_i: u64, spi_r: u64, flags: u8, marker: bool) -> Vec<u8> {
        let mut v = Vec::new();
        if marker {
            v.extend_from_slice(&[0; 4]);
        }
        v.extend_from_slice(&spi_i.to_be_bytes());
        v.extend_from_slice(&spi_r.to_be_bytes());
        v.extend_from_slice(&[33, 0x20, 35, flags]);
        v.extend_from_slice(&1u32.to_be_bytes());
        v.extend_from_slice(&60u32.to_be_bytes());
        v.extend_from_slice(&[0xab; 32]);
        v
    }

    /// SPIs of worker `w` of `n`, as its endpoint draws them.
    fn spis_of(w: usize, n: usize) -> Vec<u64> {
        [0u64, 1, 0x1234_5678_9abc_def0, u64::MAX, 77 << 30]
            .into_iter()
            .map(|r| match shard_for_worker(w, n, r) {
                Some(s) => s.ike_spi(r | (1 << 20)).unwrap(),
                None => r | 1,
            })
            .collect()
    }

    #[test]
    fn on_port_4500_esp_goes_to_the_data_plane_and_ike_to_the_worker_of_its_sa() {
        let from = UdpSocket::bind("127.0.0.1:0").unwrap();
        for (data, n) in [(2u32, 2usize), (1, 1), (3, 2), (2, 3)] {
            let g = Group {
                data,
                ike: n as u32,
                nat_t: true,
            };
            let key = InitKey::random();
            let socks = group(g, key);
            let router = IkeRouter::for_test(n, key);
            let d = data as usize;
            // ESP, by the site: every SA of a site to its one socket, all data plane ones
            // used by some site.
            let mut used = vec![false; d];
            for site in (0..16).map(|_| UdpSocket::bind("127.0.0.1:0").unwrap()) {
                let want = esp_socket(data, site.local_addr().unwrap()) as usize;
                for spi in (0..8u32).map(|i| 0x1000_0100u32.wrapping_mul(i + 1) | 0x100) {
                    let mut esp = spi.to_be_bytes().to_vec();
                    esp.extend_from_slice(&[0x55; 60]);
                    assert_eq!(landed(&socks, &site, &esp), want, "ESP spi {spi:#x}");
                }
                used[want] = true;
            }
            assert!(used.iter().all(|u| *u), "data {data}: {used:?}");
            // A NAT keepalive: the first data plane socket.
            assert_eq!(landed(&socks, &from, &[0xff]), 0);
            // IKE of an SA of worker w: to w's socket, both directions of the exchange.
            for w in 0..n {
                for spi in spis_of(w, n) {
                    for m in [
                        ike(7, spi, FLAG_INITIATOR as u8, true),
                        ike(spi, 9, 0x20, true),
                        ike(spi, 0, 0x20, true),
                    ] {
                        assert_eq!(landed(&socks, &from, &m), d + w, "n {n} w {w} spi {spi:#x}");
                        assert_eq!(router.worker_of(&m[4..]), w);
                    }
                }
            }
            // New SAs (IKE_SA_INIT straight to 4500): spread by the keyed hash, as the router.
            let mut seen = vec![0; n];
            for spi_i in (1..100u64).map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15)) {
                let m = ike(spi_i, 0, FLAG_INITIATOR as u8, true);
                let at = landed(&socks, &from, &m);
                assert_eq!(at, d + key.worker(n, spi_i));
                assert_eq!(router.worker_of(&m[4..]), at - d);
                seen[at - d] += 1;
            }
            assert!(seen.iter().all(|s| *s > 100 / n / 3), "{seen:?}");
            // A flood that keeps the low bits of both halves of its SPIs still spreads.
            let mut seen = vec![0; n];
            for i in 1..100u64 {
                let spi_i = (i << 52) | (i << 20) | 0x0005_0000_0005;
                let m = ike(spi_i, 0, FLAG_INITIATOR as u8, true);
                let at = landed(&socks, &from, &m);
                assert_eq!(at, d + key.worker(n, spi_i));
                seen[at - d] += 1;
            }
            assert!(seen.iter().all(|s| *s > 100 / n / 3), "fixed low bits: {seen:?}");
            // Too short for a header: the first worker.
            assert_eq!(landed(&socks, &from, &[0, 0, 0, 0, 1, 2, 3]), d);
        }
    }

    #[test]
    fn over_ipv6_each_site_has_its_data_plane_socket() {
        let Ok(probe) = UdpSocket::bind("[::1]:0") else {
            eprintln!("SKIP: no IPv6 loopback");
            return;
        };
        drop(probe);
        let g = Group {
            data: 3,
            ike: 1,
            nat_t: true,
        };
        let socks = group_on("[::1]:0", g, InitKey::random());
        let mut used = [false; 3];
        for site in (0..24).map(|_| UdpSocket::bind("[::1]:0").unwrap()) {
            let want = esp_socket(3, site.local_addr().unwrap()) as usize;
            for spi in [0x100u32, 0xdead_beef, 0x7000_0001] {
                let mut esp = spi.to_be_bytes().to_vec();
                esp.extend_from_slice(&[0x55; 40]);
                assert_eq!(landed(&socks, &site, &esp), want);
            }
            used[want] = true;
            assert_eq!(landed(&socks, &site, &ike(9, 0, FLAG_INITIATOR as u8, true)), 3);
        }
        assert!(used.iter().all(|u| *u), "{used:?}");
    }

    #[test]
    fn on_port_500_each_message_goes_to_the_worker_of_its_sa() {
        let from = UdpSocket::bind("127.0.0.1:0").unwrap();
        let n = 3;
        let key = InitKey::random();
        let g = Group {
            data: 0,
            ike: n as u32,
            nat_t: false,
        };
        let socks = group(g, key);
        let router = IkeRouter::for_test(n, key);
        for w in 0..n {
            for spi in spis_of(w, n) {
                let m = ike(3, spi, FLAG_INITIATOR as u8, false);
                assert_eq!(landed(&socks, &from, &m), w);
                assert_eq!(worker_of_spi(n, spi), w);
                // The low word alone non-zero still names our SPI (shard 0).
                let low = Shard::new(0).unwrap().ike_spi(5 << SHARD_BITS).unwrap();
                let m = ike(3, low, FLAG_INITIATOR as u8, false);
                assert_eq!(landed(&socks, &from, &m), router.worker_of(&m));
            }
        }
        for spi_i in 1..50u64 {
            let m = ike(spi_i << 40 | spi_i, 0, FLAG_INITIATOR as u8, false);
            assert_eq!(landed(&socks, &from, &m), router.worker_of(&m));
        }
    }

    #[test]
    fn programs_jump_forward_within_the_program() {
        for g in [
            Group {
                data: 2,
                ike: 2,
                nat_t: true,
            },
            Group {
                data: 1,
                ike: 1,
                nat_t: true,
            },
            Group {
                data: 0,
                ike: 4,
                nat_t: false,
            },
        ] {
            let p = program(g, InitKey::random());
            for (i, insn) in p.iter().enumerate().filter(|(_, i)| i.code & 0x07 == JMP) {
                let ja = insn.code == JA;
                let far = if ja {
                    insn.k as usize
                } else {
                    usize::from(insn.jt.max(insn.jf))
                };
                assert!(i + 1 + far < p.len(), "{g:?}: instruction {i} jumps out");
            }
            assert_eq!(p.last().map(|i| i.code & 0x07), Some(RET));
        }
    }
}
