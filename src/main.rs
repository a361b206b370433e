//! The `hoard` command line: `serve` runs the daemon; the rest are tools around it.

#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::time::Duration;

use clap::{Parser, Subcommand};

use hoard::config::{
    parse_offset, CommonArgs, Config, LifecycleArgs, LogFormat, Overrides, ServeFlags,
};

#[derive(Parser)]
#[command(
    name = "hoard",
    version,
    about = "A shared build cache for BuildKit build farms"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (defaults: HTTP on 127.0.0.1:5000, data in ./hoard-data).
    Serve(Box<ServeArgs>),
    /// Run one lifecycle pass (TTL, orphans, size bound) on a data directory. If a daemon is
    /// serving it, the daemon runs the pass; otherwise it runs here, offline.
    Gc {
        /// One pass, then exit (the daemon runs passes continuously by itself).
        #[arg(long)]
        once: bool,
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        lifecycle: LifecycleArgs,
    },
    /// Re-hash every blob and report corrupt or missing ones and unknown files (exit 1 if any).
    Verify {
        /// Quarantine corrupt blobs, drop manifests and tags that would dangle, remove unknown
        /// files.
        #[arg(long)]
        repair: bool,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Exit 0 if the daemon at --listen answers `GET /healthz` with 200 (a container health
    /// check that needs no HTTP client in the image).
    Health {
        /// The daemon's address; 0.0.0.0 or [::] mean this machine.
        #[arg(long, env = "HOARD_LISTEN", default_value = "127.0.0.1:5000")]
        listen: String,
    },
    /// Go's GOCACHEPROG helper: `GOCACHEPROG="hoard gocacheprog --url http://hoard:5000"` shares
    /// Go's build cache through hoard, with a local disk tier.
    Gocacheprog(hoard::gocache::prog::ProgArgs),
    /// Save a directory (a cache mount: GOMODCACHE, GOCACHE, npm, cargo…) to hoard, or restore
    /// one.
    #[command(subcommand)]
    Snapshot(hoard::snapshot::client::SnapshotCmd),
    /// Ask a running hoard over its gRPC socket (hoard.v1.Admin): stats, refs, gc, verify,
    /// evict. Human output, or --json.
    Admin(AdminArgs),
    /// Tokens for `[auth]`: `new` makes a secret and prints it with the config entry holding
    /// its hash; `hash` prints the hash of a secret read from stdin.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Check a configuration file (with HOARD_* variables applied) and print the settings in
    /// effect, secrets masked. Exit 1 with the reason when it is not valid.
    CheckConfig {
        /// The TOML file.
        file: std::path::PathBuf,
    },
    /// Measure push/HEAD/pull/manifest throughput against a registry URL (see benches/).
    Bench(hoard::bench::BenchArgs),
    /// Ingest and read large and small blobs over containerd's content API on each socket
    /// given (hoard's, a containerd's), alternating; prints MB/s and ratios (benches/content.sh).
    BenchContent(hoard::bench::BenchContentArgs),
    /// Print one core's sha256 throughput in MB/s.
    BenchSha256,
    /// Build a data directory with N blobs in its index and files (for the restart benchmark).
    BenchFill(hoard::bench::FillArgs),
    /// The same 16 MiB blobs as `bench --only medium`, PUT and GET straight to an S3 bucket
    /// with a plain SDK client: the S3 service's own speed, for benches/s3.sh.
    BenchS3(hoard::bench::BenchS3Args),
    /// Fills an S3 bucket as replicas pushing images leave it (blobs, links, manifest records,
    /// tags): a large bucket for restart measurements.
    BenchFillS3(hoard::bench::FillS3Args),
}

#[derive(clap::Args)]
struct ServeArgs {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    lifecycle: LifecycleArgs,
    #[command(flatten)]
    serve: ServeFlags,
    /// Test hook: run as if the wall clock were off by this much, e.g. -3h or +2h.
    #[arg(long, env = "HOARD_CLOCK_OFFSET", hide = true, allow_hyphen_values = true,
          value_parser = parse_offset)]
    clock_offset: Option<i64>,
}

impl ServeArgs {
    fn config(&self) -> anyhow::Result<(Config, i64)> {
        let o = Overrides {
            common: self.common.clone(),
            lifecycle: self.lifecycle.clone(),
            serve: self.serve.clone(),
        };
        let config = Config::load(&o).map_err(anyhow::Error::msg)?;
        Ok((config, self.clock_offset.unwrap_or(0)))
    }
}

/// The configuration of a tool subcommand (no serve flags; the clock offset hook from env).
fn tool_config(common: CommonArgs, lifecycle: LifecycleArgs) -> anyhow::Result<(Config, i64)> {
    let o = Overrides {
        common,
        lifecycle,
        serve: ServeFlags::default(),
    };
    let config = Config::load(&o).map_err(anyhow::Error::msg)?;
    let offset = match std::env::var("HOARD_CLOCK_OFFSET") {
        Ok(v) => parse_offset(&v).map_err(anyhow::Error::msg)?,
        Err(_) => 0,
    };
    Ok((config, offset))
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HOARD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// A listening socket on `addr` (SO_REUSEADDR, so a restart does not wait out the previous
/// run's connections in TIME_WAIT).
fn bind(addr: &str) -> anyhow::Result<std::net::TcpListener> {
    use std::net::ToSocketAddrs;
    let fail = |e: &dyn std::fmt::Display| anyhow::anyhow!("cannot listen on {addr}: {e}");
    let sa = addr
        .to_socket_addrs()
        .map_err(|e| fail(&e))?
        .next()
        .ok_or_else(|| fail(&"the name resolves to no address"))?;
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(sa),
        socket2::Type::STREAM,
        None,
    )
    .map_err(|e| fail(&e))?;
    socket.set_reuse_address(true).map_err(|e| fail(&e))?;
    socket.bind(&sa.into()).map_err(|e| fail(&e))?;
    socket.listen(1024).map_err(|e| fail(&e))?;
    socket.set_nonblocking(true).map_err(|e| fail(&e))?;
    Ok(socket.into())
}

/// Files hoard creates in a data directory must stay its owner's: a `hoard verify` run as root
/// on a service's directory must not leave root-owned index files the service cannot open. As
/// root on a directory another user owns, hoard becomes that user (before any thread starts,
/// so the whole process does).
fn run_as_owner(dir: &std::path::Path) -> anyhow::Result<()> {
    use rustix::process::{geteuid, Gid, Uid};
    use rustix::thread::{set_thread_groups, set_thread_res_gid, set_thread_res_uid};
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(dir) else {
        // Not there yet: hoard creates it, as whoever runs it.
        return Ok(());
    };
    let me = geteuid();
    let (uid, gid) = (meta.uid(), meta.gid());
    if me.as_raw() == uid {
        return Ok(());
    }
    if !me.is_root() {
        // An unprivileged user writes where the directory's permissions let it (a volume
        // shared through its group, as Kubernetes' fsGroup does), and cannot change owners.
        return Ok(());
    }
    // Linux keeps credentials per thread: the switch covers the process only while it has one.
    let threads = std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count());
    if threads != 1 {
        anyhow::bail!(
            "cannot switch to the owner of {} with {threads} threads running; run hoard as uid \
             {uid}",
            dir.display()
        );
    }
    let (u, g) = (Uid::from_raw(uid), Gid::from_raw(gid));
    let switched = set_thread_groups(&[g])
        .and_then(|()| set_thread_res_gid(g, g, g))
        .and_then(|()| set_thread_res_uid(u, u, u));
    if let Err(e) = switched {
        anyhow::bail!(
            "cannot switch to uid {uid} / gid {gid}, the owner of {}: {e}",
            dir.display()
        );
    }
    tracing::info!(
        uid,
        gid,
        dir = %dir.display(),
        "running as the data directory's owner so that the files hoard creates stay theirs"
    );
    Ok(())
}

/// Every connection and every blob being read holds a descriptor: take the hard limit, not the
/// (often 1024) soft one.
fn raise_open_files() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current < lim.maximum {
        lim.current = lim.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, lim) {
            tracing::warn!(error = %e, "cannot raise the open file limit");
        }
    }
    let now = getrlimit(Resource::Nofile).current;
    tracing::debug!(limit = now, "open file limit");
    if now.is_some_and(|n| n < 4096) {
        tracing::warn!(
            limit = now,
            "the open file limit is low for a registry: each connection and each blob being \
             served holds one; raise it (e.g. LimitNOFILE in a systemd unit)"
        );
    }
}

#[derive(clap::Args)]
struct AdminArgs {
    /// The daemon's socket (default: hoard.sock in the data directory).
    #[arg(long, env = "HOARD_GRPC_SOCKET", global = true)]
    socket: Option<std::path::PathBuf>,
    /// Data directory whose socket to use (default ./hoard-data).
    #[arg(long, env = "HOARD_DATA_DIR", global = true)]
    data_dir: Option<std::path::PathBuf>,
    /// Print the answer as JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: AdminCmd,
}

#[derive(Subcommand)]
enum AdminCmd {
    /// Size, counts, hits and misses; per repository with --prefix.
    Stats {
        /// Only repositories whose name starts with this.
        #[arg(long, default_value = "")]
        prefix: String,
    },
    /// Refs (tags, and the internal refs of the Go caches, snapshots and content views).
    Refs {
        #[arg(long, default_value = "")]
        prefix: String,
        /// At most this many (0: all).
        #[arg(long, default_value_t = 0)]
        limit: usize,
    },
    /// Run a lifecycle pass now and print what went and why.
    Gc,
    /// Re-hash every blob and check every ref (exit 1 if something is wrong).
    Verify {
        #[arg(long)]
        repair: bool,
    },
    /// Remove refs now: "repository:tag", or a prefix ending in '*' ("team-a/*"); then a pass
    /// removes what they alone reached.
    Evict { target: String },
}

fn admin(a: AdminArgs) -> anyhow::Result<()> {
    let socket = a.socket.unwrap_or_else(|| {
        a.data_dir
            .unwrap_or_else(|| std::path::PathBuf::from("./hoard-data"))
            .join("hoard.sock")
    });
    let cmd = match a.cmd {
        AdminCmd::Stats { prefix } => hoard::admin::Command::Stats { prefix },
        AdminCmd::Refs { prefix, limit } => hoard::admin::Command::Refs { prefix, limit },
        AdminCmd::Gc => hoard::admin::Command::Gc,
        AdminCmd::Verify { repair } => hoard::admin::Command::Verify { repair },
        AdminCmd::Evict { target } => hoard::admin::Command::Evict { target },
    };
    let ok = runtime()?.block_on(hoard::admin::run(&socket, cmd, a.json))?;
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}

#[derive(Subcommand)]
enum TokenCmd {
    /// A new random secret, and the `[[auth.tokens]]` entry to paste (the secret is printed
    /// once: hand it to the client, it is not kept anywhere).
    New {
        /// The token's name (shown in logs).
        #[arg(long)]
        name: String,
        /// Scopes, e.g. --scope 'oci:team-a/*:read,write' --scope 'gocache:*' (repeatable).
        #[arg(long = "scope")]
        scopes: Vec<String>,
    },
    /// Reads a secret from stdin (one line) and prints its `sha256:` hash for the config.
    Hash,
}

fn token(cmd: TokenCmd) -> anyhow::Result<()> {
    match cmd {
        TokenCmd::New { name, scopes } => {
            for s in &scopes {
                hoard::auth::Grant::parse(s).map_err(|e| anyhow::anyhow!(e))?;
            }
            let secret = hoard::auth::new_secret();
            eprintln!("secret (give it to the client; it is not shown again): {secret}");
            println!("[[auth.tokens]]");
            println!("name = {}", toml_str(&name));
            println!("hash = \"{}\"", hoard::auth::hash_secret(&secret));
            let list: Vec<String> = scopes.iter().map(|s| toml_str(s)).collect();
            println!("scopes = [{}]", list.join(", "));
            Ok(())
        }
        TokenCmd::Hash => {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)?;
            let secret = line.trim_end_matches(['\n', '\r']);
            if secret.is_empty() {
                anyhow::bail!("no secret on stdin (e.g. printf %s \"$SECRET\" | hoard token hash)");
            }
            println!("{}", hoard::auth::hash_secret(secret));
            Ok(())
        }
    }
}

fn toml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

fn check_config(file: std::path::PathBuf) -> anyhow::Result<()> {
    let o = hoard::config::Overrides {
        common: hoard::config::CommonArgs {
            config: Some(file.clone()),
            ..Default::default()
        },
        ..Default::default()
    };
    let config =
        hoard::config::Config::load(&o).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let auth = hoard::auth::Auth::from_config(&config.auth)
        .map_err(|e| anyhow::anyhow!("{}: [auth]: {e}", file.display()))?;
    println!("{}: valid", file.display());
    print!("{}", hoard::config::effective(&config));
    match auth {
        None => println!("auth = off (no tokens: every request is allowed)"),
        Some(a) => print!("{}", a.describe()),
    }
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Gocacheprog(a) => hoard::gocache::prog::run(a),
        Command::Snapshot(c) => hoard::snapshot::client::run(c),
        Command::Serve(a) => {
            let (config, offset) = a.config()?;
            init_logging(config.log_format);
            raise_open_files();
            // The address first (a privileged port needs root), then the owner's identity, then
            // threads: a start that cannot serve fails before it touches the store.
            let listener = bind(&config.listen)?;
            run_as_owner(&config.disk().0)?;
            runtime()?.block_on(hoard::app::serve(config, offset, listener))
        }
        Command::Gc {
            once,
            common,
            lifecycle,
        } => {
            if !once {
                anyhow::bail!(
                    "`hoard serve` runs lifecycle passes continuously; use `hoard gc --once` for one pass now"
                );
            }
            let (config, offset) = tool_config(common, lifecycle)?;
            init_logging(config.log_format);
            run_as_owner(&config.disk().0)?;
            let out = offline_or_daemon(config, offset, "/admin/gc", |app| {
                if let Some(s) = &app.shared {
                    // On a shared bucket only the lease holder collects: take it if it is free.
                    s.block(|s| async move { s.heartbeat().await })?;
                    if let Some(why) = app.not_collector() {
                        return Ok((false, why));
                    }
                }
                app.life.sweep_files()?;
                let r = app.life.pass(None)?;
                Ok((true, hoard::app::render_pass(&r)))
            })?;
            if !out.0 {
                anyhow::bail!("{}", out.1.trim());
            }
            print!("{}", out.1);
            Ok(())
        }
        Command::Verify { repair, common } => {
            let (config, offset) = tool_config(common, LifecycleArgs::default())?;
            init_logging(config.log_format);
            run_as_owner(&config.disk().0)?;
            let path = if repair {
                "/admin/verify?repair=true"
            } else {
                "/admin/verify"
            };
            let (ok, text) = offline_or_daemon(config, offset, path, move |app| {
                if !*app.swept.borrow() {
                    app.life.sweep_files()?;
                }
                let r = hoard::lifecycle::verify::verify(&app.life, repair)?;
                Ok((r.is_clean() || r.repaired, r.render()))
            })?;
            print!("{text}");
            if !ok {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Health { listen } => {
            let addr = listen
                .replace("0.0.0.0:", "127.0.0.1:")
                .replace("[::]:", "[::1]:");
            let (status, body) = request(&addr, "GET", "/healthz", Duration::from_secs(5))?;
            if status != 200 {
                anyhow::bail!("{addr} answered /healthz with {status}: {}", body.trim());
            }
            Ok(())
        }
        Command::Token(c) => token(c),
        Command::Admin(a) => admin(a),
        Command::CheckConfig { file } => check_config(file),
        Command::Bench(args) => runtime()?.block_on(hoard::bench::run(args)),
        Command::BenchContent(args) => runtime()?.block_on(hoard::bench::run_content(args)),
        Command::BenchSha256 => {
            println!("{:.0}", hoard::bench::sha256_speed());
            Ok(())
        }
        Command::BenchFill(args) => hoard::bench::fill(args),
        Command::BenchS3(args) => runtime()?.block_on(hoard::bench::run_s3(args)),
        Command::BenchFillS3(args) => runtime()?.block_on(hoard::bench::fill_s3(args)),
    }
}

/// Runs `offline` on the data directory, or, when a daemon holds it, asks that daemon (at the
/// address it wrote to `serving`) to do the same over HTTP.
fn offline_or_daemon(
    config: Config,
    offset: i64,
    path: &str,
    offline: impl FnOnce(&hoard::app::App) -> hoard::error::Result<(bool, String)>,
) -> anyhow::Result<(bool, String)> {
    let data_dir = config.disk().0;
    // A tool pointed at the wrong directory must say so, not make an empty store there and
    // report it clean.
    let journal = data_dir.join("index").join("journal");
    let found = journal
        .try_exists()
        .map_err(|e| anyhow::anyhow!("cannot look for {}: {e}", journal.display()))?;
    if !found {
        anyhow::bail!(
            "{} holds no hoard store (no {}): check --data-dir (or store.disk.path)",
            data_dir.display(),
            journal.display()
        );
    }
    match hoard::app::App::open(config, offset) {
        Ok(app) => {
            // Closed whatever the outcome, so the store stays marked clean.
            let out = offline(&app);
            let closed = app.close();
            let out = out.map_err(|e| anyhow::anyhow!("{e}"))?;
            closed.map_err(|e| anyhow::anyhow!("{e}"))?;
            Ok(out)
        }
        Err(e) if e.kind == hoard::error::ErrorKind::Conflict => {
            let file = data_dir.join(hoard::app::SERVING_FILE);
            let url = std::fs::read_to_string(&file).map_err(|_| {
                anyhow::anyhow!("{e}; and it has not written {} to be asked", file.display())
            })?;
            let addr = url.trim().trim_start_matches("http://").to_owned();
            // A pass or a verification of a large store takes a while.
            let (status, body) = request(&addr, "POST", path, Duration::from_secs(6 * 3600))?;
            Ok((status == 200, body))
        }
        Err(e) => Err(anyhow::anyhow!("{e}")),
    }
}

/// A bare HTTP/1.1 request without a body (loopback): enough to reach the daemon's admin and
/// health endpoints.
fn request(addr: &str, method: &str, path: &str, wait: Duration) -> anyhow::Result<(u16, String)> {
    use std::net::ToSocketAddrs;
    let unreachable =
        |e: &dyn std::fmt::Display| anyhow::anyhow!("cannot reach the daemon at {addr}: {e}");
    let sa = addr
        .to_socket_addrs()
        .map_err(|e| unreachable(&e))?
        .next()
        .ok_or_else(|| unreachable(&"no address"))?;
    let mut s = std::net::TcpStream::connect_timeout(&sa, Duration::from_secs(5))
        .map_err(|e| unreachable(&e))?;
    s.set_read_timeout(Some(wait))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_owned()))
}
