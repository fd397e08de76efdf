//! The site store chosen by URL: a real, private MariaDB (started by the e2e harness) with the
//! documented schema applied, and a database that is down at start.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use concentrator_e2e::mariadb::{self, MariaDb};
use concentrator_e2e::prereq;
use concentrator_gateway::sitedb::{SiteLookups, SiteStore};
use concentrator_gateway::{Options, config, start};

fn opts(site_db: &str, data: &std::path::Path) -> Options {
    let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples");
    Options::try_parse_from([
        "concentrator-gateway",
        "--config-dir",
        examples.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--site-db",
        site_db,
        "--admin-listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--no-tunnels",
    ])
    .unwrap()
}

#[tokio::test]
async fn gateway_uses_mariadb_by_url() {
    if prereq::require(&[mariadb::TOOLS]).is_skip() {
        return;
    }
    let db = MariaDb::start().expect("private MariaDB starts");
    // The schema an operator applies to their database, exactly as documented.
    let store = SiteStore::open_url(&db.url(), Duration::from_secs(5))
        .await
        .unwrap();
    store.migrate().await.expect("documented MySQL migration applies");
    let SiteStore::MySql(pool) = &store else {
        panic!("mysql:// opened {}", store.kind());
    };
    for i in 1..=3 {
        sqlx::query("INSERT INTO sites (peer_id, psk, remote_subnet, peer_address) VALUES (?, ?, ?, ?)")
            .bind(format!("s{i}.sites.example.com"))
            .bind("k")
            .bind(format!("10.128.{i}.0/24"))
            .bind(format!("192.0.2.{i}"))
            .execute(pool)
            .await
            .unwrap();
    }
    let explain: Vec<(Option<String>,)> =
        sqlx::query_as("SELECT INDEX_NAME FROM information_schema.STATISTICS WHERE TABLE_NAME = 'sites'")
            .fetch_all(pool)
            .await
            .unwrap();
    let indexes: Vec<_> = explain.into_iter().filter_map(|r| r.0).collect();
    assert!(indexes.iter().any(|i| i == "PRIMARY"), "{indexes:?}");
    assert!(indexes.iter().any(|i| i == "sites_remote_subnet"), "{indexes:?}");

    // Both lookup paths, on the real server.
    let t = concentrator_crds::EgroupSpec {
        eroute: "branches".into(),
        remote_subnet_prefix: 24,
        database: Default::default(),
        max_dynamic_eroutes: 10,
    }
    .validate()
    .unwrap()
    .site_table;
    let to = Duration::from_secs(5);
    let s = store
        .site_by_peer_id(&t, "s2.sites.example.com", 24, to)
        .await
        .unwrap();
    assert_eq!(
        (s.psk.expose(), s.remote_subnet.to_string().as_str()),
        (&b"k"[..], "10.128.2.0/24")
    );
    assert_eq!(s.peer_address.as_deref(), Some("192.0.2.2"));
    let s = store
        .site_by_subnet(&t, "10.128.3.0/24".parse().unwrap(), to)
        .await
        .unwrap();
    assert_eq!(s.peer_id, "s3.sites.example.com");
    assert_eq!(
        store.site_by_peer_id(&t, "nobody", 24, to).await,
        Err(concentrator_gateway::sitedb::LookupError::NotFound)
    );

    // Batched, as the egroups look up: concurrent lookups share statements and each gets
    // its own row.
    let lookups = SiteLookups::new("g", store.clone(), t.clone(), to);
    let mut set = tokio::task::JoinSet::new();
    for i in 0..60 {
        let l = lookups.clone();
        set.spawn(async move {
            let n = i % 3 + 1;
            let s = l.by_peer_id(&format!("s{n}.sites.example.com"), 24).await;
            (n, s)
        });
    }
    while let Some(r) = set.join_next().await {
        let (n, s) = r.unwrap();
        let s = s.unwrap();
        assert_eq!(s.remote_subnet.to_string(), format!("10.128.{n}.0/24"));
        assert_eq!(s.peer_address, Some(format!("192.0.2.{n}")));
    }
    assert!(lookups.statements() < 60, "{} statements", lookups.statements());
    // MariaDB compares under the column's collation (utf8mb4_bin pads: trailing spaces do not
    // count), not byte for byte: a batch answers exactly as a lookup alone.
    let (upper, hostile, missing, by_net) = tokio::join!(
        lookups.by_peer_id("s1.sites.example.com  ", 24),
        lookups.by_peer_id("x' OR '1'='1", 24),
        lookups.by_peer_id("nobody", 24),
        lookups.by_subnet("10.128.3.0/24".parse().unwrap())
    );
    assert_eq!(
        upper,
        store.site_by_peer_id(&t, "s1.sites.example.com  ", 24, to).await
    );
    assert_eq!(upper.unwrap().peer_id, "s1.sites.example.com");
    assert_eq!(hostile, Err(concentrator_gateway::sitedb::LookupError::NotFound));
    assert_eq!(missing, Err(concentrator_gateway::sitedb::LookupError::NotFound));
    assert_eq!(by_net.unwrap().peer_id, "s3.sites.example.com");
    store.close().await;

    let data = tempfile::tempdir().unwrap();
    let o = opts(&db.url().replacen("mysql://", "mariadb://", 1), data.path());
    let running = start(&o, config::load_dir(o.config_dir.as_deref().unwrap()).unwrap())
        .await
        .unwrap();
    assert_eq!(running.site_store.kind(), "mysql");
    assert_eq!(running.gateway.metrics.sites.get(), 3);
    assert!(
        !data.path().join("sites.db").exists(),
        "no embedded store when a URL is given"
    );
    running.shutdown().await;
}

#[tokio::test]
async fn gateway_starts_while_the_database_is_down() {
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let data = tempfile::tempdir().unwrap();
    let o = opts(&format!("mysql://u:hunter2@127.0.0.1:{free}/sites"), data.path());
    let running = tokio::time::timeout(
        Duration::from_secs(15),
        start(&o, config::load_dir(o.config_dir.as_deref().unwrap()).unwrap()),
    )
    .await
    .expect("start does not hang on a dead database")
    .expect("start succeeds: tunnels without lookups must still be served");
    assert_eq!(running.gateway.metrics.sites.get(), 0);
    running.shutdown().await;
}
