//! ESP the gateway must refuse, from real peers, captured and re-injected by the test:
//!
//! - a strongSwan site (kernel-libipsec) pings through its tunnel to `concentrator-gateway`
//!   while a raw-socket sniffer in the site namespace records the ESP-in-UDP datagrams it
//!   sends to port 4500. Re-sent unchanged they are replays; with a flipped ciphertext or ICV
//!   byte, a rewritten sequence number or cut short (each under a fresh sequence number far
//!   above anything sent) they fail integrity; under an SPI nobody uses they are unknown. Each
//!   kind is dropped and counted in `/metrics`, none reaches the TUN device, and the tunnel
//!   still carries the next real packets (the forged sequence numbers did not move the
//!   anti-replay window);
//! - two of our gateways with hand-keyed SAs (`esp-static`), the sender's selector wider than
//!   what the receiver accepts from it: packets from outside the receiver's remote subnet, or
//!   toward outside its local one, decrypt fine but are dropped and counted as policy drops,
//!   while traffic inside the selectors passes.
//!
//! No capture tool beyond python3 (an `AF_PACKET` socket) is needed. As non-root every test
//! prints SKIP and passes.

use std::path::Path;

use anyhow::{Context, Result, ensure};
use concentrator_e2e::netns::{self, Netns, Wan, addr};
use concentrator_e2e::process::Daemon;
use concentrator_e2e::strongswan;
use concentrator_e2e::tools::{self, Tool};
use concentrator_e2e::topology::{GW_ADDR, GW_HOST, SITE_HOST, SITE_ID};
use concentrator_e2e::wait::{self, Probe};
use concentrator_e2e::{logs, prereq, scratch};

mod common;

use common::site::{SiteGateway, TIMEOUT};
use common::{A, B, End, as_refs, esp_static_args};

const BIN: &str = env!("CARGO_BIN_EXE_concentrator-gateway");
/// Pings whose ESP packets are captured.
const CAPTURED_PINGS: usize = 5;
/// How far above the highest captured sequence number the forged packets go: beyond the
/// largest anti-replay window (65536), so that a window moved by a forged packet would make
/// the site's next real packets "too old".
const SEQ_JUMP: u32 = 1_000_000;
/// `kill`, to stop `esp-static` with SIGTERM so that it prints its counters.
const KILL: Tool = Tool::search("kill", "procps");

/// Records every ESP-in-UDP datagram this namespace sends to `argv[1]:4500` on `wan0` (IKE
/// with the non-ESP marker and keepalives skipped), one hex line each, to `argv[2]`.
const SNIFFER: &str = r#"
import socket, struct, sys
gw = socket.inet_aton(sys.argv[1])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
s.bind(("wan0", 0))
out = open(sys.argv[2], "w")
print("sniffing", flush=True)
while True:
    frame, addr = s.recvfrom(65535)
    if addr[2] != socket.PACKET_OUTGOING or len(frame) < 34:
        continue
    if struct.unpack("!H", frame[12:14])[0] != 0x0800:
        continue
    ip = frame[14:]
    ihl = (ip[0] & 15) * 4
    if ip[9] != 17 or ip[16:20] != gw:
        continue
    total = struct.unpack("!H", ip[2:4])[0]
    udp = ip[ihl:total]
    if len(udp) < 8 or struct.unpack("!H", udp[2:4])[0] != 4500:
        continue
    payload = udp[8:]
    if len(payload) < 8 or payload[:4] == b"\0\0\0\0":
        continue
    out.write(payload.hex() + "\n")
    out.flush()
"#;

/// Sends each hex line of `argv[2]` as one UDP datagram to `argv[1]:4500`, from an ephemeral
/// port.
const INJECTOR: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
n = 0
for line in open(sys.argv[2]):
    line = line.strip()
    if line:
        s.sendto(bytes.fromhex(line), (sys.argv[1], 4500))
        n += 1
print("sent", n)
"#;

/// The gateway's ESP counters, from one scrape of `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct EspCounters {
    packets_in: f64,
    invalid: f64,
    unknown_spi: f64,
    policy: f64,
}

/// A strongSwan site with its tunnel up to our gateway.
struct Setup(SiteGateway);

impl std::ops::Deref for Setup {
    type Target = SiteGateway;

    fn deref(&self) -> &SiteGateway {
        &self.0
    }
}

impl std::ops::DerefMut for Setup {
    fn deref_mut(&mut self) -> &mut SiteGateway {
        &mut self.0
    }
}

impl Setup {
    fn start(ike: &str, esp: &str) -> Result<Self> {
        let psk = concentrator_e2e::ids::random_hex(32);
        let s = SiteGateway::start("ed", ike, esp, &psk)?;
        s.establish(&s.connection(ike, esp, &psk, SITE_ID))?;
        Ok(Self(s))
    }

    /// The sum of the samples of metric `name` (exactly that name, any labels), which must
    /// exist.
    fn metric_sum(&self, name: &str) -> Result<f64> {
        let text = self.gw.run("curl", &["-sf", "http://127.0.0.1:9090/metrics"])?;
        let labelled = format!("{name}{{");
        let mut found = false;
        let mut sum = 0.0;
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((key, value)) = line.rsplit_once(' ') else {
                continue;
            };
            if key == name || key.starts_with(&labelled) {
                found = true;
                sum += value
                    .parse::<f64>()
                    .with_context(|| format!("metric line {line:?}"))?;
            }
        }
        ensure!(found, "no metric {name} in /metrics:\n{text}");
        Ok(sum)
    }

    fn counters(&self) -> Result<EspCounters> {
        Ok(EspCounters {
            packets_in: self.metric_sum("concentrator_gateway_esp_packets_in_total")?,
            invalid: self.metric_sum("concentrator_gateway_esp_dropped_invalid_total")?,
            unknown_spi: self.metric_sum("concentrator_gateway_esp_dropped_unknown_spi_total")?,
            policy: self.metric_sum("concentrator_gateway_esp_dropped_policy_total")?,
        })
    }

    /// Waits until the counters are exactly `want` (an overshoot fails at the timeout, with
    /// what was seen).
    fn wait_counters(&self, what: &str, want: EspCounters) -> Result<()> {
        wait::until(format!("{what}: counters {want:?}"), TIMEOUT, || {
            let now = self.counters()?;
            Ok(if now == want {
                Probe::Ready(())
            } else {
                Probe::pending(format!("{now:?}"))
            })
        })
        .with_context(|| self.logs())
    }

    /// Pings `count` times from the site's LAN to the gateway's through the tunnel; all must
    /// be answered.
    fn ping(&self, count: usize) -> Result<()> {
        let n = count.to_string();
        let out = self.site.output(
            "ping",
            &["-c", &n, "-i", "0.2", "-W", "2", "-n", "-I", SITE_HOST, GW_HOST],
        )?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            text.contains(&format!("{count} received")),
            "ping through the tunnel:\n{text}{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        Ok(())
    }

    /// Sends `packets` to the gateway's port 4500 from the site namespace.
    fn inject(&self, name: &str, packets: &[Vec<u8>]) -> Result<()> {
        let file = self.dir.path().join(format!("inject-{name}.hex"));
        let text: String = packets.iter().map(|p| hex(p) + "\n").collect();
        std::fs::write(&file, text)?;
        let out = self.site.run(
            "python3",
            &["-c", INJECTOR, GW_ADDR, file.to_str().context("path")?],
        )?;
        ensure!(out.trim() == format!("sent {}", packets.len()), "injector: {out}");
        Ok(())
    }

    /// Captures the ESP packets the site sends while it pings [`CAPTURED_PINGS`] times, and
    /// checks that the gateway delivered each of them.
    fn capture_pings(&self) -> Result<Vec<Vec<u8>>> {
        let before = self.counters()?;
        let file = self.dir.path().join("captured.hex");
        let log = self.dir.path().join("sniffer.log");
        let mut sniffer = self.site.spawn(
            "sniffer",
            "python3",
            &["-u", "-c", SNIFFER, GW_ADDR, file.to_str().context("path")?],
            &log,
        )?;
        wait::until("the sniffer to start", TIMEOUT, || {
            sniffer.ensure_running()?;
            Ok(if logs::contains(&log, "sniffing") {
                Probe::Ready(())
            } else {
                Probe::pending(logs::tail(&log, 5))
            })
        })?;
        self.ping(CAPTURED_PINGS)?;
        // Every captured packet was delivered by the gateway: re-sent, each is a replay.
        let packets = wait::until("the captured packets to be delivered", TIMEOUT, || {
            sniffer.ensure_running()?;
            let packets = read_capture(&file)?;
            let delivered = self.counters()?.packets_in - before.packets_in;
            Ok(
                if packets.len() >= CAPTURED_PINGS && delivered == packets.len() as f64 {
                    Probe::Ready(packets)
                } else {
                    Probe::pending(format!("{} captured, {delivered} delivered", packets.len()))
                },
            )
        })
        .with_context(|| self.logs())?;
        drop(sniffer);
        Ok(packets)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The complete lines of the sniffer's output, decoded.
fn read_capture(file: &Path) -> Result<Vec<Vec<u8>>> {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let complete = text.rsplit_once('\n').map_or("", |(done, _)| done);
    complete
        .lines()
        .map(|l| {
            (0..l.len())
                .step_by(2)
                .map(|i| {
                    l.get(i..i + 2)
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                        .with_context(|| format!("bad capture line {l:?}"))
                })
                .collect()
        })
        .collect()
}

fn spi(p: &[u8]) -> u32 {
    u32::from_be_bytes([p[0], p[1], p[2], p[3]])
}

fn seq(p: &[u8]) -> u32 {
    u32::from_be_bytes([p[4], p[5], p[6], p[7]])
}

fn with_seq(p: &[u8], seq: u32) -> Vec<u8> {
    let mut p = p.to_vec();
    p[4..8].copy_from_slice(&seq.to_be_bytes());
    p
}

fn flipped(mut p: Vec<u8>, at: usize) -> Vec<u8> {
    p[at] ^= 0x01;
    p
}

/// Replays, tampered packets and an unknown SPI against a strongSwan site's tunnel with ESP
/// proposal `esp`.
fn replayed_and_tampered_esp_is_dropped_and_counted(ike: &str, esp: &str) -> Result<()> {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS, &[tools::CURL, tools::PYTHON3]]).is_skip() {
        return Ok(());
    }
    let mut s = Setup::start(ike, esp)?;
    let start = s.counters()?;
    ensure!(
        start.invalid == 0.0 && start.unknown_spi == 0.0 && start.policy == 0.0,
        "drops before the test: {start:?}\n{}",
        s.logs()
    );

    let captured = s.capture_pings()?;
    let base = s.counters()?;
    let first = &captured[0];
    let our_spi = spi(first);
    ensure!(
        captured.iter().all(|p| spi(p) == our_spi),
        "captured packets of several SPIs: {:?}",
        captured
            .iter()
            .map(|p| format!("{:08x}", spi(p)))
            .collect::<Vec<_>>()
    );
    let top = captured.iter().map(|p| seq(p)).max().context("no packets")?;
    eprintln!(
        "captured {} ESP packets, SPI {our_spi:08x}, sequence numbers {:?}, {} bytes each",
        captured.len(),
        captured.iter().map(|p| seq(p)).collect::<Vec<_>>(),
        first.len()
    );

    // (a) The same bytes again: each a replay, dropped before decryption, nothing delivered.
    s.inject("replay", &captured)?;
    let after_replay = EspCounters {
        invalid: base.invalid + captured.len() as f64,
        ..base
    };
    s.wait_counters("replayed packets dropped as invalid", after_replay)?;

    // (b) Tampered, each under a fresh sequence number far above anything the site sent (so
    // that anti-replay cannot be what refuses them): integrity must.
    // ESP: SPI 4, sequence 4, IV 8 (GCM) or 16 (CBC), ciphertext, ICV 16 (GCM, HMAC-SHA-256-128).
    let len = first.len();
    let middle = len / 2;
    ensure!(
        middle > 24 && middle < len - 16,
        "a {len}-byte packet has no ciphertext byte in its middle"
    );
    let fresh = top + SEQ_JUMP;
    let tampered = vec![
        // A ciphertext byte flipped.
        flipped(with_seq(first, fresh), middle),
        // An ICV byte flipped.
        flipped(with_seq(first, fresh + 1), len - 1),
        // Only the sequence number rewritten: it is authenticated too.
        with_seq(first, fresh + 2),
        // Cut short after the IV: malformed.
        with_seq(first, fresh + 3)[..24].to_vec(),
    ];
    s.inject("tampered", &tampered)?;
    let after_tamper = EspCounters {
        invalid: after_replay.invalid + tampered.len() as f64,
        ..after_replay
    };
    s.wait_counters("tampered packets dropped as invalid", after_tamper)?;

    // (c) An SPI nobody uses.
    let unknown: Vec<Vec<u8>> = (0..3u32)
        .map(|i| {
            let mut p = with_seq(first, fresh + 10 + i);
            p[..4].copy_from_slice(&(!our_spi).to_be_bytes());
            p
        })
        .collect();
    s.inject("unknown-spi", &unknown)?;
    let after_unknown = EspCounters {
        unknown_spi: after_tamper.unknown_spi + unknown.len() as f64,
        ..after_tamper
    };
    s.wait_counters("packets for an unknown SPI dropped", after_unknown)?;

    // The tunnel still works: the site's next sequence numbers (just above `top`) are
    // accepted, so no forged packet moved the window; nothing more is dropped.
    s.gateway.ensure_running()?;
    s.ping(3)?;
    s.wait_counters(
        "the tunnel to carry the next pings",
        EspCounters {
            packets_in: after_unknown.packets_in + 3.0,
            ..after_unknown
        },
    )?;
    ensure!(!logs::contains(s.gateway.log_path(), "panicked"), "{}", s.logs());
    Ok(())
}

#[test]
fn replayed_and_tampered_esp_is_dropped_and_counted_with_aes128gcm16() -> Result<()> {
    replayed_and_tampered_esp_is_dropped_and_counted("aes128gcm16-prfsha256-x25519", "aes128gcm16")
}

#[test]
fn replayed_and_tampered_esp_is_dropped_and_counted_with_aes128_sha256() -> Result<()> {
    replayed_and_tampered_esp_is_dropped_and_counted("aes128-sha256-ecp256", "aes128-sha256")
}

/// The counters `esp-static` prints when stopped: `(out, in, dropped, policy_dropped)`.
fn esp_static_counters(log: &Path) -> Result<(u64, u64, u64, u64)> {
    let text = std::fs::read_to_string(log)?;
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with("esp-static: out "))
        .with_context(|| format!("no counters line in the log:\n{text}"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let after = |key: &str| -> Result<u64> {
        let i = words
            .iter()
            .position(|w| *w == key)
            .with_context(|| format!("no {key:?} in {line:?}"))?;
        words
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no number after {key:?} in {line:?}"))
    };
    Ok((
        after("out")?,
        after("in")?,
        after("dropped")?,
        after("policy-dropped")?,
    ))
}

/// The tails of both `esp-static` gateways' logs in `dir`.
fn dump(dir: &Path) -> String {
    format!(
        "A log:\n{}\nB log:\n{}",
        logs::tail(&dir.join("a.log"), 20),
        logs::tail(&dir.join("b.log"), 20)
    )
}

/// `esp-static` gateway A (end `a_end`, toward [`B`]) in `a` and gateway B in `b`, logging to
/// `a.log` and `b.log` in `dir`; returns them once a ping from A's LAN reaches B's.
fn start_and_ping(a: &Netns, b: &Netns, a_end: &End<'_>, dir: &Path) -> Result<[Daemon; 2]> {
    let args_a = esp_static_args(a_end, &B);
    let args_b = esp_static_args(&B, &A);
    let gateways = [
        a.spawn("gateway A", BIN, &as_refs(&args_a), &dir.join("a.log"))?,
        b.spawn("gateway B", BIN, &as_refs(&args_b), &dir.join("b.log"))?,
    ];
    a.wait_reachable(Some(addr(SITE_HOST)), addr(GW_HOST), TIMEOUT)
        .with_context(|| dump(dir))?;
    Ok(gateways)
}

/// Stops `daemon` with SIGTERM (an `esp-static` gateway then prints its counters) and waits
/// until it exits.
fn terminate(daemon: &mut Daemon) -> Result<std::process::ExitStatus> {
    let pid = daemon.pid().to_string();
    let out = std::process::Command::new(KILL.path())
        .args(["-TERM", &pid])
        .output()?;
    ensure!(out.status.success(), "kill -TERM {pid}: {out:?}");
    wait::until(
        format!("{} to exit after SIGTERM", daemon.name()),
        TIMEOUT,
        || {
            Ok(match daemon.exit_status()? {
                Some(status) => Probe::Ready(status),
                None => Probe::pending("running"),
            })
        },
    )
}

#[test]
fn traffic_outside_the_selectors_is_dropped_and_counted() -> Result<()> {
    if prereq::require(&[netns::TOOLS, &[KILL]]).is_skip() {
        return Ok(());
    }
    let wan = Wan::new()?;
    let (a, b) = (wan.host("selA", A.wan, None)?, wan.host("selB", B.wan, None)?);
    // No IPv6 on the TUN devices: the kernel's own IPv6 packets (router solicitations, MLD)
    // would go into A's tunnel and be counted as policy drops by B, at times of their own.
    for ns in [&a, &b] {
        ns.run(
            "sh",
            &["-c", "echo 1 >/proc/sys/net/ipv6/conf/default/disable_ipv6"],
        )?;
    }
    let dir = scratch::dir("esp-selectors")?;
    let log_b = dir.path().join("b.log");
    let dump = || dump(dir.path());

    // A claims all of 10.1.0.0/16; B accepts only 10.1.0.0/24 from it. Inside the
    // selectors: passes.
    let wide_a = End {
        subnet: "10.1.0.0/16",
        ..A
    };
    let [_ga, mut gb] = start_and_ping(&a, &b, &wide_a, dir.path())?;

    // From 10.1.9.1 (inside A's selector, outside B's remote subnet) ...
    a.add_lo_addr("10.1.9.1/32".parse()?)?;
    let outside_src = a.output(
        "ping",
        &["-c", "3", "-i", "0.2", "-W", "1", "-n", "-I", "10.1.9.1", GW_HOST],
    )?;
    // ... and toward 10.3.0.1 (outside B's local subnet), routed into A's tunnel.
    a.ip(&["route", "add", "10.3.0.0/24", "dev", "esp0"])?;
    let outside_dst = a.output(
        "ping",
        &[
            "-c", "3", "-i", "0.2", "-W", "1", "-n", "-I", SITE_HOST, "10.3.0.1",
        ],
    )?;
    for (what, out) in [("from 10.1.9.1", &outside_src), ("to 10.3.0.1", &outside_dst)] {
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            text.contains("3 packets transmitted, 0 received"),
            "ping {what} outside the selectors:\n{text}\n{}",
            dump()
        );
    }
    // Inside the selectors still passes.
    let inside = a.run(
        "ping",
        &["-c", "3", "-i", "0.2", "-W", "2", "-n", "-I", SITE_HOST, GW_HOST],
    )?;
    ensure!(inside.contains("3 received"), "{inside}\n{}", dump());

    // Stop B with SIGTERM: it prints its counters.
    let status = terminate(&mut gb)?;
    ensure!(status.success(), "gateway B exited with {status}\n{}", dump());
    let (sent, received, dropped, policy) = esp_static_counters(&log_b)?;
    eprintln!("gateway B: out {sent} in {received} dropped {dropped} policy-dropped {policy}");
    ensure!(
        policy == 6,
        "B should have dropped the 6 pings outside its selectors, counted {policy}\n{}",
        dump()
    );
    ensure!(dropped == 0, "B dropped {dropped} as invalid\n{}", dump());
    ensure!(received >= 3, "B delivered only {received} packets\n{}", dump());
    Ok(())
}

/// The largest inner packet one AES-128-GCM ESP-in-UDP datagram carries over a 1200-byte
/// IPv4 path: 1200 - 20 (IPv4) - 8 (UDP) - 8 (SPI, sequence number) - 8 (IV) - 16 (ICV)
/// = 1140 for inner packet, padding and the 2 trailer bytes, padded to a multiple of 4:
/// 1138 (padding 0).
const INNER_MTU_OVER_1200: usize = 1138;

#[test]
fn packets_too_big_for_the_path_get_fragmentation_needed_and_tcp_still_flows() -> Result<()> {
    if prereq::require(&[netns::TOOLS, &[KILL, tools::PYTHON3]]).is_skip() {
        return Ok(());
    }
    let wan = Wan::new()?;
    let (a, b) = (wan.host("mtuA", A.wan, None)?, wan.host("mtuB", B.wan, None)?);
    // The WAN takes 1200 bytes, the TUN devices keep 1400: a full-sized inner packet does
    // not fit one outer datagram.
    for ns in [&a, &b] {
        ns.ip(&["link", "set", "wan0", "mtu", "1200"])?;
    }
    let dir = scratch::dir("esp-mtu")?;
    let log_a = dir.path().join("a.log");
    let dump = || dump(dir.path());
    let [mut ga, _gb] = start_and_ping(&a, &b, &A, dir.path())?;

    // TCP first, before anything taught the kernel the path MTU: its segments (sized for the
    // TUN device, DF set) are refused with "fragmentation needed", the sender's TCP lowers
    // its segment size, and the file arrives intact.
    common::tcp_transfer(&b, GW_HOST, &a, SITE_HOST, dir.path()).with_context(dump)?;

    // A ping with DF that is too big is answered with the MTU that fits ...
    let too_big = a.output(
        "ping",
        &[
            "-c", "2", "-i", "0.2", "-W", "2", "-n", "-M", "do", "-s", "1300", "-I", SITE_HOST, GW_HOST,
        ],
    )?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&too_big.stdout),
        String::from_utf8_lossy(&too_big.stderr)
    );
    let mtu = INNER_MTU_OVER_1200;
    ensure!(
        text.contains(&format!("mtu = {mtu}")) || text.contains(&format!("mtu={mtu}")),
        "ping -M do -s 1300 should report mtu {mtu}:\n{text}\n{}",
        dump()
    );
    // ... exactly that MTU passes with DF (28 bytes of IPv4 and ICMP headers) ...
    let fits = (mtu - 28).to_string();
    let at_mtu = a.run(
        "ping",
        &[
            "-c", "2", "-i", "0.2", "-W", "2", "-n", "-M", "do", "-s", &fits, "-I", SITE_HOST, GW_HOST,
        ],
    )?;
    ensure!(at_mtu.contains("2 received"), "{at_mtu}\n{}", dump());
    // ... and without DF a packet too big for the path still arrives: the outer UDP
    // datagram is fragmented on the way.
    let no_df = a.run(
        "ping",
        &[
            "-c", "2", "-i", "0.2", "-W", "2", "-n", "-M", "dont", "-s", "1300", "-I", SITE_HOST, GW_HOST,
        ],
    )?;
    ensure!(no_df.contains("2 received"), "{no_df}\n{}", dump());

    // A counted what it refused.
    terminate(&mut ga)?;
    let text = std::fs::read_to_string(&log_a)?;
    let too_big_count = text
        .lines()
        .rev()
        .find_map(|l| {
            l.strip_prefix("esp-static: out ")?
                .split(" too-big ")
                .nth(1)?
                .trim()
                .parse::<u64>()
                .ok()
        })
        .with_context(|| format!("no too-big counter in A's log:\n{text}"))?;
    ensure!(
        too_big_count >= 1,
        "A counted {too_big_count} packets too big\n{}",
        dump()
    );
    Ok(())
}
