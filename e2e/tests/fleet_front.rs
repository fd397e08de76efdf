//! The fleet's front does what kube-proxy does for a UDP Service, checked with UDP echo
//! servers in the pods instead of gateways: replies come back from the Service address;
//! with ClientIP affinity a client stays on one pod per Service port, its two ports choosing
//! independently; without affinity new flows spread; removing an endpoint moves its clients
//! (affinity and conntrack flushed); a pod cannot send to the WAN outside a client's flow.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use concentrator_e2e::fleet::{self, Affinity, Fleet, FleetOptions, pod_name};
use concentrator_e2e::netns::{self, Netns, addr};
use concentrator_e2e::process::Daemon;
use concentrator_e2e::wait::{self, Probe};
use concentrator_e2e::{etcd, prereq, tools};

const PODS: usize = 3;

/// Answers every datagram on UDP 500 and 4500 with the pod's name.
const ECHO: &str = "import socket,select,sys\nss=[]\nfor p in (500,4500):\n  \
                    s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.bind(('0.0.0.0',p));ss.append(s)\n\
                    while True:\n  r,_,_=select.select(ss,[],[])\n  for s in r:\n    \
                    d,a=s.recvfrom(2000);s.sendto(sys.argv[1].encode(),a)";

/// Sends one datagram from each `src:port` of argv[3..] to argv[1]:argv[2] and prints
/// `port reply-ip reply-port payload` (or `port - - -` when nothing came back).
const CLIENT: &str = "import socket,sys\nsrc,dst,dport=sys.argv[1],sys.argv[2],int(sys.argv[3])\n\
                      for p in sys.argv[4:]:\n  s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n  \
                      s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind((src,int(p)));s.settimeout(1)\n  \
                      s.sendto(b'x',(dst,dport))\n  try:\n    d,a=s.recvfrom(100);print(p,a[0],a[1],d.decode())\n  \
                      except OSError: print(p,'-','-','-')\n  s.close()";

fn skip() -> bool {
    prereq::require(&[netns::TOOLS, etcd::TOOLS, fleet::TOOLS, &[tools::PYTHON3]]).is_skip()
}

/// A fleet network whose pods run UDP echo servers; no gateway.
fn echo_fleet(affinity: Affinity) -> Result<(Fleet, Vec<Daemon>)> {
    let dir = std::env::temp_dir();
    let fleet = Fleet::new(FleetOptions::new(PODS, affinity, "/nonexistent", &dir))?;
    let echoes = fleet
        .pods()
        .iter()
        .map(|p| {
            p.ns().spawn(
                "echo",
                tools::PYTHON3.path(),
                &["-c", ECHO, &p.name()],
                &fleet.dir().join(format!("echo-{}.log", p.name())),
            )
        })
        .collect::<Result<_>>()?;
    Ok((fleet, echoes))
}

/// Which pod answered each of `ports` (as the client's source ports) sending from `src` to
/// the front's `dport`; every answer must come from the front address and port.
fn exchange(
    fleet: &Fleet,
    client: &Netns,
    src: IpAddr,
    dport: u16,
    ports: &[u16],
) -> Result<Vec<Option<usize>>> {
    let front = fleet.front().address();
    let mut args = vec![
        "-c".to_owned(),
        CLIENT.to_owned(),
        src.to_string(),
        front.to_string(),
        dport.to_string(),
    ];
    args.extend(ports.iter().map(u16::to_string));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = client.run(tools::PYTHON3.path(), &refs)?;
    out.lines()
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            match f[..] {
                [_, "-", ..] => Ok(None),
                [_, ip, port, name] => {
                    let from: SocketAddr = format!("{ip}:{port}").parse()?;
                    ensure!(
                        from == SocketAddr::new(front, dport),
                        "a reply came from {from}, not from the front"
                    );
                    Ok((0..PODS).position(|i| pod_name(i) == name))
                }
                _ => bail!("bad client output {line:?}"),
            }
        })
        .collect()
}

/// A client namespace on the WAN with `n` addresses (192.0.2.100, ...).
fn clients(fleet: &Fleet, n: usize) -> Result<(Netns, Vec<IpAddr>)> {
    let ns = fleet.wan().host("client", "192.0.2.100", None)?;
    let mut addrs = vec![addr("192.0.2.100")];
    for i in 1..n {
        let a = addr(&format!("192.0.2.{}", 100 + i));
        ns.add_addr("wan0", format!("{a}/24").parse()?)?;
        addrs.push(a);
    }
    Ok((ns, addrs))
}

/// Waits until the echo servers answer through the front.
fn wait_echo(fleet: &Fleet, client: &Netns, src: IpAddr) -> Result<()> {
    wait::until(
        "the pods' echo servers to answer",
        Duration::from_secs(10),
        || {
            Ok(match exchange(fleet, client, src, 500, &[39999])?[0] {
                Some(_) => Probe::Ready(()),
                None => Probe::pending("no answer"),
            })
        },
    )
}

#[test]
fn client_ip_affinity_holds_per_port_and_endpoint_removal_moves_clients() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let (fleet, _echoes) = echo_fleet(Affinity::client_ip())?;
    let (client, srcs) = clients(&fleet, 12)?;
    wait_echo(&fleet, &client, srcs[0])?;
    let ports: Vec<u16> = (40000..40006).collect();
    let mut split = 0;
    let mut first = Vec::new();
    for src in &srcs {
        let mut chosen = Vec::new();
        for dport in fleet::front::SERVICE_PORTS {
            let pods: BTreeSet<Option<usize>> = exchange(&fleet, &client, *src, dport, &ports)?
                .into_iter()
                .collect();
            let [Some(pod)] = pods.iter().copied().collect::<Vec<_>>()[..] else {
                bail!("{src} to port {dport} went to pods {pods:?}, not to one");
            };
            ensure!(
                fleet.front().affinity_clients(dport, pod)?.contains(src),
                "{src} missing from the affinity set of port {dport}, pod {pod}"
            );
            chosen.push(pod);
        }
        split += usize::from(chosen[0] != chosen[1]);
        first.push(chosen[0]);
    }
    // Twelve clients all on the same pod for both ports: (1/3)^12 if the ports choose
    // independently.
    ensure!(split > 0, "every client's two ports chose the same pod");

    // The first client's port-500 pod leaves: its flows and affinity go, it moves.
    let gone = first[0];
    let before = fleet.front().flows()?;
    ensure!(
        before
            .iter()
            .any(|f| fleet.front().pod_index(f.pod) == Some(gone))
    );
    fleet.front().remove_endpoint(gone)?;
    ensure!(
        !fleet
            .front()
            .flows()?
            .iter()
            .any(|f| fleet.front().pod_index(f.pod) == Some(gone)),
        "conntrack flows to the removed pod survived"
    );
    ensure!(fleet.front().affinity_clients(500, gone)?.is_empty());
    let now = exchange(&fleet, &client, srcs[0], 500, &ports)?;
    ensure!(
        now.iter().all(|p| p.is_some() && *p != Some(gone)),
        "after removing {gone}, {} went to {now:?}",
        srcs[0]
    );
    ensure!(!fleet.front().endpoints().contains(&gone));
    fleet.front().restore_endpoint(gone)?;
    ensure!(fleet.front().endpoints().len() == PODS);

    // A pod writing to a client on its own is dropped at the front, and counted.
    let strays = fleet.front().stray_packets()?;
    let to = format!("('{}',9)", srcs[0]);
    fleet.pod(0).ns().run(
        tools::PYTHON3.path(),
        &[
            "-c",
            &format!("import socket;socket.socket(socket.AF_INET,socket.SOCK_DGRAM).sendto(b'x',{to})"),
        ],
    )?;
    wait::until("the stray packet to be counted", Duration::from_secs(5), || {
        let n = fleet.front().stray_packets()?;
        Ok(if n > strays {
            Probe::Ready(())
        } else {
            Probe::pending(n)
        })
    })
    .with_context(|| fleet.front().ruleset())
}

#[test]
fn without_affinity_new_flows_spread_over_the_pods() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let (fleet, _echoes) = echo_fleet(Affinity::None)?;
    let (client, srcs) = clients(&fleet, 1)?;
    wait_echo(&fleet, &client, srcs[0])?;
    let ports: Vec<u16> = (40000..40030).collect();
    let pods: BTreeSet<Option<usize>> = exchange(&fleet, &client, srcs[0], 500, &ports)?
        .into_iter()
        .collect();
    ensure!(!pods.contains(&None), "a flow got no answer: {pods:?}");
    // 30 flows on one pod: 3 * (1/3)^30.
    ensure!(pods.len() > 1, "30 flows from one client all went to {pods:?}");
    ensure!(fleet.front().affinity_clients(500, 0)?.is_empty());
    Ok(())
}
