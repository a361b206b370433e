//! The `hoard` command line: `serve` runs the daemon; the rest are tools around it.

#![forbid(unsafe_code)]

use std::io::{Read, Write};

use clap::{Parser, Subcommand};

use hoard::config::{parse_offset, Config, LogFormat, Overrides};

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
    Serve(ServeArgs),
    /// Run one lifecycle pass (TTL, orphans, size bound) on a data directory. If a daemon is
    /// serving it, the daemon runs the pass; otherwise it runs here, offline.
    Gc {
        /// One pass, then exit (the daemon runs passes continuously by itself).
        #[arg(long)]
        once: bool,
        #[command(flatten)]
        args: ServeArgs,
    },
    /// Re-hash every blob and report corrupt or missing ones and unknown files (exit 1 if any).
    Verify {
        /// Quarantine corrupt blobs, drop manifests and tags that would dangle, remove unknown
        /// files.
        #[arg(long)]
        repair: bool,
        #[command(flatten)]
        args: ServeArgs,
    },
    /// Measure push/HEAD/pull/manifest throughput against a registry URL (see benches/).
    Bench(hoard::bench::BenchArgs),
    /// Print one core's sha256 throughput in MB/s.
    BenchSha256,
    /// Build a data directory with N blobs in its index and files (for the restart benchmark).
    BenchFill(hoard::bench::FillArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    #[command(flatten)]
    overrides: Overrides,
    /// Test hook: run as if the wall clock were off by this much, e.g. -3h or +2h.
    #[arg(long, env = "HOARD_CLOCK_OFFSET", hide = true, allow_hyphen_values = true,
          value_parser = parse_offset)]
    clock_offset: Option<i64>,
}

impl ServeArgs {
    fn config(&self) -> anyhow::Result<(Config, i64)> {
        let config = Config::load(&self.overrides).map_err(anyhow::Error::msg)?;
        Ok((config, self.clock_offset.unwrap_or(0)))
    }
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

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(a) => {
            let (config, offset) = a.config()?;
            init_logging(config.log_format);
            runtime()?.block_on(hoard::app::serve(config, offset))
        }
        Command::Gc { once, args } => {
            if !once {
                anyhow::bail!(
                    "`hoard serve` runs lifecycle passes continuously; use `hoard gc --once` for one pass now"
                );
            }
            let (config, offset) = args.config()?;
            init_logging(config.log_format);
            let out = offline_or_daemon(config, offset, "/admin/gc", |app| {
                app.life.sweep_files()?;
                let r = app.life.pass(None)?;
                Ok((true, hoard::app::render_pass(&r)))
            })?;
            print!("{}", out.1);
            Ok(())
        }
        Command::Verify { repair, args } => {
            let (config, offset) = args.config()?;
            init_logging(config.log_format);
            let path = if repair {
                "/admin/verify?repair=true"
            } else {
                "/admin/verify"
            };
            let (ok, text) = offline_or_daemon(config, offset, path, move |app| {
                let r = hoard::lifecycle::verify::verify(&app.life, repair)?;
                Ok((r.is_clean() || r.repaired, r.render()))
            })?;
            print!("{text}");
            if !ok {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Bench(args) => runtime()?.block_on(hoard::bench::run(args)),
        Command::BenchSha256 => {
            println!("{:.0}", hoard::bench::sha256_speed());
            Ok(())
        }
        Command::BenchFill(args) => hoard::bench::fill(args),
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
    match hoard::app::App::open(config, offset) {
        Ok(app) => {
            let out = offline(&app).map_err(|e| anyhow::anyhow!("{e}"))?;
            app.close().map_err(|e| anyhow::anyhow!("{e}"))?;
            Ok(out)
        }
        Err(e) if e.kind == hoard::error::ErrorKind::Conflict => {
            let file = data_dir.join(hoard::app::SERVING_FILE);
            let url = std::fs::read_to_string(&file).map_err(|_| {
                anyhow::anyhow!("{e}; and it has not written {} to be asked", file.display())
            })?;
            let addr = url.trim().trim_start_matches("http://").to_owned();
            let (status, body) = post(&addr, path)?;
            Ok((status == 200, body))
        }
        Err(e) => Err(anyhow::anyhow!("{e}")),
    }
}

/// A bare HTTP/1.1 POST (loopback, no body): enough to reach the daemon's admin endpoints.
fn post(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr)
        .map_err(|e| anyhow::anyhow!("cannot reach the daemon at {addr}: {e}"))?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
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
