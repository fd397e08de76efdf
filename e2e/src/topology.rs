//! The addresses and identities most tests use: one site and one gateway on the WAN
//! (192.0.2.0/24, RFC 5737), each with a /24 LAN behind it whose first address is the host's
//! own (on `lo`, see [`crate::netns::Netns::add_lo_addr`]). Tests with more parties number
//! theirs from here.

use crate::netns::{addr, net};
use crate::strongswan::Connection;

/// The site's WAN address.
pub const SITE_ADDR: &str = "192.0.2.1";
/// The gateway's WAN address.
pub const GW_ADDR: &str = "192.0.2.2";
/// The subnet behind the site.
pub const SITE_LAN: &str = "10.1.0.0/24";
/// The subnet behind the gateway.
pub const GW_LAN: &str = "10.2.0.0/24";
/// The site's address on its LAN.
pub const SITE_HOST: &str = "10.1.0.1";
/// The gateway's address on its LAN.
pub const GW_HOST: &str = "10.2.0.1";
/// The site's IKE identity.
pub const SITE_ID: &str = "site-a.example";
/// The gateway's IKE identity.
pub const GW_ID: &str = "gw.example";

/// The site's view of IKEv2 PSK connection `name` to the gateway, from WAN address `local`
/// ([`SITE_ADDR`], or the site's address behind a NAT): the two LANs as traffic selectors,
/// the two identities, proposals `ike` and `esp`.
pub fn site_connection(name: &str, local: &str, ike: &str, esp: &str, psk: &str) -> Connection {
    let mut c = Connection::new(
        name,
        addr(local),
        addr(GW_ADDR),
        psk,
        vec![net(SITE_LAN)],
        vec![net(GW_LAN)],
    );
    c.local_id = SITE_ID.to_owned();
    c.remote_id = GW_ID.to_owned();
    c.ike_proposal = ike.to_owned();
    c.esp_proposal = esp.to_owned();
    c
}

/// Site `n` of many (1, 2, ...): its WAN address, 192.0.2.{10 + n}.
pub fn site_wan(n: impl Into<usize>) -> String {
    let n = n.into();
    format!("192.0.2.{}", 10 + n)
}

/// Site `n`'s LAN, 10.1.{n}.0/24 (inside 10.1.0.0/16).
pub fn site_lan(n: impl Into<usize>) -> String {
    let n = n.into();
    format!("10.1.{n}.0/24")
}

/// Site `n`'s own address on its LAN, 10.1.{n}.1.
pub fn site_host(n: impl Into<usize>) -> String {
    let n = n.into();
    format!("10.1.{n}.1")
}
