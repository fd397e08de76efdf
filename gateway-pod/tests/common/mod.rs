//! Shared by the data-plane tests: the arguments of `concentrator-gateway esp-static` for one
//! end of a tunnel, mirrored from the other end's.

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
