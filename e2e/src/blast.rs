//! A light TCP load generator for benchmarks with many flows: one process pushes N TCP flows
//! (one thread each) and one process sinks them, instead of 2N iperf3 processes whose own
//! scheduling would eat the machine being measured.
//!
//! - [`sink`] listens on one address, counts the bytes of each connection until its sender
//!   closes it, and returns one [`FlowReport`] per connection.
//! - [`send`] connects every flow (each from its own source address, so that routing and the
//!   remote side can tell them apart) and only then starts them all at once, so that the
//!   flows overlap for the whole run rather than ramp up one by one.
//!
//! Both ends are blocking std sockets; the test that uses them runs them in a namespace as a
//! process of its own (see the gateway's `bench_many_tunnels`), reporting with
//! [`FlowReport::line`] and reading back with [`FlowReport::parse`].

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Size of each read and write: iperf3's default for TCP.
const CHUNK: usize = 128 * 1024;

/// What one flow did, as seen by the side that reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowReport {
    /// Our end of the connection.
    pub local: SocketAddr,
    /// The other end.
    pub peer: SocketAddr,
    /// Payload bytes received (sink) or written (sender).
    pub bytes: u64,
    /// When the first byte moved, in seconds after the reporting process's reference time
    /// (the sink: when it started listening; the sender: when the flows were released).
    pub start: f64,
    /// From the first byte to the last (sink: to the sender's close; sender: to its end).
    pub secs: f64,
}

impl FlowReport {
    /// Bits per second over the flow's own duration (0 for a flow that moved nothing).
    pub fn bps(&self) -> f64 {
        if self.secs > 0.0 {
            self.bytes as f64 * 8.0 / self.secs
        } else {
            0.0
        }
    }

    /// One line of output: `FLOW local peer bytes start secs`.
    pub fn line(&self) -> String {
        format!(
            "FLOW {} {} {} {:.6} {:.6}",
            self.local, self.peer, self.bytes, self.start, self.secs
        )
    }

    /// The report in `line`, which may carry text before `FLOW ` (libtest prints its own
    /// "test name ... " in front of the first line of a test's output).
    pub fn parse(line: &str) -> Option<Self> {
        let rest = line.get(line.find("FLOW ")? + 5..)?;
        let mut f = rest.split_whitespace();
        Some(Self {
            local: f.next()?.parse().ok()?,
            peer: f.next()?.parse().ok()?,
            bytes: f.next()?.parse().ok()?,
            start: f.next()?.parse().ok()?,
            secs: f.next()?.parse().ok()?,
        })
    }
}

/// Counts the bytes of each connection accepted on `listener` until its peer closes it.
/// Returns after `flows` connections have closed, or at `timeout` with those that have (a
/// connection still open then is left out, so a harness that expects `flows` reports sees
/// that one is missing).
pub fn sink(listener: TcpListener, flows: usize, timeout: Duration) -> Vec<FlowReport> {
    let epoch = Instant::now();
    let (done_tx, done_rx) = mpsc::channel::<FlowReport>();
    // The accepting thread is never joined: it blocks in accept() until the process ends.
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let done = done_tx.clone();
            std::thread::spawn(move || {
                if let Some(report) = drain(stream, epoch) {
                    let _ = done.send(report);
                }
            });
        }
    });
    let deadline = epoch + timeout;
    let mut reports = Vec::with_capacity(flows);
    while reports.len() < flows {
        let left = deadline.saturating_duration_since(Instant::now());
        match done_rx.recv_timeout(left) {
            Ok(r) => reports.push(r),
            Err(_) => break,
        }
    }
    reports
}

/// Reads `stream` to its end, counting.
fn drain(mut stream: TcpStream, epoch: Instant) -> Option<FlowReport> {
    let local = stream.local_addr().ok()?;
    let peer = stream.peer_addr().ok()?;
    let mut buf = vec![0u8; CHUNK];
    let (mut bytes, mut first, mut last) = (0u64, None, Instant::now());
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let now = Instant::now();
                first.get_or_insert(now);
                last = now;
                bytes += n as u64;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let first = first.unwrap_or(last);
    Some(FlowReport {
        local,
        peer,
        bytes,
        start: first.duration_since(epoch).as_secs_f64(),
        secs: last.duration_since(first).as_secs_f64(),
    })
}

/// One flow for [`send`]: from source address `from` (any port) to `to`.
#[derive(Debug, Clone, Copy)]
pub struct Pair {
    pub from: IpAddr,
    pub to: SocketAddr,
}

impl Pair {
    /// `from>to`, e.g. `10.128.0.1>10.0.0.1:5201` (the format of a pairs file line).
    pub fn parse(s: &str) -> Option<Self> {
        let (from, to) = s.trim().split_once('>')?;
        Some(Self {
            from: from.parse().ok()?,
            to: to.parse().ok()?,
        })
    }
}

/// Connects every pair (retrying each for up to `connect_timeout`, as the sink or the path
/// may still be coming up), then pushes data on all of them at once for `duration` and
/// closes them. Fails if any flow could not connect or broke.
pub fn send(pairs: &[Pair], duration: Duration, connect_timeout: Duration) -> Result<Vec<FlowReport>> {
    // Every flow thread plus this one: the flows start only when all are connected.
    let barrier = Arc::new(Barrier::new(pairs.len() + 1));
    let epoch = Arc::new(std::sync::OnceLock::<Instant>::new());
    let threads: Vec<_> = pairs
        .iter()
        .copied()
        .map(|pair| {
            let (barrier, epoch) = (Arc::clone(&barrier), Arc::clone(&epoch));
            std::thread::spawn(move || {
                let stream = connect(pair, connect_timeout);
                // Waited for even after a failure, or the others would wait forever.
                barrier.wait();
                let stream = stream?;
                let epoch = *epoch.get().context("flows released without a start time")?;
                push(stream, epoch, duration)
            })
        })
        .collect();
    // The start time is set before the barrier opens, so every flow sees it.
    let _ = epoch.set(Instant::now());
    barrier.wait();
    let mut reports = Vec::with_capacity(pairs.len());
    let mut failures = Vec::new();
    for (pair, t) in pairs.iter().zip(threads) {
        match t.join() {
            Ok(Ok(r)) => reports.push(r),
            Ok(Err(e)) => failures.push(format!("{}>{}: {e:#}", pair.from, pair.to)),
            Err(_) => failures.push(format!("{}>{}: thread panicked", pair.from, pair.to)),
        }
    }
    if !failures.is_empty() {
        bail!(
            "{} of {} flows failed, e.g. {}",
            failures.len(),
            pairs.len(),
            failures.iter().take(3).cloned().collect::<Vec<_>>().join("; ")
        );
    }
    Ok(reports)
}

fn connect(pair: Pair, timeout: Duration) -> Result<TcpStream> {
    let deadline = Instant::now() + timeout;
    loop {
        let socket = Socket::new(Domain::for_address(pair.to), Type::STREAM, Some(Protocol::TCP))?;
        socket
            .bind(&SockAddr::from(SocketAddr::new(pair.from, 0)))
            .with_context(|| format!("binding to {}", pair.from))?;
        let left = deadline.saturating_duration_since(Instant::now());
        match socket.connect_timeout(&SockAddr::from(pair.to), left.max(Duration::from_millis(1))) {
            Ok(()) => return Ok(socket.into()),
            Err(e) if Instant::now() >= deadline => {
                return Err(e).with_context(|| format!("connecting to {}", pair.to));
            }
            // Refused: the sink is not listening yet; a short pause before the next try.
            Err(_) => std::thread::sleep(Duration::from_millis(50).min(left)),
        }
    }
}

/// Writes to `stream` until `duration` after `epoch`, then closes it.
fn push(mut stream: TcpStream, epoch: Instant, duration: Duration) -> Result<FlowReport> {
    let local = stream.local_addr()?;
    let peer = stream.peer_addr()?;
    // A write blocked on a full window returns after this, so the flow stops on time.
    stream.set_write_timeout(Some(Duration::from_millis(100)))?;
    let buf = vec![0x5au8; CHUNK];
    let end = epoch + duration;
    let start = Instant::now();
    let mut bytes = 0u64;
    while Instant::now() < end {
        match stream.write(&buf) {
            Ok(n) => bytes += n as u64,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e).with_context(|| format!("writing to {peer}")),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let _ = stream.shutdown(Shutdown::Write);
    Ok(FlowReport {
        local,
        peer,
        bytes,
        start: start.duration_since(epoch).as_secs_f64(),
        secs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_flow_is_counted_at_the_sink() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let listen = listener.local_addr().unwrap();
        let sink = std::thread::spawn(move || sink(listener, 3, Duration::from_secs(20)));
        let pairs: Vec<Pair> = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
            .iter()
            .map(|a| Pair::parse(&format!("{a}>{listen}")).unwrap())
            .collect();
        let sent = send(&pairs, Duration::from_millis(300), Duration::from_secs(10)).unwrap();
        let mut got = sink.join().unwrap();
        got.sort_by_key(|r| r.peer.ip());
        assert_eq!(got.len(), 3);
        for (r, s) in got.iter().zip(&sent) {
            assert_eq!(r.peer, s.local);
            assert_eq!(r.bytes, s.bytes, "the sink saw every byte written");
            assert!(r.bytes > 0 && r.bps() > 0.0);
            let parsed = FlowReport::parse(&format!("test x ... {}", r.line()));
            assert_eq!(parsed.map(|p| p.bytes), Some(r.bytes));
        }
    }

    #[test]
    fn a_flow_that_cannot_connect_fails_the_run() {
        // A port nobody listens on (bound, then closed).
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let pairs = [Pair::parse(&format!("127.0.0.1>127.0.0.1:{port}")).unwrap()];
        let err = send(&pairs, Duration::from_millis(100), Duration::from_millis(300)).unwrap_err();
        assert!(format!("{err:#}").contains("1 of 1 flows failed"), "{err:#}");
    }
}
