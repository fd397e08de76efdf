//! Throughput benchmark (not a timed test; ignored by default). In one run, on the same
//! machine, iperf3 TCP through the plain veth/bridge path underneath, our ESP-in-UDP data
//! plane between two of our gateways (`esp-static`, which runs the gateway's own data plane
//! workers with one hand-keyed SA pair), and strongSwan to strongSwan over kernel-libipsec,
//! plus this CPU's AES-128-GCM seal rate at 1400 B (aws-lc-rs through our `AeadKey`, one
//! core); it prints the ratios. The veth and our runs alternate `BENCH_ROUNDS` times, and the
//! ratios use their medians: one veth run on this shared 2-core machine varies by ±20%.
//! Run as root, in release mode for meaningful numbers:
//!
//!   cargo test --release -p concentrator-gateway --test bench_throughput -- --ignored --nocapture
//!
//! `BENCH_SECONDS` sets the length of each iperf3 run (default 5), `BENCH_ROUNDS` the number
//! of veth/ours pairs (default 1), `BENCH_STREAMS` the number
//! of parallel TCP streams (default 1; iperf3 `-P`), `BENCH_GATEWAY_BIN` another
//! `concentrator-gateway` binary to measure instead of this build's.
//!
//! `BENCH_BACKGROUND_SAS=N` (issue 21) adds, in each round, the same tunnel between a second
//! pair of our gateways that also hold N idle SA pairs each (`esp-static --background-sas`,
//! one /28 per SA, as a head-end with N sites has them): one tunnel's throughput with N SAs
//! installed against 1.

use std::net::IpAddr;
use std::time::Duration;

mod common;

use common::{A, B, End, as_refs, esp_static_args, gateway_bin};
use concentrator_e2e::netns::{self, Netns, Wan};
use concentrator_e2e::prereq;
use concentrator_e2e::strongswan::{self, Charon, Connection};

fn secs() -> String {
    std::env::var("BENCH_SECONDS").unwrap_or_else(|_| "5".into())
}

fn rounds() -> usize {
    std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(1)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Plaintext bits per second that one core seals with AES-128-GCM in 1400-byte ESP
/// payloads (our `AeadKey`: salt, explicit IV, ESP AAD), over about a second.
fn seal_rate() -> f64 {
    use concentrator_crds::proposal::Encryption;
    use concentrator_crypto::aead::{AeadKey, IvCounter, esp_aad};
    let key = AeadKey::new(Encryption::AesGcm16 { key_bits: 128 }, &[7; 20]).unwrap();
    let mut ivs = IvCounter::new();
    let mut buf = vec![0u8; 1400 + 16];
    let start = std::time::Instant::now();
    let mut packets = 0u64;
    while start.elapsed() < Duration::from_secs(1) {
        for seq in 0..1000u64 {
            let (aad, len) = esp_aad(0x1234, packets + seq, false);
            key.seal_in_place(&ivs.next_iv().unwrap(), &aad[..len], &mut buf)
                .unwrap();
        }
        packets += 1000;
    }
    packets as f64 * 1400.0 * 8.0 / start.elapsed().as_secs_f64()
}

fn streams() -> String {
    std::env::var("BENCH_STREAMS").unwrap_or_else(|_| "1".into())
}

/// iperf3 from `client` (bound to `from`) to a server in `server` on `to`; bits/s received.
fn iperf(client: &Netns, server: &Netns, from: &str, to: &str, logs: &std::path::Path, tag: &str) -> f64 {
    // The server binds `to`, which may live on a TUN device that is still being set up:
    // start it once the address answers.
    let to_addr: IpAddr = to.parse().unwrap();
    client
        .wait_reachable(Some(from.parse().unwrap()), to_addr, Duration::from_secs(20))
        .unwrap();
    let _srv = server
        .spawn(
            &format!("iperf3 server {tag}"),
            "iperf3",
            &["-s", "-1", "-B", to],
            &logs.join(format!("{tag}-server.log")),
        )
        .unwrap();
    let mut last = String::new();
    for _ in 0..50 {
        let out = client
            .output(
                "iperf3",
                &["-c", to, "-B", from, "-t", &secs(), "-P", &streams(), "-J"],
            )
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            if let Some(bps) = v["end"]["sum_received"]["bits_per_second"].as_f64() {
                return bps;
            }
        }
        // The server may not listen yet (or an early run did not finish): retry.
        last = text;
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("iperf3 {tag} never ran: {last}");
}

#[test]
#[ignore = "benchmark: run explicitly (see the file's doc)"]
fn throughput_ours_vs_strongswan_vs_veth() {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS]).is_skip() {
        return;
    }
    let logs = tempfile::tempdir().unwrap();
    let wan = Wan::new().unwrap();
    let (a, b, c, d) = (
        Netns::new("benchA").unwrap(),
        Netns::new("benchB").unwrap(),
        Netns::new("benchC").unwrap(),
        Netns::new("benchD").unwrap(),
    );
    for (ns, ip) in [
        (&a, "192.0.2.1/24"),
        (&b, "192.0.2.2/24"),
        (&c, "192.0.2.3/24"),
        (&d, "192.0.2.4/24"),
    ] {
        wan.attach(ns, "wan0", ip.parse().unwrap()).unwrap();
    }

    let background: u32 = std::env::var("BENCH_BACKGROUND_SAS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // The same tunnel between E and F, whose tables also hold `background` idle SAs.
    let crowded = (background > 0).then(|| {
        let (e, f) = (Netns::new("benchE").unwrap(), Netns::new("benchF").unwrap());
        wan.attach(&e, "wan0", "192.0.2.5/24".parse().unwrap()).unwrap();
        wan.attach(&f, "wan0", "192.0.2.6/24".parse().unwrap()).unwrap();
        let (ee, ff) = (
            End {
                wan: "192.0.2.5",
                ..A
            },
            End {
                wan: "192.0.2.6",
                ..B
            },
        );
        let n = background.to_string();
        let args = |me: &End, peer: &End| {
            let mut v = esp_static_args(me, peer);
            v.extend(["--background-sas".to_owned(), n.clone()]);
            v
        };
        let (ae, af) = (args(&ee, &ff), args(&ff, &ee));
        let ge = e
            .spawn("ours E", gateway_bin(), &as_refs(&ae), &logs.path().join("e.log"))
            .unwrap();
        let gf = f
            .spawn("ours F", gateway_bin(), &as_refs(&af), &logs.path().join("f.log"))
            .unwrap();
        (e, f, ge, gf)
    });
    let (aa, bb) = (esp_static_args(&A, &B), esp_static_args(&B, &A));
    let _ga = a
        .spawn("ours A", gateway_bin(), &as_refs(&aa), &logs.path().join("a.log"))
        .unwrap();
    let _gb = b
        .spawn("ours B", gateway_bin(), &as_refs(&bb), &logs.path().join("b.log"))
        .unwrap();
    // The gateways idle while the veth path runs: the WAN addresses are theirs too.
    let (mut veths, mut ourss, mut crowdeds) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds() {
        veths.push(iperf(
            &a,
            &b,
            "192.0.2.1",
            "192.0.2.2",
            logs.path(),
            &format!("veth{round}"),
        ));
        ourss.push(iperf(
            &a,
            &b,
            "10.1.0.1",
            "10.2.0.1",
            logs.path(),
            &format!("ours{round}"),
        ));
        if let Some((e, f, _, _)) = &crowded {
            crowdeds.push(iperf(
                e,
                f,
                "10.1.0.1",
                "10.2.0.1",
                logs.path(),
                &format!("crowded{round}"),
            ));
        }
    }
    let (veth, ours) = (median(&veths), median(&ourss));

    c.add_lo_addr("10.3.0.1/24".parse().unwrap()).unwrap();
    d.add_lo_addr("10.4.0.1/24".parse().unwrap()).unwrap();
    let (cc, cd) = (Charon::start(&c).unwrap(), Charon::start(&d).unwrap());
    let conn = Connection::new(
        "bench",
        "192.0.2.3".parse().unwrap(),
        "192.0.2.4".parse().unwrap(),
        "bench-psk-not-secret",
        vec!["10.3.0.0/24".parse().unwrap()],
        vec!["10.4.0.0/24".parse().unwrap()],
    );
    cd.load(&[conn.mirrored()]).unwrap();
    cc.load(&[conn]).unwrap();
    cc.initiate("bench").unwrap();
    cc.wait_established("bench", "bench", Duration::from_secs(15))
        .unwrap();
    let swan = iperf(&c, &d, "10.3.0.1", "10.4.0.1", logs.path(), "strongswan");

    let seal = seal_rate();

    let g = |bps: f64| bps / 1e9;
    let all = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{:.2}", g(*x)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "iperf3 TCP, {} s each, {} stream(s), one tunnel, AES-128-GCM, {} round(s) (medians):",
        secs(),
        streams(),
        veths.len()
    );
    println!(
        "  veth path:                       {:>8.3} Gbit/s  [{}]",
        g(veth),
        all(&veths)
    );
    println!(
        "  ours (esp-static, ESP in UDP):   {:>8.3} Gbit/s  [{}]",
        g(ours),
        all(&ourss)
    );
    println!("  strongSwan kernel-libipsec:      {:>8.3} Gbit/s", g(swan));
    println!("  AES-128-GCM seal, 1400 B, 1 core:{:>8.3} Gbit/s", g(seal));
    println!("  ours / strongSwan:               {:>8.1}x", ours / swan);
    println!("  ours / veth:                     {:>8.1}%", 100.0 * ours / veth);
    let per_round: Vec<String> = veths
        .iter()
        .zip(&ourss)
        .map(|(v, o)| format!("{:.1}%", 100.0 * o / v))
        .collect();
    println!("  ours / veth, each round:         {}", per_round.join(" "));
    println!("  ours / AES-GCM seal rate:        {:>8.1}%", 100.0 * ours / seal);
    if !crowdeds.is_empty() {
        let crowded = median(&crowdeds);
        println!(
            "  ours, {background} more SAs installed: {:>8.3} Gbit/s  [{}]",
            g(crowded),
            all(&crowdeds)
        );
        println!("  with {background} SAs / with 1:      {:>8.2}x", crowded / ours);
        assert!(crowded > 0.0);
    }
    assert!(ours > 0.0 && swan > 0.0 && veth > 0.0 && seal > 0.0);
}
