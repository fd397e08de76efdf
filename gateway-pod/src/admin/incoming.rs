//! The admin API's TLS listener. Each connection is accepted with the TLS files as they are
//! then (re-read at most every [`RECHECK`]), so a renewed certificate or CA bundle (cert-manager
//! renewing, kubelet swapping a Secret volume's files) is used without a restart; files that
//! stop being usable leave the last good ones in use, with a warning.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use concentrator_proto::tls::AdminTls;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;

/// How often the files may be read again: often enough that a renewal is seen within seconds,
/// rarely enough that a burst of connections does not read them each time.
pub const RECHECK: Duration = Duration::from_secs(1);
/// TLS handshakes in progress at most.
const MAX_HANDSHAKES: usize = 64;
/// Longest a client may take for its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The files in use and the server config made from them.
struct Current {
    files: AdminTls,
    config: Arc<tokio_rustls::rustls::ServerConfig>,
    checked: Instant,
    /// The last problem reported with new files, so it is logged once, not per connection.
    problem: Option<String>,
}

/// TLS server configs from a directory, made again when its files change.
pub struct ReloadingTls {
    dir: PathBuf,
    current: Mutex<Current>,
}

impl ReloadingTls {
    /// Starts with `files` (already loaded and checked).
    pub fn new(files: AdminTls) -> Result<Self, concentrator_proto::tls::TlsError> {
        let config = files.server_config()?;
        Ok(Self {
            dir: files.dir().to_owned(),
            current: Mutex::new(Current {
                files,
                config,
                checked: Instant::now(),
                problem: None,
            }),
        })
    }

    /// The config for a connection accepted now.
    fn config(&self) -> Arc<tokio_rustls::rustls::ServerConfig> {
        let mut c = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if c.checked.elapsed() < RECHECK {
            return c.config.clone();
        }
        c.checked = Instant::now();
        let fresh = AdminTls::load(&self.dir).and_then(|f| {
            if f.same_files(&c.files) {
                return Ok(None);
            }
            let config = f.server_config()?;
            Ok(Some((f, config)))
        });
        match fresh {
            Ok(None) => {}
            Ok(Some((files, config))) => {
                tracing::info!(dir = %self.dir.display(), "admin API TLS files changed; new connections use them");
                c.files = files;
                c.config = config;
                c.problem = None;
            }
            Err(e) => {
                let problem = e.to_string();
                if c.problem.as_ref() != Some(&problem) {
                    tracing::warn!(error = %problem, "admin API TLS files unusable; keeping the last good ones");
                    c.problem = Some(problem);
                }
            }
        }
        c.config.clone()
    }
}

/// Accepts connections on `listener` and hands on those whose TLS handshake succeeded (the
/// client presented a certificate the CA signed). Ends when the receiver is dropped.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ReloadingTls>,
) -> mpsc::Receiver<std::io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = mpsc::channel(32);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = tx.closed() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!(error = %e, "admin API: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // A client opening connections in a loop must not take every file descriptor of
            // the pod (etcd, replication and IKE need theirs): handshakes beyond the bound are
            // closed at once.
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                tracing::info!(%peer, "admin API: too many TLS handshakes at once; connection closed");
                continue;
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
            let tx = tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => tracing::info!(%peer, error = %e, "admin API: TLS handshake refused"),
                    Err(_) => tracing::info!(%peer, "admin API: TLS handshake timed out"),
                }
            });
        }
    });
    rx
}
