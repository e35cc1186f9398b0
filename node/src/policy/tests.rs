use super::*;

const DIGEST: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const OTHER: &str = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

fn policy(toml_text: &str) -> Policy {
    #[derive(Deserialize)]
    struct Doc {
        policy: Policy,
    }
    let doc: Doc = toml::from_str(toml_text).expect("parses");
    doc.policy.validate().expect("valid");
    doc.policy
}

fn job(json: serde_json::Value) -> Work {
    let spec: JobSpec = serde_json::from_value(json).expect("spec");
    Work::job(&spec, Some(submitter()))
}

fn submitter() -> Submitter {
    Submitter {
        org_id: "acme".into(),
        name: Some("alice".into()),
        role: Some("operator".into()),
        deployment: None,
        trigger: None,
        local_trigger: None,
    }
}

fn refused(p: &Policy, w: &Work) -> Refusal {
    match p.evaluate(w, false) {
        Decision::Refuse(r) => r,
        other => panic!("expected a refusal, got {other:?} for {w:?}"),
    }
}

#[test]
fn no_policy_allows_everything_as_before() {
    let p = Policy::default();
    assert!(p.is_open());
    let w = job(serde_json::json!({ "image": OTHER, "network": true, "inputs": ["../x"],
        "security": { "user": "0", "writable_rootfs": true, "cap_add": ["NET_ADMIN"] } }));
    assert_eq!(p.evaluate(&w, false), Decision::Allow);
}

#[test]
fn images_are_allowed_by_digest_with_their_own_rules() {
    let p = policy(&format!(
        r#"[policy]
        images = [ {{ digest = "{DIGEST}", name = "deid", kinds = ["container"], input_prefixes = ["scans/"], relaxations = [] }} ]
        "#
    ));
    let ok = job(serde_json::json!({ "image": DIGEST, "inputs": ["scans/a.dcm"] }));
    assert_eq!(p.evaluate(&ok, false), Decision::Allow);
    let r = refused(&p, &job(serde_json::json!({ "image": OTHER })));
    assert_eq!(r.rule, "policy.images");
    assert!(r.value.contains(OTHER), "{r:?}");
    let r = refused(&p, &job(serde_json::json!({ "image": DIGEST, "inputs": ["notes/a.txt"] })));
    assert_eq!(r.rule, "policy.images[deid].input_prefixes");
    let r = refused(&p, &job(serde_json::json!({ "image": DIGEST, "network": true })));
    assert_eq!(
        (r.rule.as_str(), r.value.as_str()),
        ("policy.images[deid].relaxations", "network (network = true)")
    );
    // Inference runs no image: the per-image kinds do not apply, the top-level ones do.
    let generate = job(serde_json::json!({ "kind": "generate", "model": "m", "prompt": "hi" }));
    assert_eq!(p.evaluate(&generate, false), Decision::Allow);
    let p = policy(
        r#"[policy]
        kinds = ["container"]"#,
    );
    assert_eq!(refused(&p, &generate).value, "kind generate");
}

#[test]
fn inputs_outside_the_prefixes_never_slip_through() {
    let p = policy(
        r#"[policy]
        input_prefixes = ["scans/"]"#,
    );
    for key in [
        "notes/a.txt",
        "scans/../notes/a.txt",
        "scans/%2e%2e/notes/a.txt",
        "scans/%2E%2E%2Fnotes",
        "other/../scans/a.dcm",
        "./scans/a.dcm",
        "scans\\..\\notes",
        "/scans/a.dcm",
        "scans//a",
        "scan",
    ] {
        let r = refused(&p, &job(serde_json::json!({ "image": DIGEST, "inputs": [key] })));
        assert_eq!(r.rule, "policy.input_prefixes", "{key}");
    }
    let ok = job(serde_json::json!({ "image": DIGEST, "inputs": ["scans/2026/a.dcm", "scans/2027/"] }));
    assert_eq!(p.evaluate(&ok, false), Decision::Allow);
    // An inference job's prompt key, or the texts it embeds, are inputs too.
    let generate = job(serde_json::json!({ "kind": "generate", "model": "m", "prompt_key": "notes/x.txt" }));
    assert_eq!(refused(&p, &generate).rule, "policy.input_prefixes");
    let embed = job(serde_json::json!({ "kind": "embed", "model": "m", "texts_key": "notes/secret.jsonl" }));
    assert_eq!(refused(&p, &embed).rule, "policy.input_prefixes");
}

#[test]
fn relaxations_ceilings_and_submitters_are_checked() {
    let p = policy(
        r#"[policy]
        relaxations = ["network"]
        max_memory_mb = 1024
        max_timeout_secs = 60
        submitters = ["role:operator", "deployment:viewer"]"#,
    );
    let root = job(serde_json::json!({ "image": DIGEST, "security": { "user": "0:0" } }));
    assert_eq!(refused(&p, &root).value, "root (user = \"0:0\")");
    // Spellings the runtime reads as uid 0, and names the image maps, cannot be judged: root.
    for user in ["00", "+0", "-0", "root", "nobody", "0x0"] {
        let w = job(serde_json::json!({ "image": DIGEST, "timeout_secs": 30, "security": { "user": user } }));
        assert_eq!(refused(&p, &w).rule, "policy.relaxations", "{user}");
    }
    let plain =
        job(serde_json::json!({ "image": DIGEST, "timeout_secs": 30, "security": { "user": "1000:1000" } }));
    assert_eq!(p.evaluate(&plain, false), Decision::Allow);
    let caps = job(serde_json::json!({ "image": DIGEST, "security": { "cap_add": ["SYS_ADMIN"] } }));
    assert_eq!(refused(&p, &caps).value, "cap-add (cap_add SYS_ADMIN)");
    let big = job(serde_json::json!({ "image": DIGEST, "resources": { "memory_mb": 4096 } }));
    assert_eq!(refused(&p, &big).rule, "policy.max_memory_mb");
    let long = job(serde_json::json!({ "image": DIGEST, "timeout_secs": 61 }));
    assert_eq!(refused(&p, &long).value, "timeout_secs = 61 (at most 60)");
    let net = job(serde_json::json!({ "image": DIGEST, "network": true, "timeout_secs": 30 }));
    assert_eq!(p.evaluate(&net, false), Decision::Allow);
    let mut viewer = net.clone();
    viewer.submitter = Some(Submitter { role: Some("viewer".into()), ..submitter() });
    assert_eq!(refused(&p, &viewer).rule, "policy.submitters");
    let mut unstated = net.clone();
    unstated.submitter = None;
    assert!(refused(&p, &unstated).value.contains("does not say who submitted it"));
    let service: ServiceSpec = serde_json::from_value(serde_json::json!({
        "image": DIGEST, "network": "bridge",
        "publish": [{ "host_ip": "127.0.0.1", "host_port": 8080, "container_port": 80 }],
    }))
    .expect("service");
    let by = Submitter {
        org_id: "acme".into(),
        name: None,
        role: None,
        deployment: Some("viewer".into()),
        trigger: None,
        local_trigger: None,
    };
    let r = refused(&p, &Work::service(&service, Some(by)));
    assert_eq!(r.value, "publish (publish 127.0.0.1:8080)");
}

#[test]
fn approval_is_asked_for_new_images_every_job_or_per_image() {
    let p = policy(&format!(
        r#"[policy]
        approval = "new-image"
        approvers_group = "root"
        images = [ {{ digest = "{DIGEST}" }}, {{ digest = "{OTHER}", approval = "always" }} ]"#
    ));
    let w = job(serde_json::json!({ "image": DIGEST }));
    assert_eq!(p.evaluate(&w, false), Decision::NeedsApproval);
    assert_eq!(p.evaluate(&w, true), Decision::Allow, "approved before, with --remember");
    let always = job(serde_json::json!({ "image": OTHER }));
    assert_eq!(p.evaluate(&always, true), Decision::NeedsApproval);
    let p = policy(
        r#"[policy]
        approval = "every-job""#,
    );
    assert_eq!(p.evaluate(&w, true), Decision::NeedsApproval);
    // A refusal wins over asking: nobody is asked to approve what the policy forbids.
    let p = policy(
        r#"[policy]
        approval = "every-job"
        relaxations = []"#,
    );
    let net = job(serde_json::json!({ "image": DIGEST, "network": true }));
    assert!(matches!(p.evaluate(&net, false), Decision::Refuse(_)));
}

#[test]
fn a_policy_that_cannot_apply_as_written_is_refused() {
    for (text, needle) in [
        ("images = [ { digest = \"sha256:abc\" } ]", "not an image digest"),
        ("input_prefixes = [\"\"]", "names the whole store"),
        ("input_prefixes = [\"scans/../\"]", "`..` segment"),
        ("submitters = [\"alice\"]", "must be org:ID"),
        ("max_memory_mb = 0", "at least 1"),
        ("approval = \"always\"", "per image"),
        ("approvers_group = \"no-such-group-here\"", "there is no group"),
    ] {
        #[derive(Deserialize)]
        struct Doc {
            policy: Policy,
        }
        let doc: Doc = toml::from_str(&format!("[policy]\n{text}\n")).expect("parses");
        let err = doc.policy.validate().expect_err(text);
        assert!(err.contains(needle), "{text}: {err}");
    }
    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Doc {
        policy: Policy,
    }
    let err = toml::from_str::<Doc>("[policy]\nimage = []\n").expect_err("unknown key").to_string();
    assert!(err.contains("unknown field `image`"), "{err}");
    let err = toml::from_str::<Doc>("[policy]\nkinds = [\"batch\"]\n").expect_err("unknown kind").to_string();
    assert!(err.contains("batch"), "{err}");
}

#[test]
fn the_strict_template_is_a_valid_policy_that_runs_nothing_unlisted() {
    let p = policy(STRICT_TEMPLATE);
    let r = refused(&p, &job(serde_json::json!({ "image": DIGEST })));
    assert_eq!(r.rule, "policy.images");
    assert_eq!(p.approval, Approval::NewImage);
}

#[test]
fn require_sealed_refuses_results_that_would_leave_in_clear_and_nothing_else() {
    let p = policy("[policy]\nrequire_sealed = true\n");
    let spec = serde_json::json!({ "image": DIGEST });
    let r = refused(&p, &job(spec.clone()).unsealed(true));
    assert_eq!(r.rule, "policy.require_sealed");
    assert!(r.value.contains("without recipients"), "{r}");
    // Sealed, or a result that stays on site (a local trigger's): allowed.
    assert_eq!(p.evaluate(&job(spec), false), Decision::Allow);
    assert!(!p.is_open(), "require_sealed is a restriction");
}

#[test]
fn the_sites_own_recipients_must_be_age_public_keys() {
    #[derive(Deserialize)]
    struct Doc {
        policy: Policy,
    }
    let key = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p";
    let good: Doc = toml::from_str(&format!("[policy]\nseal_also_to = [\"{key}\"]\n")).expect("parses");
    good.policy.validate().expect("a real age key is accepted");
    for (bad, says) in [
        ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5", "not an age X25519 public key"),
        ("age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8q", "not an age X25519 public key"),
    ] {
        let doc: Doc = toml::from_str(&format!("[policy]\nseal_also_to = [\"{bad}\"]\n")).expect("parses");
        let err = doc.policy.validate().expect_err("refused");
        assert!(err.starts_with("policy.seal_also_to: ") && err.contains(says), "{err}");
    }
    let doc: Doc =
        toml::from_str(&format!("[policy]\nseal_also_to = [\"{key}\", \"{key}\"]\n")).expect("parses");
    assert!(doc.policy.validate().expect_err("twice").contains("named twice"));
}
