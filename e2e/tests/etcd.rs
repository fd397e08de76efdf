//! A private etcd answers etcd-client: a key put with a lease vanishes when the lease is
//! revoked; the harness's range reader sees what etcd-client wrote.

use std::time::Instant;

use anyhow::{Context, Result, ensure};
use concentrator_e2e::etcd::{self, Etcd};
use concentrator_e2e::{ids, prereq};
use etcd_client::{Client, PutOptions};

#[tokio::test]
async fn lease_put_get_revoke() -> Result<()> {
    if prereq::require(&[etcd::TOOLS]).is_skip() {
        return Ok(());
    }
    let t0 = Instant::now();
    let server = Etcd::start()?;
    let t_start = t0.elapsed();

    let mut client = Client::connect([server.endpoint()], None)
        .await
        .with_context(|| format!("connecting to {}\n{}", server.endpoint(), server.log_tail(20)))?;
    let key = format!("/e2e/gateways/{}", ids::random_hex(8));

    let lease = client.lease_grant(30, None).await?;
    ensure!(lease.ttl() > 0, "lease granted with ttl {}", lease.ttl());
    client
        .put(
            key.as_str(),
            "gw-1",
            Some(PutOptions::new().with_lease(lease.id())),
        )
        .await?;

    let got = client.get(key.as_str(), None).await?;
    let kv = got.kvs().first().context("key missing right after put")?;
    ensure!(kv.value() == b"gw-1", "value {:?}", kv.value_str());
    ensure!(
        kv.lease() == lease.id(),
        "key bound to lease {} not {}",
        kv.lease(),
        lease.id()
    );

    // The harness's own reader (etcd's JSON gateway) sees the same key.
    let seen = server.range("/e2e/gateways/")?;
    ensure!(
        seen.iter()
            .any(|kv| kv.key == key && kv.value == b"gw-1" && kv.lease == lease.id()),
        "range read {seen:?}"
    );

    // Revocation deletes the attached keys before the call returns (it goes through raft),
    // and `get` is linearizable: no polling needed.
    client.lease_revoke(lease.id()).await?;
    let got = client.get(key.as_str(), None).await?;
    ensure!(
        got.kvs().is_empty(),
        "key survived lease revocation: {:?}",
        got.kvs()
    );
    eprintln!(
        "timings: etcd healthy {t_start:.2?}, test done {:.2?}",
        t0.elapsed()
    );
    Ok(())
}
