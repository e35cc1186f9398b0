//! The site policy (`[policy]` in the node's own configuration files): what may run on this
//! node's data, whoever signed it. Every path that can start work (a job over the network or
//! from a bundle, a local relay trigger, an inference job, a service revision) asks
//! [`Policy::evaluate`] before anything runs; nothing from the control plane, a deployment or a
//! bundle can change the policy (a bundle's configuration may not set `policy`). Each rule is
//! a list that means "anything" when absent, so a node without a `[policy]` behaves as before.
//! See docs/site-policy.md.

use serde::{Deserialize, Serialize};

use outpost_protocol::{ContainerSpec, InferenceKind, JobSpec, ServiceNetwork, ServiceSpec, Submitter};

/// What a piece of work is, for the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Container,
    Generate,
    Embed,
    Service,
}

/// A relaxation of the hardened defaults a job or service may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Relaxation {
    /// A network (jobs: `network = true`; services: `internal` or `bridge`).
    Network,
    /// A writable root filesystem.
    WritableRootfs,
    /// Running as user 0.
    Root,
    /// Capabilities added back.
    CapAdd,
    /// A GPU (none can be asked for yet; listed so a policy can already forbid it).
    Gpu,
    /// Host ports published by a service.
    Publish,
}

/// Whether work waits for a person at the site before it runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Approval {
    /// Never (the default).
    #[default]
    Off,
    /// Work with an image not approved before (`outpost approvals approve --remember`).
    NewImage,
    /// Every job.
    EveryJob,
    /// (Per image) every job with this image.
    Always,
}

/// Rules for one image, on top of the policy's own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageRule {
    /// `sha256:<64 hex>`: the image id `docker load` keeps. A name is only a label.
    pub digest: String,
    /// For people: what the image is.
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub kinds: Option<Vec<Kind>>,
    #[serde(default)]
    pub input_prefixes: Option<Vec<String>>,
    #[serde(default)]
    pub relaxations: Option<Vec<Relaxation>>,
    /// `always`: every job with this image waits for approval.
    #[serde(default)]
    pub approval: Option<Approval>,
}

/// `[policy]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Images that may run at all. Absent: any image.
    #[serde(default)]
    pub images: Option<Vec<ImageRule>>,
    /// Kinds of work that may run: `container`, `generate`, `embed`, `service`.
    #[serde(default)]
    pub kinds: Option<Vec<Kind>>,
    /// Relaxations of the hardened defaults that may be asked for at all.
    #[serde(default)]
    pub relaxations: Option<Vec<Relaxation>>,
    /// Prefixes of the local object store that work may read (inputs, prompt keys).
    #[serde(default)]
    pub input_prefixes: Option<Vec<String>>,
    /// Who may submit: `org:ID`, `role:NAME`, `name:TOKEN_NAME`, `deployment:NAME` (services),
    /// `trigger:NAME` (the control plane's org triggers), `local-trigger:NAME` (this node's).
    #[serde(default)]
    pub submitters: Option<Vec<String>>,
    #[serde(default)]
    pub max_memory_mb: Option<u64>,
    #[serde(default)]
    pub max_cpu_millis: Option<u64>,
    #[serde(default)]
    pub max_timeout_secs: Option<u64>,
    /// Jobs of one submitter running at once on this node; more wait their turn (in order).
    #[serde(default)]
    pub max_jobs_per_submitter: Option<u64>,
    /// Whether work waits for a person at the site.
    #[serde(default)]
    pub approval: Approval,
    /// Besides root, the members of this group may approve and deny (`outpost approvals`).
    #[serde(default)]
    pub approvers_group: Option<String>,
    /// Refuse jobs whose result would reach the control plane in clear: a job from the
    /// control plane or a bundle must name recipients to seal it for.
    #[serde(default)]
    pub require_sealed: bool,
    /// The site's own age recipients (`age1…`), added to every sealed result so the site can
    /// read what it sends out.
    #[serde(default)]
    pub seal_also_to: Vec<String>,
    /// The organisation's settings as last heard from the control plane (not configuration:
    /// kept in `data_dir/org-settings.json`); kinds of the features they turn off are refused.
    #[serde(skip)]
    pub org: Option<outpost_protocol::OrgSettings>,
}

/// The policy in force, shared by every gate of a running agent and replaced whole when the
/// agent reloads it (SIGHUP): a gate reads one consistent policy per decision.
#[derive(Debug, Clone, Default)]
pub struct Current(std::sync::Arc<std::sync::RwLock<std::sync::Arc<Policy>>>);

impl Current {
    pub fn new(policy: Policy) -> Self {
        Current(std::sync::Arc::new(std::sync::RwLock::new(std::sync::Arc::new(policy))))
    }

    /// The policy in force now.
    pub fn get(&self) -> std::sync::Arc<Policy> {
        match self.0.read() {
            Ok(p) => std::sync::Arc::clone(&p),
            Err(poisoned) => std::sync::Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Puts `policy` in force (it was validated when its configuration loaded), keeping the
    /// organisation's settings in force.
    pub fn set(&self, mut policy: Policy) {
        self.replace(|held| {
            policy.org = held.org.clone();
            policy
        });
    }

    /// Puts the organisation's settings in force beneath the same site policy.
    pub fn set_org(&self, org: Option<outpost_protocol::OrgSettings>) {
        self.replace(|held| Policy { org, ..held.clone() });
    }

    fn replace(&self, f: impl FnOnce(&Policy) -> Policy) {
        let mut guard = match self.0.write() {
            Ok(p) => p,
            Err(poisoned) => poisoned.into_inner(),
        };
        let next = std::sync::Arc::new(f(&guard));
        *guard = next;
    }
}

/// Whom `max_jobs_per_submitter` counts a job against: the most specific thing its submitter
/// says (token name, trigger, local trigger; else role, else organisation).
pub fn submitter_key(submitter: Option<&Submitter>) -> String {
    submitter.and_then(|s| s.identities().pop()).unwrap_or_else(|| "unstated".into())
}

/// A piece of work as the policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Work {
    pub kind: Kind,
    /// The image by digest (none for inference, which runs a model of the signed store).
    pub image: Option<String>,
    pub relaxations: Vec<(Relaxation, String)>,
    /// Keys and prefixes of the local store the work reads.
    pub inputs: Vec<String>,
    pub memory_mb: u64,
    pub cpu_millis: u64,
    pub timeout_secs: Option<u64>,
    /// Who asked for it (`None`: not stated, e.g. by an older control plane).
    pub submitter: Option<Submitter>,
    /// A job whose result leaves the site in clear: from the control plane or a bundle, with
    /// no recipients to seal it for. (A local trigger's result and a service stay on site.)
    pub unsealed_result: bool,
}

/// Why the policy refuses work: the rule and the value that did not match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// The rule, as a configuration path (`policy.images`, `policy.images[deid].kinds`, ...).
    pub rule: String,
    /// What the work asked for that the rule does not allow.
    pub value: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "refused by the site policy: {} does not allow {}", self.rule, self.value)
    }
}

/// What the policy says about a piece of work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Allowed once a person at the site approves it.
    NeedsApproval,
    Refuse(Refusal),
}

impl Work {
    /// A job as the policy sees it.
    pub fn job(spec: &JobSpec, submitter: Option<Submitter>) -> Self {
        match spec {
            JobSpec::Container(c) => Self::container(c, submitter),
            JobSpec::Inference(i) => Work {
                kind: match i.kind {
                    InferenceKind::Generate => Kind::Generate,
                    InferenceKind::Embed => Kind::Embed,
                },
                image: None,
                relaxations: Vec::new(),
                // Every key of the store it reads: a prompt, or the texts to embed.
                inputs: i.prompt_key.iter().chain(i.texts_key.iter()).cloned().collect(),
                memory_mb: 0,
                cpu_millis: 0,
                timeout_secs: Some(i.timeout_secs),
                submitter,
                unsealed_result: false,
            },
        }
    }

    /// Marks a job whose result would leave the site in clear (see [`Work::unsealed_result`]).
    pub fn unsealed(self, unsealed_result: bool) -> Self {
        Work { unsealed_result, ..self }
    }

    fn container(c: &ContainerSpec, submitter: Option<Submitter>) -> Self {
        let mut relaxations = security_relaxations(&c.security);
        if c.network {
            relaxations.push((Relaxation::Network, "network = true".into()));
        }
        Work {
            kind: Kind::Container,
            image: Some(c.image.clone()),
            relaxations,
            inputs: c.inputs.clone(),
            memory_mb: c.resources.memory_mb,
            cpu_millis: c.resources.cpu_millis,
            timeout_secs: Some(c.timeout_secs),
            submitter,
            unsealed_result: false,
        }
    }

    /// A service revision as the policy sees it; its submitter is its deployment.
    pub fn service(spec: &ServiceSpec, submitter: Option<Submitter>) -> Self {
        let mut relaxations = security_relaxations(&spec.security);
        match spec.network {
            ServiceNetwork::None => {}
            ServiceNetwork::Internal => relaxations.push((Relaxation::Network, "network = internal".into())),
            ServiceNetwork::Bridge => relaxations.push((Relaxation::Network, "network = bridge".into())),
        }
        for p in &spec.publish {
            relaxations.push((Relaxation::Publish, format!("publish {}:{}", p.host_ip, p.host_port)));
        }
        Work {
            kind: Kind::Service,
            image: Some(spec.image.clone()),
            relaxations,
            inputs: spec.inputs.clone(),
            memory_mb: spec.resources.memory_mb,
            cpu_millis: spec.resources.cpu_millis,
            timeout_secs: None,
            submitter,
            unsealed_result: false,
        }
    }
}

fn security_relaxations(s: &outpost_protocol::SecurityOverrides) -> Vec<(Relaxation, String)> {
    let mut out = Vec::new();
    if s.writable_rootfs {
        out.push((Relaxation::WritableRootfs, "writable_rootfs = true".into()));
    }
    if let Some(user) = &s.user {
        // Only a plain decimal uid can be judged: a name is mapped by the image's own
        // /etc/passwd, and the runtime reads "00" or "+0" as 0 too. Anything else counts as
        // asking for root.
        let uid = user.split(':').next().unwrap_or_default();
        let plain = !uid.is_empty() && uid.bytes().all(|b| b.is_ascii_digit());
        match uid.parse::<u32>() {
            Ok(n) if plain && n != 0 => {}
            Ok(_) if plain => out.push((Relaxation::Root, format!("user = {user:?}"))),
            _ => out.push((
                Relaxation::Root,
                format!("user = {user:?} (not a numeric uid: it cannot be judged)"),
            )),
        }
    }
    for cap in &s.cap_add {
        out.push((Relaxation::CapAdd, format!("cap_add {cap}")));
    }
    out
}

fn name_of<T: Serialize>(v: &T) -> String {
    outpost_protocol::wire_name(v)
}

/// Whether `key` is plain enough to judge by its prefix: no `.` or `..` segment, no encoded dot,
/// slash or backslash, no backslash, no empty segment. Anything else is refused rather than
/// guessed at: a key that only normalises into an allowed prefix must not get in.
pub fn plain_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("an empty key or prefix names the whole store".into());
    }
    if key.split('/').any(|s| s == "." || s == "..") {
        return Err("a `.` or `..` segment".into());
    }
    let lower = key.to_ascii_lowercase();
    if ["%2e", "%2f", "%5c"].iter().any(|e| lower.contains(e)) {
        return Err("a percent-encoded dot, slash or backslash".into());
    }
    if key.contains('\\') {
        return Err("a backslash".into());
    }
    if key.starts_with('/') || key.contains("//") {
        return Err("an empty path segment".into());
    }
    if key.chars().any(char::is_control) {
        return Err("a control character".into());
    }
    Ok(())
}

/// Checks a digest is `sha256:` and 64 lowercase hex digits.
fn check_digest(d: &str) -> Result<(), String> {
    match d.strip_prefix("sha256:") {
        Some(hex)
            if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
        {
            Ok(())
        }
        _ => Err(format!("{d:?} is not an image digest (sha256: and 64 lowercase hex digits)")),
    }
}

fn check_prefixes(rule: &str, prefixes: &[String]) -> Result<(), String> {
    for p in prefixes {
        plain_key(p).map_err(|why| format!("{rule}: {p:?} has {why}"))?;
    }
    Ok(())
}

impl Policy {
    /// Whether the policy restricts anything at all.
    pub fn is_open(&self) -> bool {
        *self == Policy::default()
    }

    /// The checks made when the configuration loads: a policy that cannot be applied as
    /// written stops the agent (never fail open).
    pub fn validate(&self) -> Result<(), String> {
        if let Some(images) = &self.images {
            let mut seen = std::collections::BTreeSet::new();
            for (i, rule) in images.iter().enumerate() {
                check_digest(&rule.digest).map_err(|e| format!("policy.images[{i}].digest: {e}"))?;
                if !seen.insert(rule.digest.as_str()) {
                    return Err(format!("policy.images[{i}]: {} is listed twice", rule.digest));
                }
                if let Some(p) = &rule.input_prefixes {
                    check_prefixes(&format!("policy.images[{i}].input_prefixes"), p)?;
                }
                if matches!(rule.approval, Some(a) if a != Approval::Always) {
                    return Err(format!(
                        "policy.images[{i}].approval: only \"always\" is meaningful per image"
                    ));
                }
            }
        }
        if let Some(p) = &self.input_prefixes {
            check_prefixes("policy.input_prefixes", p)?;
        }
        if self.approval == Approval::Always {
            return Err("policy.approval: \"always\" is per image; use \"every-job\" here".into());
        }
        if let Some(g) = &self.approvers_group {
            if g.is_empty() || g.chars().any(char::is_whitespace) {
                return Err("policy.approvers_group must be a group name".into());
            }
            // The approval socket is given to this group: it must exist, or nobody could approve.
            if !matches!(nix::unistd::Group::from_name(g), Ok(Some(_))) {
                return Err(format!("policy.approvers_group: there is no group {g:?} on this machine"));
            }
        }
        if let Some(subs) = &self.submitters {
            for s in subs {
                let ok = s.split_once(':').is_some_and(|(k, v)| {
                    ["org", "role", "name", "deployment", "trigger", "local-trigger"].contains(&k)
                        && !v.is_empty()
                });
                if !ok {
                    return Err(format!(
                        "policy.submitters: {s:?} must be org:ID, role:NAME, name:TOKEN_NAME, deployment:NAME, \
                         trigger:NAME or local-trigger:NAME"
                    ));
                }
            }
        }
        outpost_protocol::seal::check_recipients(&self.seal_also_to)
            .map_err(|why| format!("policy.seal_also_to: {why}"))?;
        for (key, v) in [
            ("max_memory_mb", self.max_memory_mb),
            ("max_cpu_millis", self.max_cpu_millis),
            ("max_timeout_secs", self.max_timeout_secs),
            ("max_jobs_per_submitter", self.max_jobs_per_submitter),
        ] {
            if v == Some(0) {
                return Err(format!("policy.{key} must be at least 1 (leave it out for no ceiling)"));
            }
        }
        Ok(())
    }

    /// The rule for `digest`, if the policy lists it.
    pub fn image(&self, digest: &str) -> Option<&ImageRule> {
        self.images.as_ref()?.iter().find(|r| r.digest == digest)
    }

    /// What the policy says about `work`. `approved` says whether its image was approved at
    /// the site before (the remembered allowlist).
    pub fn evaluate(&self, work: &Work, approved: bool) -> Decision {
        match self.refusal(work) {
            Some(r) => Decision::Refuse(r),
            None if self.needs_approval(work, approved) => Decision::NeedsApproval,
            None => Decision::Allow,
        }
    }

    fn needs_approval(&self, work: &Work, approved: bool) -> bool {
        let per_image = work.image.as_deref().and_then(|d| self.image(d)).and_then(|r| r.approval);
        if per_image == Some(Approval::Always) {
            return true;
        }
        match self.approval {
            Approval::Off | Approval::Always => false,
            Approval::EveryJob => true,
            Approval::NewImage => work.image.is_some() && !approved,
        }
    }

    fn refusal(&self, work: &Work) -> Option<Refusal> {
        let refuse = |rule: &str, value: String| Some(Refusal { rule: rule.to_owned(), value });
        let image_rule = match (&self.images, &work.image) {
            (Some(_), Some(digest)) => match self.image(digest) {
                Some(rule) => Some(rule),
                None => return refuse("policy.images", format!("image {digest}")),
            },
            _ => None,
        };
        let at = |field: &str| match image_rule {
            Some(r) if !r.name.is_empty() => format!("policy.images[{}].{field}", r.name),
            Some(r) => format!("policy.images[{}].{field}", r.digest),
            None => String::new(),
        };
        if let Some(org) = &self.org
            && crate::org_settings::kinds_off(org).contains(&work.kind)
        {
            return refuse(
                &format!(
                    "the organisation's settings (revision {}, features off: {})",
                    org.revision,
                    org.features_off.join(", ")
                ),
                format!("kind {}", name_of(&work.kind)),
            );
        }
        if let Some(kinds) = &self.kinds
            && !kinds.contains(&work.kind)
        {
            return refuse("policy.kinds", format!("kind {}", name_of(&work.kind)));
        }
        if let Some(kinds) = image_rule.and_then(|r| r.kinds.as_ref())
            && !kinds.contains(&work.kind)
        {
            return refuse(&at("kinds"), format!("kind {}", name_of(&work.kind)));
        }
        for (relaxation, asked) in &work.relaxations {
            if let Some(allowed) = &self.relaxations
                && !allowed.contains(relaxation)
            {
                return refuse("policy.relaxations", format!("{} ({asked})", name_of(relaxation)));
            }
            if let Some(allowed) = image_rule.and_then(|r| r.relaxations.as_ref())
                && !allowed.contains(relaxation)
            {
                return refuse(&at("relaxations"), format!("{} ({asked})", name_of(relaxation)));
            }
        }
        for input in &work.inputs {
            let prefixes = [
                ("policy.input_prefixes".to_owned(), self.input_prefixes.as_ref()),
                (at("input_prefixes"), image_rule.and_then(|r| r.input_prefixes.as_ref())),
            ];
            for (rule, allowed) in prefixes {
                let Some(allowed) = allowed else { continue };
                if let Err(why) = plain_key(input) {
                    return refuse(&rule, format!("input {input:?} ({why})"));
                }
                if !allowed.iter().any(|p| input.starts_with(p.as_str())) {
                    return refuse(&rule, format!("input {input:?}"));
                }
            }
        }
        let ceilings = [
            ("policy.max_memory_mb", self.max_memory_mb, Some(work.memory_mb), "memory_mb"),
            ("policy.max_cpu_millis", self.max_cpu_millis, Some(work.cpu_millis), "cpu_millis"),
            ("policy.max_timeout_secs", self.max_timeout_secs, work.timeout_secs, "timeout_secs"),
        ];
        for (rule, max, asked, what) in ceilings {
            if let (Some(max), Some(asked)) = (max, asked)
                && asked > max
            {
                return refuse(rule, format!("{what} = {asked} (at most {max})"));
            }
        }
        if self.require_sealed && work.unsealed_result {
            return refuse(
                "policy.require_sealed",
                "a job without recipients (its result would reach the control plane in clear)".into(),
            );
        }
        if let Some(allowed) = &self.submitters {
            let Some(s) = &work.submitter else {
                return refuse(
                    "policy.submitters",
                    "work that does not say who submitted it (sent by a control plane older than revision 3, or \
                     one that did not yet know this agent reads submitters)"
                        .into(),
                );
            };
            let ids = s.identities();
            if !ids.iter().any(|id| allowed.contains(id)) {
                return refuse("policy.submitters", format!("submitter {}", ids.join(", ")));
            }
        }
        None
    }

    /// A short stable hash of the policy as loaded, for the audit chain.
    pub fn digest(&self) -> String {
        use sha2::Digest;
        let canonical = serde_json::to_vec(self).unwrap_or_default();
        hex::encode(&sha2::Sha256::digest(&canonical)[..16])
    }
}

/// The strict template for hospitals (`outpost policy template strict`): nothing runs until an
/// image is listed by digest, no relaxation, no store prefix readable until one is listed, every
/// new image approved at the site first.
pub const STRICT_TEMPLATE: &str = r#"# Outpost site policy: the strict template. Install as config.d/policy.toml, owned by
# root and not writable by anyone else; `outpost policy check` validates it and
# `outpost policy explain JOB.json` says what it does to a job. Nothing the control plane,
# a deployment or a bundle sends can change it.
[policy]
# Images that may run, by digest (`docker image inspect --format '{{.Id}}' NAME`). Until one is
# listed nothing runs. Per image: which kinds of work, which store prefixes, which relaxations.
#   images = [
#     { digest = "sha256:<64 hex>", name = "deid 1.4", kinds = ["container"], input_prefixes = ["scans/"] },
#   ]
images = []
# Kinds of work: container, generate, embed, service.
kinds = ["container", "generate", "embed", "service"]
# Relaxations of the hardened defaults that may be asked for at all: network, writable-rootfs,
# root, cap-add, gpu, publish. None.
relaxations = []
# Prefixes of the local object store work may read. None until the data owners list some.
input_prefixes = []
# Ceilings per job.
max_memory_mb = 16384
max_cpu_millis = 8000
max_timeout_secs = 86400
# Jobs of one submitter running at once; more wait their turn.
max_jobs_per_submitter = 4
# Every image the site has not approved before waits for a person (`outpost approvals`);
# root and the members of approvers_group may approve.
approval = "new-image"
# approvers_group = "outpost-approvers"
# Results: require every job from the control plane or a bundle to name the recipients its
# result is sealed for (`job submit --recipient age1...`), so output tails and bodies never
# reach the control plane in clear; add the site's own age key to read what leaves.
require_sealed = true
# seal_also_to = ["age1..."]
"#;

#[cfg(test)]
mod tests;
