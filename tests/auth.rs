//! Tokens and scopes against the real daemon: every front end's scope allowed and refused,
//! distribution's token flow as registry clients speak it, and skopeo pushing and pulling with
//! credentials.

mod common;

use std::process::Command;

use base64::Engine as _;
use common::*;

struct Secrets {
    team_a: String,
    deleter: String,
    go: String,
    snap: String,
    admin: String,
}

fn hoard_out(args: &[&str], stdin: Option<&str>) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hoard"));
    cmd.args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    {
        use std::io::Write;
        let mut i = child.stdin.take().unwrap();
        if let Some(s) = stdin {
            i.write_all(s.as_bytes()).unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "hoard {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A token made with `hoard token new`: (the config entry, the secret).
fn new_token(name: &str, scopes: &[&str]) -> (String, String) {
    let mut args = vec!["token", "new", "--name", name];
    for s in scopes {
        args.extend(["--scope", s]);
    }
    let out = hoard_out(&args, None);
    let secret = out
        .lines()
        .find_map(|l| l.strip_prefix("secret (give it to the client; it is not shown again): "))
        .unwrap()
        .to_owned();
    let entry: String = out
        .lines()
        .filter(|l| !l.starts_with("secret"))
        .map(|l| format!("{l}\n"))
        .collect();
    // `hoard token hash` agrees with the entry.
    let hash = hoard_out(&["token", "hash"], Some(&secret));
    assert!(entry.contains(hash.trim()), "{entry} / {hash}");
    (entry, secret)
}

fn start() -> (Hoard, Secrets, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let (e1, team_a) = new_token("team-a", &["oci:team-a/*:read,write", "oci:public/*:write"]);
    let (e2, deleter) = new_token(
        "deleter",
        &["oci:team-a/*:read,delete", "oci:private/*:read,write"],
    );
    let (e3, go) = new_token("go", &["gocache:*:read,write", "gomod:*:read"]);
    let (e4, snap) = new_token("snap", &["snapshot:ci/*:read,write"]);
    let (e5, admin) = new_token("ops", &["admin", "metrics"]);
    let config = format!(
        "[auth]\nanonymous = [\"oci:public/*:read\"]\n\n[gomod]\nupstreams = [\"http://127.0.0.1:9\"]\nsumdb = \"off\"\n\n{e1}\n{e2}\n{e3}\n{e4}\n{e5}"
    );
    let path = dir.path().join("hoard.toml");
    std::fs::write(&path, &config).unwrap();
    let check = hoard_out(&["check-config", path.to_str().unwrap()], None);
    assert!(check.contains("token \"team-a\""), "{check}");
    for s in [&team_a, &deleter, &go, &snap, &admin] {
        assert!(!check.contains(s.as_str()), "check-config shows a secret");
    }
    let h = Hoard::start(&["--config", path.to_str().unwrap()]);
    (
        h,
        Secrets {
            team_a,
            deleter,
            go,
            snap,
            admin,
        },
        dir,
    )
}

fn basic(secret: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("someone:{secret}"))
    )
}

fn bearer(secret: &str) -> String {
    format!("Bearer {secret}")
}

/// A blob push (POST then PUT) as `auth`; the final status.
fn push_blob_as(h: &Hoard, repo: &str, data: &[u8], auth: Option<&str>) -> Resp {
    let mut r = h.req("POST", &format!("/v2/{repo}/blobs/uploads/"));
    if let Some(a) = auth {
        r = r.header("Authorization", a);
    }
    let resp = r.send();
    if resp.status != 202 {
        return resp;
    }
    let loc = resp.header("location").unwrap().to_owned();
    let sep = if loc.contains('?') { '&' } else { '?' };
    let mut r = h
        .req("PUT", &format!("{loc}{sep}digest={}", sha256(data)))
        .body(data.to_vec());
    if let Some(a) = auth {
        r = r.header("Authorization", a);
    }
    r.send()
}

fn get_as(h: &Hoard, method: &str, path: &str, auth: Option<&str>) -> Resp {
    let mut r = h.req(method, path);
    if let Some(a) = auth {
        r = r.header("Authorization", a);
    }
    r.send()
}

fn challenge_param(resp: &Resp, key: &str) -> Option<String> {
    let c = resp.header("www-authenticate")?;
    let i = c.find(&format!("{key}=\""))? + key.len() + 2;
    Some(c[i..].split('"').next()?.to_owned())
}

#[test]
fn the_registry_speaks_distributions_token_flow_and_scopes_hold() {
    let (h, s, _dir) = start();
    // The ping sends clients to hoard's own token endpoint.
    let ping = get_as(&h, "GET", "/v2/", None);
    assert_eq!(ping.status, 401);
    assert_eq!(ping.code(), "UNAUTHORIZED");
    let realm = challenge_param(&ping, "realm").unwrap();
    assert_eq!(realm, format!("http://{}/token", h.addr));
    assert_eq!(challenge_param(&ping, "service").as_deref(), Some("hoard"));
    assert_eq!(
        get_as(&h, "GET", "/v2/", Some(&basic(&s.team_a))).status,
        200
    );
    assert_eq!(
        get_as(&h, "GET", "/v2/", Some(&basic("hoard_wrong"))).status,
        401
    );

    // An anonymous push is challenged with the scope it needs.
    let data = bytes(1, 5000);
    let r = push_blob_as(&h, "team-a/app", &data, None);
    assert_eq!(r.status, 401);
    assert_eq!(
        challenge_param(&r, "scope").as_deref(),
        Some("repository:team-a/app:pull,push")
    );
    // Basic credentials: allowed where the scope reaches, DENIED elsewhere.
    assert_eq!(
        push_blob_as(&h, "team-a/app", &data, Some(&basic(&s.team_a))).status,
        201
    );
    let r = push_blob_as(&h, "team-b/app", &data, Some(&basic(&s.team_a)));
    assert_eq!((r.status, r.code()), (403, "DENIED".to_owned()));
    assert_eq!(
        push_blob_as(&h, "team-a/app", &data, Some(&basic(&s.go))).status,
        403
    );

    // The token flow: GET /token with Basic credentials and the challenge's scope.
    let t = get_as(
        &h,
        "GET",
        "/token?service=hoard&scope=repository%3Ateam-a%2Fapp%3Apull%2Cpush&scope=repository:team-b/app:pull",
        Some(&basic(&s.team_a)),
    );
    assert_eq!(t.status, 200, "{}", t.text());
    let token = t.json()["token"].as_str().unwrap().to_owned();
    assert_eq!(t.json()["access_token"].as_str(), Some(token.as_str()));
    assert!(t.json()["expires_in"].as_u64().unwrap() > 0);
    let data2 = bytes(2, 7000);
    assert_eq!(
        push_blob_as(&h, "team-a/app", &data2, Some(&bearer(&token))).status,
        201
    );
    let m = image_manifest(
        (
            &sha256(&data),
            data.len(),
            "application/vnd.oci.image.config.v1+json",
        ),
        &[(sha256(&data2), data2.len())],
    );
    let put = h
        .req("PUT", "/v2/team-a/app/manifests/v1")
        .header("Content-Type", OCI_MANIFEST)
        .header("Authorization", &bearer(&token))
        .body(m.clone())
        .send();
    assert_eq!(put.status, 201);
    // What the token was not granted: a new challenge naming the scope, insufficient_scope.
    let r = get_as(&h, "GET", "/v2/team-b/app/tags/list", Some(&bearer(&token)));
    assert_eq!(r.status, 401);
    assert_eq!(
        challenge_param(&r, "error").as_deref(),
        Some("insufficient_scope")
    );
    let r = get_as(
        &h,
        "GET",
        "/v2/team-a/other/tags/list",
        Some(&bearer(&token)),
    );
    assert_eq!(
        r.status, 401,
        "a token is for the repositories it was asked for"
    );
    // The OAuth2 password grant (containerd's first try).
    let form = format!(
        "grant_type=password&service=hoard&client_id=test&username=x&password={}&scope=repository%3Ateam-a%2Fapp%3Apull",
        s.team_a
    );
    let t2 = h
        .req("POST", "/token")
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(form)
        .send();
    assert_eq!(t2.status, 200, "{}", t2.text());
    let read_only = t2.json()["access_token"].as_str().unwrap().to_owned();
    assert_eq!(
        get_as(
            &h,
            "GET",
            "/v2/team-a/app/manifests/v1",
            Some(&bearer(&read_only))
        )
        .status,
        200
    );
    assert_eq!(
        push_blob_as(&h, "team-a/app", &data, Some(&bearer(&read_only))).status,
        401
    );
    let bad = h
        .req("POST", "/token")
        .body("grant_type=password&username=x&password=hoard_nope&scope=")
        .send();
    assert_eq!(bad.status, 401);
    assert_eq!(
        get_as(
            &h,
            "GET",
            "/token?scope=repository:a:pull",
            Some(&basic("nope"))
        )
        .status,
        401
    );
    // A token altered by its holder is refused.
    let (body, sig) = token.split_once('.').unwrap();
    let mut claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .unwrap(),
    )
    .unwrap();
    claims["acc"][0]["n"] = "team-b/app".into();
    let forged = format!(
        "{}.{sig}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    assert_eq!(
        get_as(
            &h,
            "GET",
            "/v2/team-b/app/tags/list",
            Some(&bearer(&forged))
        )
        .status,
        401
    );

    // Delete needs delete.
    let dm = sha256(&m);
    let path = format!("/v2/team-a/app/manifests/{dm}");
    assert_eq!(
        get_as(&h, "DELETE", &path, Some(&basic(&s.team_a))).status,
        403
    );
    assert_eq!(get_as(&h, "GET", &path, None).status, 401);
    assert_eq!(
        get_as(&h, "DELETE", &path, Some(&basic(&s.deleter))).status,
        202
    );

    // Anonymous read where configured, with or without a token from /token.
    assert_eq!(
        push_blob_as(&h, "public/base", &data, Some(&basic(&s.team_a))).status,
        201
    );
    let blob = format!("/v2/public/base/blobs/{}", sha256(&data));
    assert_eq!(get_as(&h, "GET", &blob, None).status, 200);
    let anon = get_as(
        &h,
        "GET",
        "/token?service=hoard&scope=repository:public/base:pull,push",
        None,
    );
    assert_eq!(anon.status, 200);
    let anon = anon.json()["token"].as_str().unwrap().to_owned();
    assert_eq!(get_as(&h, "GET", &blob, Some(&bearer(&anon))).status, 200);
    assert_eq!(
        push_blob_as(&h, "public/base", &data2, Some(&bearer(&anon))).status,
        401
    );
    assert_eq!(push_blob_as(&h, "public/base", &data2, None).status, 401);

    // A mount reads the repository it comes from: allowed, a real mount; not allowed, a plain
    // upload (202) and the blob is not in the target.
    let shared = bytes(3, 3000);
    assert_eq!(
        push_blob_as(&h, "team-a/lib", &shared, Some(&basic(&s.team_a))).status,
        201
    );
    let private = bytes(4, 3000);
    assert_eq!(
        push_blob_as(&h, "private/x", &private, Some(&basic(&s.deleter))).status,
        201
    );
    let mount = |from: &str, d: &str, who: &str| {
        h.req(
            "POST",
            &format!("/v2/public/base/blobs/uploads/?mount={d}&from={from}"),
        )
        .header("Authorization", who)
        .send()
        .status
    };
    assert_eq!(
        mount("team-a/lib", &sha256(&shared), &basic(&s.team_a)),
        201
    );
    assert_eq!(
        mount("private/x", &sha256(&private), &basic(&s.team_a)),
        202
    );
    let head = |d: &str| get_as(&h, "HEAD", &format!("/v2/public/base/blobs/{d}"), None).status;
    assert_eq!(head(&sha256(&shared)), 200);
    assert_eq!(head(&sha256(&private)), 404);
    // Without write on the target, no upload at all.
    assert_eq!(mount("team-a/lib", &sha256(&shared), &basic(&s.go)), 403);

    // "*" is a name, not a wildcard: a token asked for it reaches no repository.
    let star = get_as(
        &h,
        "GET",
        "/token?service=hoard&scope=repository:*:pull,push,delete&scope=registry:catalog:*",
        Some(&basic(&s.team_a)),
    );
    let star = star.json()["token"].as_str().unwrap().to_owned();
    assert_eq!(
        get_as(&h, "GET", "/v2/private/x/tags/list", Some(&bearer(&star))).status,
        401
    );
    assert_eq!(
        get_as(&h, "GET", "/v2/_catalog", Some(&bearer(&star))).status,
        401
    );
    let cat = get_as(&h, "GET", "/v2/_catalog", None);
    assert_eq!(
        challenge_param(&cat, "scope").as_deref(),
        Some("registry:catalog:*")
    );
    // A mount with no `from`, or an encoded one, is a plain upload too.
    let m = |q: &str| {
        h.req("POST", &format!("/v2/public/base/blobs/uploads/?{q}"))
            .header("Authorization", &basic(&s.team_a))
            .send()
            .status
    };
    assert_eq!(m(&format!("mount={}", sha256(&private))), 202);
    assert_eq!(
        m(&format!("mount={}&%66rom=private/x", sha256(&private))),
        202
    );
    assert_eq!(head(&sha256(&private)), 404);
    // A token from /token does not buy a new one.
    assert_eq!(
        get_as(
            &h,
            "GET",
            "/token?scope=repository:team-a/app:pull",
            Some(&bearer(&token))
        )
        .status,
        401
    );
    // A secret sent without a scheme is refused and not logged.
    let raw = h
        .req("GET", "/v2/team-a/app/tags/list")
        .header("Authorization", &s.team_a)
        .send();
    assert_eq!(raw.status, 401);
    assert!(!raw.text().contains(s.team_a.as_str()));

    // Logs name tokens, never secrets.
    let log = h.log();
    assert!(log.contains("team-a may not"), "{log}");
    for secret in [&s.team_a, &s.deleter, &s.go, &s.snap, &s.admin] {
        assert!(!log.contains(secret.as_str()), "a secret in the log");
    }
}

#[test]
fn every_front_end_checks_its_scope() {
    let (h, s, _dir) = start();
    let action = "ab".repeat(32);
    let output = bytes(9, 1000);
    let gput = |who: Option<&str>| {
        let mut r = h
            .req(
                "PUT",
                &format!(
                    "/gocache/team/action/{action}?output={}",
                    sha256(&output).trim_start_matches("sha256:")
                ),
            )
            .body(output.clone());
        if let Some(w) = who {
            r = r.header("Authorization", w);
        }
        r.send()
    };
    let r = gput(None);
    assert_eq!(r.status, 401);
    assert!(
        r.header("www-authenticate").unwrap().starts_with("Basic"),
        "{:?}",
        r.headers
    );
    assert_eq!(gput(Some(&basic(&s.team_a))).status, 403);
    assert!(matches!(gput(Some(&bearer(&s.go))).status, 200 | 201 | 204));
    let gget = |who: Option<&str>| {
        get_as(&h, "GET", &format!("/gocache/team/action/{action}"), who).status
    };
    assert_eq!(gget(None), 401);
    assert_eq!(gget(Some(&basic(&s.go))), 200);
    assert_eq!(gget(Some(&basic(&s.snap))), 403);

    // The module proxy: go may read (the upstream here is down: 502/404, not a refusal).
    let list = "/gomod/example.com/m/@v/list";
    assert_eq!(get_as(&h, "GET", list, None).status, 401);
    assert_eq!(get_as(&h, "GET", list, Some(&basic(&s.team_a))).status, 403);
    let st = get_as(&h, "GET", list, Some(&basic(&s.go))).status;
    assert!(st != 401 && st != 403, "{st}");
    assert_eq!(
        get_as(
            &h,
            "GET",
            "/gomod/sumdb/sum.golang.org/supported",
            Some(&basic(&s.snap))
        )
        .status,
        403
    );

    // Snapshots: snap may read and write ci/*, nothing else.
    let snap = |method: &str, path: &str, who: &str| {
        h.req(method, path)
            .header("Authorization", who)
            .body(Vec::new())
            .send()
            .status
    };
    let missing = |key: &str, who: &str| {
        h.req("POST", &format!("/snapshots/{key}/_missing"))
            .header("Authorization", who)
            .body(b"[]".to_vec())
            .send()
            .status
    };
    assert!(!matches!(missing("ci/k", &basic(&s.snap)), 401 | 403));
    assert_eq!(missing("dev/k", &basic(&s.snap)), 403);
    assert_eq!(missing("ci/k", &basic(&s.go)), 403);
    // A digest stored only in an image repository is "missing" to a snapshot: naming it does
    // not link it.
    let layer = bytes(8, 4000);
    let pushed = h
        .req(
            "POST",
            &format!("/v2/team-a/img/blobs/uploads/?digest={}", sha256(&layer)),
        )
        .header("Authorization", &basic(&s.team_a))
        .body(layer.clone())
        .send();
    assert_eq!(pushed.status, 201);
    let missing_list = h
        .req("POST", "/snapshots/ci/k/_missing")
        .header("Authorization", &basic(&s.snap))
        .body(format!("[\"{}\"]", sha256(&layer)))
        .send();
    assert!(
        missing_list.text().contains(&sha256(&layer)),
        "{}",
        missing_list.text()
    );
    assert_eq!(
        snap(
            "GET",
            &format!("/snapshots/ci/k/_chunks/{}", sha256(&layer)),
            &basic(&s.snap)
        ),
        404
    );
    assert_eq!(snap("GET", "/snapshots/ci/k", &basic(&s.snap)), 404);
    assert_eq!(snap("GET", "/snapshots/dev/k", &basic(&s.snap)), 403);
    assert_eq!(snap("DELETE", "/snapshots/ci/k", &basic(&s.snap)), 403);
    assert_eq!(snap("GET", "/snapshots/?prefix=ci/", &basic(&s.snap)), 404);
    assert_eq!(snap("GET", "/snapshots/?prefix=c", &basic(&s.snap)), 403);
    // The OCI form of a snapshot is the snapshot's scope.
    assert_eq!(
        get_as(
            &h,
            "GET",
            "/v2/snapshots/ci/k/manifests/latest",
            Some(&basic(&s.snap))
        )
        .status,
        404
    );
    assert_eq!(
        get_as(
            &h,
            "GET",
            "/v2/snapshots/ci/k/manifests/latest",
            Some(&basic(&s.team_a))
        )
        .status,
        403
    );

    // Operators: admin and metrics.
    assert_eq!(get_as(&h, "POST", "/admin/gc", None).status, 401);
    assert_eq!(
        get_as(&h, "POST", "/admin/gc", Some(&basic(&s.team_a))).status,
        403
    );
    assert_eq!(
        get_as(&h, "POST", "/admin/gc", Some(&basic(&s.admin))).status,
        200
    );
    assert_eq!(get_as(&h, "GET", "/", None).status, 401);
    assert_eq!(get_as(&h, "GET", "/", Some(&basic(&s.admin))).status, 200);
    assert_eq!(get_as(&h, "GET", "/healthz", None).status, 200);
    assert_eq!(get_as(&h, "GET", "/readyz", None).status, 200);
}

#[test]
fn skopeo_pushes_and_pulls_with_credentials() {
    let skopeo = require_tool("skopeo", "install it with `apt-get install skopeo`");
    let (h, s, _dir) = start();
    let tmp = tempfile::tempdir().unwrap();
    let (dm, manifest) = make_oci_layout(tmp.path());
    let src = format!("oci:{}:v1", tmp.path().join("layout").display());
    let dst = format!("docker://127.0.0.1:{}/team-a/app:v1", h.port());
    let creds = format!("ci:{}", s.team_a);
    // Without credentials the push is refused, and nothing is kept.
    let out = Command::new(&skopeo)
        .args(["copy", "--dest-tls-verify=false", &src, &dst])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(h.stored_blobs(), 0);
    run_ok(Command::new(&skopeo).args([
        "copy",
        "--dest-tls-verify=false",
        "--dest-creds",
        &creds,
        &src,
        &dst,
    ]));
    let got = get_as(
        &h,
        "GET",
        "/v2/team-a/app/manifests/v1",
        Some(&basic(&s.team_a)),
    );
    assert_eq!(got.body, manifest);
    assert_eq!(sha256(&got.body), dm);
    // Back out with credentials, byte for byte.
    let back = tmp.path().join("back");
    run_ok(Command::new(&skopeo).args([
        "copy",
        "--src-tls-verify=false",
        "--src-creds",
        &creds,
        &dst,
        &format!("oci:{}:v1", back.display()),
    ]));
    let hex = dm.trim_start_matches("sha256:");
    assert_eq!(
        std::fs::read(back.join("blobs/sha256").join(hex)).unwrap(),
        manifest
    );
    // Another team's token may not read it; anonymous may read public/ only.
    let out = Command::new(&skopeo)
        .args([
            "inspect",
            "--tls-verify=false",
            "--creds",
            &format!("x:{}", s.go),
            &dst,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let public = format!("docker://127.0.0.1:{}/public/app:v1", h.port());
    run_ok(Command::new(&skopeo).args([
        "copy",
        "--dest-tls-verify=false",
        "--dest-creds",
        &creds,
        &src,
        &public,
    ]));
    let anon =
        run_ok(Command::new(&skopeo).args(["inspect", "--raw", "--tls-verify=false", &public]));
    assert_eq!(
        sha256(anon.trim_end().as_bytes()),
        sha256(String::from_utf8_lossy(&manifest).trim_end().as_bytes())
    );
}

/// The Go side with a token: GOPROXY with the token in its URL, GOCACHEPROG and snapshots with
/// `--token`; without it the proxy refuses, the helper's misses never fail the build, and a
/// snapshot save says why it failed.
#[test]
fn go_and_snapshots_use_tokens() {
    use common::goproxy::{go, write_module, Upstream};
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("upstream");
    write_module(
        &root,
        "example.com/dep",
        "v1.0.0",
        &[
            ("go.mod", "module example.com/dep\n\ngo 1.22\n"),
            (
                "dep.go",
                "package dep\n\nfunc Name() string { return \"dep\" }\n",
            ),
        ],
    );
    let up = Upstream::start(&root);
    let (entry, secret) = new_token("builder", &["gomod:*:read", "gocache:*", "snapshot:ci/*"]);
    let config = format!(
        "[gomod]\nupstreams = [\"{}\"]\nsumdb = \"off\"\n\n{entry}",
        up.url()
    );
    let path = tmp.path().join("hoard.toml");
    std::fs::write(&path, config).unwrap();
    // Go passes credentials over TLS only.
    let (ca, cert, key) = make_cert(tmp.path(), "hoard");
    let h = Hoard::start(&[
        "--config",
        path.to_str().unwrap(),
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    let base = format!("https://{}", h.addr);
    let app = tmp.path().join("app");
    std::fs::create_dir_all(&app).unwrap();
    std::fs::write(
        app.join("go.mod"),
        "module example.com/app\n\ngo 1.22\n\nrequire example.com/dep v1.0.0\n",
    )
    .unwrap();
    std::fs::write(
        app.join("main.go"),
        "package main\n\nimport (\n\t\"fmt\"\n\n\t\"example.com/dep\"\n)\n\nfunc main() { fmt.Println(dep.Name()) }\n",
    )
    .unwrap();

    // No token: go reports the refusal.
    let out = go(&tmp.path().join("m0"), &app, &format!("{base}/gomod"))
        .env("SSL_CERT_FILE", &ca)
        .args(["mod", "download", "-x"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success());
    assert!(text.contains("401"), "{text}");
    // The token as the password in GOPROXY's URL.
    let proxy = format!("https://builder:{secret}@{}/gomod", h.addr);
    let prog = |machine: &std::path::Path, token: Option<&str>| {
        let mut p = format!(
            "{} gocacheprog --url {} --dir {} --verbose",
            env!("CARGO_BIN_EXE_hoard"),
            base,
            machine.join("prog").display()
        );
        if let Some(t) = token {
            p.push_str(&format!(" --token {t}"));
        }
        p
    };
    let build = |machine: &str, token: Option<&str>| {
        let m = tmp.path().join(machine);
        let out = go(&m, &app, &proxy)
            .env("SSL_CERT_FILE", &ca)
            .env("GOCACHEPROG", prog(&m, token))
            .args(["build", "-o", m.join("app").to_str().unwrap(), "."])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{text}");
        text
    };
    let first = build("m1", Some(&secret));
    assert!(first.contains("0 failed"), "{first}");
    let second = build("m2", Some(&secret));
    assert!(!second.contains(" 0 hits from hoard"), "{second}");
    // A helper without the token: every request refused, the build still succeeds.
    let third = build("m3", None);
    assert!(third.contains(" 0 hits from hoard"), "{third}");
    assert!(!third.contains(" 0 failed"), "{third}");

    // Snapshots.
    let dir = tmp.path().join("cache");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("a"), bytes(1, 10_000)).unwrap();
    let snap = |args: &[&str], token: Option<&str>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_hoard"));
        c.arg("snapshot")
            .args(args)
            .env_remove("HOARD_TOKEN")
            .env("SSL_CERT_FILE", &ca);
        if let Some(t) = token {
            c.env("HOARD_TOKEN", t);
        }
        c.output().unwrap()
    };
    let url = base.clone();
    let d = dir.to_str().unwrap();
    let out = snap(&["save", "--url", &url, "--key", "ci/k", d], None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("401"), "{err}");
    let out = snap(&["save", "--url", &url, "--key", "ci/k", d], Some(&secret));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = snap(
        &["save", "--url", &url, "--key", "other/k", d],
        Some(&secret),
    );
    assert!(!out.status.success());
    let back = tmp.path().join("back");
    let out = snap(
        &[
            "restore",
            "--url",
            &url,
            "--key",
            "ci/k",
            back.to_str().unwrap(),
        ],
        Some(&secret),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(back.join("a")).unwrap(), bytes(1, 10_000));
}

/// The certificate a TLS server presents, by its subject's common name (openssl s_client).
fn served_cn(addr: std::net::SocketAddr, ca: &std::path::Path) -> String {
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &addr.to_string(),
            "-servername",
            "localhost",
        ])
        .arg("-CAfile")
        .arg(ca)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find_map(|l| l.trim().strip_prefix("subject=CN = ").map(str::to_owned))
        .unwrap_or_else(|| panic!("no subject in:\n{text}"))
}

#[test]
fn tls_round_trip_with_skopeo_and_a_new_certificate_on_sighup() {
    let skopeo = require_tool("skopeo", "install it with `apt-get install skopeo`");
    let tmp = tempfile::tempdir().unwrap();
    let (ca1, cert1, key1) = make_cert(tmp.path(), "one");
    let (ca2, cert2, key2) = make_cert(tmp.path(), "two");
    let (cert, key) = (tmp.path().join("live.crt"), tmp.path().join("live.key"));
    std::fs::copy(&cert1, &cert).unwrap();
    std::fs::copy(&key1, &key).unwrap();
    let (entry, secret) = new_token("ci", &["oci:*"]);
    let config = tmp.path().join("hoard.toml");
    std::fs::write(&config, entry).unwrap();
    let h = Hoard::start(&[
        "--config",
        config.to_str().unwrap(),
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    assert_eq!(served_cn(h.addr, &ca1), "one");
    // Plain HTTP gets no answer from a TLS port.
    assert!(h
        .req("GET", "/healthz")
        .try_send()
        .map(|r| r.status != 200)
        .unwrap_or(true));

    let certs = tmp.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::copy(&ca1, certs.join("ca.crt")).unwrap();
    let layout = tmp.path().join("img");
    let (dm, manifest) = make_oci_layout(&layout);
    let src = format!("oci:{}:v1", layout.join("layout").display());
    let dst = format!("docker://127.0.0.1:{}/team/app:v1", h.port());
    let creds = format!("ci:{secret}");
    let certs_s = certs.to_str().unwrap();
    run_ok(Command::new(&skopeo).args([
        "copy",
        "--dest-cert-dir",
        certs_s,
        "--dest-creds",
        &creds,
        &src,
        &dst,
    ]));
    let back = tmp.path().join("back");
    run_ok(Command::new(&skopeo).args([
        "copy",
        "--src-cert-dir",
        certs_s,
        "--src-creds",
        &creds,
        &dst,
        &format!("oci:{}:v1", back.display()),
    ]));
    let hex = dm.trim_start_matches("sha256:");
    assert_eq!(
        std::fs::read(back.join("blobs/sha256").join(hex)).unwrap(),
        manifest
    );
    // Verification is real: a client trusting another CA refuses the server.
    let other = tmp.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::copy(&ca2, other.join("ca.crt")).unwrap();
    let out = Command::new(&skopeo)
        .args([
            "inspect",
            "--cert-dir",
            other.to_str().unwrap(),
            "--creds",
            &creds,
            &dst,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());

    // A renewed certificate: SIGHUP, and new connections get it.
    std::fs::copy(&cert2, &cert).unwrap();
    std::fs::copy(&key2, &key).unwrap();
    let pid = h.child.id().to_string();
    run_ok(Command::new("kill").args(["-HUP", &pid]));
    wait_until(
        "the new certificate",
        std::time::Duration::from_secs(10),
        || h.log().contains("TLS certificate and key read again"),
    );
    assert_eq!(served_cn(h.addr, &ca2), "two");
    // A broken one: the reload fails, the one in use stays.
    std::fs::write(&cert, "not a certificate").unwrap();
    run_ok(Command::new("kill").args(["-HUP", &pid]));
    wait_until(
        "the failed reload",
        std::time::Duration::from_secs(10),
        || h.log().contains("TLS reload failed"),
    );
    assert_eq!(served_cn(h.addr, &ca2), "two");
    std::fs::copy(&ca2, certs.join("ca.crt")).unwrap();
    run_ok(Command::new(&skopeo).args(["inspect", "--cert-dir", certs_s, "--creds", &creds, &dst]));
}

/// containerd's ctr and buildah push and pull with a token (both speak the token flow), and
/// fail without one.
#[test]
fn ctr_and_buildah_push_and_pull_with_a_token() {
    let skopeo = require_tool("skopeo", "install it with `apt-get install skopeo`");
    let buildah = require_tool("buildah", "install it with `apt-get install buildah`");
    let (h, s, _dir) = start();
    let tmp = tempfile::tempdir().unwrap();
    let (dm, _) = make_oci_layout(tmp.path());
    let creds = format!("ci:{}", s.team_a);
    let reference = format!("127.0.0.1:{}/team-a/base:v1", h.port());
    run_ok(Command::new(&skopeo).args([
        "copy",
        "--dest-tls-verify=false",
        "--dest-creds",
        &creds,
        &format!("oci:{}:v1", tmp.path().join("layout").display()),
        &format!("docker://{reference}"),
    ]));

    let ctd = Containerd::start(&tmp.path().join("ctd"));
    let out = ctd
        .ctr()
        .args(["images", "pull", "--plain-http", &reference])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a pull without credentials");
    run_ok(ctd.ctr().args([
        "images",
        "pull",
        "--plain-http",
        "--user",
        &creds,
        &reference,
    ]));
    let pushed = format!("127.0.0.1:{}/team-a/pushed:v2", h.port());
    run_ok(ctd.ctr().args(["images", "tag", &reference, &pushed]));
    let out = ctd
        .ctr()
        .args([
            "images",
            "push",
            "--plain-http",
            "--user",
            &format!("x:{}", s.go),
            &pushed,
        ])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a push with a token without oci scopes"
    );
    run_ok(
        ctd.ctr()
            .args(["images", "push", "--plain-http", "--user", &creds, &pushed]),
    );
    let r = get_as(
        &h,
        "HEAD",
        "/v2/team-a/pushed/manifests/v2",
        Some(&basic(&s.team_a)),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("docker-content-digest"), Some(dm.as_str()));

    let root = tmp.path().join("buildah");
    let b = || {
        let mut c = Command::new(&buildah);
        c.arg("--storage-driver")
            .arg("vfs")
            .arg("--root")
            .arg(root.join("root"))
            .arg("--runroot")
            .arg(root.join("run"));
        c
    };
    let out = b()
        .args([
            "pull",
            "--tls-verify=false",
            &format!("docker://{reference}"),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a buildah pull without credentials");
    run_ok(b().args([
        "pull",
        "--tls-verify=false",
        "--creds",
        &creds,
        &format!("docker://{reference}"),
    ]));
    let again = format!("docker://127.0.0.1:{}/team-a/buildah:v3", h.port());
    run_ok(b().args([
        "push",
        "--tls-verify=false",
        "--creds",
        &creds,
        &reference,
        &again,
    ]));
    let r = get_as(
        &h,
        "GET",
        "/v2/team-a/buildah/tags/list",
        Some(&basic(&s.team_a)),
    );
    assert_eq!(r.status, 200);
    assert!(r.text().contains("v3"), "{}", r.text());
}

/// A gRPC channel over TLS to `addr`, trusting `ca` (HTTP/2 offered by ALPN, as gRPC clients do).
async fn tls_channel(addr: &str, ca: &std::path::Path) -> tonic::transport::Channel {
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg));
    let addr = addr.to_owned();
    tonic::transport::Endpoint::try_from(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let (connector, addr) = (connector.clone(), addr.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(&addr).await?;
                let name = rustls::pki_types::ServerName::try_from("localhost")
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
        .unwrap()
}

#[test]
fn grpc_needs_a_token_over_tcp_speaks_tls_and_trusts_the_socket() {
    use hoard::proto::admin::admin_client::AdminClient;
    use hoard::proto::content as api;
    use hoard::proto::content::content_client::ContentClient;
    use hoard::proto::leases::leases_client::LeasesClient;
    use tonic::Code;

    let dir = tempfile::tempdir().unwrap();
    let (e1, node) = new_token("node-a", &["content:node-a/*:read,write,delete"]);
    let (e2, reader) = new_token("reader", &["content:node-a/*:read"]);
    let (e3, ops) = new_token("ops", &["admin", "metrics"]);
    let (e4, team_a) = new_token("team-a", &["oci:team-a/*:read,write"]);
    let (e5, one_ns) = new_token("one-namespace", &["content:node-a/ci:read"]);
    let config = dir.path().join("hoard.toml");
    std::fs::write(&config, format!("[auth]\n\n{e1}\n{e2}\n{e3}\n{e4}\n{e5}")).unwrap();
    let (ca, cert, key) = make_cert(dir.path(), "grpc");
    let h = Hoard::start(&[
        "--config",
        config.to_str().unwrap(),
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--grpc-listen",
        "127.0.0.1:0",
        "--grpc-view",
        "node-a",
    ]);
    let log = h.log();
    let addr: String = log
        .split("gRPC on https://")
        .nth(1)
        .expect("the TCP listener's address in the log")
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
        .collect();

    // A real TLS client: the handshake offers the certificate and agrees on HTTP/2.
    let openssl = require_tool("openssl", "install it with `apt-get install openssl`");
    let out = Command::new(openssl)
        .args(["s_client", "-connect", &addr, "-alpn", "h2", "-CAfile"])
        .arg(&ca)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("ALPN protocol: h2"), "{text}");
    assert!(text.contains("Verify return code: 0"), "{text}");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ch = tls_channel(&addr, &ca).await;
        let with = |token: Option<&str>, view: Option<&str>| {
            let (token, view) = (token.map(str::to_owned), view.map(str::to_owned));
            move |mut r: tonic::Request<()>| {
                if let Some(t) = &token {
                    r.metadata_mut()
                        .insert("authorization", format!("Bearer {t}").parse().unwrap());
                }
                if let Some(v) = &view {
                    r.metadata_mut().insert("hoard-view", v.parse().unwrap());
                }
                r.metadata_mut()
                    .insert("containerd-namespace", "ci".parse().unwrap());
                Ok(r)
            }
        };
        let data = b"a layer written over TCP".to_vec();
        let digest = sha256(&data);
        let commit = || api::WriteContentRequest {
            action: api::WriteAction::Commit as i32,
            r#ref: "tcp".into(),
            expected: digest.clone(),
            data: data.clone().into(),
            ..Default::default()
        };
        // Each token against each service: (token, write allowed, read allowed, admin allowed).
        let none: Option<&str> = None;
        let cases = [
            (
                none,
                Code::Unauthenticated,
                Code::Unauthenticated,
                Code::Unauthenticated,
            ),
            (
                Some("not-a-token"),
                Code::Unauthenticated,
                Code::Unauthenticated,
                Code::Unauthenticated,
            ),
            (
                Some(team_a.as_str()),
                Code::PermissionDenied,
                Code::PermissionDenied,
                Code::PermissionDenied,
            ),
            (
                Some(reader.as_str()),
                Code::PermissionDenied,
                Code::Ok,
                Code::PermissionDenied,
            ),
            (
                Some(ops.as_str()),
                Code::PermissionDenied,
                Code::PermissionDenied,
                Code::Ok,
            ),
            (
                Some(node.as_str()),
                Code::Ok,
                Code::Ok,
                Code::PermissionDenied,
            ),
        ];
        for (token, write, read, admin) in cases {
            let who = match token {
                None => "no token",
                Some(t) if t == node => "node-a",
                Some(t) if t == reader => "reader",
                Some(t) if t == ops => "ops",
                Some(t) if t == team_a => "team-a",
                Some(_) => "an unknown token",
            };
            let mut c = ContentClient::with_interceptor(ch.clone(), with(token, None));
            let code = |r: Result<(), tonic::Status>| r.err().map_or(Code::Ok, |e| e.code());
            let w: Result<(), tonic::Status> = async {
                let mut s = c
                    .write(tokio_stream::iter(vec![commit()]))
                    .await?
                    .into_inner();
                while s.message().await?.is_some() {}
                Ok(())
            }
            .await;
            // A second commit of the same bytes is AlreadyExists: allowed, too.
            let w = match w {
                Err(e) if e.code() == Code::AlreadyExists => Ok(()),
                r => r,
            };
            assert_eq!(code(w), write, "{who}: Write");
            let r = c.list(api::ListContentRequest::default()).await.map(|_| ());
            assert_eq!(code(r), read, "{who}: List");
            let mut a = AdminClient::with_interceptor(ch.clone(), with(token, None));
            let r = a
                .stats(hoard::proto::admin::StatsRequest::default())
                .await
                .map(|_| ());
            assert_eq!(code(r), admin, "{who}: Admin.Stats");
        }
        // Deleting and leases need their actions; another view is another scope.
        let mut c = ContentClient::with_interceptor(ch.clone(), with(Some(&reader), None));
        let e = c
            .delete(api::DeleteContentRequest {
                digest: digest.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
        let mut l = LeasesClient::with_interceptor(ch.clone(), with(Some(&reader), None));
        let e = l
            .create(hoard::proto::leases::CreateRequest::default())
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
        let mut l = LeasesClient::with_interceptor(ch.clone(), with(Some(&node), None));
        l.create(hoard::proto::leases::CreateRequest::default())
            .await
            .unwrap();
        let mut c = ContentClient::with_interceptor(ch.clone(), with(Some(&node), Some("node-b")));
        let e = c
            .list(api::ListContentRequest::default())
            .await
            .err()
            .unwrap();
        assert_eq!(e.code(), Code::PermissionDenied, "another view");
        let mut c = ContentClient::with_interceptor(ch.clone(), with(Some(&node), None));
        c.delete(api::DeleteContentRequest {
            digest: digest.clone(),
        })
        .await
        .unwrap();

        // A grant of one namespace does not reach a request without one (which acts on every
        // namespace of the view, as containerd's collector does).
        let mut c = ContentClient::with_interceptor(ch.clone(), with(Some(&one_ns), None));
        c.list(api::ListContentRequest::default()).await.unwrap();
        let mut bare = tonic::Request::new(api::ListContentRequest::default());
        bare.metadata_mut()
            .insert("authorization", format!("Bearer {one_ns}").parse().unwrap());
        let mut c = ContentClient::new(ch.clone());
        assert_eq!(
            c.list(bare).await.err().map(|e| e.code()),
            Some(Code::PermissionDenied)
        );

        // The socket needs no token: its file permissions are its access control.
        let sock = hoard::grpc::connect_socket(&h.data.join("hoard.sock"))
            .await
            .unwrap();
        let mut a = AdminClient::new(sock.clone());
        a.stats(hoard::proto::admin::StatsRequest::default())
            .await
            .unwrap();
        let mut c = ContentClient::new(sock);
        c.info(api::InfoRequest {
            digest: digest.clone(),
        })
        .await
        .unwrap();
    });
    // Over /v2/, a view's internal repositories are the content scope's too.
    let tags = |token: &str| {
        run_ok(
            Command::new("curl")
                .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
                .arg(&ca)
                .args(["-H", &format!("Authorization: {}", basic(token))])
                .arg(format!(
                    "https://localhost:{}/v2/containerd/node-a/content/ci/tags/list",
                    h.port()
                )),
        )
    };
    assert_eq!(tags(&reader), "200");
    assert_eq!(tags(&team_a), "403");
    // Refusals are logged with the token's name, never its value.
    let log = h.log();
    assert!(log.contains("reader may not"), "{log}");
    for s in [&node, &reader, &ops, &team_a] {
        assert!(!log.contains(s.as_str()), "a secret in the log");
    }
    // Refusals are counted.
    let metrics = run_ok(
        Command::new("curl")
            .args(["-sf", "--cacert"])
            .arg(&ca)
            .args(["-H", &format!("Authorization: {}", bearer(&ops))])
            .arg(format!("https://localhost:{}/metrics", h.port())),
    );
    assert!(
        metrics.contains("auth_refusals_total{front=\"content\"}"),
        "{metrics}"
    );
}
