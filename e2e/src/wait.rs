//! Poll a condition until it holds or a timeout passes: the only way this harness waits.

use std::fmt::Display;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// One look at a condition.
#[derive(Debug)]
pub enum Probe<T> {
    /// The condition holds; the wait returns this value.
    Ready(T),
    /// Not yet; the text says what was seen (shown if the wait times out).
    Pending(String),
}

impl<T> Probe<T> {
    /// `Probe::Pending` from anything printable.
    pub fn pending(why: impl Display) -> Self {
        Self::Pending(why.to_string())
    }
}

/// Calls `probe` until it returns [`Probe::Ready`], backing off from 2 ms to 50 ms between
/// calls. An `Err` from `probe` ends the wait at once (a daemon died, a config was refused).
/// After `timeout` it fails with "timed out after .. waiting for {what}" and the last
/// pending state.
pub fn until<T>(
    what: impl Display,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<Probe<T>>,
) -> Result<T> {
    let mut backoff = Backoff::new(timeout);
    loop {
        match probe().with_context(|| format!("while waiting for {what}"))? {
            Probe::Ready(value) => return Ok(value),
            Probe::Pending(why) => std::thread::sleep(backoff.next(&what, why)?),
        }
    }
}

/// [`until`] for async tests: sleeps on the tokio timer, so the tasks under test run.
pub async fn until_async<T>(
    what: impl Display,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<Probe<T>>,
) -> Result<T> {
    let mut backoff = Backoff::new(timeout);
    loop {
        match probe().with_context(|| format!("while waiting for {what}"))? {
            Probe::Ready(value) => return Ok(value),
            Probe::Pending(why) => tokio::time::sleep(backoff.next(&what, why)?).await,
        }
    }
}

/// The pauses of a wait: 2 ms doubling up to 50 ms, and the deadline.
struct Backoff {
    start: Instant,
    timeout: Duration,
    pause: Duration,
}

impl Backoff {
    fn new(timeout: Duration) -> Self {
        Self {
            start: Instant::now(),
            timeout,
            pause: Duration::from_millis(2),
        }
    }

    /// The next pause, or the time-out error with the last pending state.
    fn next(&mut self, what: &impl Display, why: String) -> Result<Duration> {
        let elapsed = self.start.elapsed();
        if elapsed >= self.timeout {
            bail!("timed out after {elapsed:.1?} waiting for {what}; last state: {why}");
        }
        let pause = self.pause.min(self.timeout - elapsed);
        self.pause = (self.pause * 2).min(Duration::from_millis(50));
        Ok(pause)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_ready_value() {
        let mut n = 0;
        let v = until("n to reach 3", Duration::from_secs(5), || {
            n += 1;
            Ok(if n >= 3 {
                Probe::Ready(n)
            } else {
                Probe::pending(n)
            })
        })
        .unwrap();
        assert_eq!(v, 3);
    }

    #[test]
    fn times_out_with_message() {
        let err = until("never", Duration::from_millis(20), || {
            Ok(Probe::<()>::pending("still no"))
        })
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("timed out"), "{msg}");
        assert!(msg.contains("waiting for never"), "{msg}");
        assert!(msg.contains("still no"), "{msg}");
    }

    #[test]
    fn probe_error_aborts() {
        let err = until("x", Duration::from_secs(5), || -> Result<Probe<()>> {
            bail!("daemon died")
        })
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("daemon died"), "{msg}");
        assert!(msg.contains("while waiting for x"), "{msg}");
    }
}
