//! Regenerates `tests/data/strongswan_*.txt`: two strongSwan charons (key-oracle logging,
//! `ike = 4`, `chd = 4`) establish an IKE SA and a CHILD SA, and the inputs and outputs of
//! charon's key derivation are cut out of the initiator's log.
//!
//! Ignored by default (needs root, network namespaces and strongSwan):
//!
//! ```sh
//! cargo test -p concentrator-crypto --test capture_strongswan -- --ignored --nocapture
//! ```

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use concentrator_e2e::netns::{self, Netns, Wan, addr, net};
use concentrator_e2e::prereq;
use concentrator_e2e::strongswan::{self, Charon, CharonOptions, Connection, HexDump, hex_dumps};

/// Runs one exchange with `ike`/`esp` proposals and returns the initiator's and the
/// responder's charon logs.
fn exchange(ike: &str, esp: &str) -> Result<(String, String)> {
    let wan = Wan::new()?;
    let site_a = Netns::new("kcapA")?;
    let site_b = Netns::new("kcapB")?;
    wan.attach(&site_a, "wan0", net("192.0.2.1/24"))?;
    wan.attach(&site_b, "wan0", net("192.0.2.2/24"))?;
    site_a.add_lo_addr(net("10.1.0.1/24"))?;
    site_b.add_lo_addr(net("10.2.0.1/24"))?;
    site_a.wait_reachable(None, addr("192.0.2.2"), Duration::from_secs(5))?;

    let charon_a = Charon::start_with(&site_a, &CharonOptions::key_oracle())?;
    let charon_b = Charon::start_with(&site_b, &CharonOptions::key_oracle())?;
    let mut conn = Connection::new(
        "kat",
        addr("192.0.2.1"),
        addr("192.0.2.2"),
        "known-answer-capture",
        vec![net("10.1.0.0/24")],
        vec![net("10.2.0.0/24")],
    );
    conn.local_id = "siteA".to_owned();
    conn.remote_id = "siteB".to_owned();
    ike.clone_into(&mut conn.ike_proposal);
    esp.clone_into(&mut conn.esp_proposal);
    charon_b.load(&[conn.mirrored()])?;
    charon_a.load(&[conn])?;
    charon_a.initiate("kat").with_context(|| charon_b.log_tail(40))?;
    charon_a.wait_established("kat", "kat", Duration::from_secs(15))?;
    charon_b.wait_established("kat", "kat", Duration::from_secs(15))?;
    let a = std::fs::read_to_string(charon_a.log_path())?;
    let b = std::fs::read_to_string(charon_b.log_path())?;
    Ok((a, b))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The test-data file for one exchange, from the initiator's log.
fn render(ike: &str, esp: &str, log: &str) -> Result<String> {
    let d = hex_dumps(log);
    let one =
        |label: &str| -> Option<Vec<u8>> { d.iter().find(|d| d.label == label).map(|d| d.bytes.clone()) };
    let need = |label: &str| one(label).with_context(|| format!("no '{label}' dump in the log"));
    let skeyseed = need("SKEYSEED")?;
    let prf_len = skeyseed.len();
    // The initiator verifies the responder's AUTH over
    // "IKE_SA_INIT response | Ni | prf(SK_pr, IDr')": the response's header carries both SPIs.
    let octets = d
        .iter()
        .filter(|d| d.label.starts_with("octets = message + nonce"))
        .map(|HexDump { bytes, .. }| bytes)
        .find(|b| b.len() > 28 && b[8..16].iter().any(|&x| x != 0))
        .context("no AUTH octets over the IKE_SA_INIT response")?;
    let msg_len = u32::from_be_bytes(octets[24..28].try_into()?) as usize;
    let ni = &octets[msg_len..octets.len() - prf_len];
    let seed = need("seed")?;
    anyhow::ensure!(seed.starts_with(ni), "child seed does not start with Ni");
    let nr = &seed[ni.len()..];
    let mut out = format!(
        "# Captured from strongSwan charon (Debian 5.9.8, ike = 4, chd = 4) by\n\
         # tests/capture_strongswan.rs; initiator side. Regenerate with:\n\
         # cargo test -p concentrator-crypto --test capture_strongswan -- --ignored\n\
         ike_proposal = {ike}\nesp_proposal = {esp}\n"
    );
    let mut line = |k: &str, v: &[u8]| out.push_str(&format!("{k} = {}\n", hex(v)));
    line("spi_i", &octets[0..8]);
    line("spi_r", &octets[8..16]);
    line("ni", ni);
    line("nr", nr);
    line("g_ir", &need("shared Diffie Hellman secret")?);
    line("skeyseed", &skeyseed);
    for (k, label) in [
        ("sk_d", "Sk_d secret"),
        ("sk_ai", "Sk_ai secret"),
        ("sk_ar", "Sk_ar secret"),
        ("sk_ei", "Sk_ei secret"),
        ("sk_er", "Sk_er secret"),
        ("sk_pi", "Sk_pi secret"),
        ("sk_pr", "Sk_pr secret"),
        ("esp_ei", "encryption initiator key"),
        ("esp_er", "encryption responder key"),
        ("esp_ai", "integrity initiator key"),
        ("esp_ar", "integrity responder key"),
    ] {
        // AEAD transforms have no integrity keys: charon logs none, we store them empty.
        line(k, &one(label).unwrap_or_default());
    }
    Ok(out)
}

#[test]
#[ignore = "needs root, network namespaces and strongSwan; regenerates tests/data"]
fn capture_strongswan() -> Result<()> {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS]).is_skip() {
        return Ok(());
    }
    let out = std::env::var("CAPTURE_DIR").unwrap_or_else(|_| "/tmp/kcap".to_owned());
    std::fs::create_dir_all(&out)?;
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    for (name, ike, esp) in [
        ("x25519_gcm", "aes128gcm16-prfsha256-x25519", "aes128gcm16"),
        (
            "modp2048_cbc",
            "aes256-sha384-prfsha384-modp2048",
            "aes256-sha256",
        ),
    ] {
        let (a, b) = exchange(ike, esp)?;
        std::fs::write(Path::new(&out).join(format!("{name}.initiator.log")), &a)?;
        std::fs::write(Path::new(&out).join(format!("{name}.responder.log")), b)?;
        let file = data.join(format!("strongswan_{name}.txt"));
        std::fs::write(&file, render(ike, esp, &a)?)?;
        println!("wrote {}", file.display());
    }
    Ok(())
}
