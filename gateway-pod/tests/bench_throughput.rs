//! Throughput benchmark (not a timed test; ignored by default). In one run, on the same
//! machine, iperf3 TCP through the plain veth/bridge path underneath, our ESP-in-UDP data
//! plane between two of our gateways (`esp-static`, which runs the gateway's own data plane
//! workers with one hand-keyed SA pair), and strongSwan to strongSwan over kernel-libipsec;
//! it prints the ratios.
//! Run as root, in release mode for meaningful numbers:
//!
//!   cargo test --release -p concentrator-gateway --test bench_throughput -- --ignored --nocapture
//!
//! `BENCH_SECONDS` sets the length of each iperf3 run (default 5), `BENCH_STREAMS` the number
//! of parallel TCP streams (default 1; iperf3 `-P`), `BENCH_GATEWAY_BIN` another
//! `concentrator-gateway` binary to measure instead of this build's.

use std::net::IpAddr;
use std::time::Duration;

mod common;

use common::{A, B, as_refs, esp_static_args};
use concentrator_e2e::netns::{self, Netns, Wan};
use concentrator_e2e::prereq;
use concentrator_e2e::strongswan::{self, Charon, Connection};

const BIN: &str = env!("CARGO_BIN_EXE_concentrator-gateway");

/// The gateway binary measured: this build's, or `BENCH_GATEWAY_BIN` (another build of it,
/// to compare two versions under the same conditions, one run after the other).
fn gateway_bin() -> String {
    std::env::var("BENCH_GATEWAY_BIN").unwrap_or_else(|_| BIN.into())
}

fn secs() -> String {
    std::env::var("BENCH_SECONDS").unwrap_or_else(|_| "5".into())
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

    let veth = iperf(&a, &b, "192.0.2.1", "192.0.2.2", logs.path(), "veth");

    let (aa, bb) = (esp_static_args(&A, &B), esp_static_args(&B, &A));
    let _ga = a
        .spawn("ours A", gateway_bin(), &as_refs(&aa), &logs.path().join("a.log"))
        .unwrap();
    let _gb = b
        .spawn("ours B", gateway_bin(), &as_refs(&bb), &logs.path().join("b.log"))
        .unwrap();
    let ours = iperf(&a, &b, "10.1.0.1", "10.2.0.1", logs.path(), "ours");

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

    let g = |bps: f64| bps / 1e9;
    println!(
        "iperf3 TCP, {} s each, {} stream(s), one tunnel, AES-128-GCM:",
        secs(),
        streams()
    );
    println!("  veth path:                       {:>8.3} Gbit/s", g(veth));
    println!("  ours (esp-static, ESP in UDP):   {:>8.3} Gbit/s", g(ours));
    println!("  strongSwan kernel-libipsec:      {:>8.3} Gbit/s", g(swan));
    println!("  ours / strongSwan:               {:>8.1}x", ours / swan);
    println!("  ours / veth:                     {:>8.1}%", 100.0 * ours / veth);
    assert!(ours > 0.0 && swan > 0.0 && veth > 0.0);
}
