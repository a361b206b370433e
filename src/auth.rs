//! Who may do what: tokens with scopes, checked before any front end touches anything.
//!
//! A token is a random secret the operator hands out; the config holds only its SHA-256
//! (`hoard token new` prints both, `hoard token hash` hashes one read from stdin). Each token
//! names scopes: `<front end>:<names>:<actions>`, e.g. `oci:team-a/*:read,write`,
//! `gocache:*:read`, `snapshot:ci/*:read,write,delete`, `admin`. `<names>` is a name or a
//! prefix ending in `*`; the actions default to all three. Anonymous requests get the scopes in
//! `anonymous` (none unless set).
//!
//! Clients present a token three ways:
//! - on `/v2/`, as every registry client does: a `401` with `WWW-Authenticate: Bearer
//!   realm=…,service=…,scope=…` sends them to `/token` (distribution's token flow, `GET` with
//!   Basic credentials or an anonymous request, or the OAuth2 `POST` password grant), which
//!   answers a short-lived token signed by hoard (HMAC-SHA256) granting what was asked for and
//!   allowed;
//! - Basic credentials, the token as password (any user name) — `GOPROXY=https://u:TOKEN@…`,
//!   `curl -u`;
//! - `Authorization: Bearer <token>` (the helpers' `--token`).
//!
//! Secrets are compared by hash in constant time and never logged; refusals are logged with
//! the token's name.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::{constant_time, digest, hmac};
use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// A front end, as scopes name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Front {
    Oci,
    Gomod,
    Gocache,
    Snapshot,
    Content,
    Admin,
    Metrics,
}

impl Front {
    fn parse(s: &str) -> Option<Front> {
        Some(match s {
            "oci" => Front::Oci,
            "gomod" => Front::Gomod,
            "gocache" => Front::Gocache,
            "snapshot" => Front::Snapshot,
            "content" => Front::Content,
            "admin" => Front::Admin,
            "metrics" => Front::Metrics,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Front::Oci => "oci",
            Front::Gomod => "gomod",
            Front::Gocache => "gocache",
            Front::Snapshot => "snapshot",
            Front::Content => "content",
            Front::Admin => "admin",
            Front::Metrics => "metrics",
        }
    }
}

pub const READ: u8 = 1;
pub const WRITE: u8 = 2;
pub const DELETE: u8 = 4;
const ALL: u8 = READ | WRITE | DELETE;

fn action_name(a: u8) -> &'static str {
    match a {
        READ => "read",
        WRITE => "write",
        DELETE => "delete",
        _ => "access",
    }
}

/// One scope: actions on the names of one front end a pattern matches.
#[derive(Clone, Debug, PartialEq)]
pub struct Grant {
    pub front: Front,
    /// The name, or with `prefix` the start every matching name has ("" with `prefix`: all).
    pub pattern: String,
    pub prefix: bool,
    pub actions: u8,
}

impl Grant {
    /// `front[:names[:actions]]`.
    pub fn parse(s: &str) -> Result<Grant, String> {
        let bad = |why: &str| format!("scope {s:?}: {why} (e.g. \"oci:team-a/*:read,write\")");
        let mut parts = s.splitn(3, ':');
        let front = parts.next().and_then(Front::parse).ok_or_else(|| {
            bad("the front end is one of oci, gomod, gocache, snapshot, content, admin, metrics")
        })?;
        let names = parts.next().unwrap_or("*");
        let actions = match parts.next() {
            None => ALL,
            Some(list) => {
                let mut a = 0;
                for w in list.split(',').map(str::trim) {
                    a |= match w {
                        "read" | "pull" => READ,
                        "write" | "push" => WRITE,
                        "delete" => DELETE,
                        "all" | "*" => ALL,
                        _ => return Err(bad("actions are read, write, delete or all")),
                    };
                }
                a
            }
        };
        if names.is_empty() {
            return Err(bad("empty name pattern"));
        }
        let (pattern, prefix) = match names.strip_suffix('*') {
            Some(p) => (p.to_owned(), true),
            None => (names.to_owned(), false),
        };
        if pattern.contains('*') {
            return Err(bad("'*' may only end a pattern"));
        }
        Ok(Grant {
            front,
            pattern,
            prefix,
            actions,
        })
    }

    fn covers(&self, front: Front, name: &str, action: u8) -> bool {
        self.front == front
            && self.actions & action == action
            && if self.prefix {
                name.starts_with(&self.pattern)
            } else {
                name == self.pattern
            }
    }
}

/// `[[auth.tokens]]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Shown in logs and metrics; never the secret.
    pub name: String,
    /// `sha256:<hex>` of the secret (`hoard token hash`).
    pub hash: String,
    pub scopes: Vec<String>,
}

/// A file `auth.tokens_file` names: `[[tokens]]` tables, as in the config.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    #[serde(default)]
    tokens: Vec<TokenConfig>,
}

#[derive(Clone, Debug)]
struct Token {
    name: String,
    hash: [u8; 32],
    grants: Vec<Grant>,
}

/// What a request needs: an action on a name of a front end. `name: None` is any name (a
/// listing, or content shared between names): some grant of the front end with the action.
#[derive(Clone, Debug, PartialEq)]
pub struct Need {
    pub front: Front,
    pub name: Option<String>,
    pub action: u8,
    /// An OCI request: refusals speak the registry's challenge.
    pub oci: bool,
    /// `name` is a prefix selecting names (a snapshot listing): allowed only where every name
    /// it may select is.
    pub prefix_query: bool,
}

impl Need {
    fn describe(&self) -> String {
        format!(
            "{} {}:{}",
            action_name(self.action),
            self.front.as_str(),
            self.name.as_deref().unwrap_or("*")
        )
    }

    /// The distribution scope that would grant this, for a challenge.
    fn registry_scope(&self) -> Option<String> {
        let name = self.name.as_deref()?;
        if self.front == Front::Oci && name == "*" {
            return Some("registry:catalog:*".into());
        }
        let repo = match self.front {
            Front::Oci => name.to_owned(),
            Front::Snapshot => format!("snapshots/{name}"),
            Front::Gocache => format!("gocache/{name}"),
            Front::Gomod => format!("gomod/{name}"),
            _ => return None,
        };
        let actions = match self.action {
            READ => "pull",
            DELETE => "delete",
            _ => "pull,push",
        };
        Some(format!("repository:{repo}:{actions}"))
    }
}

/// Claims of a token `/token` signed.
#[derive(Serialize, Deserialize, Debug)]
pub struct Claims {
    /// The token's name; "" for anonymous.
    sub: String,
    /// Unix seconds.
    exp: u64,
    iat: u64,
    acc: Vec<Access>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Access {
    f: Front,
    /// The exact name granted, or "*" for any (a catalog).
    n: String,
    a: u8,
}

/// Who sent a request.
#[derive(Debug)]
pub enum Who {
    Anonymous,
    /// A configured token, by index.
    Token(usize),
    /// A token `/token` signed.
    Signed(Claims),
}

/// The outcome of a check.
#[derive(Debug)]
pub enum Verdict {
    Allow,
    /// No (valid) credentials where some are needed: 401 with a challenge.
    Challenge {
        why: String,
        insufficient: bool,
    },
    /// Credentials that do not reach: 403.
    Deny {
        why: String,
    },
}

pub struct Auth {
    tokens: Vec<Token>,
    anonymous: Vec<Grant>,
    pub service: String,
    realm: Option<String>,
    ttl: Duration,
    key: hmac::Key,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub tokens: Vec<TokenConfig>,
    /// A TOML file of `[[tokens]]`, e.g. a mounted Kubernetes Secret.
    pub tokens_file: Option<std::path::PathBuf>,
    /// Scopes every request has, with or without a token (e.g. `["oci:public/*:read"]`).
    pub anonymous: Vec<String>,
    /// `service` in challenges and tokens (default "hoard").
    pub service: Option<String>,
    /// The token endpoint clients are sent to (default: `/token` on the host they asked).
    pub realm: Option<String>,
    /// How long a token from `/token` is good for (default 5m).
    pub token_ttl: Option<crate::config::HumanDuration>,
    /// A file holding the key tokens are signed with (32+ bytes). Replicas behind one address
    /// need the same one; unset, each process makes its own.
    pub signing_key_file: Option<std::path::PathBuf>,
}

impl AuthConfig {
    /// Auth is on once any token is configured.
    pub fn enabled(&self) -> bool {
        !self.tokens.is_empty() || self.tokens_file.is_some()
    }
}

pub fn hash_secret(secret: &str) -> String {
    format!(
        "sha256:{}",
        crate::digest::hex_encode(digest::digest(&digest::SHA256, secret.as_bytes()).as_ref())
    )
}

/// A new random secret, printable.
pub fn new_secret() -> String {
    let mut b = [0u8; 24];
    let _ = getrandom::getrandom(&mut b);
    format!(
        "hoard_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    )
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
}

impl Auth {
    /// `None` when auth is off (no tokens configured).
    pub fn from_config(c: &AuthConfig) -> Result<Option<Auth>, String> {
        if !c.enabled() {
            if !c.anonymous.is_empty() {
                return Err("auth.anonymous is set but no auth.tokens: with no token every request is allowed; add a token or drop auth.anonymous".into());
            }
            return Ok(None);
        }
        let mut configured = c.tokens.clone();
        if let Some(f) = &c.tokens_file {
            let text = std::fs::read_to_string(f)
                .map_err(|e| format!("auth.tokens_file {}: {e}", f.display()))?;
            let parsed: TokensFile = toml::from_str(&text)
                .map_err(|e| format!("auth.tokens_file {}: {e}", f.display()))?;
            configured.extend(parsed.tokens);
        }
        let mut tokens = Vec::new();
        for t in &configured {
            if t.name.is_empty() {
                return Err("a token without a name".into());
            }
            if tokens.iter().any(|o: &Token| o.name == t.name) {
                return Err(format!("two tokens named {:?}", t.name));
            }
            let hash = t
                .hash
                .strip_prefix("sha256:")
                .and_then(crate::digest::hex32)
                .ok_or_else(|| {
                    format!(
                        "token {:?}: hash must be sha256:<64 hex> (hoard token hash); a secret does not belong in the config",
                        t.name
                    )
                })?;
            let grants = t
                .scopes
                .iter()
                .map(|s| Grant::parse(s))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("token {:?}: {e}", t.name))?;
            tokens.push(Token {
                name: t.name.clone(),
                hash,
                grants,
            });
        }
        let anonymous = c
            .anonymous
            .iter()
            .map(|s| Grant::parse(s))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("auth.anonymous: {e}"))?;
        let key_bytes = match &c.signing_key_file {
            Some(f) => {
                let k = std::fs::read(f)
                    .map_err(|e| format!("auth.signing_key_file {}: {e}", f.display()))?;
                let k = k.trim_ascii().to_vec();
                if k.len() < 32 {
                    return Err(format!(
                        "auth.signing_key_file {}: {} bytes; use 32 or more (e.g. head -c 48 /dev/urandom | base64)",
                        f.display(),
                        k.len()
                    ));
                }
                k
            }
            None => {
                let mut k = vec![0u8; 32];
                getrandom::getrandom(&mut k).map_err(|e| format!("no randomness: {e}"))?;
                k
            }
        };
        Ok(Some(Auth {
            tokens,
            anonymous,
            service: c.service.clone().unwrap_or_else(|| "hoard".into()),
            realm: c.realm.clone(),
            ttl: c.token_ttl.map(|d| d.0).unwrap_or(Duration::from_secs(300)),
            key: hmac::Key::new(hmac::HMAC_SHA256, &key_bytes),
        }))
    }

    /// Tokens and scopes in effect, for `hoard check-config` (names and scopes only).
    pub fn describe(&self) -> String {
        let scope = |g: &Grant| {
            let mut a = Vec::new();
            for x in [READ, WRITE, DELETE] {
                if g.actions & x != 0 {
                    a.push(action_name(x));
                }
            }
            format!(
                "{}:{}{}:{}",
                g.front.as_str(),
                g.pattern,
                if g.prefix { "*" } else { "" },
                a.join(",")
            )
        };
        let mut out = format!(
            "auth = on (service {:?}, tokens from /token good for {:?}, realm {})\n",
            self.service,
            self.ttl,
            self.realm.as_deref().unwrap_or("<the host asked>/token")
        );
        for t in &self.tokens {
            let s: Vec<String> = t.grants.iter().map(scope).collect();
            out.push_str(&format!(
                "  token {:?} (hash ****): {}\n",
                t.name,
                s.join(" ")
            ));
        }
        let s: Vec<String> = self.anonymous.iter().map(scope).collect();
        out.push_str(&format!(
            "  anonymous: {}\n",
            if s.is_empty() {
                "nothing".into()
            } else {
                s.join(" ")
            }
        ));
        out
    }

    /// The configured token whose secret this is (every hash compared, in constant time).
    fn by_secret(&self, secret: &str) -> Option<usize> {
        let h = digest::digest(&digest::SHA256, secret.as_bytes());
        let mut found = None;
        for (i, t) in self.tokens.iter().enumerate() {
            if constant_time::verify_slices_are_equal(h.as_ref(), &t.hash).is_ok() {
                found = Some(i);
            }
        }
        found
    }

    /// Who the `Authorization` header names. `Err` for credentials that are there but wrong.
    pub fn identify(&self, authorization: Option<&str>) -> Result<Who, String> {
        let Some(h) = authorization else {
            return Ok(Who::Anonymous);
        };
        let (scheme, rest) = h.split_once(' ').unwrap_or((h, ""));
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("basic") {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(rest)
                .map_err(|_| "Basic credentials are not base64".to_owned())?;
            let text = String::from_utf8(raw).map_err(|_| "Basic credentials are not UTF-8")?;
            let (_, secret) = text.split_once(':').unwrap_or(("", &text));
            return self
                .by_secret(secret)
                .map(Who::Token)
                .ok_or_else(|| "unknown token".into());
        }
        if scheme.eq_ignore_ascii_case("bearer") {
            if let Some(c) = self.verify(rest) {
                if c.exp + 30 < unix_now() {
                    return Err("the token from /token has expired; ask for a new one".into());
                }
                if !c.sub.is_empty() && !self.tokens.iter().any(|t| t.name == c.sub) {
                    return Err(format!("token {:?} is no longer configured", c.sub));
                }
                return Ok(Who::Signed(c));
            }
            return self
                .by_secret(rest)
                .map(Who::Token)
                .ok_or_else(|| "unknown or forged token".into());
        }
        // Not the header's text: a secret sent without a scheme must not reach a log.
        Err("unsupported authorization scheme (use Basic or Bearer)".into())
    }

    pub fn name_of(&self, who: &Who) -> String {
        match who {
            Who::Anonymous => "anonymous".into(),
            Who::Token(i) => self
                .tokens
                .get(*i)
                .map(|t| t.name.clone())
                .unwrap_or_default(),
            Who::Signed(c) if c.sub.is_empty() => "anonymous (signed)".into(),
            Who::Signed(c) => c.sub.clone(),
        }
    }

    fn grants_of(&self, who: &Who) -> impl Iterator<Item = &Grant> {
        let own: &[Grant] = match who {
            Who::Token(i) => self.tokens.get(*i).map(|t| &t.grants[..]).unwrap_or(&[]),
            _ => &[],
        };
        own.iter().chain(self.anonymous.iter())
    }

    fn allowed(&self, who: &Who, need: &Need) -> bool {
        match who {
            Who::Signed(c) => {
                c.acc.iter().any(|a| {
                    a.f == need.front
                        && a.a & need.action == need.action
                        && (a.n == "*" || need.name.as_deref() == Some(a.n.as_str()))
                }) || self.anon_allows(need)
            }
            _ => match &need.name {
                // Every key the prefix may select must be covered: a prefix grant that is
                // itself a prefix of it.
                Some(n) if need.prefix_query => self.grants_of(who).any(|g| {
                    g.front == need.front
                        && g.actions & need.action == need.action
                        && g.prefix
                        && n.starts_with(&g.pattern)
                }),
                Some(n) => self
                    .grants_of(who)
                    .any(|g| g.covers(need.front, n, need.action)),
                None => self
                    .grants_of(who)
                    .any(|g| g.front == need.front && g.actions & need.action == need.action),
            },
        }
    }

    fn anon_allows(&self, need: &Need) -> bool {
        self.allowed(&Who::Anonymous, need)
    }

    /// May `who` do `need`?
    pub fn check(&self, who: &Who, need: &Need) -> Verdict {
        if self.allowed(who, need) {
            return Verdict::Allow;
        }
        let why = format!("{} may not {}", self.name_of(who), need.describe());
        match who {
            Who::Anonymous => Verdict::Challenge {
                why,
                insufficient: false,
            },
            // A registry client asks /token again with the scope the challenge names.
            Who::Signed(_) if need.oci => Verdict::Challenge {
                why,
                insufficient: true,
            },
            _ => Verdict::Deny { why },
        }
    }

    /// `WWW-Authenticate` for a 401.
    pub fn challenge(
        &self,
        need: Option<&Need>,
        host: &str,
        tls: bool,
        insufficient: bool,
    ) -> String {
        if need.is_some_and(|n| !n.oci) {
            return format!("Basic realm=\"{}\"", self.service);
        }
        let realm = self
            .realm
            .clone()
            .unwrap_or_else(|| format!("{}://{host}/token", if tls { "https" } else { "http" }));
        let mut c = format!("Bearer realm=\"{realm}\",service=\"{}\"", self.service);
        if let Some(s) = need.and_then(Need::registry_scope) {
            c.push_str(&format!(",scope=\"{s}\""));
        }
        if insufficient {
            c.push_str(",error=\"insufficient_scope\"");
        }
        c
    }

    fn sign(&self, c: &Claims) -> String {
        let body = b64().encode(serde_json::to_vec(c).unwrap_or_default());
        let tag = hmac::sign(&self.key, body.as_bytes());
        format!("{body}.{}", b64().encode(tag.as_ref()))
    }

    fn verify(&self, token: &str) -> Option<Claims> {
        let (body, tag) = token.split_once('.')?;
        let tag = b64().decode(tag).ok()?;
        hmac::verify(&self.key, body.as_bytes(), &tag).ok()?;
        serde_json::from_slice(&b64().decode(body).ok()?).ok()
    }

    /// `/token`: a signed token granting, of the scopes asked for, what `who` may do.
    /// Returns the JSON answer.
    pub fn issue(&self, who: &Who, scopes: &[String]) -> String {
        let mut acc: Vec<Access> = Vec::new();
        for s in scopes {
            for (front, name, actions) in parse_registry_scope(s) {
                let mut granted = 0;
                for a in [READ, WRITE, DELETE] {
                    if actions & a == 0 {
                        continue;
                    }
                    // Names are literal: "*" is the catalog's name, not every repository.
                    let need = Need {
                        front,
                        name: Some(name.clone()),
                        action: a,
                        oci: true,
                        prefix_query: false,
                    };
                    if self.allowed(who, &need) {
                        granted |= a;
                    }
                }
                if granted != 0 {
                    acc.push(Access {
                        f: front,
                        n: name,
                        a: granted,
                    });
                }
            }
        }
        let now = unix_now();
        let claims = Claims {
            sub: match who {
                Who::Token(i) => self
                    .tokens
                    .get(*i)
                    .map(|t| t.name.clone())
                    .unwrap_or_default(),
                Who::Signed(c) => c.sub.clone(),
                Who::Anonymous => String::new(),
            },
            exp: now + self.ttl.as_secs(),
            iat: now,
            acc,
        };
        let token = self.sign(&claims);
        serde_json::json!({
            "token": token,
            "access_token": token,
            "expires_in": self.ttl.as_secs(),
            "issued_at": crate::clock::rfc3339(now as i64 * 1000),
        })
        .to_string()
    }
}

/// `repository:<name>:<actions>` (or `repository(class):…`, `registry:catalog:*`) as
/// (front end, name, actions) in hoard's terms.
fn parse_registry_scope(s: &str) -> Vec<(Front, String, u8)> {
    let Some((kind, rest)) = s.split_once(':') else {
        return Vec::new();
    };
    let Some((name, actions)) = rest.rsplit_once(':') else {
        return Vec::new();
    };
    let mut a = 0;
    for w in actions.split(',') {
        a |= match w.trim() {
            "pull" => READ,
            "push" => WRITE | READ,
            "delete" => DELETE,
            "*" => ALL,
            _ => 0,
        };
    }
    let kind = kind.split('(').next().unwrap_or(kind);
    match kind {
        "repository" => {
            let (front, n) = front_of_repo(name);
            vec![(front, n, a)]
        }
        "registry" if name == "catalog" => vec![(Front::Oci, "*".into(), READ)],
        _ => Vec::new(),
    }
}

/// Repositories under hoard's own prefixes belong to their front end's scopes.
pub fn front_of_repo(repo: &str) -> (Front, String) {
    if let Some(k) = repo.strip_prefix("snapshots/") {
        return (Front::Snapshot, k.to_owned());
    }
    if let Some(k) = repo.strip_prefix("gocache/") {
        return (Front::Gocache, k.to_owned());
    }
    if let Some(k) = repo.strip_prefix("gomod/") {
        return (Front::Gomod, k.to_owned());
    }
    // A content view's holds and leases: `containerd/<view>/{content,leases}/<namespace>`, in
    // the content API's scope names (`<view>/<namespace>`).
    if let Some(k) = repo.strip_prefix("containerd/") {
        let name = match k.split('/').collect::<Vec<_>>()[..] {
            [view, "content" | "leases", ns] => format!("{view}/{ns}"),
            _ => k.to_owned(),
        };
        return (Front::Content, name);
    }
    (Front::Oci, repo.to_owned())
}

fn method_action(m: &http::Method) -> u8 {
    match *m {
        http::Method::GET | http::Method::HEAD | http::Method::OPTIONS => READ,
        http::Method::DELETE => DELETE,
        _ => WRITE,
    }
}

/// What a request needs. `None`: nothing (health, the token endpoint) — `Some(None)` is "any
/// valid identity" (the `/v2/` ping).
pub fn need_of(method: &http::Method, path: &str, query: Option<&str>) -> Option<Option<Need>> {
    let action = method_action(method);
    let need = |front: Front, name: Option<String>, oci: bool| {
        Some(Some(Need {
            front,
            name,
            action,
            oci,
            prefix_query: false,
        }))
    };
    if path == "/v2" || path == "/v2/" {
        return Some(None);
    }
    if let Some(rest) = path.strip_prefix("/v2/") {
        let rest = crate::oci::percent_decode(rest);
        if rest == "_catalog" {
            return Some(Some(Need {
                front: Front::Oci,
                name: Some("*".into()),
                action: READ,
                oci: true,
                prefix_query: false,
            }));
        }
        let repo = ["/manifests/", "/blobs/", "/tags/", "/referrers/"]
            .iter()
            .filter_map(|m| rest.rfind(m).map(|i| &rest[..i]))
            .max_by_key(|r| r.len())
            .unwrap_or(&rest);
        let (front, name) = front_of_repo(repo);
        return need(front, Some(name), true);
    }
    if let Some(rest) = path.strip_prefix("/snapshots/") {
        let key = if rest.is_empty() {
            query
                .unwrap_or("")
                .split('&')
                .find_map(|kv| kv.strip_prefix("prefix="))
                .map(crate::oci::percent_decode)
                .unwrap_or_default()
        } else {
            let r = rest
                .strip_suffix("/_missing")
                .or_else(|| rest.strip_suffix("/_tar"))
                .or_else(|| rest.rsplit_once("/_chunks/").map(|(k, _)| k))
                .unwrap_or(rest);
            r.to_owned()
        };
        // Asking which chunks are missing is part of a save.
        let action = if rest.ends_with("/_missing") {
            WRITE
        } else {
            action
        };
        return Some(Some(Need {
            front: Front::Snapshot,
            name: Some(key),
            action,
            oci: false,
            prefix_query: rest.is_empty(),
        }));
    }
    if let Some(rest) = path.strip_prefix("/gocache/") {
        let ns = rest.split('/').next().unwrap_or("");
        return need(Front::Gocache, Some(ns.to_owned()), false);
    }
    if let Some(rest) = path.strip_prefix("/gomod/") {
        if rest.starts_with("sumdb/") {
            return need(Front::Gomod, None, false);
        }
        let escaped = rest.split("/@").next().unwrap_or(rest);
        let name = crate::gomod::names::ModPath::from_escaped(escaped)
            .map(|m| m.path)
            .unwrap_or_else(|_| escaped.to_owned());
        return need(Front::Gomod, Some(name), false);
    }
    if path.starts_with("/admin/") {
        return need(Front::Admin, Some("*".into()), false);
    }
    match path {
        "/healthz" | "/readyz" | "/token" => None,
        "/metrics" | "/" | "/status.json" => Some(Some(Need {
            front: Front::Metrics,
            name: Some("*".into()),
            action: READ,
            oci: false,
            prefix_query: false,
        })),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(scopes: &[&str], anon: &[&str]) -> (Auth, String) {
        let secret = new_secret();
        let c = AuthConfig {
            tokens: vec![TokenConfig {
                name: "ci".into(),
                hash: hash_secret(&secret),
                scopes: scopes.iter().map(|s| s.to_string()).collect(),
            }],
            anonymous: anon.iter().map(|s| s.to_string()).collect(),
            ..AuthConfig::default()
        };
        (Auth::from_config(&c).unwrap().unwrap(), secret)
    }

    fn basic(secret: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("anyone:{secret}"))
        )
    }

    #[test]
    fn scopes_parse_and_match() {
        let g = Grant::parse("oci:team-a/*:read,write").unwrap();
        assert!(g.covers(Front::Oci, "team-a/app", READ));
        assert!(g.covers(Front::Oci, "team-a/app", WRITE));
        assert!(!g.covers(Front::Oci, "team-a/app", DELETE));
        assert!(!g.covers(Front::Oci, "team-b/app", READ));
        assert!(!g.covers(Front::Gocache, "team-a/app", READ));
        let g = Grant::parse("admin").unwrap();
        assert_eq!((g.front, g.prefix, g.actions), (Front::Admin, true, ALL));
        assert!(Grant::parse("registry:*").is_err());
        assert!(Grant::parse("oci:a*b").is_err());
        assert!(Grant::parse("oci:a:fly").is_err());
    }

    #[test]
    fn requests_map_to_what_they_need() {
        let get = http::Method::GET;
        let n = need_of(&get, "/v2/team-a/app/manifests/latest", None)
            .unwrap()
            .unwrap();
        assert_eq!(
            (n.front, n.name.as_deref(), n.action),
            (Front::Oci, Some("team-a/app"), READ)
        );
        let n = need_of(&http::Method::PATCH, "/v2/a/blobs/uploads/x", None)
            .unwrap()
            .unwrap();
        assert_eq!((n.name.as_deref(), n.action), (Some("a"), WRITE));
        // A repository named like a route part is still found whole.
        let n = need_of(&get, "/v2/x/blobs/y/manifests/v1", None)
            .unwrap()
            .unwrap();
        assert_eq!(n.name.as_deref(), Some("x/blobs/y"));
        let n = need_of(&get, "/v2/snapshots/ci/gomod/manifests/latest", None)
            .unwrap()
            .unwrap();
        assert_eq!(
            (n.front, n.name.as_deref()),
            (Front::Snapshot, Some("ci/gomod"))
        );
        let n = need_of(&http::Method::POST, "/snapshots/ci/k/_missing", None)
            .unwrap()
            .unwrap();
        assert_eq!(
            (n.front, n.name.as_deref(), n.action),
            (Front::Snapshot, Some("ci/k"), WRITE)
        );
        let n = need_of(&get, "/snapshots/", Some("prefix=ci%2Fk"))
            .unwrap()
            .unwrap();
        assert_eq!(n.name.as_deref(), Some("ci/k"));
        let n = need_of(&get, "/gomod/github.com/!acme/x/@v/list", None)
            .unwrap()
            .unwrap();
        assert_eq!(
            (n.front, n.name.as_deref()),
            (Front::Gomod, Some("github.com/Acme/x"))
        );
        let n = need_of(&http::Method::PUT, "/gocache/team/action/ab", None)
            .unwrap()
            .unwrap();
        assert_eq!(
            (n.front, n.name.as_deref(), n.action),
            (Front::Gocache, Some("team"), WRITE)
        );
        assert_eq!(need_of(&get, "/v2/", None), Some(None));
        assert_eq!(need_of(&get, "/healthz", None), None);
    }

    #[test]
    fn basic_bearer_and_signed_tokens() {
        let (a, secret) = auth(&["oci:team-a/*:read,write"], &["oci:public/*:read"]);
        let pull = |name: &str| Need {
            front: Front::Oci,
            name: Some(name.into()),
            action: READ,
            oci: true,
            prefix_query: false,
        };
        let who = a.identify(Some(&basic(&secret))).unwrap();
        assert!(matches!(a.check(&who, &pull("team-a/x")), Verdict::Allow));
        assert!(matches!(a.check(&who, &pull("public/x")), Verdict::Allow));
        assert!(matches!(
            a.check(&who, &pull("team-b/x")),
            Verdict::Deny { .. }
        ));
        let who = a.identify(Some(&format!("Bearer {secret}"))).unwrap();
        assert!(matches!(a.check(&who, &pull("team-a/x")), Verdict::Allow));
        assert!(a.identify(Some(&basic("wrong"))).is_err());
        assert!(a.identify(Some("Bearer nope")).is_err());
        assert!(matches!(
            a.check(&Who::Anonymous, &pull("team-a/x")),
            Verdict::Challenge {
                insufficient: false,
                ..
            }
        ));
        assert!(matches!(
            a.check(&Who::Anonymous, &pull("public/y")),
            Verdict::Allow
        ));

        // /token grants what was asked and allowed, nothing more.
        let who = a.identify(Some(&basic(&secret))).unwrap();
        let answer: serde_json::Value = serde_json::from_str(&a.issue(
            &who,
            &[
                "repository:team-a/x:pull,push".into(),
                "repository:team-b/x:pull".into(),
            ],
        ))
        .unwrap();
        let t = answer["token"].as_str().unwrap();
        let signed = a.identify(Some(&format!("Bearer {t}"))).unwrap();
        assert!(matches!(
            a.check(&signed, &pull("team-a/x")),
            Verdict::Allow
        ));
        assert!(matches!(
            a.check(&signed, &pull("team-a/other")),
            Verdict::Challenge {
                insufficient: true,
                ..
            }
        ));
        assert!(matches!(
            a.check(&signed, &pull("team-b/x")),
            Verdict::Challenge { .. }
        ));
        // A forged or altered token is refused.
        let (body, tag) = t.split_once('.').unwrap();
        let mut claims: serde_json::Value =
            serde_json::from_slice(&b64().decode(body).unwrap()).unwrap();
        claims["acc"][0]["n"] = "team-b/x".into();
        let forged = format!("{}.{tag}", b64().encode(claims.to_string()));
        assert!(a.identify(Some(&format!("Bearer {forged}"))).is_err());
        // Another process's key does not verify it.
        let (b, _) = auth(&[], &[]);
        assert!(b.verify(t).is_none());
    }

    #[test]
    fn a_prefix_listing_needs_a_grant_over_every_key_it_may_select() {
        let (a, secret) = auth(&["snapshot:ci/k:read", "snapshot:team/*:read"], &[]);
        let who = a.identify(Some(&basic(&secret))).unwrap();
        let list = |p: &str| Need {
            front: Front::Snapshot,
            name: Some(p.into()),
            action: READ,
            oci: false,
            prefix_query: true,
        };
        assert!(
            matches!(a.check(&who, &list("ci/k")), Verdict::Deny { .. }),
            "ci/k… may select ci/kernel"
        );
        assert!(matches!(a.check(&who, &list("team/")), Verdict::Allow));
        assert!(matches!(a.check(&who, &list("team/x-")), Verdict::Allow));
        assert!(matches!(a.check(&who, &list("tea")), Verdict::Deny { .. }));
        let exact = Need {
            prefix_query: false,
            ..list("ci/k")
        };
        assert!(matches!(a.check(&who, &exact), Verdict::Allow));
    }

    #[test]
    fn config_refuses_secrets_and_bad_scopes() {
        let c = AuthConfig {
            tokens: vec![TokenConfig {
                name: "x".into(),
                hash: "hunter2".into(),
                scopes: vec![],
            }],
            ..AuthConfig::default()
        };
        assert!(Auth::from_config(&c)
            .err()
            .unwrap()
            .contains("hoard token hash"));
        let c = AuthConfig {
            anonymous: vec!["oci:*:read".into()],
            ..AuthConfig::default()
        };
        assert!(Auth::from_config(&c).is_err());
        assert!(Auth::from_config(&AuthConfig::default()).unwrap().is_none());
    }
}
