//! One head-end serving groups of sites with different crypto: five responder eroutes on one
//! gateway, pairwise different IKE and ESP proposals (GCM and CBC + HMAC, ChaCha20, X25519,
//! ECP-256/384, MODP-2048/3072), each with its own peer-ID pattern. A strongSwan site of each
//! group connects with its group's proposal and carries traffic both ways; a site whose
//! identity belongs to one group but which offers only another group's IKE proposal is
//! refused in IKE_AUTH (AUTHENTICATION_FAILED) and counted, and the others are unaffected.
//!
//! As non-root every test prints SKIP and passes.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use concentrator_e2e::gateway::Gateway;
use concentrator_e2e::netns::{self, Netns, Wan, addr};
use concentrator_e2e::strongswan::{self, Charon, Connection};
use concentrator_e2e::topology::{GW_ADDR, GW_HOST, GW_ID, GW_LAN, site_host, site_lan, site_wan};
use concentrator_e2e::{logs, prereq, scratch, tools};

const BIN: &str = env!("CARGO_BIN_EXE_concentrator-gateway");
const TIMEOUT: Duration = Duration::from_secs(30);

/// A group of sites: its eroute's name and proposals.
struct Group {
    name: &'static str,
    ike: &'static str,
    esp: &'static str,
    /// The DH group as `swanctl --list-sas` names it: each group's is its own.
    dh: &'static str,
}

const GROUPS: [Group; 5] = [
    Group {
        name: "legacy",
        ike: "aes256-sha256-modp2048",
        dh: "MODP_2048",
        esp: "aes256-sha256",
    },
    Group {
        name: "modern",
        ike: "aes128gcm16-prfsha256-x25519",
        dh: "CURVE_25519",
        esp: "aes128gcm16",
    },
    Group {
        name: "regulated",
        ike: "aes256gcm16-prfsha384-ecp384",
        dh: "ECP_384",
        esp: "aes256gcm16",
    },
    Group {
        name: "iot",
        ike: "aes128-sha256-ecp256",
        dh: "ECP_256",
        esp: "chacha20poly1305",
    },
    Group {
        name: "archive",
        ike: "chacha20poly1305-prfsha512-modp3072",
        dh: "MODP_3072",
        esp: "aes128-sha512",
    },
];

fn peer_id(group: &str) -> String {
    format!("site.{group}.example")
}

/// One static eroute per group, each with its own peer-ID pattern, subnet and PSK.
fn write_config(dir: &Path) -> Result<()> {
    for (n, g) in GROUPS.iter().enumerate() {
        let name = g.name;
        std::fs::create_dir_all(dir.join(format!("secrets/{name}")))?;
        std::fs::write(dir.join(format!("secrets/{name}/psk")), format!("psk-of-{name}"))?;
        std::fs::write(
            dir.join(format!("{name}.yaml")),
            format!(
                "apiVersion: vpn.concentrator.io/v1alpha1\nkind: Eroute\nmetadata:\n  name: {name}\n\
                 spec:\n  localSubnet: {GW_LAN}\n  remoteSubnet: {}\n  peerId: \"*.{name}.example\"\n\
                 \x20 localId: {GW_ID}\n  pskSecretRef:\n    name: {name}\n    key: psk\n  role: Responder\n\
                 \x20 ike:\n    proposals: [{}]\n  esp:\n    proposals: [{}]\n",
                site_lan(n),
                g.ike,
                g.esp
            ),
        )?;
    }
    Ok(())
}

struct Site {
    ns: Netns,
    charon: Charon,
}

fn site(wan_net: &Wan, n: usize, group: &Group, ike: &str) -> Result<Site> {
    let ns = wan_net.host(&format!("eps{n}"), &site_wan(n), Some(&site_host(n)))?;
    let charon = Charon::start(&ns)?;
    let mut c = Connection::new(
        "gw",
        addr(&site_wan(n)),
        addr(GW_ADDR),
        &format!("psk-of-{}", group.name),
        vec![site_lan(n).parse()?],
        vec![GW_LAN.parse()?],
    );
    c.local_id = peer_id(group.name);
    c.remote_id = GW_ID.to_owned();
    c.ike_proposal = ike.to_owned();
    c.esp_proposal = group.esp.to_owned();
    charon.load(&[c])?;
    Ok(Site { ns, charon })
}

#[test]
fn sites_of_eroutes_with_different_proposals_each_connect_with_their_own() -> Result<()> {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS, &[tools::CURL]]).is_skip() {
        return Ok(());
    }
    let wan_net = Wan::new()?;
    let gw = wan_net.host("epgw", GW_ADDR, Some(GW_HOST))?;
    let dir = scratch::dir("eroute-proposals")?;
    write_config(&dir.path().join("gw-config"))?;
    let gateway = Gateway::start(&gw, Path::new(BIN), dir.path(), "gw", GW_ADDR, &[])?;
    let metric = |name: &str, want: f64| {
        concentrator_e2e::gateway::wait_metric(&gw, name, want, TIMEOUT).with_context(|| gateway.log_tail(30))
    };

    let sites: Vec<Site> = GROUPS
        .iter()
        .enumerate()
        .map(|(n, g)| site(&wan_net, n, g, g.ike))
        .collect::<Result<_>>()?;
    for (n, (s, g)) in sites.iter().zip(&GROUPS).enumerate() {
        s.charon
            .initiate("gw")
            .with_context(|| format!("{}: {}\n{}", g.name, s.charon.log_tail(20), gateway.log_tail(20)))?;
        // strongSwan lists the proposal it negotiated: the group's own.
        let sas = s.charon.list_sas()?;
        let dh: Vec<&str> = sas
            .iter()
            .filter_map(|sa| sa.fields.get("dh-group"))
            .map(String::as_str)
            .collect();
        ensure!(dh == [g.dh], "{}: negotiated {sas:?}", g.name);
        s.ns.wait_reachable(Some(addr(&site_host(n))), addr(GW_HOST), TIMEOUT)
            .with_context(|| format!("{} -> head-end\n{}", g.name, gateway.log_tail(20)))?;
        gw.wait_reachable(Some(addr(GW_HOST)), addr(&site_host(n)), TIMEOUT)
            .with_context(|| format!("head-end -> {}", g.name))?;
    }
    metric("concentrator_gateway_ike_sas_established", GROUPS.len() as f64)?;
    let tunnels = gw.run(BIN, &["tunnels"])?;
    for g in &GROUPS {
        ensure!(
            tunnels.contains(&peer_id(g.name)),
            "{} missing from:\n{tunnels}",
            g.name
        );
    }

    // A "modern" site that offers only the legacy group's IKE proposal: IKE_SA_INIT takes it
    // (the legacy eroute allows it), IKE_AUTH refuses it once the identity selects "modern".
    let modern = &GROUPS[1];
    let wrong = site(&wan_net, GROUPS.len(), modern, GROUPS[0].ike)?;
    let _ = wrong.charon.initiate("gw");
    wrong
        .charon
        .wait_logged("AUTHENTICATION_FAILED", TIMEOUT)
        .with_context(|| gateway.log_tail(30))?;
    metric(
        "concentrator_gateway_ike_failures_total{reason=\"ike_proposal_not_allowed\"}",
        1.0,
    )?;
    metric("concentrator_gateway_ike_sas_half_open", 0.0)?;
    ensure!(
        logs::contains(&gateway.log, "ike_proposal_not_allowed"),
        "the refusal is logged:\n{}",
        gateway.log_tail(30)
    );
    // The others are unaffected.
    metric("concentrator_gateway_ike_sas_established", GROUPS.len() as f64)?;
    for (n, (s, g)) in sites.iter().zip(&GROUPS).enumerate() {
        s.ns.wait_reachable(Some(addr(&site_host(n))), addr(GW_HOST), TIMEOUT)
            .with_context(|| format!("{} after the refusal", g.name))?;
    }
    Ok(())
}
