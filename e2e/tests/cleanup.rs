//! A test that panics halfway still leaves no namespace, process or temp dir behind.

use std::path::{Path, PathBuf};
use std::sync::mpsc;

use concentrator_e2e::etcd::{self, Etcd};
use concentrator_e2e::netns::{self, Netns, Wan};
use concentrator_e2e::prereq;
use concentrator_e2e::strongswan::{self, Charon};

struct Leftovers {
    namespaces: Vec<String>,
    pids: Vec<u32>,
    dirs: Vec<PathBuf>,
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z")
    })
}

#[test]
fn panicking_test_leaves_nothing_behind() {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS, etcd::TOOLS]).is_skip() {
        return;
    }
    if std::env::var_os("E2E_KEEP").is_some() {
        eprintln!("E2E_KEEP is set: temp dirs are kept on purpose, not checking cleanup");
        return;
    }
    let (tx, rx) = mpsc::channel();
    let doomed = std::thread::spawn(move || {
        let wan = Wan::new().expect("wan");
        let site = Netns::new("doomed").expect("netns");
        wan.attach(&site, "wan0", "192.0.2.9/24".parse().expect("prefix"))
            .expect("attach");
        let charon = Charon::start(&site).expect("charon");
        let server = Etcd::start().expect("etcd");
        // A process nobody owns: the namespace teardown must kill it.
        let stray = site
            .command("sleep")
            .arg("600")
            .spawn()
            .expect("spawn stray sleep");
        let mut pids = site.pids();
        pids.push(stray.id());
        std::mem::forget(stray);
        tx.send(Leftovers {
            namespaces: vec![wan.namespace().name().to_owned(), site.name().to_owned()],
            pids,
            dirs: vec![
                charon.dir_path().to_owned(),
                server.log_path().parent().map(Path::to_owned).expect("log dir"),
            ],
        })
        .expect("send");
        panic!("deliberate failure halfway through a test");
    });
    assert!(doomed.join().is_err(), "the doomed test did not panic");
    let left = rx.recv().expect("the doomed test reported its world");

    let listed = netns_list();
    for name in &left.namespaces {
        assert!(!listed.contains(name), "namespace {name} survived: {listed}");
    }
    assert!(
        left.pids.len() >= 2,
        "expected charon and the stray: {:?}",
        left.pids
    );
    for pid in &left.pids {
        assert!(!alive(*pid), "process {pid} survived");
    }
    for dir in &left.dirs {
        assert!(!dir.exists(), "temp dir {} survived", dir.display());
    }
}

fn netns_list() -> String {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout).into_owned()
}
