//! A ping run in the background, for loss figures: `ping -i INTERVAL -w DEADLINE` in a
//! namespace while the test does something else (freezes etcd, kills a pod), then its
//! transmitted and received counts.

use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::logs;
use crate::netns::Netns;
use crate::process::Daemon;
use crate::tools;
use crate::wait::{self, Probe};

/// What a finished ping run saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PingStats {
    /// Echo requests sent.
    pub transmitted: u32,
    /// Echo replies received.
    pub received: u32,
}

impl PingStats {
    /// Requests that got no reply.
    pub fn lost(&self) -> u32 {
        self.transmitted.saturating_sub(self.received)
    }

    /// The lost share, 0.0 to 1.0 (1.0 when nothing was sent).
    pub fn loss(&self) -> f64 {
        if self.transmitted == 0 {
            1.0
        } else {
            f64::from(self.lost()) / f64::from(self.transmitted)
        }
    }
}

impl fmt::Display for PingStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{} lost ({:.1}%)",
            self.lost(),
            self.transmitted,
            self.loss() * 100.0
        )
    }
}

/// A running `ping`; [`Self::finish`] waits for its deadline and reads the summary.
#[derive(Debug)]
pub struct Ping {
    daemon: Daemon,
    deadline: Duration,
    interval: Duration,
}

impl Ping {
    /// Pings `to` from `from` in `ns` every `interval` for `deadline`, output to `log`.
    /// Each request waits at most one second for its reply (`-W 1`), so a reply that comes
    /// later counts as lost.
    pub fn start(
        ns: &Netns,
        from: IpAddr,
        to: IpAddr,
        interval: Duration,
        deadline: Duration,
        log: &Path,
    ) -> Result<Self> {
        let every = format!("{:.3}", interval.as_secs_f64());
        let secs = deadline.as_secs().max(1).to_string();
        let (from, to) = (from.to_string(), to.to_string());
        // Each reply on its own line (no -q): [`Self::finish_with_gap`] reads them.
        let args = ["-n", "-i", &every, "-W", "1", "-w", &secs, "-I", &from, &to];
        let daemon = ns.spawn("ping", tools::PING.path(), &args, log)?;
        Ok(Self {
            daemon,
            deadline,
            interval,
        })
    }

    /// Waits for ping to end and returns what it counted and its longest time without a
    /// reply ([`largest_gap`]).
    pub fn finish_with_gap(self) -> Result<(PingStats, Duration)> {
        let (interval, path) = (self.interval, self.daemon.log_path().to_owned());
        let stats = self.finish()?;
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok((stats, largest_gap(&text, stats.transmitted, interval)))
    }

    /// Waits for ping to end (its deadline and a margin) and returns what it counted.
    pub fn finish(mut self) -> Result<PingStats> {
        let daemon = &mut self.daemon;
        wait::until(
            "ping to reach its deadline",
            self.deadline + Duration::from_secs(10),
            || {
                Ok(match daemon.exit_status()? {
                    Some(_) => Probe::Ready(()),
                    None => Probe::pending("running"),
                })
            },
        )?;
        let text = std::fs::read_to_string(self.daemon.log_path())
            .with_context(|| format!("reading {}", self.daemon.log_path().display()))?;
        parse_summary(&text).with_context(|| logs::tail(self.daemon.log_path(), 10))
    }
}

/// The longest run of requests without a reply, as time (`interval` per request), among
/// the `transmitted` requests whose replies `text` lists (`icmp_seq=N`, from 1).
pub fn largest_gap(text: &str, transmitted: u32, interval: Duration) -> Duration {
    let mut seqs: Vec<u32> = text
        .lines()
        .filter(|l| l.contains(" bytes from "))
        .filter_map(|l| l.split("icmp_seq=").nth(1))
        .filter_map(|s| s.split_whitespace().next()?.parse().ok())
        .collect();
    seqs.sort_unstable();
    seqs.dedup();
    // Requests 1..=transmitted; a missing run's length is the distance between the replies
    // around it, less one (the edges count from before the first and after the last).
    let mut prev = 0u32;
    let mut worst = 0u32;
    for s in seqs.iter().copied().chain([transmitted.saturating_add(1)]) {
        worst = worst.max(s.saturating_sub(prev).saturating_sub(1));
        prev = s;
    }
    interval * worst
}

/// Reads "N packets transmitted, M received" from ping's summary.
pub fn parse_summary(text: &str) -> Result<PingStats> {
    for line in text.lines() {
        let Some((sent, rest)) = line.split_once(" packets transmitted, ") else {
            continue;
        };
        let received = rest.split_whitespace().next().unwrap_or_default();
        return Ok(PingStats {
            transmitted: sent.trim().parse().context("transmitted count")?,
            received: received.parse().context("received count")?,
        });
    }
    bail!("no ping summary in:\n{text}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_gap_counts_the_longest_run_of_lost_requests() {
        let reply = |n: u32| format!("64 bytes from 10.2.0.1: icmp_seq={n} ttl=64 time=0.1 ms\n");
        let text: String = [1, 2, 3, 9, 10].into_iter().map(reply).collect();
        let i = Duration::from_millis(20);
        assert_eq!(largest_gap(&text, 10, i), i * 5);
        assert_eq!(largest_gap(&text, 16, i), i * 6, "the tail: 11..=16");
        assert_eq!(largest_gap("", 3, i), i * 3);
        let all: String = (1..=4).map(reply).collect();
        assert_eq!(largest_gap(&all, 4, i), Duration::ZERO);
    }

    #[test]
    fn reads_the_summary() {
        let text = "PING 10.2.0.1 (10.2.0.1) from 10.1.1.1 : 56(84) bytes of data.\n\n\
                    --- 10.2.0.1 ping statistics ---\n\
                    125 packets transmitted, 123 received, 1.6% packet loss, time 24870ms\n\
                    rtt min/avg/max/mdev = 0.1/0.2/0.3/0.1 ms\n";
        let s = parse_summary(text).unwrap();
        assert_eq!((s.transmitted, s.received, s.lost()), (125, 123, 2));
        assert_eq!(s.to_string(), "2/125 lost (1.6%)");
        let errors = "10 packets transmitted, 0 received, +10 errors, 100% packet loss\n";
        assert_eq!(parse_summary(errors).unwrap().received, 0);
        assert!(parse_summary("nothing").is_err());
    }
}
