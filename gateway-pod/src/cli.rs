//! Command line. Every flag can also be set through the `CONCENTRATOR_*` variable shown in
//! `--help`.

use std::net::SocketAddr;
use std::path::PathBuf;

use concentrator_telemetry::LogFormat;

/// Gateway pod of the concentrator: terminates IKEv2/ESP tunnels for the eroutes and egroups
/// found in a config directory.
#[derive(Clone, Debug, clap::Parser)]
#[command(name = "concentrator-gateway", version, about, long_about = None, subcommand_negates_reqs = true)]
pub struct Options {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Directory with Eroute/Egroup YAML (every *.yaml/*.yml, multi-document allowed) and
    /// Secrets as secrets/<name>/<key>. Required to run the gateway.
    #[arg(long, env = "CONCENTRATOR_CONFIG_DIR", value_name = "DIR", required = true)]
    pub config_dir: Option<PathBuf>,

    /// Directory for state: the embedded SQLite site store (sites.db) lives here.
    #[arg(
        long,
        env = "CONCENTRATOR_DATA_DIR",
        value_name = "DIR",
        default_value = "/var/lib/concentrator"
    )]
    pub data_dir: PathBuf,

    /// Default site store instead of the embedded one: mysql://user:pass@host:port/db
    /// (mariadb:// works too) or sqlite:PATH. Prefer the variable: a URL on the command
    /// line is visible to every local user.
    #[arg(
        long,
        env = "CONCENTRATOR_SITE_DB",
        value_name = "URL",
        hide_env_values = true
    )]
    pub site_db: Option<String>,

    /// Address of the gRPC admin API (tunnels, counters, drain) and gRPC health.
    #[arg(
        long,
        env = "CONCENTRATOR_ADMIN_LISTEN",
        value_name = "ADDR",
        default_value = "127.0.0.1:50051"
    )]
    pub admin_listen: SocketAddr,

    /// Directory with the admin API's TLS files, laid out as a kubernetes.io/tls Secret with
    /// ca.crt: tls.crt and tls.key (this gateway's certificate and key), ca.crt (the CA that
    /// signs the clients' certificates and the other gateways'). Set: the admin API requires
    /// mutual TLS, and `tunnels` and the fleet-wide tunnel list present this certificate.
    /// Unset: plaintext, allowed only on a loopback --admin-listen.
    #[arg(long, env = "CONCENTRATOR_ADMIN_TLS_DIR", value_name = "DIR")]
    pub admin_tls_dir: Option<PathBuf>,

    /// DNS name that the admin API's certificate must carry, checked by `tunnels` and by the
    /// gateways of a fleet asking each other (whatever address they connect to).
    #[arg(
        long,
        env = "CONCENTRATOR_ADMIN_TLS_SERVER_NAME",
        value_name = "NAME",
        default_value = concentrator_proto::tls::DEFAULT_SERVER_NAME
    )]
    pub admin_tls_server_name: String,

    /// Address of the Prometheus endpoint (/metrics, /healthz, /readyz).
    #[arg(
        long,
        env = "CONCENTRATOR_METRICS_LISTEN",
        value_name = "ADDR",
        default_value = "127.0.0.1:9090"
    )]
    pub metrics_listen: SocketAddr,

    /// Log format; the level comes from RUST_LOG (default info). OTLP trace export is on
    /// when OTEL_EXPORTER_OTLP_ENDPOINT is set.
    #[arg(long, env = "CONCENTRATOR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty)]
    pub log_format: LogFormat,

    /// Validate the config directory, print a summary and exit (0 valid, 2 invalid).
    #[arg(long, env = "CONCENTRATOR_CHECK")]
    pub check: bool,

    /// Address IKE (UDP 500 and 4500) listens on.
    #[arg(
        long,
        env = "CONCENTRATOR_IKE_LISTEN",
        value_name = "IP",
        default_value = "0.0.0.0"
    )]
    pub ike_listen: std::net::IpAddr,

    /// UDP port of IKE.
    #[arg(long, env = "CONCENTRATOR_IKE_PORT", default_value_t = 500)]
    pub ike_port: u16,

    /// UDP port of IKE after NAT detection and of ESP in UDP (RFC 3948).
    #[arg(long, env = "CONCENTRATOR_NAT_T_PORT", default_value_t = 4500)]
    pub nat_t_port: u16,

    /// TUN device that carries the sites' inner traffic; routes to the sites' subnets point
    /// to it.
    #[arg(long, env = "CONCENTRATOR_TUN_NAME", default_value = "concentrator0")]
    pub tun_name: String,

    /// MTU of the TUN device (the path MTU minus ESP-in-UDP overhead, at most 73 octets).
    #[arg(long, env = "CONCENTRATOR_TUN_MTU", default_value_t = 1400)]
    pub tun_mtu: u16,

    /// Wait before the first retransmission of a request this gateway sends (liveness
    /// checks); each next one waits twice as long.
    #[arg(long, env = "CONCENTRATOR_IKE_RETRANSMIT_TIMEOUT", value_name = "DURATION", default_value = "2s", value_parser = humantime::parse_duration)]
    pub ike_retransmit_timeout: std::time::Duration,

    /// Retransmissions of an unanswered request before the peer is deemed dead and its
    /// IKE SA and tunnels are removed (with the defaults: after 126 s).
    #[arg(long, env = "CONCENTRATOR_IKE_RETRANSMIT_TRIES", default_value_t = 5)]
    pub ike_retransmit_tries: u32,

    /// Half-open IKE SAs (IKE_SA_INIT answered, IKE_AUTH not finished) from which new
    /// initiators must first return a cookie (RFC 7296 §2.6): the defence against floods of
    /// IKE_SA_INIT from spoofed addresses.
    #[arg(long, env = "CONCENTRATOR_IKE_COOKIE_THRESHOLD", default_value_t = 1000)]
    pub ike_cookie_threshold: usize,

    /// Half-open IKE SAs at which new IKE_SA_INIT requests are dropped.
    #[arg(long, env = "CONCENTRATOR_IKE_MAX_HALF_OPEN", default_value_t = 20000)]
    pub ike_max_half_open: usize,

    /// Send new sites that support redirects (RFC 5685) to this gateway (an address or a
    /// name) instead of accepting them here; established tunnels stay.
    #[arg(long, env = "CONCENTRATOR_REDIRECT_TO", value_name = "GATEWAY")]
    pub redirect_to: Option<String>,

    /// Also carry plain ESP (IP protocol 50 on a raw socket; needs CAP_NET_RAW) for sites
    /// that do not float to UDP: without a NAT in between, IKE then stays on port 500 and
    /// the tunnel uses plain ESP. Without this flag every site is made to use ESP in UDP on
    /// the NAT-T port (what a Kubernetes Service can carry).
    #[arg(long, env = "CONCENTRATOR_RAW_ESP")]
    pub raw_esp: bool,

    /// Clamp the MSS that TCP SYNs through the tunnels announce (both ways): `auto` (in a
    /// fleet, so that a full-size packet forwarded between pods fits the pod network's MTU
    /// unfragmented; standalone, no clamp), `off`, or an MSS in bytes for every tunnel (as
    /// iptables' `TCPMSS --set-mss`).
    #[arg(
        long,
        env = "CONCENTRATOR_TCP_MSS_CLAMP",
        value_name = "auto|off|BYTES",
        default_value = "auto"
    )]
    pub tcp_mss_clamp: crate::dataplane::mss::MssClampOption,

    /// IKE control workers: the IKE SAs are shared out over them by SPI, each with its own
    /// engine and sockets. Default: one (more gave no gain on 2 cores, BENCHMARKS.md). A
    /// fleet member runs one.
    #[arg(long, env = "CONCENTRATOR_IKE_WORKERS", value_name = "N", default_value_t = crate::control::default_workers(), value_parser = parse_ike_workers)]
    pub ike_workers: usize,

    /// Steer IKE on port 4500 (and on 500, with several workers) to the IKE workers' own
    /// sockets with a BPF program on the port's SO_REUSEPORT group, so the data plane's
    /// threads read ESP only. `off`: they read it and pass it on, as before (for comparison;
    /// a kernel that refuses the program falls back to that by itself).
    #[arg(long, env = "CONCENTRATOR_IKE_STEERING", value_name = "on|off", default_value = "on", action = clap::ArgAction::Set, value_parser = parse_on_off)]
    pub ike_steering: bool,

    /// etcd client URLs (comma-separated): join the fleet of gateway pods that share this
    /// etcd and key prefix (shard ownership, site claims, SPI routing). Unset: a standalone
    /// gateway.
    #[arg(
        long,
        env = "CONCENTRATOR_FLEET_ETCD",
        value_name = "URL",
        value_delimiter = ','
    )]
    pub fleet_etcd: Vec<String>,

    /// Key prefix of the fleet in etcd (several fleets can share one etcd).
    #[arg(
        long,
        env = "CONCENTRATOR_FLEET_PREFIX",
        value_name = "PREFIX",
        default_value = "/concentrator"
    )]
    pub fleet_prefix: String,

    /// This pod's name in the fleet (default: the host name). A StatefulSet pod's ordinal
    /// (`gw-3` → 3) is its member ID.
    #[arg(long, env = "CONCENTRATOR_FLEET_MEMBER", value_name = "NAME")]
    pub fleet_member: Option<String>,

    /// Where the other pods reach this one (IP, or IP:PORT; port 4510 by default): the pod
    /// IP. Required with --fleet-etcd.
    #[arg(long, env = "CONCENTRATOR_FLEET_ADDRESS", value_name = "IP[:PORT]")]
    pub fleet_address: Option<String>,

    /// File with the fleet key (at least 32 random bytes, e.g. `head -c 32 /dev/urandom`),
    /// the same in every pod: it authenticates and encrypts pod-to-pod traffic; a pod with
    /// another key is refused. Required with --fleet-etcd.
    #[arg(long, env = "CONCENTRATOR_FLEET_KEY_FILE", value_name = "PATH")]
    pub fleet_key_file: Option<PathBuf>,

    /// On SIGTERM in a fleet: how long to hand tunnels over to the other members (a drain)
    /// before exiting. Keep it below the pod's terminationGracePeriodSeconds.
    #[arg(long, env = "CONCENTRATOR_DRAIN_TIMEOUT", value_name = "DURATION", default_value = "45s", value_parser = humantime::parse_duration)]
    pub drain_timeout: std::time::Duration,

    /// TTL of the pod's etcd lease: a pod that dies loses its shards after this long.
    #[arg(long, env = "CONCENTRATOR_FLEET_LEASE_TTL", value_name = "DURATION", default_value = "3s", value_parser = humantime::parse_duration)]
    pub fleet_lease_ttl: std::time::Duration,

    /// Copies of each shard's SAs kept on other members, so that pods that die lose no
    /// tunnel: with N, any N members lost at once lose nothing (0: a dead pod's sites
    /// reconnect). Each copy costs its bytes on the pod network and memory on its member.
    #[arg(long, env = "CONCENTRATOR_FLEET_REPLICAS", value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=4))]
    pub fleet_replicas: u8,

    /// After a take-over, synchronize IKE Message IDs (RFC 6311) with the sites that
    /// announced it, for IKE SAs with AES-CBC. Off by default: strongSwan leaves a request it
    /// had in flight unsent after a sync (see docs/fleet.md); the catch-up window does
    /// without it.
    #[arg(long, env = "CONCENTRATOR_FLEET_MESSAGE_ID_SYNC")]
    pub fleet_message_id_sync: bool,

    /// The VIP front's address (the one sites are configured with): turns on the director
    /// (docs/fleet.md, "The VIP front"). One member, elected in etcd, answers a new site
    /// that supports RFC 5685 with a REDIRECT to the least-loaded member's
    /// --fleet-redirect-address; sites that were redirected, or do not support redirects,
    /// are served as in the SLB front.
    #[arg(long, env = "CONCENTRATOR_FLEET_VIP", value_name = "IP")]
    pub fleet_vip: Option<std::net::IpAddr>,

    /// This pod's own stable address that sites are redirected to (its per-pod Service
    /// address, never the pod IP), published in its member record. Without it (and without
    /// --fleet-redirect-addresses-file) the director never sends a site here.
    #[arg(long, env = "CONCENTRATOR_FLEET_REDIRECT_ADDRESS", value_name = "IP")]
    pub fleet_redirect_address: Option<std::net::IpAddr>,

    /// A file of `<member name> <IP>` lines (the operator's ConfigMap of per-pod Service
    /// addresses): this pod's redirect address is on the line of its --fleet-member name.
    /// Read again at each load report, so an address that appears later is published.
    #[arg(
        long,
        env = "CONCENTRATOR_FLEET_REDIRECT_ADDRESSES_FILE",
        value_name = "PATH",
        conflicts_with = "fleet_redirect_address"
    )]
    pub fleet_redirect_addresses_file: Option<PathBuf>,

    /// With --fleet-vip: the director redirects a new site only once it has authenticated,
    /// in its IKE_AUTH response (RFC 5685 §6; Huawei's second mode), instead of in
    /// IKE_SA_INIT: a site learns no member's address before it proves its key, at the cost
    /// of a Diffie-Hellman and an authentication on the director per new site.
    #[arg(long, env = "CONCENTRATOR_FLEET_REDIRECT_IN_AUTH", requires = "fleet_vip")]
    pub fleet_redirect_in_auth: bool,

    /// With --fleet-vip: a member holding clearly more than its even share of tunnels sends
    /// sites that support it elsewhere (an RFC 5685 REDIRECT on their established IKE SA, to
    /// the least-loaded member), one or a few a second, never a site twice in 300 s
    /// (strongSwan follows at most 5 redirects in 300 s). Each moved site renegotiates.
    #[arg(long, env = "CONCENTRATOR_FLEET_REBALANCE", requires = "fleet_vip")]
    pub fleet_rebalance: bool,

    /// CA bundle (PEM) that signs etcd's server certificate: etcd over TLS.
    #[arg(long, env = "CONCENTRATOR_FLEET_ETCD_CA", value_name = "PATH")]
    pub fleet_etcd_ca: Option<PathBuf>,

    /// Client certificate (PEM) for etcd, with --fleet-etcd-key.
    #[arg(
        long,
        env = "CONCENTRATOR_FLEET_ETCD_CERT",
        value_name = "PATH",
        requires = "fleet_etcd_key"
    )]
    pub fleet_etcd_cert: Option<PathBuf>,

    /// Client key (PEM) for etcd, with --fleet-etcd-cert.
    #[arg(
        long,
        env = "CONCENTRATOR_FLEET_ETCD_KEY",
        value_name = "PATH",
        requires = "fleet_etcd_cert"
    )]
    pub fleet_etcd_key: Option<PathBuf>,

    /// Serve only the admin API and metrics: no IKE, no TUN device (no tunnels; needs no
    /// privileges). For inspecting a configuration or a site store.
    #[arg(long, env = "CONCENTRATOR_NO_TUNNELS")]
    pub no_tunnels: bool,
}

/// Maintenance of the site store (the same --data-dir / --site-db as the gateway).
#[derive(Clone, Debug, clap::Subcommand)]
pub enum Command {
    /// Create the default site table and its indexes (idempotent). For an external MySQL,
    /// this is the documented schema; the gateway never migrates one by itself.
    Migrate,
    /// Site rows.
    #[command(subcommand)]
    Sites(SitesCommand),
    /// Carry traffic through one ESP-in-UDP tunnel with SAs whose keys are given by hand (no
    /// IKE): for testing the data plane and for benchmarks. Runs until stopped.
    EspStatic(Box<EspStaticArgs>),
    /// List the tunnels of a running gateway through its admin API (--admin-listen).
    Tunnels {
        /// Only peers whose ID matches this pattern (`*` and `?` wildcards).
        #[arg(long, value_name = "PATTERN")]
        peer_id: Option<String>,
        /// Only tunnels derived from this base eroute.
        #[arg(long, value_name = "NAME")]
        eroute: Option<String>,
        /// Every member's tunnels in a fleet (with the member holding each), not only this
        /// gateway's. Exits with 3 if a member's list could not be had (named on stderr).
        #[arg(long)]
        fleet: bool,
    },
    /// Drain a running gateway through its admin API (--admin-listen): it refuses new sites
    /// and reports not ready; in a fleet it hands its tunnels over to the other members.
    /// Prints the state and the tunnels left. Exits 0 once asked (with --wait: once drained),
    /// 1 if the gateway cannot be reached, 4 if --wait runs out.
    Drain {
        /// Stop draining: take new sites again.
        #[arg(long, conflicts_with_all = ["wait", "exit"])]
        cancel: bool,
        /// Wait until no tunnel is left.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits.
        #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        /// The gateway exits once drained.
        #[arg(long)]
        exit: bool,
    },
}

/// A tunnel with hand-made SAs. Both ends must mirror each other's SPIs and keys.
#[derive(Clone, Debug, clap::Args)]
pub struct EspStaticArgs {
    /// Name of the TUN device to create.
    #[arg(long, default_value = "esp0")]
    pub tun_name: String,
    /// Our inner address with prefix, put on the TUN device (e.g. 10.1.0.1/32).
    #[arg(long)]
    pub tun_address: ipnet::IpNet,
    /// MTU of the TUN device.
    #[arg(long, default_value_t = 1400)]
    pub mtu: u16,
    /// UDP address to receive ESP on.
    #[arg(long, default_value = "0.0.0.0:4500")]
    pub local: SocketAddr,
    /// The peer's UDP address.
    #[arg(long)]
    pub peer: SocketAddr,
    /// Traffic selector on our side.
    #[arg(long)]
    pub local_subnet: ipnet::IpNet,
    /// Traffic selector on the peer's side (routed into the tunnel).
    #[arg(long)]
    pub remote_subnet: ipnet::IpNet,
    /// ESP proposal of both SAs (an AEAD: aes128gcm16, aes256gcm16, chacha20poly1305).
    #[arg(long, default_value = "aes128gcm16")]
    pub cipher: String,
    /// SPI of the SA we send on (hex).
    #[arg(long)]
    pub spi_out: String,
    /// SPI of the SA we receive on (hex).
    #[arg(long)]
    pub spi_in: String,
    /// Key material of the outbound SA, hex: key then 4-byte salt.
    #[arg(long, env = "CONCENTRATOR_ESP_KEY_OUT", hide_env_values = true)]
    pub key_out: String,
    /// Key material of the inbound SA, hex: key then 4-byte salt.
    #[arg(long, env = "CONCENTRATOR_ESP_KEY_IN", hide_env_values = true)]
    pub key_in: String,
    /// Anti-replay window in packets.
    #[arg(long, default_value_t = 4096)]
    pub replay_window: u32,
    /// Plain ESP (IP protocol 50 on a raw socket) instead of ESP in UDP: for peers that do
    /// not float to UDP. The ports of --local and --peer are then ignored.
    #[arg(long)]
    pub raw_esp: bool,
    /// Also install this many SA pairs that carry nothing, each for its own /28 in
    /// 10.128.0.0/9 (at most 524,288): one tunnel's throughput among many SAs, as a
    /// head-end with that many sites has them in its tables.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=524_288))]
    pub background_sas: u32,
}

/// `sites ...`
#[derive(Clone, Debug, clap::Subcommand)]
pub enum SitesCommand {
    /// Bulk-load a CSV (header: peer_id,psk,remote_subnet[,peer_address][,backup_peer_address])
    /// into the default table, replacing rows with the same peer_id; all rows or none.
    Import {
        /// The CSV file.
        file: PathBuf,
        /// Refuse subnets whose prefix length differs (the Egroup's remoteSubnetPrefix).
        #[arg(long, value_name = "LEN")]
        prefix: Option<u8>,
    },
}

/// `--ike-workers`: 1 to [`crate::control::MAX_IKE_WORKERS`].
fn parse_ike_workers(s: &str) -> Result<usize, String> {
    let max = crate::control::MAX_IKE_WORKERS;
    match s.parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(format!("a number of workers from 1 to {max}")),
    }
}

/// `on` or `off`.
fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err("on or off".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn every_flag_has_an_env_variable() {
        let cmd = <Options as clap::CommandFactory>::command();
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" || id == "command" {
                continue;
            }
            let env = arg.get_env().and_then(|e| e.to_str()).unwrap_or_default();
            assert!(
                env.starts_with("CONCENTRATOR_"),
                "--{id} has no CONCENTRATOR_* variable"
            );
        }
    }

    #[test]
    fn parses_flags() {
        let o =
            Options::try_parse_from(["g", "--config-dir", "ex", "--check", "--log-format", "json"]).unwrap();
        assert!(o.check);
        assert_eq!(o.log_format, LogFormat::Json);
        assert!(Options::try_parse_from(["g"]).is_err(), "config dir is required");
        let o = Options::try_parse_from([
            "g",
            "--data-dir",
            "/tmp/x",
            "sites",
            "import",
            "s.csv",
            "--prefix",
            "24",
        ])
        .unwrap();
        assert!(matches!(
            o.command,
            Some(Command::Sites(SitesCommand::Import { prefix: Some(24), .. }))
        ));
        assert!(
            Options::try_parse_from(["g", "migrate"]).is_ok(),
            "maintenance needs no config dir"
        );
        let steering = |args: &[&str]| {
            Options::try_parse_from(["g", "--config-dir", "ex"].iter().chain(args))
                .map(|o| o.ike_steering)
                .ok()
        };
        assert_eq!(steering(&[]), Some(true));
        assert_eq!(steering(&["--ike-steering", "off"]), Some(false));
        assert_eq!(steering(&["--ike-steering", "on"]), Some(true));
        assert_eq!(steering(&["--ike-steering", "yes"]), None);
    }
}
