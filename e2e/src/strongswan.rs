//! strongSwan sites: one `charon` per network namespace, configured through `swanctl`.
//!
//! The kernel here has XFRM but no ESP/GCM, so charon uses the `kernel-libipsec` userspace
//! data plane: it creates an `ipsec0` TUN device and routes the remote traffic selectors to
//! it in table 220 (`kernel-netlink` handles routes and addresses only). libipsec always
//! encapsulates ESP in UDP 4500 (charon logs "remote host is behind NAT").
//!
//! Each charon gets its own work dir holding `strongswan.conf` (read via `STRONGSWAN_CONF`),
//! the VICI socket, `charon.log` (filelog) and `charon.out` (stdout/stderr), and runs under
//! `unshare -m` with a private tmpfs on `/run` so pid files of parallel charons do not
//! collide.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use ipnet::IpNet;
use tempfile::TempDir;

use crate::netns::Netns;
use crate::process::{self, COMMAND_TIMEOUT, Daemon};
use crate::tools::{self, Tool};
use crate::wait::{self, Probe};
use crate::{logs, scratch};

/// What this module needs.
pub const TOOLS: &[Tool] = &[
    tools::CHARON,
    tools::SWANCTL,
    tools::UNSHARE,
    tools::MOUNT,
    tools::SH,
    tools::KERNEL_LIBIPSEC,
    tools::GCM_PLUGIN,
    tools::OPENSSL_PLUGIN,
];

/// Plugins charon loads (`charon.load_modular = no`). `openssl` provides X25519; Debian's
/// `curve25519` plugin is in `libstrongswan-extra-plugins`, which is not needed.
pub const CHARON_PLUGINS: &str = "random nonce aes sha1 sha2 hmac gcm openssl pem pkcs1 x509 \
                                  pubkey kdf kernel-libipsec kernel-netlink socket-default vici";

/// Plugins swanctl loads (without a list it tries many that Debian does not ship, and warns).
pub const SWANCTL_PLUGINS: &str = "random nonce pem pkcs1 pkcs8 x509 pubkey openssl";

/// Default IKE proposal of [`Connection::new`].
pub const DEFAULT_IKE_PROPOSAL: &str = "aes128gcm16-prfsha256-x25519";
/// Default ESP proposal of [`Connection::new`].
pub const DEFAULT_ESP_PROPOSAL: &str = "aes128gcm16";

/// How long [`Charon::start`] waits for the VICI socket to answer.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Directories swanctl looks for credentials in, next to the `swanctl.conf` it loads.
const SWANCTL_SUBDIRS: &[&str] = &[
    "x509", "x509ca", "x509ocsp", "x509aa", "x509ac", "x509crl", "pubkey", "private", "rsa", "ecdsa",
    "bliss", "pkcs8", "pkcs12",
];

/// `start_action` of a child config.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StartAction {
    /// Wait for [`Charon::initiate`] (or the peer).
    #[default]
    None,
    /// Initiate as soon as the config is loaded.
    Start,
    /// Install a trap policy; initiate on matching traffic.
    Trap,
}

impl StartAction {
    fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Start => "start",
            Self::Trap => "trap",
        }
    }
}

/// One IKEv2 PSK connection with one child SA of the same name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connection {
    /// Connection and child name (letters, digits, `-`, `_`).
    pub name: String,
    /// Our IKE address.
    pub local_addr: IpAddr,
    /// The peer's IKE address.
    pub remote_addr: IpAddr,
    /// Our IKE identity.
    pub local_id: String,
    /// The peer's IKE identity.
    pub remote_id: String,
    /// Pre-shared key (any bytes; written to swanctl.conf as hex).
    pub psk: String,
    /// Our side's traffic selectors.
    pub local_ts: Vec<IpNet>,
    /// The peer's traffic selectors.
    pub remote_ts: Vec<IpNet>,
    /// IKE proposal, e.g. `aes128gcm16-prfsha256-x25519`.
    pub ike_proposal: String,
    /// ESP proposal, e.g. `aes128gcm16`.
    pub esp_proposal: String,
    /// What charon does when the config is loaded.
    pub start_action: StartAction,
    /// Extra `key = value` lines for the connection section (e.g. `encap = yes`).
    pub extra: Vec<String>,
    /// Extra `key = value` lines for the child section (e.g. `rekey_time = 0`).
    pub child_extra: Vec<String>,
}

impl Connection {
    /// A connection with the default proposals, no start action, and the addresses as IDs.
    pub fn new(
        name: &str,
        local_addr: IpAddr,
        remote_addr: IpAddr,
        psk: &str,
        local_ts: Vec<IpNet>,
        remote_ts: Vec<IpNet>,
    ) -> Self {
        Self {
            name: name.to_owned(),
            local_addr,
            remote_addr,
            local_id: local_addr.to_string(),
            remote_id: remote_addr.to_string(),
            psk: psk.to_owned(),
            local_ts,
            remote_ts,
            ike_proposal: DEFAULT_IKE_PROPOSAL.to_owned(),
            esp_proposal: DEFAULT_ESP_PROPOSAL.to_owned(),
            start_action: StartAction::None,
            extra: Vec::new(),
            child_extra: Vec::new(),
        }
    }

    /// The same connection seen from the peer (local and remote swapped, start action none).
    pub fn mirrored(&self) -> Self {
        Self {
            local_addr: self.remote_addr,
            remote_addr: self.local_addr,
            local_id: self.remote_id.clone(),
            remote_id: self.local_id.clone(),
            local_ts: self.remote_ts.clone(),
            remote_ts: self.local_ts.clone(),
            start_action: StartAction::None,
            ..self.clone()
        }
    }

    fn validate(&self) -> Result<()> {
        ensure!(
            !self.name.is_empty()
                && self
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "connection name {:?} must be letters, digits, - or _",
            self.name
        );
        ensure!(!self.local_ts.is_empty(), "{}: local_ts is empty", self.name);
        ensure!(!self.remote_ts.is_empty(), "{}: remote_ts is empty", self.name);
        let values = [
            &self.local_id,
            &self.remote_id,
            &self.ike_proposal,
            &self.esp_proposal,
        ];
        for v in values.into_iter().chain(&self.extra).chain(&self.child_extra) {
            check_value(v)?;
        }
        Ok(())
    }

    /// The `connections { NAME { ... } }` entry.
    fn write_connection(&self, out: &mut String) {
        let join = |nets: &[IpNet]| nets.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
        let _ = writeln!(out, "  {} {{", self.name);
        let _ = writeln!(out, "    version = 2");
        let _ = writeln!(out, "    local_addrs = {}", self.local_addr);
        let _ = writeln!(out, "    remote_addrs = {}", self.remote_addr);
        let _ = writeln!(out, "    proposals = {}", self.ike_proposal);
        for line in &self.extra {
            let _ = writeln!(out, "    {line}");
        }
        let _ = writeln!(
            out,
            "    local {{\n      auth = psk\n      id = {}\n    }}",
            self.local_id
        );
        let _ = writeln!(
            out,
            "    remote {{\n      auth = psk\n      id = {}\n    }}",
            self.remote_id
        );
        let _ = writeln!(out, "    children {{\n      {} {{", self.name);
        let _ = writeln!(out, "        local_ts = {}", join(&self.local_ts));
        let _ = writeln!(out, "        remote_ts = {}", join(&self.remote_ts));
        let _ = writeln!(out, "        esp_proposals = {}", self.esp_proposal);
        let _ = writeln!(out, "        start_action = {}", self.start_action.as_str());
        for line in &self.child_extra {
            let _ = writeln!(out, "        {line}");
        }
        let _ = writeln!(out, "      }}\n    }}\n  }}");
    }

    /// The `secrets { ike-NAME { ... } }` entry.
    fn write_secret(&self, out: &mut String) {
        let hex: String = self.psk.bytes().map(|b| format!("{b:02x}")).collect();
        let _ = writeln!(out, "  ike-{} {{", self.name);
        let _ = writeln!(out, "    id-local = {}", self.local_id);
        let _ = writeln!(out, "    id-remote = {}", self.remote_id);
        let _ = writeln!(out, "    secret = 0x{hex}");
        let _ = writeln!(out, "  }}");
    }
}

/// swanctl.conf / strongswan.conf values run to the end of the line; braces and `#` would
/// change the structure.
fn check_value(v: &str) -> Result<()> {
    ensure!(
        !v.contains(['\n', '\r', '{', '}', '#']),
        "config value {v:?} must not contain newlines, braces or #"
    );
    Ok(())
}

/// A complete `swanctl.conf` for `conns`.
pub fn swanctl_conf(conns: &[Connection]) -> Result<String> {
    let mut out = String::from("connections {\n");
    for c in conns {
        c.validate()?;
        c.write_connection(&mut out);
    }
    out.push_str("}\nsecrets {\n");
    for c in conns {
        c.write_secret(&mut out);
    }
    out.push_str("}\n");
    Ok(out)
}

/// How a [`Charon`] is started.
#[derive(Clone, Debug)]
pub struct CharonOptions {
    /// `filelog` levels: `("default", 1)`, `("ike", 2)`, ...
    pub log_levels: Vec<(String, i8)>,
    /// Extra `key = value` lines for the `charon { }` section (e.g. `block_threshold = 100`).
    pub extra_settings: Vec<String>,
    /// How long to wait for the VICI socket.
    pub start_timeout: Duration,
}

impl Default for CharonOptions {
    fn default() -> Self {
        Self {
            log_levels: [("default", 1), ("ike", 2), ("cfg", 2), ("knl", 2)]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
            extra_settings: Vec::new(),
            start_timeout: START_TIMEOUT,
        }
    }
}

impl CharonOptions {
    /// Logs SKEYSEED, every SK_* key, child SA keys and the decoded payloads of every message
    /// (`ike = 4`, `chd = 4`, `enc = 3`): a known-answer oracle for key derivation and codec
    /// work.
    pub fn key_oracle() -> Self {
        let mut o = Self::default();
        o.log_levels.extend(
            [("ike", 4), ("chd", 4), ("enc", 3)]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v)),
        );
        o
    }
}

/// A charon daemon in a namespace. Dropping it kills charon (and prints its log tail if the
/// thread is panicking).
#[derive(Debug)]
pub struct Charon {
    ns: String,
    daemon: Daemon,
    conf: PathBuf,
    swanctl_dir: PathBuf,
    log: PathBuf,
    dir: Option<TempDir>,
}

impl Charon {
    /// Starts charon in `ns` with default options and waits until VICI answers.
    pub fn start(ns: &Netns) -> Result<Self> {
        Self::start_with(ns, &CharonOptions::default())
    }

    /// Starts charon in `ns` and waits until VICI answers.
    pub fn start_with(ns: &Netns, options: &CharonOptions) -> Result<Self> {
        let dir = scratch::dir("charon")?;
        let path = dir.path().to_owned();
        let vici = path.join("charon.vici");
        let log = path.join("charon.log");
        let swanctl_dir = path.join("swanctl");
        for sub in SWANCTL_SUBDIRS {
            std::fs::create_dir_all(swanctl_dir.join(sub))?;
        }
        let conf = scratch::write(&path, "strongswan.conf", &strongswan_conf(&vici, &log, options)?)?;

        let mut cmd = ns.command(tools::UNSHARE.path());
        cmd.args(["-m", "--"])
            .arg(tools::SH.path())
            .args(["-c", "mount -t tmpfs none /run && exec \"$0\""])
            .arg(tools::CHARON.path())
            .env("STRONGSWAN_CONF", &conf);
        let daemon = Daemon::spawn(&format!("charon in {}", ns.name()), cmd, &path.join("charon.out"))?;
        let mut charon = Self {
            ns: ns.name().to_owned(),
            daemon,
            conf,
            swanctl_dir,
            log,
            dir: Some(dir),
        };
        charon.wait_vici(options.start_timeout)?;
        Ok(charon)
    }

    fn wait_vici(&mut self, timeout: Duration) -> Result<()> {
        let vici = self.dir_path().join("charon.vici");
        let what = format!("charon in {} to answer on {}", self.ns, vici.display());
        let conf = self.conf.clone();
        let daemon = &mut self.daemon;
        let result = wait::until(&what, timeout, || {
            daemon.ensure_running()?;
            if !vici.exists() {
                return Ok(Probe::pending("no VICI socket yet"));
            }
            let out = process::output(swanctl_command(&conf).arg("--stats"), COMMAND_TIMEOUT)?;
            Ok(if out.status.success() {
                Probe::Ready(())
            } else {
                Probe::pending(String::from_utf8_lossy(&out.stderr).trim().to_owned())
            })
        });
        result.map_err(|e| e.context(self.log_tail(40)))
    }

    /// The namespace charon runs in.
    pub fn namespace(&self) -> &str {
        &self.ns
    }

    /// The work dir (configs, logs, VICI socket).
    pub fn dir_path(&self) -> &Path {
        self.dir.as_ref().map_or(Path::new("/nonexistent"), TempDir::path)
    }

    /// charon's file log.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Tails of charon's file log and of its stdout/stderr, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        format!(
            "charon in {}:\n{}\n{}",
            self.ns,
            logs::tail(&self.log, lines),
            self.daemon.log_tail(10)
        )
    }

    /// A `swanctl` command talking to this charon (via `STRONGSWAN_CONF`).
    pub fn swanctl_command(&self) -> Command {
        swanctl_command(&self.conf)
    }

    /// Runs `swanctl args...`; a non-zero exit is an error with charon's log tail.
    pub fn swanctl(&self, args: &[&str]) -> Result<String> {
        process::run(self.swanctl_command().args(args), COMMAND_TIMEOUT)
            .map_err(|e| e.context(self.log_tail(30)))
    }

    /// Writes `swanctl.conf` for `conns` and loads it (`swanctl --load-all --file F`). This
    /// replaces the whole loaded configuration.
    pub fn load(&self, conns: &[Connection]) -> Result<()> {
        let file = scratch::write(&self.swanctl_dir, "swanctl.conf", &swanctl_conf(conns)?)?;
        let file = file.to_string_lossy().into_owned();
        self.swanctl(&["--load-all", "--file", &file])
            .with_context(|| format!("loading {file} into charon in {}", self.ns))?;
        Ok(())
    }

    /// Initiates child `name` of connection `name` and waits (up to 10 s) for swanctl to
    /// report the result.
    pub fn initiate(&self, name: &str) -> Result<()> {
        self.swanctl(&["--initiate", "--ike", name, "--child", name, "--timeout", "10"])
            .with_context(|| format!("initiating {name} from {}", self.ns))?;
        Ok(())
    }

    /// All IKE SAs (`swanctl --list-sas --pretty`, parsed).
    pub fn list_sas(&self) -> Result<Vec<IkeSa>> {
        let text = self.swanctl(&["--list-sas", "--pretty"])?;
        parse_list_sas(&text)
    }

    /// The child SA `child` of IKE SA `conn`, if any, in whatever state.
    pub fn child_sa(&self, conn: &str, child: &str) -> Result<Option<ChildSa>> {
        Ok(self
            .list_sas()?
            .into_iter()
            .filter(|ike| ike.name == conn)
            .flat_map(|ike| ike.children)
            .find(|c| c.name == child))
    }

    /// Polls until charon's log holds `needle` (e.g. a notify it received); on timeout the
    /// error holds the log's tail.
    pub fn wait_logged(&self, needle: &str, timeout: Duration) -> Result<()> {
        wait::until(
            format!("charon in {} to log {needle:?}", self.ns),
            timeout,
            || {
                Ok(if logs::contains(&self.log, needle) {
                    Probe::Ready(())
                } else {
                    Probe::pending("not yet")
                })
            },
        )
        .map_err(|e| e.context(self.log_tail(30)))
    }

    /// Polls until IKE SA `conn` is ESTABLISHED with child `child` INSTALLED; returns the
    /// child. On timeout the error holds the last SA states and charon's log tail.
    pub fn wait_established(&self, conn: &str, child: &str, timeout: Duration) -> Result<ChildSa> {
        let what = format!("{conn}/{child} ESTABLISHED/INSTALLED in {}", self.ns);
        wait::until(&what, timeout, || {
            let sas = self.list_sas()?;
            let ike = sas.iter().find(|s| s.name == conn && s.state == "ESTABLISHED");
            let found = ike.and_then(|s| {
                s.children
                    .iter()
                    .find(|c| c.name == child && c.state == "INSTALLED")
            });
            Ok(match found {
                Some(c) => Probe::Ready(c.clone()),
                None => Probe::pending(summary(&sas)),
            })
        })
        .map_err(|e| e.context(self.log_tail(40)))
    }
}

impl Drop for Charon {
    fn drop(&mut self) {
        self.daemon.kill();
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail(40));
        }
        if let Some(dir) = self.dir.take() {
            scratch::release(dir);
        }
    }
}

fn swanctl_command(conf: &Path) -> Command {
    let mut cmd = Command::new(tools::SWANCTL.path());
    cmd.env("STRONGSWAN_CONF", conf);
    cmd
}

fn strongswan_conf(vici: &Path, log: &Path, options: &CharonOptions) -> Result<String> {
    let vici = format!("unix://{}", vici.display());
    ensure!(
        vici.len() < 100,
        "VICI socket path {vici} is too long for a unix socket"
    );
    let mut levels = String::new();
    for (subsystem, level) in &options.log_levels {
        check_value(subsystem)?;
        let _ = writeln!(levels, "      {subsystem} = {level}");
    }
    let mut extra = String::new();
    for line in &options.extra_settings {
        check_value(line)?;
        let _ = writeln!(extra, "  {line}");
    }
    Ok(format!(
        "charon {{
  load_modular = no
  load = {CHARON_PLUGINS}
{extra}  plugins {{
    vici {{
      socket = {vici}
    }}
    kernel-libipsec {{
      allow_peer_ts = yes
    }}
  }}
  filelog {{
    charon {{
      path = {log}
      time_format = %H:%M:%S
      ike_name = yes
      append = no
      flush_line = yes
{levels}    }}
  }}
}}
swanctl {{
  load = {SWANCTL_PLUGINS}
  socket = {vici}
}}
",
        log = log.display()
    ))
}

/// One hex dump in a charon log (levels of [`CharonOptions::key_oracle`]): the line
/// `"... <conn|1> <label> => <n> bytes @ 0x..."` and the dump lines after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HexDump {
    /// What charon dumped: `SKEYSEED`, `Sk_d secret`, `encryption initiator key`, ...
    pub label: String,
    /// The dumped bytes.
    pub bytes: Vec<u8>,
}

/// Every hex dump in a charon log, in order. A dump cut short by the end of the log or by a
/// line that is not a dump line keeps the bytes read so far.
pub fn hex_dumps(log: &str) -> Vec<HexDump> {
    let mut out = Vec::new();
    let mut lines = log.lines();
    while let Some(line) = lines.next() {
        let Some((head, tail)) = line.split_once(" => ") else {
            continue;
        };
        let Some(n) = tail
            .split_once(" bytes @ ")
            .and_then(|(n, _)| n.trim().parse::<usize>().ok())
        else {
            continue;
        };
        // "hh:mm:ss tt[IKE] <kat|1> LABEL"
        let label = head.rsplit_once("> ").map_or(head, |(_, l)| l).trim().to_owned();
        let mut bytes = Vec::with_capacity(n);
        while bytes.len() < n {
            // "...> 0: 43 5C 0B ...  ascii": at most 16 bytes, then two spaces.
            let Some((_, dump)) = lines.next().and_then(|l| l.split_once(": ")) else {
                break;
            };
            let row = dump.split(' ').take_while(|t| !t.is_empty()).take(16);
            bytes.extend(row.filter_map(|tok| u8::from_str_radix(tok, 16).ok()));
        }
        bytes.truncate(n);
        out.push(HexDump { label, bytes });
    }
    out
}

/// The bytes of every hex dump whose label ends with `label`, in order.
pub fn hex_dumps_of(log: &str, label: &str) -> Vec<Vec<u8>> {
    hex_dumps(log)
        .into_iter()
        .filter(|d| d.label.ends_with(label))
        .map(|d| d.bytes)
        .collect()
}

/// One IKE SA from `swanctl --list-sas`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IkeSa {
    /// Connection name.
    pub name: String,
    /// `ESTABLISHED`, `CONNECTING`, ...
    pub state: String,
    /// Child SAs.
    pub children: Vec<ChildSa>,
    /// Every scalar field as printed (`local-host`, `encr-alg`, ...).
    pub fields: BTreeMap<String, String>,
}

/// One child SA from `swanctl --list-sas`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChildSa {
    /// Child config name.
    pub name: String,
    /// `INSTALLED`, `REKEYING`, ...
    pub state: String,
    /// Inbound bytes (decrypted payload).
    pub bytes_in: u64,
    /// Outbound bytes.
    pub bytes_out: u64,
    /// Inbound packets.
    pub packets_in: u64,
    /// Outbound packets.
    pub packets_out: u64,
    /// Negotiated local traffic selectors.
    pub local_ts: Vec<String>,
    /// Negotiated remote traffic selectors.
    pub remote_ts: Vec<String>,
    /// Every scalar field as printed (`spi-in`, `encr-alg`, `encap`, ...).
    pub fields: BTreeMap<String, String>,
}

/// A parsed `--pretty` VICI message node.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Node {
    Section(Vec<(String, Self)>),
    Value(String),
    List(Vec<String>),
}

/// Parses `swanctl --pretty` output: `name {` ... `}` sections, `key = value`,
/// `key = [` items `]`.
fn parse_pretty(text: &str) -> Result<Vec<(String, Node)>> {
    let mut stack: Vec<(String, Vec<(String, Node)>)> = vec![(String::new(), Vec::new())];
    let mut list: Option<(String, Vec<String>)> = None;
    for raw in text.lines() {
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        if let Some((key, items)) = &mut list {
            if line == "]" {
                let key = std::mem::take(key);
                let items = std::mem::take(items);
                list = None;
                if let Some(top) = stack.last_mut() {
                    top.1.push((key, Node::List(items)));
                }
            } else {
                items.push(line.to_owned());
            }
        } else if let Some(name) = line.strip_suffix(" {}") {
            if let Some(top) = stack.last_mut() {
                top.1.push((name.to_owned(), Node::Section(Vec::new())));
            }
        } else if let Some(name) = line.strip_suffix(" {") {
            stack.push((name.to_owned(), Vec::new()));
        } else if line == "}" {
            let Some((name, items)) = stack.pop() else {
                bail!("unbalanced }} in swanctl output:\n{text}");
            };
            let Some(top) = stack.last_mut() else {
                bail!("unbalanced }} in swanctl output:\n{text}");
            };
            top.1.push((name, Node::Section(items)));
        } else if let Some((key, value)) = line.split_once(" = ") {
            if value == "[" {
                list = Some((key.to_owned(), Vec::new()));
            } else if let Some(top) = stack.last_mut() {
                top.1.push((key.to_owned(), Node::Value(value.to_owned())));
            }
        }
        // Anything else (log lines) is ignored.
    }
    ensure!(
        stack.len() == 1 && list.is_none(),
        "truncated swanctl output:\n{text}"
    );
    Ok(stack.pop().map(|(_, items)| items).unwrap_or_default())
}

fn scalars(items: &[(String, Node)]) -> BTreeMap<String, String> {
    items
        .iter()
        .filter_map(|(k, v)| match v {
            Node::Value(v) => Some((k.clone(), v.clone())),
            _ => None,
        })
        .collect()
}

fn list(items: &[(String, Node)], key: &str) -> Vec<String> {
    items
        .iter()
        .find_map(|(k, v)| match v {
            Node::List(l) if k == key => Some(l.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

fn section<'a>(items: &'a [(String, Node)], key: &str) -> &'a [(String, Node)] {
    items
        .iter()
        .find_map(|(k, v)| match v {
            Node::Section(s) if k == key => Some(s.as_slice()),
            _ => None,
        })
        .unwrap_or(&[])
}

/// Parses `swanctl --list-sas --pretty` output.
pub fn parse_list_sas(text: &str) -> Result<Vec<IkeSa>> {
    let mut sas = Vec::new();
    for (event, node) in parse_pretty(text)? {
        let Node::Section(conns) = node else { continue };
        if event != "list-sa event" {
            continue;
        }
        for (name, node) in conns {
            let Node::Section(items) = node else { continue };
            let fields = scalars(&items);
            let children = section(&items, "child-sas")
                .iter()
                .filter_map(|(key, node)| match node {
                    Node::Section(c) => Some(child_sa(key, c)),
                    _ => None,
                })
                .collect();
            sas.push(IkeSa {
                name,
                state: fields.get("state").cloned().unwrap_or_default(),
                children,
                fields,
            });
        }
    }
    Ok(sas)
}

fn child_sa(key: &str, items: &[(String, Node)]) -> ChildSa {
    let fields = scalars(items);
    let num = |k: &str| fields.get(k).and_then(|v| v.parse().ok()).unwrap_or(0);
    ChildSa {
        name: fields.get("name").cloned().unwrap_or_else(|| key.to_owned()),
        state: fields.get("state").cloned().unwrap_or_default(),
        bytes_in: num("bytes-in"),
        bytes_out: num("bytes-out"),
        packets_in: num("packets-in"),
        packets_out: num("packets-out"),
        local_ts: list(items, "local-ts"),
        remote_ts: list(items, "remote-ts"),
        fields,
    }
}

fn summary(sas: &[IkeSa]) -> String {
    if sas.is_empty() {
        return "no IKE SAs".to_owned();
    }
    sas.iter()
        .map(|s| {
            let children: Vec<String> = s
                .children
                .iter()
                .map(|c| format!("{} {}", c.name, c.state))
                .collect();
            format!("{} {} [{}]", s.name, s.state, children.join(", "))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_dumps_read_labels_and_bytes_across_lines() {
        let log = "\
10:00:00 09[CHD] <gw|1> encryption initiator key => 20 bytes @ 0x7f00
10:00:00 09[CHD] <gw|1>    0: 00 01 02 03 04 05 06 07 08 09 0A 0B 0C 0D 0E 0F  ................
10:00:00 09[CHD] <gw|1>   16: 10 11 12 13                                      ....
10:00:00 09[IKE] <gw|1> something else
10:00:00 09[CHD] <gw|1> encryption responder key => 2 bytes @ 0x7f01
10:00:00 09[CHD] <gw|1>    0: FF EE                                            ..
";
        let dumps = hex_dumps(log);
        assert_eq!(dumps.len(), 2);
        assert_eq!(dumps[0].label, "encryption initiator key");
        assert_eq!(dumps[0].bytes, (0u8..20).collect::<Vec<_>>());
        assert_eq!(hex_dumps_of(log, "responder key"), [vec![0xff, 0xee]]);
        assert!(hex_dumps_of(log, "integrity initiator key").is_empty());
    }

    const SAMPLE: &str = "list-sa event {
  site {
    uniqueid = 1
    version = 2
    state = ESTABLISHED
    local-host = 192.0.2.1
    local-id = C=CH, O=strongSwan, CN=a
    child-sas {
      site-1 {
        name = site
        state = INSTALLED
        bytes-in = 252
        packets-in = 3
        bytes-out = 253
        packets-out = 4
        local-ts = [
          10.1.0.0/24
        ]
        remote-ts = [
          10.2.0.0/24
          10.3.0.0/24
        ]
      }
    }
  }
}
list-sas reply {
}
";

    #[test]
    fn parses_list_sas() {
        let sas = parse_list_sas(SAMPLE).unwrap();
        assert_eq!(sas.len(), 1);
        let ike = &sas[0];
        assert_eq!(ike.name, "site");
        assert_eq!(ike.state, "ESTABLISHED");
        assert_eq!(ike.fields["local-id"], "C=CH, O=strongSwan, CN=a");
        let c = &ike.children[0];
        assert_eq!(c.name, "site");
        assert_eq!(c.state, "INSTALLED");
        assert_eq!(
            (c.bytes_in, c.packets_in, c.bytes_out, c.packets_out),
            (252, 3, 253, 4)
        );
        assert_eq!(c.local_ts, ["10.1.0.0/24"]);
        assert_eq!(c.remote_ts, ["10.2.0.0/24", "10.3.0.0/24"]);
        assert_eq!(summary(&sas), "site ESTABLISHED [site INSTALLED]");
    }

    #[test]
    fn parses_empty_and_rejects_truncated() {
        assert!(parse_list_sas("list-sas reply {\n}\n").unwrap().is_empty());
        assert!(parse_list_sas("list-sas reply {}\n").unwrap().is_empty());
        assert!(parse_list_sas("list-sa event {\n  site {\n").is_err());
    }

    fn conn() -> Connection {
        Connection::new(
            "site",
            "192.0.2.1".parse().unwrap(),
            "192.0.2.2".parse().unwrap(),
            "s3cret \"quoted\"",
            vec!["10.1.0.0/24".parse().unwrap()],
            vec!["10.2.0.0/24".parse().unwrap()],
        )
    }

    #[test]
    fn renders_swanctl_conf() {
        let text = swanctl_conf(&[conn()]).unwrap();
        assert!(
            text.contains("    proposals = aes128gcm16-prfsha256-x25519\n"),
            "{text}"
        );
        assert!(text.contains("        esp_proposals = aes128gcm16\n"), "{text}");
        assert!(text.contains("        local_ts = 10.1.0.0/24\n"), "{text}");
        assert!(text.contains("      id = 192.0.2.1\n"), "{text}");
        assert!(text.contains("    secret = 0x73336372657420"), "{text}");
        assert_eq!(text.matches('{').count(), text.matches('}').count());
    }

    #[test]
    fn mirrored_swaps_sides() {
        let m = conn().mirrored();
        assert_eq!(m.local_addr.to_string(), "192.0.2.2");
        assert_eq!(m.remote_id, "192.0.2.1");
        assert_eq!(m.local_ts, conn().remote_ts);
        assert_eq!(m.mirrored(), conn());
    }

    #[test]
    fn rejects_structure_in_values() {
        let mut c = conn();
        c.local_id = "a\n}".to_owned();
        assert!(swanctl_conf(&[c]).is_err());
        let mut c = conn();
        c.name = "bad name".to_owned();
        assert!(swanctl_conf(&[c]).is_err());
    }

    #[test]
    fn strongswan_conf_has_required_settings() {
        let text = strongswan_conf(
            Path::new("/tmp/x/charon.vici"),
            Path::new("/tmp/x/charon.log"),
            &CharonOptions::default(),
        )
        .unwrap();
        for needle in [
            "load_modular = no",
            "kernel-libipsec kernel-netlink",
            "allow_peer_ts = yes",
            "socket = unix:///tmp/x/charon.vici",
            "path = /tmp/x/charon.log",
        ] {
            assert!(text.contains(needle), "{needle} missing:\n{text}");
        }
        assert_eq!(text.matches('{').count(), text.matches('}').count());
    }
}
