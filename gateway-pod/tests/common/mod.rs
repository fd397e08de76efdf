// Each test binary includes this module and uses part of it.
#![allow(dead_code)]

//! Shared by the gateway's integration tests: the arguments of `concentrator-gateway
//! esp-static` for one end of a tunnel, mirrored from the other end's; checksummed TCP
//! transfers; static eroutes ([`StaticEroute`]); starting the gateway and reading its metrics
//! and tunnels; in [`site`], a strongSwan site with its gateway; in [`fleet`], a fleet of
//! gateway pods (`concentrator_e2e::fleet`) configured with one egroup for many sites.

pub(crate) mod fleet;
pub(crate) mod fleet_sites;
pub(crate) mod site;

/// One end of a hand-keyed tunnel.
pub(crate) struct End<'a> {
    /// Inner address on the TUN device, e.g. `10.1.0.1/32`.
    pub(crate) tun: &'a str,
    /// WAN address, e.g. `192.0.2.1`.
    pub(crate) wan: &'a str,
    /// Subnet behind this end, e.g. `10.1.0.0/24`.
    pub(crate) subnet: &'a str,
    /// SPI this end receives on (hex).
    pub(crate) spi_in: &'a str,
    /// Key + salt (hex) of the SA this end receives on.
    pub(crate) key_in: &'a str,
}

/// `esp-static` arguments for `me` talking to `peer`: what `me` sends is what `peer` receives.
pub(crate) fn esp_static_args(me: &End, peer: &End) -> Vec<String> {
    let local = format!("{}:4500", me.wan);
    let remote = format!("{}:4500", peer.wan);
    [
        "esp-static",
        "--tun-name",
        "esp0",
        "--tun-address",
        me.tun,
        "--local",
        &local,
        "--peer",
        &remote,
        "--local-subnet",
        me.subnet,
        "--remote-subnet",
        peer.subnet,
        "--spi-out",
        peer.spi_in,
        "--spi-in",
        me.spi_in,
        "--key-out",
        peer.key_in,
        "--key-in",
        me.key_in,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

/// Borrowed views for `Netns::spawn`.
pub(crate) fn as_refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The two ends used by the tests and the benchmark.
pub(crate) const A: End<'static> = End {
    tun: "10.1.0.1/32",
    wan: "192.0.2.1",
    subnet: "10.1.0.0/24",
    spi_in: "a1",
    key_in: "a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3",
};
/// See [`A`].
pub(crate) const B: End<'static> = End {
    tun: "10.2.0.1/32",
    wan: "192.0.2.2",
    subnet: "10.2.0.0/24",
    spi_in: "b1",
    key_in: "000102030405060708090a0b0c0d0e0f10111213",
};

/// Sends a 2 MB pseudo-random file over TCP from `from` (bound to `src`) to a listener on
/// `dst:5001` in `to`, and checks that the bytes arrive intact. `dir` holds the files.
pub(crate) fn tcp_transfer(
    from: &concentrator_e2e::netns::Netns,
    src: &str,
    to: &concentrator_e2e::netns::Netns,
    dst: &str,
    dir: &std::path::Path,
) -> anyhow::Result<()> {
    let payload: Vec<u8> = (0..2_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let transfer = Transfer {
        name: "file",
        port: 5001,
        send: "s.sendall(d)",
    };
    transfer.run(from, src, to, dst, dir, &payload)
}

/// Like [`tcp_transfer`], but one TCP connection paced over `duration` (1000 bytes every
/// 20 ms), so that it spans events such as rekeys; the bytes must arrive intact.
pub(crate) fn paced_tcp_transfer(
    from: &concentrator_e2e::netns::Netns,
    src: &str,
    to: &concentrator_e2e::netns::Netns,
    dst: &str,
    dir: &std::path::Path,
    duration: std::time::Duration,
) -> anyhow::Result<()> {
    let chunks = (duration.as_millis() / 20).max(1) as u32;
    let payload: Vec<u8> = (0..chunks * 1000)
        .map(|i| (i.wrapping_mul(2246822519) >> 24) as u8)
        .collect();
    let transfer = Transfer {
        name: "paced stream",
        port: 5002,
        send: "s.settimeout(30)\nfor i in range(0,len(d),1000):\n  s.sendall(d[i:i+1000]);time.sleep(0.02)",
    };
    transfer.run(from, src, to, dst, dir, &payload)
}

/// One checksummed TCP transfer: a python3 listener writes what it receives to a file, a
/// python3 sender connects (retrying while the path comes up) and runs `send` with the
/// payload in `d` and the socket in `s`.
struct Transfer {
    name: &'static str,
    port: u16,
    send: &'static str,
}

impl Transfer {
    fn run(
        &self,
        from: &concentrator_e2e::netns::Netns,
        src: &str,
        to: &concentrator_e2e::netns::Netns,
        dst: &str,
        dir: &std::path::Path,
        payload: &[u8],
    ) -> anyhow::Result<()> {
        use anyhow::{Context, ensure};
        use concentrator_e2e::wait::{Probe, until};
        let (name, port) = (self.name, self.port);
        let tag = name.replace(' ', "-");
        let sent = dir.join(format!("{tag}-sent-{src}.bin"));
        std::fs::write(&sent, payload)?;
        let received = dir.join(format!("{tag}-received-{dst}.bin"));
        let _ = std::fs::remove_file(&received);
        let listener = to.spawn(
            "listener",
            "python3",
            &[
                "-c",
                &format!(
                    "import socket\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
                     s.bind((\"{dst}\",{port}));s.listen(1);c,_=s.accept();f=open(\"{}\",\"wb\")\n\
                     while True:\n  d=c.recv(65536)\n  if not d: break\n  f.write(d)\nf.close()",
                    received.display()
                ),
            ],
            &dir.join(format!("{tag}-listener-{dst}.log")),
        )?;
        let send = format!(
            "import socket,time\nfor i in range(100):\n  try:\n    s=socket.create_connection((\"{dst}\",{port}),timeout=2,source_address=(\"{src}\",0));break\n  except OSError: time.sleep(0.1)\n\
             d=open(\"{}\",\"rb\").read()\n{}\ns.close()",
            sent.display(),
            self.send
        );
        from.run("python3", &["-c", &send])
            .with_context(|| format!("sending the {name}"))?;
        until(
            format!("the whole {name} to arrive"),
            std::time::Duration::from_secs(30),
            || {
                let got = std::fs::metadata(&received).map(|m| m.len()).unwrap_or(0);
                Ok(if got == payload.len() as u64 {
                    Probe::Ready(())
                } else {
                    Probe::pending(format!("{got} bytes"))
                })
            },
        )?;
        drop(listener);
        ensure!(
            std::fs::read(&received)? == payload,
            "received bytes differ from the sent {name}"
        );
        Ok(())
    }
}

/// A static eroute with its PSK Secret, written as YAML into a gateway's config directory:
/// the responder or initiator end of one tunnel, to a strongSwan site or another of our
/// gateways. Unset optional fields leave the eroute's defaults.
#[derive(Default)]
pub(crate) struct StaticEroute<'a> {
    pub(crate) name: &'a str,
    pub(crate) local_subnet: &'a str,
    pub(crate) remote_subnet: &'a str,
    /// The identity the peer must show.
    pub(crate) peer_id: &'a str,
    pub(crate) local_id: &'a str,
    /// `Some(address)`: role Initiator toward the peer at that address; `None`: Responder.
    pub(crate) initiate_to: Option<&'a str>,
    pub(crate) ike: &'a str,
    pub(crate) esp: &'a str,
    /// `ike.dpdInterval`.
    pub(crate) dpd: Option<&'a str>,
    /// `ike.lifetime` and `esp.lifetime`.
    pub(crate) lifetimes: Option<(&'a str, &'a str)>,
    /// More lines of the `esp` section, each `    key: value\n`.
    pub(crate) esp_extra: &'a str,
    pub(crate) psk: &'a str,
}

impl StaticEroute<'_> {
    /// Writes `{dir}/{name}.yaml` and the PSK as `{dir}/secrets/{name}/psk`.
    pub(crate) fn write(&self, dir: &std::path::Path) -> anyhow::Result<()> {
        let name = self.name;
        std::fs::create_dir_all(dir.join("secrets").join(name))?;
        std::fs::write(dir.join("secrets").join(name).join("psk"), self.psk)?;
        let role = match self.initiate_to {
            Some(addr) => format!("Initiator\n  peerAddress: {addr}"),
            None => "Responder".to_owned(),
        };
        let line =
            |key: &str, value: Option<&str>| value.map(|v| format!("    {key}: {v}\n")).unwrap_or_default();
        let ike_extra = line("dpdInterval", self.dpd) + &line("lifetime", self.lifetimes.map(|l| l.0));
        let esp_extra = line("lifetime", self.lifetimes.map(|l| l.1)) + self.esp_extra;
        std::fs::write(
            dir.join(format!("{name}.yaml")),
            format!(
                "apiVersion: vpn.concentrator.io/v1alpha1\nkind: Eroute\nmetadata:\n  name: {name}\n\
                 spec:\n  localSubnet: {}\n  remoteSubnet: {}\n  peerId: \"{}\"\n  localId: {}\n\
                 \x20 pskSecretRef:\n    name: {name}\n    key: psk\n  role: {role}\n\
                 \x20 ike:\n    proposals: [{}]\n{ike_extra}\
                 \x20 esp:\n    proposals: [{}]\n{esp_extra}",
                self.local_subnet, self.remote_subnet, self.peer_id, self.local_id, self.ike, self.esp
            ),
        )?;
        Ok(())
    }
}

/// The gateway binary tests and benchmarks run: this build's, or `BENCH_GATEWAY_BIN`
/// (another build of it, for a benchmark to compare two versions in the same conditions).
pub(crate) fn gateway_bin() -> String {
    std::env::var("BENCH_GATEWAY_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_concentrator-gateway").into())
}

/// Starts `concentrator-gateway` in `ns` with `{dir}/config` and `{dir}/data`, IKE on
/// `listen`, output to `{dir}/gateway.log`; does not wait (see [`wait_ready`]).
pub(crate) fn spawn_gateway(
    ns: &concentrator_e2e::netns::Netns,
    name: &str,
    dir: &std::path::Path,
    listen: &str,
    extra: &[&str],
) -> anyhow::Result<concentrator_e2e::process::Daemon> {
    use anyhow::Context;
    let (config, data) = (dir.join("config"), dir.join("data"));
    let mut args = vec![
        "--config-dir",
        config.to_str().context("path")?,
        "--data-dir",
        data.to_str().context("path")?,
        "--ike-listen",
        listen,
    ];
    args.extend_from_slice(extra);
    ns.spawn(name, gateway_bin(), &args, &dir.join("gateway.log"))
}

/// [`spawn_gateway`], then [`wait_ready`]: the gateway serves.
pub(crate) fn start_gateway(
    ns: &concentrator_e2e::netns::Netns,
    name: &str,
    dir: &std::path::Path,
    listen: &str,
    extra: &[&str],
) -> anyhow::Result<concentrator_e2e::process::Daemon> {
    let mut daemon = spawn_gateway(ns, name, dir, listen, extra)?;
    wait_ready(&mut daemon, std::time::Duration::from_secs(20))?;
    Ok(daemon)
}

// Metrics of a gateway in a namespace: shared with the tests that use `e2e::gateway` directly.
#[allow(unused_imports)]
pub(crate) use concentrator_e2e::gateway::{metric, wait_metric, wait_ready};

/// The row of `concentrator-gateway tunnels` (run in `ns`) whose peer ID is `peer_id`, split
/// in columns: peer ID, eroute, egroup, peer address, remote subnet, SAs, bytes in, bytes out,
/// idle.
pub(crate) fn tunnel_row(
    ns: &concentrator_e2e::netns::Netns,
    peer_id: &str,
) -> anyhow::Result<Option<Vec<String>>> {
    let table = ns.run(env!("CARGO_BIN_EXE_concentrator-gateway"), &["tunnels"])?;
    Ok(table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(peer_id))
        .map(|l| l.split_whitespace().map(str::to_owned).collect()))
}

/// Counts what arrives in `ns` by outer protocol, for [`outer_counts`]: plain ESP (IP
/// protocol 50) and UDP to port 4500.
pub(crate) fn count_outer(ns: &concentrator_e2e::netns::Netns) -> anyhow::Result<()> {
    ns.run(
        "nft",
        &[
            "add table inet outer; add chain inet outer in { type filter hook input priority 0; }; \
             add rule inet outer in meta l4proto esp counter; \
             add rule inet outer in udp dport 4500 counter",
        ],
    )?;
    Ok(())
}

/// Bytes that reached `ns` as (plain ESP, UDP 4500) since [`count_outer`]. Bytes, not
/// packets: UDP GRO hands the firewall coalesced datagrams.
pub(crate) fn outer_counts(ns: &concentrator_e2e::netns::Netns) -> anyhow::Result<(u64, u64)> {
    use anyhow::Context;
    let out = ns.run("nft", &["list table inet outer"])?;
    let count = |what: &str| -> anyhow::Result<u64> {
        out.lines()
            .find(|l| l.contains(what))
            .and_then(|l| l.split("bytes ").nth(1))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {what} counter in:\n{out}"))
    };
    Ok((count("l4proto esp")?, count("dport 4500")?))
}

/// A positive number from the environment variable `name`, else `default` (benchmark sizes).
#[allow(dead_code)] // Benchmarks only.
pub(crate) fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(default)
}

/// iperf3 TCP from `from` in `client` to the head-end address on `server` for `secs`
/// (`reverse`: the server sends): the bits per second received. The server serves one run.
#[allow(dead_code)] // Benchmarks only.
pub(crate) fn iperf_bps(
    client: &concentrator_e2e::netns::Netns,
    from: std::net::IpAddr,
    server: &concentrator_e2e::netns::Netns,
    reverse: bool,
    secs: u64,
    log: &std::path::Path,
) -> anyhow::Result<f64> {
    use concentrator_e2e::{tools, topology::GW_HOST};
    let _server = server.spawn(
        "iperf3 server",
        tools::IPERF3.path(),
        &["-s", "-1", "-B", GW_HOST],
        log,
    )?;
    let (from, secs) = (from.to_string(), secs.to_string());
    let mut args = vec!["-c", GW_HOST, "-B", &from, "-t", &secs, "-J"];
    if reverse {
        args.push("-R");
    }
    let mut last = String::new();
    for _ in 0..50 {
        let out = client.output(tools::IPERF3.path(), &args)?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_str(&text)?;
            if let Some(bps) = v["end"]["sum_received"]["bits_per_second"].as_f64() {
                return Ok(bps);
            }
        }
        // The server may not listen yet: try again.
        last = text;
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    anyhow::bail!("iperf3 never ran: {last}")
}
