//! The real binary's command line: what kubectl shows of it, and its refusals.

use std::process::Command;

fn plugin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kubectl-concentrator"))
}

#[test]
fn help_names_every_command() {
    let out = plugin().arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for command in ["tunnels", "drain", "undrain", "status", "sites"] {
        assert!(help.contains(command), "{command} missing from:\n{help}");
    }
}

#[test]
fn direct_access_without_a_client_certificate_is_refused_plainly() {
    let out = plugin()
        .args(["--direct", "127.0.0.1:9", "tunnels"])
        .env_remove("CONCENTRATOR_ADMIN_TLS_DIR")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--direct needs --admin-tls-dir"), "{err}");
}

#[test]
fn an_unknown_output_format_is_refused() {
    let out = plugin().args(["-o", "csv", "status"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}
