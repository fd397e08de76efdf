//! How the plugin reaches a gateway pod's admin API: through the API server's port-forward
//! (from anywhere kubectl works), or directly at an address (`--direct`, from inside the
//! pod network), over mutual TLS with the fleet's certificate either way.

use std::path::Path;

use anyhow::{Context, Result};
use concentrator_crds::GatewayFleet;
use concentrator_proto::admin::gateway_admin_client::GatewayAdminClient;
use concentrator_proto::tls::{AdminTls, ClientTls, DEFAULT_SERVER_NAME};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use tonic::transport::Channel;

/// The admin API's port in a gateway pod.
pub(crate) const ADMIN_PORT: u16 = 50051;

/// One pod's admin API client.
pub(crate) type Admin = GatewayAdminClient<Channel>;

/// Where the pods are.
pub(crate) enum Reach {
    /// A Kubernetes fleet: its pods by port-forward.
    Cluster {
        client: Client,
        ns: String,
        fleet: Box<GatewayFleet>,
    },
    /// One admin API at an address.
    Direct(String),
}

impl Reach {
    /// The fleet `name` in `ns` (the only one there when `None`).
    pub(crate) async fn cluster(ns: Option<&str>, name: Option<&str>) -> Result<Self> {
        let client = Client::try_default()
            .await
            .context("cannot reach the Kubernetes API (KUBECONFIG or in-cluster config)")?;
        let ns = ns.map_or_else(|| client.default_namespace().to_owned(), str::to_owned);
        let fleets: Api<GatewayFleet> = Api::namespaced(client.clone(), &ns);
        let fleet = match name {
            Some(n) => fleets
                .get(n)
                .await
                .with_context(|| format!("GatewayFleet {ns}/{n}"))?,
            None => {
                let mut all = fleets.list(&ListParams::default()).await?.items;
                anyhow::ensure!(
                    all.len() == 1,
                    "{} GatewayFleets in namespace {ns}: name one with --fleet",
                    all.len()
                );
                all.remove(0)
            }
        };
        Ok(Self::Cluster {
            client,
            ns,
            fleet: Box::new(fleet),
        })
    }

    /// The fleet's pods, by ordinal (their names).
    pub(crate) async fn pods(&self) -> Result<Vec<String>> {
        match self {
            Self::Direct(addr) => Ok(vec![addr.clone()]),
            Self::Cluster { client, ns, fleet } => {
                let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
                let selector = format!(
                    "app.kubernetes.io/name=concentrator-gateway,app.kubernetes.io/instance={}",
                    fleet.name_any()
                );
                let mut names: Vec<String> = pods
                    .list(&ListParams::default().labels(&selector))
                    .await?
                    .items
                    .iter()
                    .map(ResourceExt::name_any)
                    .collect();
                names.sort_by_key(|n| (n.len(), n.clone()));
                Ok(names)
            }
        }
    }

    /// The client certificate: `dir`, else (on a cluster) the fleet's `adminTlsSecretName`,
    /// whose certificate the pods also present to each other.
    pub(crate) async fn tls(&self, dir: Option<&Path>, server_name: Option<&str>) -> Result<ClientTls> {
        let server_name = server_name.unwrap_or(DEFAULT_SERVER_NAME).to_owned();
        if let Some(dir) = dir {
            return Ok(ClientTls {
                files: AdminTls::load(dir)?,
                server_name,
            });
        }
        let Self::Cluster { client, ns, fleet } = self else {
            anyhow::bail!(
                "--direct needs --admin-tls-dir (the pods' admin API asks for a client certificate)"
            );
        };
        let name = fleet.spec.admin_tls_secret_name.as_deref().with_context(|| {
            format!(
                "GatewayFleet {ns}/{} has no adminTlsSecretName: its pods' admin API is on their loopback",
                fleet.name_any()
            )
        })?;
        let secret = Api::<Secret>::namespaced(client.clone(), ns)
            .get(name)
            .await
            .with_context(|| format!("Secret {ns}/{name}"))?;
        let data = secret.data.unwrap_or_default();
        let key = |k: &str| {
            data.get(k)
                .map(|v| v.0.clone())
                .with_context(|| format!("Secret {ns}/{name} has no {k}"))
        };
        let origin = Path::new("secret").join(ns).join(name);
        Ok(ClientTls {
            files: AdminTls::from_pem(
                &origin,
                key("tls.crt")?,
                zeroize::Zeroizing::new(key("tls.key")?),
                key("ca.crt")?,
            )?,
            server_name,
        })
    }

    /// A client of `pod`'s admin API (`pod` as [`Self::pods`] names it).
    pub(crate) async fn admin(&self, pod: &str, tls: &ClientTls) -> Result<Admin> {
        match self {
            Self::Direct(addr) => {
                let ch = concentrator_proto::tls::endpoint(addr, Some(tls))?
                    .connect_timeout(std::time::Duration::from_secs(5))
                    .connect()
                    .await
                    .with_context(|| format!("admin API at {addr}"))?;
                Ok(GatewayAdminClient::new(ch))
            }
            Self::Cluster { client, ns, .. } => {
                let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
                let name = pod.to_owned();
                // One port-forward per connection: the API server relays its bytes, TLS runs
                // end to end between us and the pod.
                let connector = tower::service_fn(move |_: tonic::transport::Uri| {
                    let (pods, name) = (pods.clone(), name.clone());
                    async move {
                        let mut pf = pods
                            .portforward(&name, &[ADMIN_PORT])
                            .await
                            .map_err(std::io::Error::other)?;
                        let stream = pf
                            .take_stream(ADMIN_PORT)
                            .ok_or_else(|| std::io::Error::other("port-forward gave no stream"))?;
                        tokio::spawn(async move {
                            let _ = pf.join().await;
                        });
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                    }
                });
                let ch = concentrator_proto::tls::endpoint(&format!("{pod}.{ns}:{ADMIN_PORT}"), Some(tls))?
                    .connect_with_connector(connector)
                    .await
                    .with_context(|| format!("admin API of pod {ns}/{pod} (port-forward)"))?;
                Ok(GatewayAdminClient::new(ch))
            }
        }
    }

    /// The fleet's status line, on a cluster.
    pub(crate) fn fleet(&self) -> Option<&GatewayFleet> {
        match self {
            Self::Cluster { fleet, .. } => Some(fleet),
            Self::Direct(_) => None,
        }
    }
}
