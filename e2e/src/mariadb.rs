//! A private MariaDB server: `mariadb-install-db` into a temp dir, `mariadbd` on a free
//! 127.0.0.1 port plus a unix socket in that dir, a password user (`mysql_native_password`)
//! owning one database. Killed and deleted on drop.

use std::io::{ErrorKind, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use tempfile::TempDir;

use crate::process::{self, Daemon};
use crate::tools::{self, Tool};
use crate::wait::{self, Probe};
use crate::{ids, logs, ports, scratch};

/// What this module needs.
pub const TOOLS: &[Tool] = &[tools::MARIADBD, tools::MARIADB_INSTALL_DB];

/// How long to wait for the server to greet clients.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The user the server is set up with.
pub const USER: &str = "e2e";
/// The database that user owns.
pub const DATABASE: &str = "e2e";

/// Bind attempts (a port can be taken between choosing and binding it).
const ATTEMPTS: usize = 3;

/// A running private MariaDB.
#[derive(Debug)]
pub struct MariaDb {
    daemon: Daemon,
    port: u16,
    socket: PathBuf,
    error_log: PathBuf,
    password: String,
    dir: Option<TempDir>,
}

impl MariaDb {
    /// Creates the data dir, starts the server and waits until it greets clients.
    pub fn start() -> Result<Self> {
        let dir = scratch::dir("mariadb")?;
        let path = dir.path().to_owned();
        let data = path.join("data");
        let password = ids::random_hex(24);

        let mut install = Command::new(tools::MARIADB_INSTALL_DB.path());
        install
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            // A private tmpdir: a starting mariadbd deletes `#sql*` temp files in its tmpdir,
            // including those of another instance bootstrapping in parallel.
            .arg(format!("--tmpdir={}", path.display()))
            .args([
                "--user=root",
                "--auth-root-authentication-method=socket",
                "--skip-test-db",
                "--innodb-log-file-size=4M",
            ]);
        process::run(&mut install, Duration::from_secs(120))?;

        // Run by mariadbd before it accepts connections (bootstrap runs with
        // --skip-grant-tables, where CREATE USER is refused). Idempotent: a start that failed
        // to bind may be retried on the same data dir.
        scratch::write(
            &path,
            "init.sql",
            &format!(
                "CREATE USER IF NOT EXISTS '{USER}'@'%' IDENTIFIED VIA mysql_native_password \
                 USING PASSWORD('{password}');\n\
                 CREATE DATABASE IF NOT EXISTS {DATABASE};\n\
                 GRANT ALL PRIVILEGES ON {DATABASE}.* TO '{USER}'@'%';\n"
            ),
        )?;
        let socket = path.join("mysqld.sock");
        let error_log = path.join("error.log");

        ports::start_on_free_ports("mariadbd", ATTEMPTS, |_| {
            let port = ports::free_tcp_port()?;
            let mut daemon = spawn_server(&path, port)?;
            match wait_greeting(&mut daemon, port, &error_log) {
                Ok(()) => Ok(ports::Attempt::Started((daemon, port))),
                Err(e) => ports::failed_start(&mut daemon, e, &error_log),
            }
        })
        .map(|(daemon, port)| Self {
            daemon,
            port,
            socket,
            error_log,
            password,
            dir: Some(dir),
        })
    }

    /// Stops the server at once (SIGKILL): a database outage.
    pub fn stop(&mut self) {
        self.daemon.kill();
    }

    /// Starts the server again on the same data, port and socket, after [`Self::stop`].
    pub fn restart(&mut self) -> Result<()> {
        let path = self.socket.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut daemon = spawn_server(&path, self.port)?;
        wait_greeting(&mut daemon, self.port, &self.error_log)?;
        self.daemon = daemon;
        Ok(())
    }

    /// `mysql://e2e:PASSWORD@127.0.0.1:PORT/e2e`.
    pub fn url(&self) -> String {
        format!(
            "mysql://{USER}:{}@127.0.0.1:{}/{DATABASE}",
            self.password, self.port
        )
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's unix socket.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// The password of [`USER`].
    pub fn password(&self) -> &str {
        &self.password
    }

    /// The tail of the server's error log.
    pub fn log_tail(&self, lines: usize) -> String {
        logs::tail(&self.error_log, lines)
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        self.daemon.kill();
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail(30));
        }
        if let Some(dir) = self.dir.take() {
            scratch::release(dir);
        }
    }
}

/// Waits until the server sends its protocol-10 handshake on `port`. The init file has run
/// by then: mariadbd executes it before its accept loop starts.
fn wait_greeting(daemon: &mut Daemon, port: u16, error_log: &Path) -> Result<()> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    wait::until(format!("mariadbd to greet on {addr}"), START_TIMEOUT, || {
        daemon
            .ensure_running()
            .map_err(|e| e.context(logs::tail(error_log, 30)))?;
        Ok(match greeting(addr) {
            Ok(_version) => Probe::Ready(()),
            Err(why) => Probe::Pending(why),
        })
    })
}

/// Reads the first packet of a MySQL connection: `Ok(server version)` for a handshake,
/// `Err(why)` otherwise.
fn greeting(addr: SocketAddr) -> Result<String, String> {
    let timeout = Duration::from_secs(1);
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let mut header = [0u8; 4];
    stream.read_exact(&mut header).map_err(|e| match e.kind() {
        ErrorKind::UnexpectedEof => "connection closed before greeting".to_owned(),
        _ => e.to_string(),
    })?;
    let len = usize::from(header[0]) | usize::from(header[1]) << 8 | usize::from(header[2]) << 16;
    let mut payload = vec![0u8; len.min(4096)];
    stream.read_exact(&mut payload).map_err(|e| e.to_string())?;
    match payload.first() {
        Some(10) => {
            let version = payload[1..].split(|&b| b == 0).next().unwrap_or_default();
            Ok(String::from_utf8_lossy(version).into_owned())
        }
        Some(0xff) => Err(format!(
            "error packet: {}",
            String::from_utf8_lossy(payload.get(3..).unwrap_or_default())
        )),
        other => Err(format!("unexpected first byte {other:?}")),
    }
}

/// `mariadbd` on the data dir under `path`, listening on `port` and `path/mysqld.sock`.
fn spawn_server(path: &Path, port: u16) -> Result<Daemon> {
    let mut cmd = Command::new(tools::MARIADBD.path());
    cmd.arg("--no-defaults")
        .arg(format!("--datadir={}", path.join("data").display()))
        .arg(format!("--socket={}", path.join("mysqld.sock").display()))
        .arg(format!("--port={port}"))
        .arg(format!("--pid-file={}", path.join("mariadbd.pid").display()))
        .arg(format!("--log-error={}", path.join("error.log").display()))
        .arg(format!("--init-file={}", path.join("init.sql").display()))
        .arg(format!("--tmpdir={}", path.display()))
        .args([
            "--bind-address=127.0.0.1",
            "--user=root",
            "--skip-name-resolve",
            "--innodb-log-file-size=4M",
            "--innodb-buffer-pool-size=32M",
        ]);
    Daemon::spawn("mariadbd", cmd, &path.join("mariadbd.out"))
}
