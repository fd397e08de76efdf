//! Key derivation against strongSwan: the inputs and outputs of two real exchanges captured
//! from charon's key-oracle log (tests/data/strongswan_*.txt, see tests/capture_strongswan.rs).

mod common;

use common::{h, kv};
use concentrator_crypto::keymat::{self, ChildSaKeys, IkeSaKeys};
use concentrator_crypto::{Encryption, Integrity, Prf, PrfAlg};

struct Capture {
    prf: Prf,
    encr: Encryption,
    integ: Option<Integrity>,
    esp_encr: Encryption,
    esp_integ: Option<Integrity>,
    v: std::collections::HashMap<String, String>,
}

impl Capture {
    fn get(&self, k: &str) -> Vec<u8> {
        h(self.v.get(k).unwrap_or_else(|| panic!("missing {k}")))
    }
    fn spi(&self, k: &str) -> [u8; 8] {
        self.get(k).try_into().expect("8-byte SPI")
    }
}

fn load(
    text: &str,
    prf: PrfAlg,
    encr: Encryption,
    integ: Option<Integrity>,
    esp: (Encryption, Option<Integrity>),
) -> Capture {
    Capture {
        prf: Prf::new(prf),
        encr,
        integ,
        esp_encr: esp.0,
        esp_integ: esp.1,
        v: kv(text),
    }
}

fn captures() -> Vec<Capture> {
    vec![
        load(
            include_str!("data/strongswan_x25519_gcm.txt"),
            PrfAlg::HmacSha256,
            Encryption::AesGcm16 { key_bits: 128 },
            None,
            (Encryption::AesGcm16 { key_bits: 128 }, None),
        ),
        load(
            include_str!("data/strongswan_modp2048_cbc.txt"),
            PrfAlg::HmacSha384,
            Encryption::AesCbc { key_bits: 256 },
            Some(Integrity::HmacSha384_192),
            (
                Encryption::AesCbc { key_bits: 256 },
                Some(Integrity::HmacSha256_128),
            ),
        ),
    ]
}

#[test]
fn skeyseed_and_sk_keys_match_strongswan() {
    for c in captures() {
        let (ni, nr, g_ir) = (c.get("ni"), c.get("nr"), c.get("g_ir"));
        let seed = keymat::skeyseed(c.prf, &ni, &nr, &g_ir);
        assert_eq!(seed.expose(), &c.get("skeyseed")[..], "SKEYSEED ({:?})", c.encr);
        let keys = IkeSaKeys::derive(
            c.prf,
            seed.expose(),
            &ni,
            &nr,
            &c.spi("spi_i"),
            &c.spi("spi_r"),
            c.encr,
            c.integ,
        )
        .expect("derive");
        for (name, got) in [
            ("sk_d", &keys.sk_d),
            ("sk_ai", &keys.sk_ai),
            ("sk_ar", &keys.sk_ar),
            ("sk_ei", &keys.sk_ei),
            ("sk_er", &keys.sk_er),
            ("sk_pi", &keys.sk_pi),
            ("sk_pr", &keys.sk_pr),
        ] {
            assert_eq!(got.expose(), &c.get(name)[..], "{name} ({:?})", c.encr);
        }
        // The one-call form gives the same keys.
        let again = IkeSaKeys::from_ike_sa_init(
            c.prf,
            &ni,
            &nr,
            &g_ir,
            &c.spi("spi_i"),
            &c.spi("spi_r"),
            c.encr,
            c.integ,
        )
        .expect("derive");
        assert_eq!(again.sk_pr.expose(), keys.sk_pr.expose());
    }
}

#[test]
fn first_child_sa_keys_match_strongswan() {
    for c in captures() {
        let keys = ChildSaKeys::derive(
            c.prf,
            &c.get("sk_d"),
            None,
            &c.get("ni"),
            &c.get("nr"),
            c.esp_encr,
            c.esp_integ,
        )
        .expect("derive");
        // charon logs the AEAD key with its salt appended (key || salt).
        let ei = [keys.initiator.encr.expose(), keys.initiator.salt.expose()].concat();
        let er = [keys.responder.encr.expose(), keys.responder.salt.expose()].concat();
        assert_eq!(ei, c.get("esp_ei"), "initiator encryption key ({:?})", c.esp_encr);
        assert_eq!(er, c.get("esp_er"), "responder encryption key ({:?})", c.esp_encr);
        assert_eq!(
            keys.initiator.integ.expose(),
            &c.get("esp_ai")[..],
            "initiator integrity key"
        );
        assert_eq!(
            keys.responder.integ.expose(),
            &c.get("esp_ar")[..],
            "responder integrity key"
        );
        if c.esp_encr.is_aead() {
            assert_eq!(keys.initiator.salt.len(), 4);
            assert!(keys.initiator.integ.is_empty());
        } else {
            assert!(keys.initiator.salt.is_empty());
        }
    }
}

#[test]
fn child_sa_with_pfs_puts_g_ir_first() {
    // KEYMAT = prf+(SK_d, g^ir (new) | Ni | Nr) (RFC 7296 §2.17).
    let prf = Prf::new(PrfAlg::HmacSha256);
    let encr = Encryption::ChaCha20Poly1305;
    let keys = ChildSaKeys::derive(prf, b"skd", Some(b"gir"), b"ni", b"nr", encr, None).expect("derive");
    let stream = prf.prf_plus(b"skd", &[b"gir", b"ni", b"nr"], 72).expect("prf+");
    let s = stream.expose();
    assert_eq!(keys.initiator.encr.expose(), &s[..32]);
    assert_eq!(keys.initiator.salt.expose(), &s[32..36]);
    assert_eq!(keys.responder.encr.expose(), &s[36..68]);
    assert_eq!(keys.responder.salt.expose(), &s[68..72]);
}

#[test]
fn rekeyed_skeyseed_uses_old_sk_d() {
    // SKEYSEED = prf(SK_d (old), g^ir (new) | Ni | Nr) (RFC 7296 §2.18).
    let prf = Prf::new(PrfAlg::HmacSha384);
    let seed = keymat::rekey_skeyseed(prf, b"old-sk-d", b"g-ir", b"ni", b"nr");
    assert_eq!(seed.expose(), prf.compute(b"old-sk-d", &[b"g-irninr"]).expose());
}

#[test]
fn transform_combinations_are_checked() {
    let prf = Prf::new(PrfAlg::HmacSha256);
    let spi = [1u8; 8];
    let gcm = Encryption::AesGcm16 { key_bits: 256 };
    let cbc = Encryption::AesCbc { key_bits: 128 };
    assert!(
        IkeSaKeys::derive(
            prf,
            b"s",
            b"n",
            b"n",
            &spi,
            &spi,
            gcm,
            Some(Integrity::HmacSha256_128)
        )
        .is_err()
    );
    assert!(IkeSaKeys::derive(prf, b"s", b"n", b"n", &spi, &spi, cbc, None).is_err());
    assert!(
        IkeSaKeys::derive(
            prf,
            b"s",
            b"n",
            b"n",
            &spi,
            &spi,
            Encryption::AesCbc { key_bits: 192 },
            None
        )
        .is_err()
    );
    let k = IkeSaKeys::derive(prf, b"s", b"n", b"n", &spi, &spi, gcm, None).expect("gcm");
    assert_eq!(
        (k.sk_d.len(), k.sk_ai.len(), k.sk_ei.len(), k.sk_pr.len()),
        (32, 0, 36, 32)
    );
    let k = IkeSaKeys::derive(
        prf,
        b"s",
        b"n",
        b"n",
        &spi,
        &spi,
        cbc,
        Some(Integrity::HmacSha512_256),
    )
    .expect("cbc");
    assert_eq!((k.sk_ai.len(), k.sk_ei.len()), (64, 16));
    assert!(!format!("{k:?}").contains(&format!("{:?}", k.sk_d.expose())));
}

#[test]
fn inline_secret_holds_up_to_its_size() {
    use concentrator_crypto::InlineSecret;
    let k = InlineSecret::<64>::from_slice(&[7; 48]).expect("fits");
    assert_eq!(k.expose(), &[7; 48]);
    assert_eq!(k.to_secret().expose(), &[7; 48]);
    assert_eq!(
        format!("{k:?}"),
        "InlineSecret(<48 bytes>)",
        "no key bytes in Debug"
    );
    assert!(InlineSecret::<64>::from_slice(&[0; 64]).is_some());
    assert!(InlineSecret::<64>::from_slice(&[0; 65]).is_none());
    assert_eq!(
        InlineSecret::<64>::from_slice(&[]).expect("empty").expose(),
        &[] as &[u8]
    );
}
