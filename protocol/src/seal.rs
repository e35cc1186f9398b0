//! Results sealed for the people who asked for them: the node encrypts what a result says
//! beyond bookkeeping to the job's age X25519 recipients (and the site's own, if its policy
//! names one); the control plane stores and returns the ciphertext; the requester opens it
//! with `outpost-control job result --identity FILE` or with any age implementation (the
//! ciphertext is a standard ASCII-armoured age file: `age -d -i KEY`).
//!
//! Recipients are checked here without the `seal` feature too, so that every side refuses a
//! malformed one with the same words.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Most recipients one job may name.
pub const MAX_RECIPIENTS: usize = 16;

/// The first and last lines of an ASCII-armoured age file: a sealed result starts with the
/// first; a sealed live log is a run of such files.
pub const ARMOUR_BEGIN: &str = "-----BEGIN AGE ENCRYPTED FILE-----";
pub const ARMOUR_END: &str = "-----END AGE ENCRYPTED FILE-----";

/// What a sealed result hides, as the plaintext of its age file (JSON). The clear report keeps
/// outcome, exit code, error, timings and each output's key, size and SHA-256.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealedPart {
    #[serde(default)]
    pub stdout_tail: String,
    #[serde(default)]
    pub stderr_tail: String,
    /// Output bodies the egress policy let out, by key.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub bodies: BTreeMap<String, String>,
}

/// Checks one recipient's form: `age1` then bech32 text, as `age-keygen` prints it. The full
/// check (checksum, curve point) is [`parse_recipient`] where the `seal` feature is on.
pub fn check_recipient_form(text: &str) -> Result<(), String> {
    let ok = text.len() == 62
        && text.starts_with("age1")
        && text[4..].bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "recipient {:?} is not an age X25519 public key (age1 followed by 58 lowercase characters, \
             as age-keygen prints it)",
            text.chars().take(80).collect::<String>()
        ))
    }
}

/// Checks a job's recipient list: at most [`MAX_RECIPIENTS`], each well-formed, no repeats.
pub fn check_recipients(recipients: &[String]) -> Result<(), String> {
    if recipients.len() > MAX_RECIPIENTS {
        return Err(format!("{} recipients; at most {MAX_RECIPIENTS}", recipients.len()));
    }
    for (i, r) in recipients.iter().enumerate() {
        check_recipient_form(r)?;
        #[cfg(feature = "seal")]
        parse_recipient(r)?;
        if recipients[..i].contains(r) {
            return Err(format!("recipient {r} is named twice"));
        }
    }
    Ok(())
}

#[cfg(feature = "seal")]
pub use sealing::{SealError, open, open_report, parse_recipient, seal, seal_report};

#[cfg(feature = "seal")]
mod sealing {
    use std::io::{Read, Write};
    use std::str::FromStr;

    use age::armor::{ArmoredReader, ArmoredWriter, Format};

    /// Why sealing or opening failed.
    #[derive(Debug, thiserror::Error)]
    pub enum SealError {
        #[error("{0}")]
        Recipient(String),
        #[error("no recipients to seal for")]
        NoRecipients,
        #[error("sealing failed: {0}")]
        Encrypt(String),
        #[error("the identity file holds no usable age identity: {0}")]
        Identity(String),
        #[error(
            "the sealed result cannot be opened: {0} (none of the identities given is a recipient, \
             or the ciphertext was altered)"
        )]
        Open(String),
    }

    /// Parses an `age1…` recipient, with the same words as [`super::check_recipient_form`].
    pub fn parse_recipient(text: &str) -> Result<age::x25519::Recipient, String> {
        super::check_recipient_form(text)?;
        age::x25519::Recipient::from_str(text).map_err(|e| {
            format!("recipient {text:?} is not an age X25519 public key: {e} (copy it again from age-keygen)")
        })
    }

    /// Encrypts `plaintext` to every recipient; returns the ASCII-armoured age file.
    pub fn seal(plaintext: &[u8], recipients: &[String]) -> Result<String, SealError> {
        if recipients.is_empty() {
            return Err(SealError::NoRecipients);
        }
        let parsed = recipients
            .iter()
            .map(|r| parse_recipient(r).map_err(SealError::Recipient))
            .collect::<Result<Vec<_>, _>>()?;
        let encryptor = age::Encryptor::with_recipients(parsed.iter().map(|r| r as &dyn age::Recipient))
            .map_err(|e| SealError::Encrypt(e.to_string()))?;
        let encrypt = |e: std::io::Error| SealError::Encrypt(e.to_string());
        let mut out = Vec::with_capacity(plaintext.len() * 4 / 3 + 512);
        let armour = ArmoredWriter::wrap_output(&mut out, Format::AsciiArmor).map_err(encrypt)?;
        let mut writer = encryptor.wrap_output(armour).map_err(encrypt)?;
        writer.write_all(plaintext).map_err(encrypt)?;
        writer.finish().and_then(|armour| armour.finish()).map_err(encrypt)?;
        String::from_utf8(out).map_err(|e| SealError::Encrypt(e.to_string()))
    }

    /// Seals `report` for `recipients`: its tails and output bodies move into an age file in
    /// `sealed`; what stays in clear is bookkeeping. Nothing changes on an error.
    pub fn seal_report(report: &mut crate::ResultReport, recipients: &[String]) -> Result<(), SealError> {
        let part = super::SealedPart {
            stdout_tail: report.stdout_tail.clone(),
            stderr_tail: report.stderr_tail.clone(),
            bodies: report.outputs.iter().filter_map(|o| Some((o.key.clone(), o.body.clone()?))).collect(),
        };
        let plaintext = serde_json::to_vec(&part).map_err(|e| SealError::Encrypt(e.to_string()))?;
        report.sealed = Some(seal(&plaintext, recipients)?);
        report.withhold_output();
        Ok(())
    }

    /// The clear report of a sealed one, opened with `identity_file`: tails and bodies back in
    /// their places, `sealed` gone. A report that is not sealed is returned as it is.
    pub fn open_report(
        report: &crate::ResultReport,
        identity_file: &str,
    ) -> Result<crate::ResultReport, SealError> {
        let Some(armoured) = &report.sealed else { return Ok(report.clone()) };
        let plaintext = open(armoured, identity_file)?;
        let part: super::SealedPart = serde_json::from_slice(&plaintext)
            .map_err(|e| SealError::Open(format!("the sealed part is not what a node seals: {e}")))?;
        let mut clear = crate::ResultReport { sealed: None, ..report.clone() };
        clear.stdout_tail = part.stdout_tail;
        clear.stderr_tail = part.stderr_tail;
        for o in &mut clear.outputs {
            o.body = part.bodies.get(&o.key).cloned();
        }
        Ok(clear)
    }

    /// Decrypts an armoured age file with the identities in `identity_file` (the text of a
    /// file as `age-keygen` writes it). Fails, saying so, on any altered byte.
    pub fn open(armoured: &str, identity_file: &str) -> Result<Vec<u8>, SealError> {
        let file = age::IdentityFile::from_buffer(identity_file.as_bytes())
            .map_err(|e| SealError::Identity(e.to_string()))?;
        let identities = file.into_identities().map_err(|e| SealError::Identity(e.to_string()))?;
        if identities.is_empty() {
            return Err(SealError::Identity("no AGE-SECRET-KEY-1… line".into()));
        }
        let open = |e: &dyn std::fmt::Display| SealError::Open(e.to_string());
        let decryptor =
            age::Decryptor::new_buffered(ArmoredReader::new(armoured.as_bytes())).map_err(|e| open(&e))?;
        let mut reader = decryptor.decrypt(identities.iter().map(|i| i.as_ref())).map_err(|e| open(&e))?;
        let mut plaintext = Vec::new();
        reader.read_to_end(&mut plaintext).map_err(|e| open(&e))?;
        Ok(plaintext)
    }
}

#[cfg(all(test, feature = "seal"))]
mod tests {
    use super::*;
    use crate::{Outcome, OutputObject, ResultReport, Timings};

    fn keypair() -> (String, String) {
        use age::secrecy::ExposeSecret;
        let id = age::x25519::Identity::generate();
        (id.to_public().to_string(), format!("# a test key\n{}\n", id.to_string().expose_secret()))
    }

    fn report() -> ResultReport {
        ResultReport {
            job_id: "j".into(),
            attempt: 1,
            idempotency_key: "j/1".into(),
            outcome: Outcome::Succeeded,
            exit_code: Some(0),
            error: None,
            stdout_tail: "patient 42: benign\n".into(),
            stderr_tail: "warning: low contrast\n".into(),
            output_truncated: false,
            timings: Timings::default(),
            outputs: vec![
                OutputObject {
                    key: "out/a.json".into(),
                    size: 9,
                    sha256: "ab".repeat(32),
                    body: Some("{\"a\":1}".into()),
                },
                OutputObject { key: "out/b.bin".into(), size: 4, sha256: "cd".repeat(32), body: None },
            ],
            egress_denied: Vec::new(),
            inference: None,
            sealed: None,
        }
    }

    #[test]
    fn a_sealed_report_keeps_only_bookkeeping_and_each_recipient_opens_it() {
        let (alice, alice_key) = keypair();
        let (site, site_key) = keypair();
        let clear = report();
        let mut sealed = clear.clone();
        seal_report(&mut sealed, &[alice, site]).expect("sealed");
        let text = serde_json::to_string(&sealed).expect("json");
        for secret in ["patient 42", "low contrast", "\\\"a\\\":1"] {
            assert!(!text.contains(secret), "{secret} in clear: {text}");
        }
        assert_eq!((sealed.outcome, sealed.exit_code), (Outcome::Succeeded, Some(0)));
        assert_eq!(sealed.outputs.iter().map(|o| o.size).collect::<Vec<_>>(), [9, 4], "sizes stay in clear");
        assert!(sealed.sealed.as_deref().is_some_and(|s| s.starts_with(ARMOUR_BEGIN)));
        for key in [&alice_key, &site_key] {
            assert_eq!(open_report(&sealed, key).expect("opened"), clear);
        }
    }

    #[test]
    fn a_flipped_byte_a_stranger_and_a_bad_identity_file_each_fail_saying_so() {
        let (alice, _) = keypair();
        let (_, stranger) = keypair();
        let (bob, bob_key) = keypair();
        let mut sealed = report();
        seal_report(&mut sealed, &[alice, bob]).expect("sealed");

        let err = open_report(&sealed, &stranger).expect_err("not a recipient").to_string();
        assert!(err.contains("cannot be opened"), "{err}");

        // Flip one character of the base64 body (past the header line).
        let armoured = sealed.sealed.clone().expect("sealed");
        let at = armoured.len() / 2;
        let flipped_char = if armoured.as_bytes()[at] == b'A' { "B" } else { "A" };
        let mut flipped = sealed.clone();
        flipped.sealed = Some(format!("{}{flipped_char}{}", &armoured[..at], &armoured[at + 1..]));
        let err = open_report(&flipped, &bob_key).expect_err("altered").to_string();
        assert!(err.contains("cannot be opened"), "{err}");

        let err = open_report(&sealed, "not a key\n").expect_err("no identity").to_string();
        assert!(err.contains("identity file"), "{err}");
    }

    #[test]
    fn recipients_are_checked_with_one_set_of_words() {
        let (good, _) = keypair();
        assert!(check_recipients(std::slice::from_ref(&good)).is_ok());
        let typo = format!("{}{}", &good[..good.len() - 1], if good.ends_with('q') { 'p' } else { 'q' });
        for (list, says) in [
            (vec!["ssh-ed25519 AAAA".to_owned()], "not an age X25519 public key"),
            (vec![typo], "not an age X25519 public key"),
            (vec![good.clone(), good.clone()], "named twice"),
            (vec![good; MAX_RECIPIENTS + 1], "at most"),
        ] {
            let err = check_recipients(&list).expect_err("refused");
            assert!(err.contains(says), "{says}: {err}");
        }
        assert!(matches!(seal(b"x", &[]), Err(SealError::NoRecipients)));
    }
}
