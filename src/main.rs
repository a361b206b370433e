//! The `hoard` command line: `serve` runs the daemon; the rest are tools around it.

#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};

use hoard::config::{Config, LogFormat, Overrides};

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
    Serve(Overrides),
    /// Measure push/HEAD/pull/manifest throughput against a registry URL (see benches/).
    Bench(hoard::bench::BenchArgs),
    /// Print one core's sha256 throughput in MB/s.
    BenchSha256,
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

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(o) => {
            let config = Config::load(&o).map_err(anyhow::Error::msg)?;
            init_logging(config.log_format);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(hoard::app::serve(config))
        }
        Command::Bench(args) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(hoard::bench::run(args))
        }
        Command::BenchSha256 => {
            println!("{:.0}", hoard::bench::sha256_speed());
            Ok(())
        }
    }
}
