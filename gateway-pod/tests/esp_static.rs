//! Two of our gateways carry traffic to each other through ESP in UDP: each in its own
//! network namespace, TUN device on the inside, the WAN bridge of the e2e harness outside,
//! SAs with hand-made keys (`concentrator-gateway esp-static`).

use std::path::Path;
use std::time::Duration;

mod common;

use common::{A, B, as_refs, esp_static_args};
use concentrator_e2e::netns::{self, Netns, Wan};
use concentrator_e2e::prereq;
use concentrator_e2e::process::Daemon;

const BIN: &str = env!("CARGO_BIN_EXE_concentrator-gateway");

/// Both gateways' logs, for failure messages.
fn dump(logs: &Path) -> String {
    format!(
        "A log:\n{}\nB log:\n{}",
        std::fs::read_to_string(logs.join("a.log")).unwrap_or_default(),
        std::fs::read_to_string(logs.join("b.log")).unwrap_or_default()
    )
}

/// Gateway A in `a` and gateway B in `b` (`esp-static` plus `extra` arguments, logs in
/// `logs`); returns them once a ping from A's LAN to B's gets three answers out of three.
fn start_and_ping(a: &Netns, b: &Netns, logs: &Path, extra: &[&str]) -> [Daemon; 2] {
    let start = |ns: &Netns, name, mut args: Vec<String>, log| {
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        ns.spawn(name, BIN, &as_refs(&args), &logs.join(log)).unwrap()
    };
    let gateways = [
        start(a, "gateway A", esp_static_args(&A, &B), "a.log"),
        start(b, "gateway B", esp_static_args(&B, &A), "b.log"),
    ];
    // Before the tunnel is up the ping cannot work; once both ends run, it must.
    a.wait_reachable(
        Some("10.1.0.1".parse().unwrap()),
        "10.2.0.1".parse().unwrap(),
        Duration::from_secs(20),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", dump(logs)));
    let out = a
        .run(
            "ping",
            &["-c", "3", "-i", "0.2", "-W", "2", "-I", "10.1.0.1", "10.2.0.1"],
        )
        .unwrap();
    assert!(out.contains("3 received"), "{out}");
    gateways
}

#[test]
fn two_gateways_carry_ping_and_tcp_through_esp_in_udp() {
    if prereq::require(&[netns::TOOLS]).is_skip() {
        return;
    }
    let wan = Wan::new().unwrap();
    let (a, b) = (Netns::new("gwA").unwrap(), Netns::new("gwB").unwrap());
    wan.attach(&a, "wan0", "192.0.2.1/24".parse().unwrap()).unwrap();
    wan.attach(&b, "wan0", "192.0.2.2/24".parse().unwrap()).unwrap();
    let logs = tempfile::tempdir().unwrap();

    let _gateways = start_and_ping(&a, &b, logs.path(), &[]);

    // The traffic really went through ESP on UDP 4500: the WAN carries no inner addresses.
    let link = a.run("ip", &["-s", "link", "show", "esp0"]).unwrap();
    assert!(link.contains("esp0"), "{link}");
    // A TCP transfer of a checksummed file: bytes arrive intact.
    let payload: Vec<u8> = (0..2_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let src = logs.path().join("payload.bin");
    std::fs::write(&src, &payload).unwrap();
    let dst = logs.path().join("received.bin");
    let listener = b
        .spawn("listener", "sh", &["-c", &format!("exec python3 -c 'import socket,sys\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind((\"10.2.0.1\",5001));s.listen(1);c,_=s.accept();f=open(\"{}\",\"wb\")\nwhile True:\n  d=c.recv(65536)\n  if not d: break\n  f.write(d)\nf.close()'", dst.display())], &logs.path().join("listener.log"))
        .unwrap();
    let send = format!(
        "import socket,time\nfor i in range(100):\n  try:\n    s=socket.create_connection((\"10.2.0.1\",5001),timeout=2);break\n  except OSError: time.sleep(0.1)\ns.sendall(open(\"{}\",\"rb\").read());s.close()",
        src.display()
    );
    a.run("python3", &["-c", &send]).unwrap();
    concentrator_e2e::wait::until("the whole file to arrive", Duration::from_secs(20), || {
        let got = std::fs::metadata(&dst).map(|m| m.len()).unwrap_or(0);
        Ok(if got == payload.len() as u64 {
            concentrator_e2e::wait::Probe::Ready(())
        } else {
            concentrator_e2e::wait::Probe::pending(format!("{got} bytes"))
        })
    })
    .unwrap();
    drop(listener);
    assert!(std::fs::read(&dst).unwrap() == payload, "received bytes differ");
}

#[test]
fn two_gateways_carry_ping_and_tcp_through_plain_esp() {
    if prereq::require(&[
        netns::TOOLS,
        &[concentrator_e2e::tools::NFT, concentrator_e2e::tools::PYTHON3],
    ])
    .is_skip()
    {
        return;
    }
    let wan = Wan::new().unwrap();
    let (a, b) = (Netns::new("rawA").unwrap(), Netns::new("rawB").unwrap());
    wan.attach(&a, "wan0", "192.0.2.1/24".parse().unwrap()).unwrap();
    wan.attach(&b, "wan0", "192.0.2.2/24".parse().unwrap()).unwrap();
    // B counts what arrives by protocol: ESP, and UDP to port 4500 (which must stay zero).
    common::count_outer(&b).unwrap();
    let logs = tempfile::tempdir().unwrap();
    let _gateways = start_and_ping(&a, &b, logs.path(), &["--raw-esp"]);
    common::tcp_transfer(&a, "10.1.0.1", &b, "10.2.0.1", logs.path())
        .unwrap_or_else(|e| panic!("{e:#}\n{}", dump(logs.path())));
    let (esp, udp) = common::outer_counts(&b).unwrap();
    // The 2 MB transfer went to B as plain ESP.
    assert!(esp > 2_000_000, "the traffic was not plain ESP: {esp} ESP bytes");
    assert_eq!(udp, 0, "ESP in UDP seen");
}
