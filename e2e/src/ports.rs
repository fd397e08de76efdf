//! Free TCP ports on 127.0.0.1 for private daemons.
//!
//! Ports are drawn at random from 15000..32000, below Linux's ephemeral range
//! (32768..60999), so outgoing client connections of parallel tests cannot take them between
//! the check and the daemon's `bind`. A port handed out once is never handed out again by
//! this process. Daemon starters still retry with new ports when a bind fails.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, TcpListener};
use std::sync::Mutex;

use anyhow::{Result, bail};

use crate::ids;

const LOW: u16 = 15000;
const HIGH: u16 = 32000;

static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// A TCP port on 127.0.0.1 that nothing listens on right now.
pub fn free_tcp_port() -> Result<u16> {
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..200 {
        let span = u64::from(HIGH - LOW);
        // `% span` keeps the value below HIGH - LOW, which fits in u16.
        let port = LOW + u16::try_from(ids::random_u64() % span).unwrap_or(0);
        if handed_out.contains(&port) {
            continue;
        }
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            handed_out.insert(port);
            return Ok(port);
        }
    }
    bail!("no free TCP port on 127.0.0.1 in {LOW}..{HIGH} after 200 tries")
}

/// How one attempt to start a daemon on freshly picked ports ended.
pub enum Attempt<T> {
    /// It runs.
    Started(T),
    /// Another process took a picked port between the check and the bind: try new ports.
    PortTaken(anyhow::Error),
}

/// Runs `start` with new ports until the daemon runs, a failure other than a port clash
/// occurs, or `attempts` clashes happened.
pub fn start_on_free_ports<T>(
    what: &str,
    attempts: usize,
    mut start: impl FnMut(usize) -> Result<Attempt<T>>,
) -> Result<T> {
    let mut last_error = None;
    for attempt in 0..attempts {
        match start(attempt)? {
            Attempt::Started(t) => return Ok(t),
            Attempt::PortTaken(e) => last_error = Some(e),
        }
    }
    match last_error {
        Some(e) => Err(e.context(format!("{what} could not bind in {attempts} tries"))),
        None => bail!("{what} was not started"),
    }
}

/// Classifies a daemon that failed to come up: killed either way; a bind clash named in `log`
/// may be retried, anything else is final and carries the log's tail.
pub fn failed_start<T>(
    daemon: &mut crate::process::Daemon,
    error: anyhow::Error,
    log: &std::path::Path,
) -> Result<Attempt<T>> {
    daemon.kill();
    if crate::logs::contains(log, "already in use") {
        Ok(Attempt::PortTaken(error))
    } else {
        Err(error.context(crate::logs::tail(log, 30)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_and_bindable() {
        let a = free_tcp_port().unwrap();
        let b = free_tcp_port().unwrap();
        assert_ne!(a, b);
        assert!((LOW..HIGH).contains(&a));
        TcpListener::bind((Ipv4Addr::LOCALHOST, a)).unwrap();
    }
}
