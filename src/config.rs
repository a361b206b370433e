//! Configuration: one TOML file whose `[store]` section mirrors the store tree, every key also
//! settable by a `HOARD_…` environment variable and a flag (flag > env > file > default);
//! `store.disk.path` is `--store-path` / `HOARD_STORE_PATH`. Sizes and durations are human text: "10GiB", "512MiB", "1s", "5m", "14d".

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::store::disk::Durability;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address of the HTTP front end (OCI registry, health). Port 0 picks a free port.
    pub listen: String,
    /// Where everything is kept unless a store says otherwise.
    pub data_dir: PathBuf,
    pub log_format: LogFormat,
    /// An upload session with no request for this long is dropped and its data removed.
    pub upload_timeout: HumanDuration,
    /// How long a stopping daemon lets in-flight requests finish.
    pub shutdown_timeout: HumanDuration,
    /// Bound on stored bytes (blobs and uploads in progress). Unset: only the disk bounds it.
    pub max_size: Option<HumanSize>,
    /// Above this share of `max_size`, evict least recently used roots...
    pub high_watermark: Fraction,
    /// ...until usage is under this share.
    pub low_watermark: Fraction,
    /// Tags (and other roots) not pulled or pushed for this long expire. Unset: no expiry.
    pub ttl: Option<HumanDuration>,
    /// Nothing expires before it is older than `ttl` plus this.
    pub clock_skew_tolerance: HumanDuration,
    /// A blob or manifest no tag reaches is kept this long after its last push, mount or HEAD
    /// (an export in progress), then collected.
    pub orphan_grace: HumanDuration,
    /// How often the background pass (TTL, orphans, watermarks) runs.
    pub gc_interval: HumanDuration,
    /// Blob transfers (pulls, upload bodies) in progress at once; past it, 503 + Retry-After.
    pub max_transfers: usize,
    /// A request body that sends nothing for this long is cut off and its upload dropped.
    pub body_timeout: HumanDuration,
    /// A client that reads nothing of a response for this long is disconnected.
    pub send_timeout: HumanDuration,
    /// One log line per request at info.
    pub access_log: bool,
    /// Serve HTTPS with this certificate chain (PEM) and `tls_key`; both read again on SIGHUP.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// The gRPC unix socket (containerd's content API, hoard's admin API). Default
    /// `<data_dir>/hoard.sock`; "none" serves no socket.
    pub grpc_socket: Option<PathBuf>,
    /// Also serve gRPC on this TCP address (tokens required when auth is on; TLS with
    /// `tls_cert`). Unset: socket only.
    pub grpc_listen: Option<String>,
    /// The content API's view on these listeners: what `List` shows and `Delete` drops (see
    /// the README). One per node sharing a store.
    pub grpc_view: String,
    pub store: StoreConfig,
    /// The caching module proxy at `/gomod/`.
    pub gomod: GomodConfig,
    /// Tokens and scopes; with none configured every request is allowed.
    pub auth: crate::auth::AuthConfig,
}

/// `[gomod]`: where module proxy misses are fetched from and how kept files are refreshed.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GomodConfig {
    /// Upstream module proxies, tried in order; each entry may itself be a GOPROXY-style list
    /// (`a,b|c`: after `|` any error moves on, after `,` only 404/410).
    pub upstreams: Vec<String>,
    /// `list`, `@latest`, `.info` and checksum lookups older than this are fetched again.
    pub refresh: HumanDuration,
    /// Connecting, the response head, and each body chunk from an upstream.
    pub timeout: HumanDuration,
    /// The checksum database zips and go.mod files are checked against ("off": none).
    pub sumdb: String,
    /// Module path patterns the checksum database is not asked about (as GONOSUMDB).
    pub nosumdb: Vec<String>,
}

impl Default for GomodConfig {
    fn default() -> GomodConfig {
        GomodConfig {
            upstreams: vec!["https://proxy.golang.org".into()],
            refresh: HumanDuration(Duration::from_secs(60)),
            timeout: HumanDuration(Duration::from_secs(30)),
            sumdb: "sum.golang.org".into(),
            nosumdb: Vec::new(),
        }
    }
}

impl GomodConfig {
    /// Applies `HOARD_GOMOD_*` variables: UPSTREAMS (a GOPROXY-style list), REFRESH, TIMEOUT,
    /// SUMDB, NOSUMDB (comma-separated patterns).
    fn with_env(
        mut self,
        vars: impl Iterator<Item = (String, String)>,
    ) -> Result<GomodConfig, String> {
        for (k, v) in vars {
            let Some(key) = k.strip_prefix("HOARD_GOMOD_") else {
                continue;
            };
            match key {
                "UPSTREAMS" => self.upstreams = vec![v],
                "REFRESH" => {
                    self.refresh =
                        HumanDuration(parse_duration(&v).map_err(|e| format!("{k}: {e}"))?)
                }
                "TIMEOUT" => {
                    self.timeout =
                        HumanDuration(parse_duration(&v).map_err(|e| format!("{k}: {e}"))?)
                }
                "SUMDB" => self.sumdb = v,
                "NOSUMDB" => {
                    self.nosumdb = v
                        .split(',')
                        .map(|s| s.trim().to_owned())
                        .filter(|s| !s.is_empty())
                        .collect()
                }
                _ => return Err(format!("unknown variable {k}")),
            }
        }
        crate::gomod::upstream::parse_list(&self.upstreams.join(","))?;
        if self.timeout.0.is_zero() {
            return Err("gomod.timeout must be greater than zero".into());
        }
        Ok(self)
    }
}

impl Default for Config {
    fn default() -> Config {
        Config {
            listen: "127.0.0.1:5000".into(),
            data_dir: PathBuf::from("./hoard-data"),
            log_format: LogFormat::Text,
            upload_timeout: HumanDuration(Duration::from_secs(3600)),
            shutdown_timeout: HumanDuration(Duration::from_secs(30)),
            max_size: None,
            high_watermark: Fraction(0.9),
            low_watermark: Fraction(0.8),
            ttl: None,
            clock_skew_tolerance: HumanDuration(Duration::from_secs(300)),
            orphan_grace: HumanDuration(Duration::from_secs(3600)),
            gc_interval: HumanDuration(Duration::from_secs(30)),
            max_transfers: 1024,
            body_timeout: HumanDuration(Duration::from_secs(60)),
            send_timeout: HumanDuration(Duration::from_secs(60)),
            access_log: true,
            tls_cert: None,
            grpc_socket: None,
            grpc_listen: None,
            grpc_view: "default".into(),
            tls_key: None,
            store: StoreConfig::default(),
            gomod: GomodConfig::default(),
            auth: crate::auth::AuthConfig::default(),
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

/// The store tree: a disk leaf, an S3 leaf, or a disk tier in front of S3.
///
/// ```toml
/// [store.disk]             # the original form, still the default
/// durability = "group"     # or "sync": fsync every blob before answering
/// sync_interval = "1s"     # group commit period
/// direct_io_above = "32MiB" # upload bytes past this offset bypass the page cache (default: never)
///
/// [store]                  # or: S3 (any S3-compatible service)
/// type = "s3"
/// bucket = "hoard"
/// prefix = "farm/"
/// region = "us-east-1"
/// endpoint = "http://127.0.0.1:9000"
/// path_style = true
///
/// [store]                  # or: a size-capped disk tier in front of S3
/// type = "tiered"
/// [store.fast]
/// type = "disk"
/// max_size = "200GiB"
/// [store.slow]
/// type = "s3"
/// bucket = "hoard"
/// ```
/// Every key is also `HOARD_STORE_<KEY>` (`HOARD_STORE_FAST_<KEY>`, `HOARD_STORE_SLOW_<KEY>`).
#[derive(Clone, Debug)]
pub enum StoreConfig {
    Disk(DiskConfig),
    S3(S3Config),
    Tiered { fast: FastConfig, slow: S3Config },
}

impl Default for StoreConfig {
    fn default() -> StoreConfig {
        StoreConfig::Disk(DiskConfig::default())
    }
}

impl<'de> Deserialize<'de> for StoreConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<StoreConfig, D::Error> {
        let table = toml::Table::deserialize(d)?;
        StoreConfig::from_table(table).map_err(serde::de::Error::custom)
    }
}

impl StoreConfig {
    /// `[store]` as written: `type = …` with the leaf's keys beside it, or the original
    /// `[store.disk]` table.
    fn from_table(mut t: toml::Table) -> Result<StoreConfig, String> {
        let kind = match t.remove("type") {
            Some(toml::Value::String(k)) => k,
            Some(other) => return Err(format!("store.type must be a string, not {other:?}")),
            None if t.len() == 1 && t.contains_key("disk") => {
                let disk = t
                    .remove("disk")
                    .unwrap_or(toml::Value::Table(Default::default()));
                return Ok(StoreConfig::Disk(leaf(disk, "store.disk")?));
            }
            None if t.is_empty() => return Ok(StoreConfig::default()),
            None => return Err(
                "[store] needs type = \"disk\", \"s3\" or \"tiered\" (or the [store.disk] form)"
                    .into(),
            ),
        };
        match kind.as_str() {
            "disk" => Ok(StoreConfig::Disk(leaf(toml::Value::Table(t), "store")?)),
            "s3" => Ok(StoreConfig::S3(leaf(toml::Value::Table(t), "store")?)),
            "tiered" => {
                let mut part = |name: &str, want: &str| -> Result<toml::Value, String> {
                    let mut sub = match t.remove(name) {
                        Some(toml::Value::Table(sub)) => sub,
                        Some(_) => return Err(format!("store.{name} must be a table")),
                        None => {
                            return Err(format!(
                                "a tiered store needs [store.{name}] with type = \"{want}\""
                            ))
                        }
                    };
                    match sub.remove("type") {
                        Some(toml::Value::String(k)) if k == want => {}
                        None => {}
                        Some(other) => {
                            return Err(format!(
                                "store.{name}.type must be \"{want}\" (got {other:?})"
                            ))
                        }
                    }
                    Ok(toml::Value::Table(sub))
                };
                let fast = leaf(part("fast", "disk")?, "store.fast")?;
                let slow = leaf(part("slow", "s3")?, "store.slow")?;
                if let Some(k) = t.keys().next() {
                    return Err(format!("unknown key store.{k} in a tiered store"));
                }
                Ok(StoreConfig::Tiered { fast, slow })
            }
            other => Err(format!(
                "unknown store type {other:?}: expected \"disk\", \"s3\" or \"tiered\""
            )),
        }
    }

    /// Applies `HOARD_STORE_*` variables (from `vars`) over the file's tree.
    fn with_env(self, vars: impl Iterator<Item = (String, String)>) -> Result<StoreConfig, String> {
        let mut set: Vec<(Option<&'static str>, String, String)> = Vec::new();
        for (k, v) in vars {
            let Some(rest) = k.strip_prefix("HOARD_STORE_") else {
                continue;
            };
            // HOARD_STORE_PATH is `--store-path`, handled with the flags.
            if rest == "PATH" {
                continue;
            }
            let (sub, key) = if let Some(r) = rest.strip_prefix("FAST_") {
                (Some("fast"), r)
            } else if let Some(r) = rest.strip_prefix("SLOW_") {
                (Some("slow"), r)
            } else {
                (None, rest)
            };
            set.push((sub, key.to_ascii_lowercase(), v));
        }
        if set.is_empty() {
            return Ok(self);
        }
        // A different type from the environment replaces the file's tree rather than mixing
        // two stores' keys.
        let retyped = set
            .iter()
            .any(|(sub, k, v)| sub.is_none() && k == "type" && v != self.kind());
        let mut t = if retyped {
            toml::Table::new()
        } else {
            self.to_table()
        };
        for (sub, key, v) in set {
            let value = match key.as_str() {
                "path_style" | "single_writer" => toml::Value::Boolean(
                    parse_bool(&v)
                        .map_err(|e| format!("HOARD_STORE_{}: {e}", key.to_ascii_uppercase()))?,
                ),
                "parallel_parts" | "retries" => toml::Value::Integer(v.parse().map_err(|_| {
                    format!(
                        "HOARD_STORE_{}: not a number: {v}",
                        key.to_ascii_uppercase()
                    )
                })?),
                _ => toml::Value::String(v),
            };
            match sub {
                None => {
                    t.insert(key, value);
                }
                Some(sub) => {
                    let entry = t
                        .entry(sub)
                        .or_insert_with(|| toml::Value::Table(Default::default()));
                    if let toml::Value::Table(st) = entry {
                        st.insert(key, value);
                    }
                }
            }
        }
        StoreConfig::from_table(t)
    }

    /// The tree back as a table (what environment overrides are applied to).
    fn to_table(&self) -> toml::Table {
        let mut t = toml::Table::new();
        match self {
            StoreConfig::Disk(d) => {
                t.insert("type".into(), "disk".into());
                d.fill(&mut t);
            }
            StoreConfig::S3(s) => {
                t.insert("type".into(), "s3".into());
                s.fill(&mut t);
            }
            StoreConfig::Tiered { fast, slow } => {
                t.insert("type".into(), "tiered".into());
                let mut f = toml::Table::new();
                fast.fill(&mut f);
                let mut sl = toml::Table::new();
                slow.fill(&mut sl);
                t.insert("fast".into(), toml::Value::Table(f));
                t.insert("slow".into(), toml::Value::Table(sl));
            }
        }
        t
    }

    pub fn kind(&self) -> &'static str {
        match self {
            StoreConfig::Disk(_) => "disk",
            StoreConfig::S3(_) => "s3",
            StoreConfig::Tiered { .. } => "tiered",
        }
    }

    /// The S3 leaf, where there is one.
    pub fn s3(&self) -> Option<&S3Config> {
        match self {
            StoreConfig::Disk(_) => None,
            StoreConfig::S3(s) | StoreConfig::Tiered { slow: s, .. } => Some(s),
        }
    }
}

fn leaf<T: serde::de::DeserializeOwned>(v: toml::Value, at: &str) -> Result<T, String> {
    v.try_into()
        .map_err(|e: toml::de::Error| format!("{at}: {}", e.message()))
}

fn parse_bool(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(format!("expected true or false, got {s:?}")),
    }
}

/// An S3 bucket (AWS S3 or any S3-compatible service).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    pub bucket: String,
    /// Prepended to every key hoard writes ("farm/" keeps hoard's objects under farm/).
    #[serde(default)]
    pub prefix: String,
    /// Unset: the standard AWS chain (AWS_REGION, profile), else us-east-1.
    #[serde(default)]
    pub region: Option<String>,
    /// Any S3-compatible service; unset: AWS.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`), which most S3-compatible services want.
    #[serde(default)]
    pub path_style: bool,
    /// Unset: the standard AWS credential chain (environment, profile, web identity, IMDS).
    #[serde(default)]
    pub access_key_id: Option<String>,
    #[serde(default)]
    pub secret_access_key: Option<String>,
    /// Part size of multipart uploads; blobs up to it go up in one PUT.
    #[serde(default = "S3Config::default_part_size")]
    pub part_size: HumanSize,
    /// Parts of one upload in flight at once.
    #[serde(default = "S3Config::default_parallel_parts")]
    pub parallel_parts: usize,
    /// Attempts of one S3 request (with exponential backoff) before hoard gives up on it.
    #[serde(default = "S3Config::default_retries")]
    pub retries: u32,
    /// One attempt of one S3 request (until its answer's headers) may take this long.
    #[serde(default = "S3Config::default_timeout")]
    pub timeout: HumanDuration,
    /// For an S3-compatible service that ignores conditional writes: run one hoard alone on
    /// the bucket (a writer lease keeps a second one out, as well as it can without them).
    /// Without this, hoard refuses such a service.
    #[serde(default)]
    pub single_writer: bool,
    /// How often each replica re-lists the bucket to catch what other replicas changed
    /// (listings, sizes, the collector's plan); reads never wait for it.
    #[serde(default = "S3Config::default_refresh_interval")]
    pub refresh_interval: HumanDuration,
    /// While other replicas are alive, the collector announces what it will delete this long
    /// before deleting it (they stop offering it, and ship the reads that may spare it).
    #[serde(default = "S3Config::default_delete_delay")]
    pub delete_delay: HumanDuration,
    /// Length of the garbage collector's lease: if its holder stops, another replica takes
    /// over this long (plus 5 s) after the last renewal, by the S3 service's clock.
    #[serde(default = "S3Config::default_gc_lease")]
    pub gc_lease: HumanDuration,
}

impl fmt::Debug for S3Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field("path_style", &self.path_style)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "…"),
            )
            .finish_non_exhaustive()
    }
}

impl S3Config {
    fn default_part_size() -> HumanSize {
        HumanSize(16 << 20)
    }
    fn default_parallel_parts() -> usize {
        4
    }
    fn default_retries() -> u32 {
        4
    }
    fn default_timeout() -> HumanDuration {
        HumanDuration(Duration::from_secs(30))
    }
    fn default_refresh_interval() -> HumanDuration {
        HumanDuration(Duration::from_secs(60))
    }
    fn default_delete_delay() -> HumanDuration {
        HumanDuration(Duration::from_secs(5))
    }
    fn default_gc_lease() -> HumanDuration {
        HumanDuration(Duration::from_secs(30))
    }

    /// How a replica paces its work with the bucket.
    pub fn timing(&self) -> crate::lifecycle::shared::Timing {
        crate::lifecycle::shared::Timing::new(
            self.refresh_interval.0,
            self.delete_delay.0,
            self.gc_lease.0,
            // Every attempt may run its full timeout, with at most 2 s of backoff between.
            (self.timeout.0 + Duration::from_secs(2)) * self.retries.max(1),
        )
    }

    fn fill(&self, t: &mut toml::Table) {
        t.insert("bucket".into(), self.bucket.clone().into());
        t.insert("prefix".into(), self.prefix.clone().into());
        for (k, v) in [
            ("region", &self.region),
            ("endpoint", &self.endpoint),
            ("access_key_id", &self.access_key_id),
            ("secret_access_key", &self.secret_access_key),
        ] {
            if let Some(v) = v {
                t.insert(k.into(), v.clone().into());
            }
        }
        t.insert("path_style".into(), self.path_style.into());
        t.insert("part_size".into(), (self.part_size.0 as i64).into());
        t.insert("parallel_parts".into(), (self.parallel_parts as i64).into());
        t.insert("retries".into(), (self.retries as i64).into());
        t.insert("timeout".into(), show_duration(self.timeout.0).into());
        t.insert("single_writer".into(), self.single_writer.into());
        t.insert(
            "refresh_interval".into(),
            show_duration(self.refresh_interval.0).into(),
        );
        t.insert(
            "delete_delay".into(),
            show_duration(self.delete_delay.0).into(),
        );
        t.insert("gc_lease".into(), show_duration(self.gc_lease.0).into());
    }

    /// Where the bucket is, for messages: "bucket hoard at http://127.0.0.1:9000".
    pub fn describe(&self) -> String {
        format!(
            "bucket {}{} at {}",
            self.bucket,
            if self.prefix.is_empty() {
                String::new()
            } else {
                format!(" (prefix {})", self.prefix)
            },
            self.endpoint.as_deref().unwrap_or("AWS S3")
        )
    }

    fn check(&self, at: &str) -> Result<(), String> {
        if self.bucket.is_empty() {
            return Err(format!("{at}.bucket must name a bucket"));
        }
        if self.access_key_id.is_some() != self.secret_access_key.is_some() {
            return Err(format!(
                "{at}: access_key_id and secret_access_key go together (or leave both unset \
                 for the standard AWS credential chain)"
            ));
        }
        if self.part_size.0 < 5 << 20 || self.part_size.0 > 5 << 30 {
            return Err(format!(
                "{at}.part_size must be between 5MiB and 5GiB (S3's multipart limits)"
            ));
        }
        if self.timeout.0.is_zero() {
            return Err(format!("{at}.timeout must be greater than zero"));
        }
        if self.refresh_interval.0 < Duration::from_secs(1) {
            return Err(format!("{at}.refresh_interval must be at least 1s"));
        }
        if self.gc_lease.0 < Duration::from_secs(3) {
            return Err(format!("{at}.gc_lease must be at least 3s"));
        }
        if self.parallel_parts == 0 || self.retries == 0 {
            return Err(format!(
                "{at}: parallel_parts and retries must be at least 1"
            ));
        }
        Ok(())
    }
}

/// The disk tier in front of S3: a bounded cache of blobs.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FastConfig {
    /// Defaults to `data_dir`/fast.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// The tier keeps at most this much; least recently used blobs leave it first (they stay
    /// in S3).
    pub max_size: HumanSize,
}

impl FastConfig {
    fn fill(&self, t: &mut toml::Table) {
        t.insert("type".into(), "disk".into());
        if let Some(p) = &self.path {
            t.insert("path".into(), p.display().to_string().into());
        }
        t.insert("max_size".into(), (self.max_size.0 as i64).into());
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiskConfig {
    /// Defaults to `data_dir`.
    pub path: Option<PathBuf>,
    pub durability: Durability,
    pub sync_interval: HumanDuration,
    /// Upload bytes past this offset are written with O_DIRECT (see store/io_thread.rs); unset,
    /// never.
    pub direct_io_above: Option<HumanSize>,
}

impl DiskConfig {
    fn fill(&self, t: &mut toml::Table) {
        if let Some(p) = &self.path {
            t.insert("path".into(), p.display().to_string().into());
        }
        let durability = match self.durability {
            Durability::Sync => "sync",
            Durability::Group => "group",
        };
        t.insert("durability".into(), durability.into());
        t.insert(
            "sync_interval".into(),
            show_duration(self.sync_interval.0).into(),
        );
        if let Some(d) = self.direct_io_above {
            t.insert("direct_io_above".into(), (d.0 as i64).into());
        }
    }

    pub fn direct_io_above(&self) -> u64 {
        self.direct_io_above
            .map_or(crate::store::disk::NO_DIRECT_IO, |s| s.0)
    }
}

impl Default for DiskConfig {
    fn default() -> DiskConfig {
        DiskConfig {
            path: None,
            durability: Durability::Group,
            sync_interval: HumanDuration(Duration::from_secs(1)),
            direct_io_above: None,
        }
    }
}

/// Overrides from flags and environment (clap merges the two); `None` leaves the file's value.
/// Grouped by who uses them, so each subcommand takes (and `--help` lists) only its own.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub common: CommonArgs,
    pub lifecycle: LifecycleArgs,
    pub serve: ServeFlags,
}

/// Where the store is and how to log: every subcommand that opens a data directory.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct CommonArgs {
    /// TOML configuration file.
    #[arg(long, env = "HOARD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory (default ./hoard-data).
    #[arg(long, env = "HOARD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Where the disk store (blobs and index) lives, if not in the data directory
    /// (store.disk.path).
    #[arg(long, env = "HOARD_STORE_PATH")]
    pub store_path: Option<PathBuf>,
    /// Log format.
    #[arg(long, env = "HOARD_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
}

/// The lifecycle policy: what a pass removes (`serve` and `gc`).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct LifecycleArgs {
    /// Bound on stored bytes, e.g. 50GiB (default: unbounded but for the disk).
    #[arg(long, env = "HOARD_MAX_SIZE", value_parser = parse_size)]
    pub max_size: Option<u64>,
    /// Share of max_size above which the least recently used roots are evicted, e.g. 90%.
    #[arg(long, env = "HOARD_HIGH_WATERMARK", value_parser = parse_fraction)]
    pub high_watermark: Option<f64>,
    /// Share of max_size eviction brings usage down to, e.g. 80%.
    #[arg(long, env = "HOARD_LOW_WATERMARK", value_parser = parse_fraction)]
    pub low_watermark: Option<f64>,
    /// Expire tags not pulled or pushed for this long, e.g. 14d (default: never).
    #[arg(long, env = "HOARD_TTL", value_parser = parse_duration)]
    pub ttl: Option<Duration>,
    /// Extra age before anything expires, covering clocks that disagree, e.g. 5m.
    #[arg(long, env = "HOARD_CLOCK_SKEW_TOLERANCE", value_parser = parse_duration)]
    pub clock_skew_tolerance: Option<Duration>,
    /// How long a pushed blob no tag reaches yet stays safe (an export in progress), e.g. 1h.
    #[arg(long, env = "HOARD_ORPHAN_GRACE", value_parser = parse_duration)]
    pub orphan_grace: Option<Duration>,
}

/// Settings only a serving daemon uses.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct ServeFlags {
    /// Address to serve HTTP on, e.g. 0.0.0.0:5000 (default 127.0.0.1:5000; port 0 = any).
    #[arg(long, env = "HOARD_LISTEN")]
    pub listen: Option<String>,
    /// `sync` fsyncs every blob before answering; `group` (default) fsyncs every sync interval.
    #[arg(long, env = "HOARD_DURABILITY", value_parser = parse_durability)]
    pub durability: Option<Durability>,
    /// Group commit period, e.g. 1s or 200ms.
    #[arg(long, env = "HOARD_SYNC_INTERVAL", value_parser = parse_duration)]
    pub sync_interval: Option<Duration>,
    /// Upload bytes past this offset bypass the page cache (O_DIRECT), e.g. 32MiB; at least
    /// 1MiB (default: never).
    #[arg(long, env = "HOARD_DIRECT_IO_ABOVE", value_parser = parse_size)]
    pub direct_io_above: Option<u64>,
    /// Idle upload sessions are dropped after this long, e.g. 1h.
    #[arg(long, env = "HOARD_UPLOAD_TIMEOUT", value_parser = parse_duration)]
    pub upload_timeout: Option<Duration>,
    /// How long shutdown waits for in-flight requests, e.g. 30s.
    #[arg(long, env = "HOARD_SHUTDOWN_TIMEOUT", value_parser = parse_duration)]
    pub shutdown_timeout: Option<Duration>,
    /// Period of the background lifecycle pass, e.g. 30s.
    #[arg(long, env = "HOARD_GC_INTERVAL", value_parser = parse_duration)]
    pub gc_interval: Option<Duration>,
    /// Blob transfers (pulls and upload bodies) served at once; past it, 503 with Retry-After
    /// (default 1024).
    #[arg(long, env = "HOARD_MAX_TRANSFERS")]
    pub max_transfers: Option<usize>,
    /// A request body that sends nothing for this long is cut off, e.g. 60s.
    #[arg(long, env = "HOARD_BODY_TIMEOUT", value_parser = parse_duration)]
    pub body_timeout: Option<Duration>,
    /// A client that reads nothing of a response for this long is disconnected, e.g. 60s.
    #[arg(long, env = "HOARD_SEND_TIMEOUT", value_parser = parse_duration)]
    pub send_timeout: Option<Duration>,
    /// One log line per request at info (true, the default, or false).
    #[arg(long, env = "HOARD_ACCESS_LOG", action = clap::ArgAction::Set)]
    pub access_log: Option<bool>,
    /// Serve HTTPS: the certificate chain, PEM (with --tls-key; reloaded on SIGHUP).
    #[arg(long, env = "HOARD_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The private key for --tls-cert, PEM.
    #[arg(long, env = "HOARD_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// The gRPC unix socket (default <data-dir>/hoard.sock; "none" for no socket).
    #[arg(long, env = "HOARD_GRPC_SOCKET")]
    pub grpc_socket: Option<PathBuf>,
    /// Also serve gRPC over TCP on this address, e.g. 0.0.0.0:5001.
    #[arg(long, env = "HOARD_GRPC_LISTEN")]
    pub grpc_listen: Option<String>,
    /// The content API's view for these listeners (default "default").
    #[arg(long, env = "HOARD_GRPC_VIEW")]
    pub grpc_view: Option<String>,
}

impl Config {
    /// The file (if any) with overrides applied.
    pub fn load(o: &Overrides) -> Result<Config, String> {
        let mut c = match &o.common.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        let (co, l, s) = (&o.common, &o.lifecycle, &o.serve);
        if let Some(v) = &co.data_dir {
            c.data_dir = v.clone();
        }
        if let Some(v) = co.log_format {
            c.log_format = v;
        }
        if let Some(v) = &s.listen {
            c.listen = v.clone();
        }
        if let Some(v) = s.upload_timeout {
            c.upload_timeout = HumanDuration(v);
        }
        if let Some(v) = s.shutdown_timeout {
            c.shutdown_timeout = HumanDuration(v);
        }
        if let Some(v) = s.gc_interval {
            c.gc_interval = HumanDuration(v);
        }
        if let Some(v) = s.max_transfers {
            c.max_transfers = v;
        }
        if let Some(v) = s.body_timeout {
            c.body_timeout = HumanDuration(v);
        }
        if let Some(v) = s.send_timeout {
            c.send_timeout = HumanDuration(v);
        }
        if let Some(v) = s.access_log {
            c.access_log = v;
        }
        if let Some(v) = &s.tls_cert {
            c.tls_cert = Some(v.clone());
        }
        if let Some(v) = &s.tls_key {
            c.tls_key = Some(v.clone());
        }
        if let Some(v) = &s.grpc_socket {
            c.grpc_socket = Some(v.clone());
        }
        if let Some(v) = &s.grpc_listen {
            c.grpc_listen = Some(v.clone());
        }
        if let Some(v) = &s.grpc_view {
            c.grpc_view = v.clone();
        }
        crate::containerd::check_identifier("grpc_view", &c.grpc_view).map_err(|e| e.message)?;
        if c.tls_cert.is_some() != c.tls_key.is_some() {
            return Err("tls_cert and tls_key go together: set both or neither".into());
        }
        if let Some(v) = l.max_size {
            c.max_size = Some(HumanSize(v));
        }
        if let Some(v) = l.high_watermark {
            c.high_watermark = Fraction(v);
        }
        if let Some(v) = l.low_watermark {
            c.low_watermark = Fraction(v);
        }
        if let Some(v) = l.ttl {
            c.ttl = Some(HumanDuration(v));
        }
        if let Some(v) = l.clock_skew_tolerance {
            c.clock_skew_tolerance = HumanDuration(v);
        }
        if let Some(v) = l.orphan_grace {
            c.orphan_grace = HumanDuration(v);
        }
        c.store = std::mem::take(&mut c.store).with_env(std::env::vars())?;
        c.gomod = std::mem::take(&mut c.gomod).with_env(std::env::vars())?;
        match &mut c.store {
            StoreConfig::Disk(disk) => {
                if let Some(v) = &co.store_path {
                    disk.path = Some(v.clone());
                }
                if let Some(v) = s.durability {
                    disk.durability = v;
                }
                if let Some(v) = s.sync_interval {
                    disk.sync_interval = HumanDuration(v);
                }
                if let Some(v) = s.direct_io_above {
                    disk.direct_io_above = Some(HumanSize(v));
                }
            }
            StoreConfig::Tiered { fast, .. } => {
                if let Some(v) = &co.store_path {
                    fast.path = Some(v.clone());
                }
            }
            StoreConfig::S3(_) => {}
        }
        c.check()?;
        Ok(c)
    }

    fn check(&self) -> Result<(), String> {
        let (hi, lo) = (self.high_watermark.0, self.low_watermark.0);
        if !(lo > 0.0 && lo < hi && hi <= 1.0) {
            return Err(format!(
                "watermarks must satisfy 0 < low_watermark < high_watermark <= 100% \
                 (got low {:.0}%, high {:.0}%)",
                lo * 100.0,
                hi * 100.0
            ));
        }
        if self.max_size.is_some_and(|m| m.0 == 0) {
            return Err("max_size must be greater than zero (leave it unset for no bound)".into());
        }
        if self.ttl.is_some_and(|t| t.0.is_zero()) {
            return Err("ttl must be greater than zero (leave it unset for no expiry)".into());
        }
        if self.gc_interval.0.is_zero() {
            return Err("gc_interval must be greater than zero".into());
        }
        if self.max_transfers == 0 {
            return Err("max_transfers must be at least 1".into());
        }
        if self.body_timeout.0.is_zero() || self.send_timeout.0.is_zero() {
            return Err("body_timeout and send_timeout must be greater than zero".into());
        }
        match &self.store {
            StoreConfig::S3(s3) => s3.check("store")?,
            StoreConfig::Tiered { fast, slow } => {
                slow.check("store.slow")?;
                if fast.max_size.0 == 0 {
                    return Err("store.fast.max_size must be greater than zero".into());
                }
            }
            StoreConfig::Disk(_) => {}
        }
        let (_, disk) = self.disk();
        if disk.sync_interval.0.is_zero() {
            return Err("sync_interval must be greater than zero".into());
        }
        if let Some(d) = disk.direct_io_above {
            if d.0 < crate::store::disk::MIN_DIRECT_IO {
                return Err(format!(
                    "direct_io_above must be at least 1MiB (got {} bytes): direct I/O runs on \
                     an upload's own I/O thread, and a smaller switch point would start one for \
                     nearly every upload",
                    d.0
                ));
            }
        }
        Ok(())
    }

    /// The lifecycle settings in the form the lifecycle code uses.
    pub fn policy(&self) -> crate::lifecycle::gc::Policy {
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        crate::lifecycle::gc::Policy {
            max_size: self.max_size.map(|m| m.0),
            high_watermark: self.high_watermark.0,
            low_watermark: self.low_watermark.0,
            ttl: self.ttl.map(|t| ms(t.0)),
            clock_skew_tolerance: ms(self.clock_skew_tolerance.0),
            orphan_grace: ms(self.orphan_grace.0),
        }
    }

    pub fn from_file(path: &Path) -> Result<Config, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading config {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("config {}: {e}", path.display()))
    }

    /// The local directory (the index, and blobs for a disk store) and the disk settings; with
    /// S3 the local directory is `data_dir` and the disk settings are the defaults.
    pub fn disk(&self) -> (PathBuf, &DiskConfig) {
        static DEFAULT: std::sync::OnceLock<DiskConfig> = std::sync::OnceLock::new();
        match &self.store {
            StoreConfig::Disk(d) => (d.path.clone().unwrap_or_else(|| self.data_dir.clone()), d),
            _ => (
                self.data_dir.clone(),
                DEFAULT.get_or_init(DiskConfig::default),
            ),
        }
    }
}

fn parse_durability(s: &str) -> Result<Durability, String> {
    match s {
        "sync" => Ok(Durability::Sync),
        "group" => Ok(Durability::Group),
        _ => Err(format!(
            "durability must be \"sync\" or \"group\", not {s:?}"
        )),
    }
}

/// A duration written as text ("1s", "250ms", "5m", "1h30m", "14d") or as plain seconds.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl fmt::Debug for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<HumanDuration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Secs(s) => Ok(HumanDuration(Duration::from_secs(s))),
            Raw::Text(t) => parse_duration(&t)
                .map(HumanDuration)
                .map_err(serde::de::Error::custom),
        }
    }
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let err = || format!("invalid duration {s:?}: write e.g. 500ms, 30s, 5m, 2h, 14d or 1h30m");
    if s.is_empty() {
        return Err(err());
    }
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
        if digits == 0 {
            return Err(err());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| err())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "d" => Duration::from_secs(n.saturating_mul(86_400)),
            "w" => Duration::from_secs(n.saturating_mul(7 * 86_400)),
            _ => return Err(err()),
        };
        total = total.saturating_add(part);
    }
    Ok(total)
}

/// A duration as the config file would write it: "1h", "1m30s", "250ms", "14d".
pub fn show_duration(d: Duration) -> String {
    let ms = d.as_millis() as u64;
    if ms == 0 {
        return "0s".into();
    }
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let mut left = ms / 1000;
    let mut out = String::new();
    for (unit, secs) in [("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)] {
        if left >= secs {
            out.push_str(&format!("{}{unit}", left / secs));
            left %= secs;
        }
    }
    out
}

/// A byte size in the config file: "50GiB" or a plain number of bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HumanSize(pub u64);

impl<'de> Deserialize<'de> for HumanSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<HumanSize, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(b) => Ok(HumanSize(b)),
            Raw::Text(t) => parse_size(&t)
                .map(HumanSize)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// A share: "90%" or 0.9.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fraction(pub f64);

impl<'de> Deserialize<'de> for Fraction {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Fraction, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(f64),
            Text(String),
        }
        let v = match Raw::deserialize(d)? {
            Raw::Number(n) => n,
            Raw::Text(t) => parse_fraction(&t).map_err(serde::de::Error::custom)?,
        };
        Ok(Fraction(v))
    }
}

pub fn parse_fraction(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let err = || format!("invalid share {s:?}: write e.g. 90% or 0.9");
    let v = match t.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map_err(|_| err())? / 100.0,
        None => t.parse::<f64>().map_err(|_| err())?,
    };
    if !(0.0..=1.0).contains(&v) {
        return Err(err());
    }
    Ok(v)
}

/// A signed offset ("+3h", "-90m", "2h") for the clock test hook.
pub fn parse_offset(s: &str) -> Result<i64, String> {
    let t = s.trim();
    let (neg, rest) = match t.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let ms = i64::try_from(parse_duration(rest)?.as_millis()).map_err(|e| e.to_string())?;
    Ok(if neg { -ms } else { ms })
}

/// A byte size written as text ("50GiB", "512MiB", "10GB", "4096") or as a plain number.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let err = || format!("invalid size {s:?}: write e.g. 4096, 512MiB, 50GiB or 10GB");
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num.parse().map_err(|_| err())?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1000,
        "MB" => 1000u64.pow(2),
        "GB" => 1000u64.pow(3),
        "TB" => 1000u64.pow(4),
        "KiB" | "K" | "k" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        "TiB" | "T" => 1 << 40,
        _ => return Err(err()),
    };
    if !num.is_finite() || num < 0.0 {
        return Err(err());
    }
    Ok((num * mult as f64) as u64)
}

/// The settings in effect, for `hoard check-config`: every key, secrets masked (`[auth]` is
/// described by `Auth::describe`).
pub fn effective(c: &Config) -> String {
    let mut shown = c.clone();
    shown.auth = crate::auth::AuthConfig::default();
    let text = format!("{shown:#?}\n");
    text.replace("    auth: AuthConfig {\n        tokens: [],\n        tokens_file: None,\n        anonymous: [],\n        service: None,\n        realm: None,\n        token_ttl: None,\n        signing_key_file: None,\n    },\n", "")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(
            parse_duration("14d").unwrap(),
            Duration::from_secs(14 * 86400)
        );
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        for bad in ["", "s", "1x", "-1s", "1.5s", "m5"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations_show_as_written() {
        for (d, text) in [
            (3600, "1h"),
            (90, "1m30s"),
            (14 * 86400, "14d"),
            (30, "30s"),
        ] {
            assert_eq!(show_duration(Duration::from_secs(d)), text);
            assert_eq!(parse_duration(text).unwrap(), Duration::from_secs(d));
        }
        assert_eq!(show_duration(Duration::from_millis(250)), "250ms");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("50GiB").unwrap(), 50 << 30);
        assert_eq!(parse_size("10GB").unwrap(), 10_000_000_000);
        assert_eq!(parse_size("1.5MiB").unwrap(), 3 << 19);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("12 parsecs").is_err());
    }

    #[test]
    fn file_rejects_unknown_keys_and_reads_the_store_tree() {
        let c: Config = toml::from_str(
            "listen = \"0.0.0.0:5001\"\n[store.disk]\ndurability = \"sync\"\nsync_interval = \"200ms\"\n\
             direct_io_above = \"64MiB\"\n",
        )
        .unwrap();
        assert_eq!(c.listen, "0.0.0.0:5001");
        let (_, d) = c.disk();
        assert_eq!(d.durability, Durability::Sync);
        assert_eq!(d.sync_interval.0, Duration::from_millis(200));
        assert_eq!(d.direct_io_above(), 64 << 20);
        let defaults = Config::default();
        assert_eq!(defaults.disk().1.direct_io_above(), u64::MAX);
        assert!(toml::from_str::<Config>("lisen = \"x\"").is_err());
        assert!(toml::from_str::<Config>("[store.disk]\nfoo = 1").is_err());
    }

    #[test]
    fn lifecycle_keys() {
        let c: Config = toml::from_str(
            "max_size = \"50GiB\"\nhigh_watermark = \"95%\"\nlow_watermark = 0.5\nttl = \"14d\"\n\
             clock_skew_tolerance = \"10m\"\norphan_grace = \"2h\"\n",
        )
        .unwrap();
        let p = c.policy();
        assert_eq!(p.max_size, Some(50 << 30));
        assert_eq!(p.high_watermark, 0.95);
        assert_eq!(p.low_watermark, 0.5);
        assert_eq!(p.ttl, Some(14 * 86_400_000));
        assert_eq!(p.clock_skew_tolerance, 600_000);
        assert_eq!(p.orphan_grace, 7_200_000);
        assert!(c.check().is_ok());
        let bad: Config = toml::from_str("high_watermark = 0.5\nlow_watermark = 0.8").unwrap();
        assert!(bad.check().is_err());
        assert_eq!(parse_offset("-3h").unwrap(), -10_800_000);
        assert_eq!(parse_offset("+90m").unwrap(), 5_400_000);
        assert!(parse_fraction("120%").is_err());
    }
}
