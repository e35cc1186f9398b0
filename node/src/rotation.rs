//! Trust rotations as the node takes them. The control plane's trust document
//! ([`outpost_protocol::NodeTrust`]) says which CAs and signing keys to trust now; the node adds
//! a CA only when a CA it already trusts signed its announcement, and a signing key only when a
//! key it already trusts endorsed it (directly or through a chain of endorsements, for a node
//! that missed rotations), and drops what the document no longer lists. Nothing is taken on the
//! control plane's word alone, and a document the node cannot follow changes nothing.
//!
//! What the node accepted is kept in `identity/trust.json` (the signing keys and the document's
//! tag) and `identity/ca.crt` (the CAs), each replaced atomically.

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine as _;
use ed25519_dalek::{Signature, Verifier as _};
use outpost_protocol::{NodeTrust, PublicKey};
use serde::{Deserialize, Serialize};

use crate::tls;

/// What `identity/trust.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Accepted {
    /// The tag of the last document taken.
    pub tag: String,
    /// The org's signing keys the node accepts signatures of.
    pub org_keys: Vec<PublicKey>,
    pub updated_unix_ms: u64,
    /// The new CA of a rotation under way, PEM: until the node's certificate is one it issued,
    /// the agent renews (at every start too), or the switch would lock the node out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_next_pem: Option<String>,
}

const TRUST_JSON: &str = "trust.json";

/// What `identity/trust.json` holds, if anything (a node never told of a rotation has none).
pub fn load(identity_dir: &Path) -> Result<Option<Accepted>, String> {
    let path = identity_dir.join(TRUST_JSON);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// The signing keys the node accepts: those of `trust.json`, else the one pinned at enrollment.
pub fn org_keys(identity_dir: &Path, pinned: &PublicKey) -> Result<Vec<PublicKey>, String> {
    Ok(load(identity_dir)?.map_or_else(|| vec![pinned.clone()], |a| a.org_keys))
}

/// What changes when a document is taken.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    pub org_keys: Vec<PublicKey>,
    pub keys_added: Vec<String>,
    pub keys_dropped: Vec<String>,
    /// The CAs to trust, PEM, when they change.
    pub ca_pem: Option<String>,
    pub cas_added: Vec<String>,
    pub cas_dropped: Vec<String>,
    /// A CA rotation under way: the new CA's fingerprint and when the control plane switches.
    pub ca_rotation: Option<(String, u64)>,
    /// That new CA, PEM.
    pub ca_next_pem: Option<String>,
}

impl Applied {
    pub fn changed(&self) -> bool {
        !self.keys_added.is_empty()
            || !self.keys_dropped.is_empty()
            || !self.cas_added.is_empty()
            || !self.cas_dropped.is_empty()
    }
}

/// What the node should trust after `doc`, given the `keys` and CAs (`ca_pem`) it trusts now.
pub fn apply(org_id: &str, keys: &[PublicKey], ca_pem: &str, doc: &NodeTrust) -> Result<Applied, String> {
    let mut applied = apply_keys(org_id, keys, doc)?;
    apply_cas(ca_pem, doc, &mut applied)?;
    Ok(applied)
}

fn apply_keys(org_id: &str, keys: &[PublicKey], doc: &NodeTrust) -> Result<Applied, String> {
    let mut trusted: BTreeMap<String, PublicKey> =
        keys.iter().map(|k| (k.key_id.clone(), k.clone())).collect();
    let mut previous: Option<&PublicKey> = None;
    for entry in &doc.org_keys {
        let key = &entry.key;
        if crate::models::key_id_of(&crate::verify::verifying_key(key)?) != key.key_id {
            return Err(format!("signing key {} does not have the id of its bytes", key.key_id));
        }
        match trusted.get(&key.key_id) {
            Some(held) if held != key => {
                return Err(format!(
                    "signing key {} is not the key this node holds under that id",
                    key.key_id
                ));
            }
            Some(_) => {}
            None => {
                let endorser = previous.filter(|p| trusted.contains_key(&p.key_id));
                if let (Some(endorser), Some(sig)) = (endorser, &entry.endorsement_hex) {
                    let message =
                        outpost_protocol::key_rotation_message(org_id, key, entry.signs_from_unix_ms);
                    let verifying = crate::verify::verifying_key(endorser)?;
                    let sig: [u8; 64] = hex::decode(sig)
                        .ok()
                        .and_then(|b| b.try_into().ok())
                        .ok_or_else(|| format!("the endorsement of key {} is not a signature", key.key_id))?;
                    verifying.verify(message.as_bytes(), &Signature::from_bytes(&sig)).map_err(|_| {
                        format!(
                            "the endorsement of signing key {} by key {} does not verify: refused",
                            key.key_id, endorser.key_id
                        )
                    })?;
                    trusted.insert(key.key_id.clone(), key.clone());
                }
            }
        }
        previous = Some(key);
    }
    let now: Vec<PublicKey> = doc
        .org_keys
        .iter()
        .filter(|e| !e.retired && trusted.contains_key(&e.key.key_id))
        .map(|e| e.key.clone())
        .collect();
    if now.is_empty() {
        return Err(format!(
            "none of the organisation's signing keys ({}) is, or is endorsed by, a key this node trusts ({}): \
             enroll this node again",
            doc.org_keys
                .iter()
                .filter(|e| !e.retired)
                .map(|e| e.key.key_id.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            keys.iter().map(|k| k.key_id.as_str()).collect::<Vec<_>>().join(", ")
        ));
    }
    let ids = |ks: &[PublicKey]| ks.iter().map(|k| k.key_id.clone()).collect::<Vec<_>>();
    let (before, after) = (ids(keys), ids(&now));
    Ok(Applied {
        keys_added: after.iter().filter(|k| !before.contains(k)).cloned().collect(),
        keys_dropped: before.iter().filter(|k| !after.contains(k)).cloned().collect(),
        org_keys: now,
        ..Default::default()
    })
}

/// A CA certificate with its fingerprint.
struct Ca {
    der: Vec<u8>,
    fingerprint: String,
}

fn cas(pem: &str, what: &str) -> Result<Vec<Ca>, String> {
    let certs = tls::certs_from_pem(pem, what).map_err(|e| e.to_string())?;
    Ok(certs
        .into_iter()
        .map(|c| Ca { fingerprint: tls::fingerprint(&c), der: c.as_ref().to_vec() })
        .collect())
}

/// Whether `ca` signed `message` (ECDSA P-256 SHA-256, ASN.1 DER signature).
fn ca_signed(ca: &Ca, message: &[u8], signature: &[u8]) -> bool {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(&ca.der) else { return false };
    let public = cert.public_key().subject_public_key.data.as_ref();
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, public)
        .verify(message, signature)
        .is_ok()
}

fn apply_cas(ca_pem: &str, doc: &NodeTrust, applied: &mut Applied) -> Result<(), String> {
    let held = cas(ca_pem, "the pinned CAs (identity/ca.crt)")?;
    let mut offered = cas(&doc.ca_pem, "the CAs in the trust document")?;
    let mut trusted: Vec<String> = held.iter().map(|c| c.fingerprint.clone()).collect();
    if let Some(rotation) = &doc.ca_rotation {
        let mut new = cas(&rotation.new_ca_pem, "the new CA of the rotation")?;
        if new.len() != 1 {
            return Err("a CA rotation announces exactly one new CA".into());
        }
        let new = new.remove(0);
        let message = outpost_protocol::ca_rotation_message(&new.fingerprint, rotation.switch_unix_ms);
        let signature = hex::decode(&rotation.signature_hex)
            .map_err(|_| "the CA rotation's signature is not hex".to_owned())?;
        if !trusted.contains(&new.fingerprint) {
            if !held.iter().any(|ca| ca_signed(ca, message.as_bytes(), &signature)) {
                return Err(format!(
                    "the announcement of CA {} is not signed by a CA this node trusts: refused",
                    new.fingerprint
                ));
            }
            trusted.push(new.fingerprint.clone());
        }
        applied.ca_rotation = Some((new.fingerprint.clone(), rotation.switch_unix_ms));
        applied.ca_next_pem = Some(pem_of(&new.der));
        if !offered.iter().any(|c| c.fingerprint == new.fingerprint) {
            offered.push(new);
        }
    }
    let keep: Vec<&Ca> = offered.iter().filter(|c| trusted.contains(&c.fingerprint)).collect();
    if keep.is_empty() {
        return Err(
            "the control plane lists no CA this node trusts: enroll this node again (`outpost enroll --force`)".into()
        );
    }
    let before: Vec<&str> = held.iter().map(|c| c.fingerprint.as_str()).collect();
    let after: Vec<&str> = keep.iter().map(|c| c.fingerprint.as_str()).collect();
    applied.cas_added = after.iter().filter(|f| !before.contains(f)).map(|f| (*f).to_owned()).collect();
    applied.cas_dropped = before.iter().filter(|f| !after.contains(f)).map(|f| (*f).to_owned()).collect();
    if !applied.cas_added.is_empty() || !applied.cas_dropped.is_empty() {
        applied.ca_pem = Some(keep.iter().map(|c| pem_of(&c.der)).collect());
    }
    Ok(())
}

fn pem_of(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// Stores what was taken: the CAs first (`ca.crt`), then `trust.json`; each replaced atomically.
pub fn store(identity_dir: &Path, applied: &Applied, tag: &str, now_unix_ms: u64) -> Result<(), String> {
    if let Some(pem) = &applied.ca_pem {
        crate::identity::replace_file(&identity_dir.join("ca.crt"), pem.as_bytes(), 0o644)
            .map_err(|e| format!("identity/ca.crt: {e}"))?;
    }
    let accepted = Accepted {
        tag: tag.to_owned(),
        org_keys: applied.org_keys.clone(),
        updated_unix_ms: now_unix_ms,
        ca_next_pem: applied.ca_next_pem.clone(),
    };
    let body = serde_json::to_vec_pretty(&accepted).map_err(|e| e.to_string())?;
    crate::identity::replace_file(&identity_dir.join(TRUST_JSON), &body, 0o644)
        .map_err(|e| format!("identity/{TRUST_JSON}: {e}"))
}

/// Whether the CA `ca_pem` issued the certificate `cert_pem`: its issuer is the CA's subject
/// and the CA's key (ECDSA P-256, as Outpost's CAs are) signed it.
pub fn issued_by(cert_pem: &str, ca_pem: &str) -> bool {
    let (Ok(cert), Ok(ca)) =
        (tls::certs_from_pem(cert_pem, "certificate"), tls::certs_from_pem(ca_pem, "CA"))
    else {
        return false;
    };
    let (Ok((_, cert)), Ok((_, ca))) = (
        x509_parser::parse_x509_certificate(cert[0].as_ref()),
        x509_parser::parse_x509_certificate(ca[0].as_ref()),
    ) else {
        return false;
    };
    let public = ca.public_key().subject_public_key.data.as_ref();
    cert.issuer().as_raw() == ca.subject().as_raw()
        && ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, public)
            .verify(cert.tbs_certificate.as_ref(), cert.signature_value.data.as_ref())
            .is_ok()
}

/// The new CA of a rotation under way whose certificate the node does not hold yet, if any
/// (`cert_pem` is the node's certificate).
pub fn renewal_owed(identity_dir: &Path, cert_pem: &str) -> Option<String> {
    let next = load(identity_dir).ok().flatten()?.ca_next_pem?;
    (!issued_by(cert_pem, &next)).then_some(next)
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::{Signer, SigningKey};
    use outpost_protocol::{CaRotation, OrgKey};
    use sha2::{Digest, Sha256};

    use super::*;

    const ORG: &str = "org-1";

    fn key(seed: u8) -> (SigningKey, PublicKey) {
        let sk = SigningKey::from_bytes(&[seed; 32]);
        let public = sk.verifying_key();
        let key_id = crate::models::key_id_of(&public);
        (sk, PublicKey { key_id, ed25519_hex: hex::encode(public.to_bytes()) })
    }

    /// The chain k1 → k2 → ... each endorsed by the one before; `signer` is the index of the key
    /// that signs now (those before it retired).
    fn chain(keys: &[(SigningKey, PublicKey)], signer: usize) -> Vec<OrgKey> {
        keys.iter()
            .enumerate()
            .map(|(i, (_, public))| OrgKey {
                key: public.clone(),
                signs_from_unix_ms: i as u64 * 1000,
                endorsement_hex: (i > 0).then(|| {
                    let message = outpost_protocol::key_rotation_message(ORG, public, i as u64 * 1000);
                    hex::encode(keys[i - 1].0.sign(message.as_bytes()).to_bytes())
                }),
                retired: i < signer,
            })
            .collect()
    }

    struct Ca {
        key: rcgen::KeyPair,
        cert: rcgen::Certificate,
    }

    fn ca(name: &str) -> Ca {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        let cert = params.self_signed(&key).expect("CA");
        Ca { key, cert }
    }

    /// `new` announced by `by` (ECDSA P-256 over the rotation message).
    fn announce(by: &Ca, new: &Ca, switch: u64) -> CaRotation {
        let fingerprint = hex::encode(Sha256::digest(new.cert.der()));
        let message = outpost_protocol::ca_rotation_message(&fingerprint, switch);
        let rng = ring::rand::SystemRandom::new();
        let signer = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            &by.key.serialize_der(),
            &rng,
        )
        .expect("signer");
        let signature = signer.sign(&rng, message.as_bytes()).expect("signed");
        CaRotation {
            new_ca_pem: new.cert.pem(),
            switch_unix_ms: switch,
            signature_hex: hex::encode(signature),
        }
    }

    fn doc(ca_pem: String, ca_rotation: Option<CaRotation>, org_keys: Vec<OrgKey>) -> NodeTrust {
        NodeTrust { tag: "t".into(), ca_pem, ca_rotation, org_keys }
    }

    #[test]
    fn an_endorsed_key_is_added_through_the_overlap_and_the_old_one_dropped_after() {
        let keys = [key(1), key(2)];
        let old = ca("old");
        let overlap = doc(old.cert.pem(), None, chain(&keys, 0));
        let applied = apply(ORG, std::slice::from_ref(&keys[0].1), &old.cert.pem(), &overlap).expect("taken");
        assert_eq!(applied.org_keys, vec![keys[0].1.clone(), keys[1].1.clone()], "both through the overlap");
        assert_eq!(applied.keys_added, vec![keys[1].1.key_id.clone()]);
        assert!(applied.ca_pem.is_none(), "the CAs did not change");

        let switched = doc(old.cert.pem(), None, chain(&keys, 1));
        let applied = apply(ORG, &applied.org_keys, &old.cert.pem(), &switched).expect("taken");
        assert_eq!(applied.org_keys, vec![keys[1].1.clone()], "only the new one after");
        assert_eq!(applied.keys_dropped, vec![keys[0].1.key_id.clone()]);
    }

    #[test]
    fn a_node_that_missed_rotations_follows_the_chain() {
        let keys = [key(1), key(2), key(3)];
        let ca = ca("ca");
        let later = doc(ca.cert.pem(), None, chain(&keys, 2));
        let applied = apply(ORG, std::slice::from_ref(&keys[0].1), &ca.cert.pem(), &later).expect("followed");
        assert_eq!(applied.org_keys, vec![keys[2].1.clone()]);
    }

    #[test]
    fn keys_nobody_trusted_endorsed_are_refused() {
        let (ours, theirs) = (key(1), key(9));
        let ca = ca("ca");
        // A key endorsed by a key the node never trusted.
        let foreign = doc(ca.cert.pem(), None, chain(&[theirs, key(10)], 1));
        let err = apply(ORG, std::slice::from_ref(&ours.1), &ca.cert.pem(), &foreign).expect_err("refused");
        assert!(err.contains("enroll this node again"), "{err}");

        // An endorsement signed over another organisation's message.
        let keys = [key(1), key(2)];
        let mut forged = chain(&keys, 1);
        let message = outpost_protocol::key_rotation_message("org-2", &keys[1].1, 1000);
        forged[1].endorsement_hex = Some(hex::encode(keys[0].0.sign(message.as_bytes()).to_bytes()));
        let err =
            apply(ORG, std::slice::from_ref(&keys[0].1), &ca.cert.pem(), &doc(ca.cert.pem(), None, forged))
                .expect_err("refused");
        assert!(err.contains("does not verify"), "{err}");

        // A key whose id is not that of its bytes.
        let mut renamed = chain(&keys, 0);
        renamed[1].key.key_id = "0000000000000000".into();
        assert!(
            apply(ORG, std::slice::from_ref(&keys[0].1), &ca.cert.pem(), &doc(ca.cert.pem(), None, renamed))
                .is_err()
        );

        // The same id with other bytes.
        let mut swapped = chain(&keys, 0);
        swapped[0].key.ed25519_hex = keys[1].1.ed25519_hex.clone();
        assert!(
            apply(ORG, std::slice::from_ref(&keys[0].1), &ca.cert.pem(), &doc(ca.cert.pem(), None, swapped))
                .is_err()
        );
    }

    #[test]
    fn a_new_ca_signed_by_the_old_one_is_added_then_the_old_one_dropped() {
        let keys = [key(1)];
        let (old, new) = (ca("old"), ca("new"));
        let rotation = announce(&old, &new, 5000);
        let both = format!("{}{}", old.cert.pem(), new.cert.pem());
        let overlap = doc(both, Some(rotation), chain(&keys, 0));
        let applied = apply(ORG, std::slice::from_ref(&keys[0].1), &old.cert.pem(), &overlap).expect("taken");
        let pem = applied.ca_pem.clone().expect("the CAs change");
        assert_eq!(tls::certs_from_pem(&pem, "cas").expect("certs").len(), 2);
        assert_eq!(applied.cas_added.len(), 1);
        assert_eq!(applied.ca_rotation.as_ref().map(|r| r.1), Some(5000));

        let after = doc(new.cert.pem(), None, chain(&keys, 0));
        let applied = apply(ORG, std::slice::from_ref(&keys[0].1), &pem, &after).expect("taken");
        let pem = applied.ca_pem.expect("the old CA goes");
        assert_eq!(tls::certs_from_pem(&pem, "cas").expect("certs").len(), 1);
        assert!(
            tls::pem_has_fingerprint(&pem, "ca", &hex::encode(Sha256::digest(new.cert.der()))).expect("pem")
        );
        assert_eq!(applied.cas_dropped.len(), 1);
    }

    #[test]
    fn a_ca_announced_by_a_stranger_or_listed_alone_is_refused() {
        let keys = [key(1)];
        let (old, new, stranger) = (ca("old"), ca("new"), ca("stranger"));
        let forged = announce(&stranger, &new, 5000);
        let err = apply(
            ORG,
            std::slice::from_ref(&keys[0].1),
            &old.cert.pem(),
            &doc(old.cert.pem(), Some(forged), chain(&keys, 0)),
        )
        .expect_err("refused");
        assert!(err.contains("not signed by a CA this node trusts"), "{err}");
        // A document that lists only a CA the node never trusted changes nothing.
        let err = apply(
            ORG,
            std::slice::from_ref(&keys[0].1),
            &old.cert.pem(),
            &doc(new.cert.pem(), None, chain(&keys, 0)),
        )
        .expect_err("refused");
        assert!(err.contains("enroll this node again"), "{err}");
    }

    #[test]
    fn a_certificate_is_issued_by_a_ca_only_when_its_key_signed_it() {
        let (a, twin) = (ca("same name"), ca("same name"));
        let node_key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name.push(rcgen::DnType::CommonName, "node-1");
        let cert = params.signed_by(&node_key, &a.cert, &a.key).expect("issued").pem();
        assert!(issued_by(&cert, &a.cert.pem()));
        assert!(!issued_by(&cert, &twin.cert.pem()), "the same name is not the same CA");
        assert!(!issued_by("not a certificate", &a.cert.pem()));

        // A renewal is owed while a rotation's new CA has not issued the node's certificate.
        let dir = tempfile::tempdir().expect("dir");
        assert_eq!(renewal_owed(dir.path(), &cert), None, "no rotation, nothing owed");
        let keys = [key(1)];
        let pending = Applied {
            org_keys: vec![keys[0].1.clone()],
            ca_next_pem: Some(twin.cert.pem()),
            ..Default::default()
        };
        store(dir.path(), &pending, "t", 1).expect("stored");
        assert!(renewal_owed(dir.path(), &cert).is_some(), "issued by the old CA: owed");
        let done = Applied { ca_next_pem: Some(a.cert.pem()), ..pending };
        store(dir.path(), &done, "t", 2).expect("stored");
        assert_eq!(renewal_owed(dir.path(), &cert), None, "issued by the new CA: nothing owed");
    }

    #[test]
    fn what_was_taken_is_stored_and_loaded() {
        let dir = tempfile::tempdir().expect("dir");
        let keys = [key(1), key(2)];
        assert_eq!(
            org_keys(dir.path(), &keys[0].1).expect("read"),
            vec![keys[0].1.clone()],
            "the pinned key"
        );
        let applied = Applied { org_keys: vec![keys[1].1.clone()], ..Default::default() };
        store(dir.path(), &applied, "tag-1", 7).expect("stored");
        assert_eq!(org_keys(dir.path(), &keys[0].1).expect("read"), vec![keys[1].1.clone()]);
        assert_eq!(load(dir.path()).expect("read").map(|a| a.tag), Some("tag-1".into()));
        std::fs::write(dir.path().join(TRUST_JSON), b"{").expect("write");
        assert!(load(dir.path()).is_err(), "a damaged file is an error, not a silent reset");
    }
}
