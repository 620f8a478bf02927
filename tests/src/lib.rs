//! Harness for end-to-end tests: builds the real `ulm-server` binary, starts it
//! on a free local port with the demo model and a temporary data directory,
//! and stops it (gracefully or with SIGKILL).
//!
//! With `ULM_TEST_DATABASE_URL=postgres://...` every server gets a fresh
//! PostgreSQL database instead of SQLite, so the same tests cover both.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};

pub const USER_KEY: &str = "user-key-0123456789abcdef";
pub const ADMIN_KEY: &str = "admin-key-0123456789abcdef";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The JSON values of a JSONL file, one per line.
pub fn jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Runs an offline command of the server binary (`corl`, `train`, ...)
/// without the environment's model and with quiet logs; returns what it
/// printed, after checking it succeeded.
pub fn run_command<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> String {
    let output = Command::new(server_binary())
        .args(args)
        .env("RUST_LOG", "warn")
        .env_remove("ULM_MODEL")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Builds the server binary once per test process and returns its path.
pub fn server_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| build_binary("ulm-server", "ulm-server"))
        .clone()
}

/// Builds the live-loop player once per test process and returns its path.
pub fn live_loop_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| build_binary("ulm-load", "ulm-live-loop"))
        .clone()
}

fn build_binary(package: &str, bin: &str) -> PathBuf {
    let status = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "-p", package, "--bin", bin])
        .current_dir(workspace_root())
        .status()
        .expect("running cargo build");
    assert!(status.success(), "building {bin} failed");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    target.join("debug").join(bin)
}

/// A fresh database URL when the tests run against PostgreSQL.
pub async fn fresh_database() -> Option<String> {
    let base = std::env::var("ULM_TEST_DATABASE_URL").ok()?;
    let name = format!("ulm_test_{}", uuid::Uuid::new_v4().simple());
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&base)
        .await
        .expect("connecting to ULM_TEST_DATABASE_URL");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .expect("creating a test database");
    let (prefix, _) = base.rsplit_once('/').expect("database URL has a path");
    Some(format!("{prefix}/{name}"))
}

pub struct Server {
    child: Option<Child>,
    /// `serve` or `worker`.
    command: &'static str,
    /// Environment variables the process gets beyond the test's.
    env: Vec<(String, String)>,
    pub base: String,
    pub data_dir: PathBuf,
    pub database_url: Option<String>,
    args: Vec<String>,
    /// Serve the instant random demo model (`--demo`), not the default.
    demo: bool,
    _tmp: Option<tempfile::TempDir>,
    pub http: reqwest::Client,
    pub key: Option<String>,
}

impl Server {
    /// Demo model, no auth, temporary data directory.
    pub async fn start() -> Server {
        Self::start_with(&["--no-auth"]).await
    }

    /// The demo model unless `args` name a `--model`.
    pub async fn start_with(args: &[&str]) -> Server {
        Self::start_serving(args, !args.contains(&"--model")).await
    }

    /// What `serve` runs with no model named: the built-in world model.
    pub async fn start_default(args: &[&str]) -> Server {
        Self::start_serving(args, false).await
    }

    async fn start_serving(args: &[&str], demo: bool) -> Server {
        Self::launch("serve", args, demo, fresh_database().await, &[])
    }

    /// One process of several sharing `database_url` (the demo model, its
    /// own data directory): `command` is `serve` or `worker`.
    pub fn start_sharing(
        command: &'static str,
        args: &[&str],
        database_url: &str,
        env: &[(&str, &str)],
    ) -> Server {
        Self::launch(command, args, true, Some(database_url.to_string()), env)
    }

    fn launch(
        command: &'static str,
        args: &[&str],
        demo: bool,
        database_url: Option<String>,
        env: &[(&str, &str)],
    ) -> Server {
        let tmp = tempfile::tempdir().expect("temp dir");
        let data_dir = tmp.path().to_path_buf();
        let mut server = Server {
            child: None,
            command,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            base: String::new(),
            data_dir,
            database_url,
            args: args.iter().map(|s| s.to_string()).collect(),
            demo,
            _tmp: Some(tmp),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(120))
                .build()
                .unwrap(),
            key: None,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(server_binary());
        cmd.arg(self.command)
            .args(["--port", "0", "--data-dir"])
            .arg(&self.data_dir);
        if self.demo {
            cmd.arg("--demo");
        }
        cmd.args(&self.args);
        if let Some(url) = &self.database_url {
            cmd.args(["--database-url", url]);
        }
        for var in [
            "ULM_MODEL",
            "ULM_DEMO",
            "ULM_API_KEYS",
            "ULM_API_KEYS_FILE",
            "ULM_NO_AUTH",
            "ULM_CONFIG",
        ] {
            cmd.env_remove(var);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        let mut child = cmd
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting ulm-server");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let base = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(addr) = line.strip_prefix("listening on ") {
                        break addr.trim().to_string();
                    }
                }
                _ => panic!("ulm-server exited before listening"),
            }
        };
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        self.base = base;
        self.child = Some(child);
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn authed(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.key {
            Some(k) => rb.bearer_auth(k),
            None => rb,
        }
    }

    /// Sends with the test's key; the body as JSON, or as a JSON string when it is not JSON.
    async fn send(&self, request: reqwest::RequestBuilder) -> (u16, Value) {
        let resp = self.authed(request).send().await.expect("request");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.send(self.http.post(self.url(path)).json(body)).await
    }

    pub async fn post_raw(&self, path: &str, body: Vec<u8>, content_type: &str) -> (u16, Value) {
        let request = self
            .http
            .post(self.url(path))
            .header("content-type", content_type)
            .body(body);
        self.send(request).await
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.send(self.http.get(self.url(path))).await
    }

    pub async fn get_bytes(&self, path: &str) -> (u16, Vec<u8>) {
        let resp = self
            .authed(self.http.get(self.url(path)))
            .send()
            .await
            .expect("request");
        (
            resp.status().as_u16(),
            resp.bytes().await.unwrap_or_default().to_vec(),
        )
    }

    /// The one version `/v1/models` marks active.
    pub async fn active_version(&self) -> String {
        let (status, models) = self.get("/v1/models").await;
        assert_eq!(status, 200, "{models}");
        let active: Vec<&Value> = models["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["active"] == true)
            .collect();
        assert_eq!(active.len(), 1, "{models}");
        active[0]["id"].as_str().unwrap().to_string()
    }

    /// Polls a job until `done` holds for it (ten minutes at most).
    pub async fn wait_job(&self, id: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(600);
        loop {
            let (status, job) = self.get(&format!("/v1/rl/jobs/{id}")).await;
            assert_eq!(status, 200, "{job}");
            if done(&job) {
                return job;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "job {id} stuck: {job}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// SIGTERM and wait: in-flight requests finish.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again on the same data directory and database.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// For a test that needs something this machine may lack: says it is
/// skipped, or fails when `required_by` (set in CI) is set.
pub fn skip_unless_required(required_by: &str, why: &str) {
    assert!(
        std::env::var_os(required_by).is_none(),
        "{required_by} is set but {why}"
    );
    eprintln!("skipped: {why}");
}

/// Whether a job has ended, whichever way.
pub fn job_finished(job: &Value) -> bool {
    ["promoted", "rejected", "failed", "cancelled"].contains(&job["status"].as_str().unwrap())
}

/// A small PNG image, base64.
pub fn png_base64(w: u32, h: u32) -> String {
    let img =
        image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 9) as u8, (y * 5) as u8, 128]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    base64::engine::general_purpose::STANDARD.encode(out.into_inner())
}

pub fn answer_body(n: u32) -> Value {
    json!({"image": png_base64(40, 30), "question": "What is in the picture?", "n": n, "max_new_tokens": 8, "seed": 1})
}

/// The favoured property on the demo model: the share of ASCII letters.
pub fn letter_share(text: &str) -> f64 {
    let total = text.chars().count().max(1);
    text.chars().filter(|c| c.is_ascii_alphabetic()).count() as f64 / total as f64
}

/// What one round of serving produced.
pub struct Round {
    pub mean_share: f64,
    pub versions: Vec<String>,
    pub texts: Vec<String>,
    pub sample_ids: Vec<String>,
}

/// `requests` questions (fixed seeds, so a round is reproducible on one
/// version), 8 answers each; with `rate`, every answer gets its letter share
/// as feedback.
pub async fn serve_round(server: &Server, requests: usize, rate: bool) -> Round {
    let mut round = Round {
        mean_share: 0.0,
        versions: Vec::new(),
        texts: Vec::new(),
        sample_ids: Vec::new(),
    };
    for i in 0..requests {
        let body = json!({
            "image": png_base64(32 + i as u32, 24), "question": format!("What is in picture {i}?"),
            "n": 8, "max_new_tokens": 6, "temperature": 1.0, "seed": 1000 * i,
        });
        let (status, answer) = server.post("/v1/answer", &body).await;
        assert_eq!(status, 200, "{answer}");
        round
            .versions
            .push(answer["model_version"].as_str().unwrap().to_string());
        for sample in answer["samples"].as_array().unwrap() {
            let text = sample["text"].as_str().unwrap().to_string();
            let id = sample["sample_id"].as_str().unwrap().to_string();
            if rate {
                let feedback =
                    json!({"sample_id": id, "key": "letters", "score": letter_share(&text)});
                let (status, body) = server.post("/v1/feedback", &feedback).await;
                assert_eq!(status, 201, "{body}");
            }
            round.mean_share += letter_share(&text);
            round.texts.push(text);
            round.sample_ids.push(id);
        }
    }
    round.mean_share /= round.texts.len() as f64;
    round.versions.dedup();
    round
}

pub async fn start_job(server: &Server, config: Value) -> String {
    let (status, job) = server.post("/v1/rl/jobs", &config).await;
    assert_eq!(status, 202, "{job}");
    assert_eq!(job["status"], "queued");
    job["id"].as_str().unwrap().to_string()
}
