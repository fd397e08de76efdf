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
        let interval = format!("{:.3}", interval.as_secs_f64());
        let secs = deadline.as_secs().max(1).to_string();
        let (from, to) = (from.to_string(), to.to_string());
        let args = [
            "-n", "-q", "-i", &interval, "-W", "1", "-w", &secs, "-I", &from, &to,
        ];
        let daemon = ns.spawn("ping", tools::PING.path(), &args, log)?;
        Ok(Self { daemon, deadline })
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
