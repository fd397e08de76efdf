//! CPU use of this process, for the operator's autoscaler: percent of one core over the last
//! sampling interval, from /proc/self/stat (utime + stime).

use std::time::{Duration, Instant};

/// Ticks of CPU time this process has used, or None where /proc is unavailable.
fn cpu_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may contain spaces and parentheses: fields are counted from
    // after its closing parenthesis, where field 3 (state) starts.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let mut fields = rest.split_whitespace();
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Clock ticks per second as the kernel reports CPU times; 100 on every Linux this runs on
/// (USER_HZ is fixed at 100 for the /proc ABI).
const USER_HZ: f64 = 100.0;

/// Percent of one core used between two samples.
pub fn percent(ticks_before: u64, ticks_after: u64, elapsed: Duration) -> u64 {
    let secs = elapsed.as_secs_f64();
    if secs <= 0.0 {
        return 0;
    }
    let used = ticks_after.saturating_sub(ticks_before) as f64 / USER_HZ;
    (used / secs * 100.0).round() as u64
}

/// Samples every `interval` into `gauge` until the task is dropped.
pub fn spawn_sampler(
    gauge: prometheus_client::metrics::gauge::Gauge,
    interval: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let Some(mut last) = cpu_ticks() else {
            tracing::debug!("no /proc/self/stat: CPU use not reported");
            return;
        };
        let mut at = Instant::now();
        loop {
            tokio::time::sleep(interval).await;
            let Some(now_ticks) = cpu_ticks() else { return };
            let now = Instant::now();
            gauge.set(i64::try_from(percent(last, now_ticks, now - at)).unwrap_or(i64::MAX));
            (last, at) = (now_ticks, now);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_of_one_core() {
        assert_eq!(percent(100, 150, Duration::from_secs(1)), 50);
        assert_eq!(percent(100, 300, Duration::from_secs(1)), 200, "two busy cores");
        assert_eq!(percent(100, 100, Duration::from_secs(5)), 0);
        assert_eq!(percent(100, 90, Duration::from_secs(1)), 0, "never negative");
        assert_eq!(percent(0, 10, Duration::ZERO), 0);
    }

    #[test]
    fn reads_own_cpu_time() {
        let before = cpu_ticks().expect("/proc/self/stat on Linux");
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(150) {
            std::hint::black_box(0u64.wrapping_add(1));
        }
        assert!(cpu_ticks().unwrap() > before, "busy-looping costs CPU ticks");
    }
}
