//! `ulm-server serve`: configuration (flags > environment > config file >
//! defaults), start-up, and graceful shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use serde::Deserialize;

use crate::api::auth::Auth;
use crate::api::limits::Limits;
use crate::api::{operations_router, router, AppState};
use crate::listen::serve_connections;
use ulm_core::engine::{Batching, Engine, EngineConfig};
use ulm_core::registry::Registry;
use ulm_core::scheduler::config::JobConfig;
use ulm_core::scheduler::{Scheduler, SchedulerConfig, SchedulerRole};
use ulm_core::store::Store;
use ulm_model::bundle::{ModelBundle, ModelChoice};

/// [`Batching`] as an option.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BatchingMode {
    Continuous,
    Static,
}

/// Every option of `serve`. Each can also come from the environment
/// (`ULM_<NAME>`) or from the TOML file given by `--config` (same names, snake_case).
#[derive(Args, Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeArgs {
    /// TOML file with any of these options.
    #[arg(long, env = "ULM_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1].
    #[arg(long, env = "ULM_HOST")]
    pub host: Option<String>,
    /// Port; 0 picks a free one [default: 8080].
    #[arg(long, env = "ULM_PORT")]
    pub port: Option<u16>,
    /// Directory for the SQLite database and images [default: ./data].
    #[arg(long, env = "ULM_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Checkpoint directory; absent: the built-in world model.
    #[arg(long, env = "ULM_MODEL")]
    pub model: Option<PathBuf>,
    /// Serve the built-in random demo model instead (instant, for tests).
    #[arg(long, env = "ULM_DEMO")]
    #[serde(default)]
    pub demo: bool,
    /// postgres://... to use PostgreSQL instead of SQLite.
    #[arg(long, env = "ULM_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Serve without authentication (local use only).
    #[arg(long, env = "ULM_NO_AUTH")]
    #[serde(default)]
    pub no_auth: bool,
    /// File of API keys, one `role:key` per line (roles: user, admin).
    #[arg(long, env = "ULM_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// API keys inline, `role:key,role:key`.
    #[arg(long, env = "ULM_API_KEYS", hide_env_values = true)]
    pub api_keys: Option<String>,
    /// cpu, cuda or cuda:N [default: cpu].
    #[arg(long, env = "ULM_DEVICE")]
    pub device: Option<String>,
    /// f32, bf16 or f16 [default: f32].
    #[arg(long, env = "ULM_DTYPE")]
    pub dtype: Option<String>,
    /// Requests waiting for the model, at most [default: 64].
    #[arg(long, env = "ULM_MAX_QUEUE")]
    pub max_queue: Option<usize>,
    /// Samples or images computed together, at most [default: 32].
    #[arg(long, env = "ULM_MAX_BATCH_ROWS")]
    pub max_batch_rows: Option<usize>,
    /// How long an idle model waits to batch requests, ms [default: 5].
    #[arg(long, env = "ULM_BATCH_WINDOW_MS")]
    pub batch_window_ms: Option<u64>,
    /// When waiting requests join the model's batch: `continuous` (between
    /// any two decode steps) or `static` (only when nothing runs; for
    /// comparison) [default: continuous].
    #[arg(long, env = "ULM_BATCHING", value_enum)]
    pub batching: Option<BatchingMode>,
    /// Time a request may take, queueing included, seconds [default: 300].
    #[arg(long, env = "ULM_REQUEST_TIMEOUT_SECS")]
    pub request_timeout_secs: Option<u64>,
    /// A connection that sends no complete request head within this many
    /// seconds is closed, idle keep-alive connections included [default: 30].
    #[arg(long, env = "ULM_HEADER_TIMEOUT_SECS")]
    pub header_timeout_secs: Option<u64>,
    /// A request body that sends nothing for this many seconds is refused
    /// (408) [default: 30].
    #[arg(long, env = "ULM_BODY_TIMEOUT_SECS")]
    pub body_timeout_secs: Option<u64>,
    /// Largest request body, bytes [default: 16 MiB].
    #[arg(long, env = "ULM_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Largest input image, pixels [default: 16,777,216 (4096 x 4096)].
    #[arg(long, env = "ULM_MAX_IMAGE_PIXELS")]
    pub max_image_pixels: Option<u64>,
    /// Input images decoded at once [default: 2].
    #[arg(long, env = "ULM_MAX_CONCURRENT_DECODES")]
    pub max_concurrent_decodes: Option<usize>,
    /// Start a refinement job when this many seconds passed since the last
    /// one [default: no timer].
    #[arg(long, env = "ULM_RL_INTERVAL_SECS")]
    pub rl_interval_secs: Option<u64>,
    /// Start a refinement job when this many feedback items arrived since
    /// the last one [default: no feedback trigger].
    #[arg(long, env = "ULM_RL_MIN_NEW_FEEDBACK")]
    pub rl_min_new_feedback: Option<u64>,
    /// JSON configuration of the jobs the triggers start (the body of
    /// `POST /v1/rl/jobs`) [default: `{}`].
    #[arg(long, env = "ULM_RL_JOB_CONFIG")]
    pub rl_job_config: Option<String>,
    /// Share of rated requests held out to evaluate candidates [default: 0.2].
    #[arg(long, env = "ULM_RL_HOLDOUT_FRACTION")]
    pub rl_holdout_fraction: Option<f64>,
    /// Run no RL jobs in this process: no triggers, and jobs queued through
    /// the API wait for a worker (`ulm-server worker`) or another replica
    /// that runs them.
    #[arg(long, env = "ULM_NO_RL_SCHEDULER")]
    #[serde(default)]
    pub no_rl_scheduler: bool,
    /// Where images and adapters are stored: `s3://bucket/prefix` for an
    /// S3-compatible service shared by several machines (endpoint, region
    /// and credentials from the `AWS_*` environment variables)
    /// [default: files under the data directory].
    #[arg(long, env = "ULM_BLOB_URL")]
    pub blob_url: Option<String>,
    /// How often the active version is read from the database, so that a
    /// promotion or activation made by another process is served here, ms
    /// [default: 1000].
    #[arg(long, env = "ULM_VERSION_POLL_MS")]
    pub version_poll_ms: Option<u64>,
    /// A running job whose worker renewed nothing for this long is marked
    /// failed, seconds [default: 30].
    #[arg(long, env = "ULM_RL_JOB_LEASE_SECS")]
    pub rl_job_lease_secs: Option<u64>,
}

/// What the process does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The HTTP API (and, unless `--no-rl-scheduler`, RL jobs).
    Serve,
    /// RL jobs only; HTTP answers health and metrics.
    Worker,
}

macro_rules! merge_fields {
    ($into:ident, $from:ident, $($field:ident),*) => {
        $( if $into.$field.is_none() { $into.$field = $from.$field.clone(); } )*
    };
}

impl ServeArgs {
    /// Fills options not given on the command line or environment from the file.
    pub fn with_file(mut self) -> Result<Self> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let file: ServeArgs =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        merge_fields!(
            self,
            file,
            host,
            port,
            data_dir,
            model,
            database_url,
            api_keys_file,
            api_keys,
            device,
            dtype,
            max_queue,
            max_batch_rows,
            batch_window_ms,
            batching,
            request_timeout_secs,
            max_body_bytes,
            max_image_pixels,
            max_concurrent_decodes,
            header_timeout_secs,
            body_timeout_secs,
            rl_interval_secs,
            rl_min_new_feedback,
            rl_job_config,
            rl_holdout_fraction,
            blob_url,
            version_poll_ms,
            rl_job_lease_secs
        );
        self.no_auth |= file.no_auth;
        self.demo |= file.demo;
        self.no_rl_scheduler |= file.no_rl_scheduler;
        Ok(self)
    }

    fn auth(&self) -> Result<Auth> {
        let keys = match (&self.api_keys_file, &self.api_keys) {
            (Some(file), _) => Some(Auth::from_file(file).map_err(anyhow::Error::msg)?),
            (None, Some(inline)) => Some(Auth::parse(inline).map_err(anyhow::Error::msg)?),
            (None, None) => None,
        };
        match (keys, self.no_auth) {
            (Some(_), true) => bail!("give either API keys or --no-auth, not both"),
            (Some(keys), false) => Ok(keys),
            (None, true) => Ok(Auth::Disabled),
            (None, false) => bail!(
                "no API keys: pass --api-keys-file FILE (lines of role:key) or --api-keys, or --no-auth for local use"
            ),
        }
    }

    fn scheduler(&self) -> Result<SchedulerConfig> {
        let defaults = SchedulerConfig::default();
        let holdout = self
            .rl_holdout_fraction
            .unwrap_or(defaults.holdout_fraction);
        if !(0.0..1.0).contains(&holdout) || holdout.is_nan() {
            bail!("--rl-holdout-fraction must be at least 0 and below 1");
        }
        if self.rl_interval_secs == Some(0) || self.rl_min_new_feedback == Some(0) {
            bail!("--rl-interval-secs and --rl-min-new-feedback must be positive");
        }
        if self.rl_job_lease_secs == Some(0) || self.version_poll_ms == Some(0) {
            bail!("--rl-job-lease-secs and --version-poll-ms must be positive");
        }
        let job_defaults: JobConfig = match &self.rl_job_config {
            Some(json) => serde_json::from_str(json).context("--rl-job-config")?,
            None => JobConfig::default(),
        };
        job_defaults
            .validate()
            .map_err(|e| anyhow::anyhow!("--rl-job-config: {e}"))?;
        Ok(SchedulerConfig {
            interval: self.rl_interval_secs.map(Duration::from_secs),
            min_new_feedback: self.rl_min_new_feedback,
            holdout_fraction: holdout,
            job_defaults,
            lease: self
                .rl_job_lease_secs
                .map_or(defaults.lease, Duration::from_secs),
            ..defaults
        })
    }

    fn limits(&self) -> Limits {
        let mut limits = Limits::default();
        if let Some(v) = self.max_body_bytes {
            limits.max_body_bytes = v;
            limits.max_image_bytes = limits.max_image_bytes.min(v);
        }
        if let Some(v) = self.max_image_pixels {
            limits.max_image_pixels = v;
        }
        if let Some(v) = self.body_timeout_secs {
            limits.body_timeout = Duration::from_secs(v.max(1));
        }
        if let Some(v) = self.max_concurrent_decodes {
            limits.max_concurrent_decodes = v.max(1);
        }
        if let Some(v) = self.request_timeout_secs {
            limits.request_timeout = Duration::from_secs(v);
        }
        limits
    }
}

pub async fn serve(args: ServeArgs, role: Role) -> Result<()> {
    let args = args.with_file()?;
    let auth = match role {
        Role::Serve => args.auth()?,
        // Health and metrics are public; a worker serves nothing else.
        Role::Worker => Auth::Disabled,
    };
    if role == Role::Worker && args.no_rl_scheduler {
        bail!("a worker runs RL jobs: --no-rl-scheduler makes no sense here");
    }
    let scheduler_config = args.scheduler()?;
    let blobs = args
        .blob_url
        .as_deref()
        .map(crate::s3::open)
        .transpose()
        .context("--blob-url")?;
    if role == Role::Serve && matches!(auth, Auth::Disabled) {
        tracing::warn!("authentication is disabled (--no-auth): every client is admin");
    }
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("data"));
    let metrics = PrometheusBuilder::new()
        .set_buckets(&[
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
        ])?
        .set_buckets_for_metric(
            Matcher::Full("ulm_batch_rows".into()),
            &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0],
        )?
        .install_recorder()
        .context("installing the metrics recorder")?;
    let store = Store::open(&data_dir, args.database_url.as_deref(), blobs)
        .await
        .context("opening the database")?;
    // A wrong bucket, endpoint or key is a start-up error, not a failure of
    // the first request that stores an image.
    store
        .blobs()
        .list("adapters")
        .await
        .with_context(|| format!("reaching the blob store {}", store.blobs().describe()))?;
    tracing::info!(blobs = %store.blobs().describe(), "blob storage");
    let bundle = load_model(&args).await?;
    tracing::info!("model: {}", bundle.describe());
    if bundle.is_demo() {
        eprintln!("NOTE: serving the built-in demo model (--demo): its images are noise and its answers nonsense");
    }
    let version = if bundle.is_demo() {
        "demo-base"
    } else {
        "base"
    }
    .to_string();
    metrics::gauge!("ulm_model_info", "version" => version.clone(), "demo" => bundle.is_demo().to_string()).set(1.0);
    let defaults = EngineConfig::default();
    let engine_config = EngineConfig {
        max_queue: args.max_queue.unwrap_or(defaults.max_queue),
        max_batch_rows: args.max_batch_rows.unwrap_or(defaults.max_batch_rows),
        batch_window: args
            .batch_window_ms
            .map_or(defaults.batch_window, Duration::from_millis),
        batching: match args.batching {
            Some(BatchingMode::Static) => Batching::Static,
            Some(BatchingMode::Continuous) => Batching::Continuous,
            None => defaults.batching,
        },
    };
    // The registry keeps the base weights; versions and the trainer share them.
    let base = bundle.clone();
    let engine = Engine::start(bundle, version.clone(), engine_config);
    let registry = Registry::open(store.clone(), engine.clone(), base, version, &data_dir)
        .await
        .context("opening the model registry")?;
    tracing::info!(version = %engine.model_version(), "serving model version");
    let poll = Duration::from_millis(args.version_poll_ms.unwrap_or(1000));
    let follower = registry.follow(poll);
    let scheduler = Scheduler::new(
        store.clone(),
        registry.clone(),
        scheduler_config,
        data_dir.join("jobs"),
    );
    let runs_jobs = role == Role::Worker || !args.no_rl_scheduler;
    let scheduler_task = scheduler.spawn(if runs_jobs {
        SchedulerRole::RunJobs
    } else {
        SchedulerRole::WatchLeases
    });
    tracing::info!(worker = scheduler.worker(), runs_jobs, "RL scheduler");
    let limits = args.limits();
    let header_timeout = Duration::from_secs(args.header_timeout_secs.unwrap_or(30).max(1));
    let state = AppState {
        engine,
        store: store.clone(),
        decode_slots: Arc::new(tokio::sync::Semaphore::new(limits.max_concurrent_decodes)),
        limits: Arc::new(limits),
        metrics,
        registry,
        scheduler: scheduler.clone(),
    };
    let host = args.host.clone().unwrap_or_else(|| "127.0.0.1".into());
    let addr: SocketAddr = format!("{host}:{}", args.port.unwrap_or(8080))
        .parse()
        .with_context(|| format!("invalid listen address {host}"))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let local = listener.local_addr()?;
    // Tests and scripts read this line to find the port.
    println!("listening on http://{local}");
    tracing::info!(%local, data_dir = %data_dir.display(), "serving");
    let app = match role {
        Role::Serve => router(state, auth),
        Role::Worker => operations_router(state),
    };
    serve_connections(listener, app, header_timeout, shutdown_signal()).await;
    tracing::info!("in-flight requests finished; shutting down");
    follower.abort();
    scheduler.stop();
    // A running job stops at its next step and is recorded as cancelled.
    if tokio::time::timeout(Duration::from_secs(60), scheduler_task)
        .await
        .is_err()
    {
        tracing::warn!("the running job did not stop within 60 s; it fails when its lease lapses");
    }
    store.close().await;
    Ok(())
}

async fn load_model(args: &ServeArgs) -> Result<ModelBundle> {
    let device = args.device.clone().unwrap_or_else(|| "cpu".into());
    let dtype = args.dtype.clone().unwrap_or_else(|| "f32".into());
    let choice = ModelChoice::from_args(args.model.as_deref(), args.demo)?;
    tokio::task::spawn_blocking(move || ModelBundle::open_named(&choice, &device, &dtype))
        .await?
        .context("loading the model")
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
    tracing::info!("shutdown signal received; finishing in-flight requests");
}
