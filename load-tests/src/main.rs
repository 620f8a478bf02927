//! Load generator for the ULM-R1 server. Sends answer, generate and feedback
//! requests (or a mix) at a fixed concurrency, bounded in time and count,
//! to a loopback address only. Prints throughput, latency percentiles and
//! error counts, writes a JSON report, and checks afterwards that every
//! acknowledged feedback item is stored.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use clap::{Parser, ValueEnum};
use serde::Serialize;
use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Scenario {
    Answer,
    Generate,
    Feedback,
    /// 40% answer, 20% generate, 40% feedback.
    Mix,
    /// What a serving benchmark mixes: half short answers (8 tokens), a
    /// quarter long answers (64 tokens), a quarter images; one sample each.
    Serving,
}

#[derive(Parser, Debug)]
#[command(
    name = "ulm-load",
    about = "Load generator for the ULM-R1 server (loopback only)"
)]
struct Args {
    /// Server base URL; must be a loopback address.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    #[arg(long, value_enum, default_value = "mix")]
    scenario: Scenario,
    /// Requests in flight at once (closed loop: each sender waits for its
    /// answer before sending again).
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Open loop instead: this many requests per second arrive, answered or
    /// not (`--concurrency` is then unused).
    #[arg(long)]
    arrival_rate: Option<f64>,
    /// How long to send requests, seconds.
    #[arg(long, default_value_t = 30)]
    duration: u64,
    /// Stop after this many requests in total.
    #[arg(long, default_value_t = 100_000)]
    max_requests: u64,
    #[arg(long, env = "ULM_LOAD_API_KEY")]
    api_key: Option<String>,
    /// Server process id, to sample its resident memory.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Where to write the JSON report.
    #[arg(long, default_value = "load-report.json")]
    report: String,
    /// Benchmark serving while an RL job trains: run the scenario once idle,
    /// then again while a job (this JSON config, admin key needed unless the
    /// server runs --no-auth) trains, and report the latency ratios.
    #[arg(long)]
    while_training: Option<String>,
}

/// Only loopback targets: 127.0.0.0/8, localhost, [::1].
fn check_local(url: &str) -> Result<()> {
    let parsed = reqwest::Url::parse(url).context("invalid --url")?;
    let host = parsed.host_str().unwrap_or_default();
    let local = host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !local {
        bail!("refusing to load-test {url}: only loopback addresses (127.0.0.0/8, localhost, [::1]) are allowed");
    }
    Ok(())
}

#[derive(Default)]
struct Stats {
    latencies_ms: Vec<f64>,
    statuses: BTreeMap<String, u64>,
}

#[derive(Serialize)]
struct OpReport {
    requests: u64,
    ok: u64,
    status_counts: BTreeMap<String, u64>,
    server_errors: u64,
    throughput_rps: f64,
    p50_ms: f64,
    p95_ms: f64,
    p99_ms: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn test_png() -> String {
    let img = image::RgbImage::from_fn(64, 48, |x, y| {
        image::Rgb([(x * 4) as u8, (y * 5) as u8, 128])
    });
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .expect("encoding a PNG in memory");
    base64::engine::general_purpose::STANDARD.encode(out.into_inner())
}

struct Client {
    http: reqwest::Client,
    base: String,
    key: Option<String>,
}

impl Client {
    async fn post(&self, path: &str, body: &Value) -> std::result::Result<(u16, Value), String> {
        let mut req = self.http.post(format!("{}{path}", self.base)).json(body);
        if let Some(k) = &self.key {
            req = req.bearer_auth(k);
        }
        let resp = req.send().await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let value = resp.json().await.unwrap_or(Value::Null);
        Ok((status, value))
    }

    async fn get(&self, path: &str) -> std::result::Result<(u16, Value), String> {
        let mut req = self.http.get(format!("{}{path}", self.base));
        if let Some(k) = &self.key {
            req = req.bearer_auth(k);
        }
        let resp = req.send().await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        Ok((status, resp.json().await.unwrap_or(Value::Null)))
    }
}

fn status_class(result: &std::result::Result<(u16, Value), String>) -> String {
    match result {
        Ok((s, _)) if *s == 429 => "429".into(),
        Ok((s, _)) => format!("{}xx", s / 100),
        Err(_) => "transport_error".into(),
    }
}

/// One load configuration, run for one or more phases.
struct Load {
    client: Arc<Client>,
    png: Arc<String>,
    /// Samples that feedback is attached to.
    sample_ids: Arc<Vec<String>>,
    scenario: Scenario,
    concurrency: usize,
    /// Open loop: requests per second, whatever the server's pace.
    arrival_rate: Option<f64>,
    max_requests: u64,
}

/// What one phase measured.
struct Phase {
    ops: BTreeMap<String, OpReport>,
    /// (sample id, feedback id) of every acknowledged feedback item.
    acked: Vec<(String, String)>,
    elapsed_s: f64,
    job: Option<Value>,
}

type SharedStats = Arc<Mutex<BTreeMap<&'static str, Stats>>>;
type Acked = Arc<Mutex<Vec<(String, String)>>>;

/// What a sender needs to send any request of a scenario.
#[derive(Clone)]
struct Sender {
    client: Arc<Client>,
    png: Arc<String>,
    sample_ids: Arc<Vec<String>>,
    scenario: Scenario,
    stats: SharedStats,
    acked: Acked,
}

impl Sender {
    /// Sends the `k`-th request of sender `w` and records its latency.
    async fn send(&self, w: usize, k: u64) {
        let op = match self.scenario {
            Scenario::Mix => match (w as u64 * 7 + k) % 5 {
                0 | 1 => Scenario::Answer,
                2 => Scenario::Generate,
                _ => Scenario::Feedback,
            },
            s => s,
        };
        let client = &self.client;
        let png = &*self.png;
        let t = Instant::now();
        let (name, result) = match op {
            Scenario::Answer => (
                "answer",
                client
                    .post("/v1/answer", &json!({"image": png, "question": "What is in the picture?", "n": 2, "max_new_tokens": 16}))
                    .await,
            ),
            Scenario::Generate => ("generate", client.post("/v1/generate", &json!({"prompt": format!("load {w} {k}"), "n": 2})).await),
            Scenario::Serving => match k % 4 {
                0 | 1 => (
                    "answer_short",
                    client
                        .post("/v1/answer", &json!({"image": png, "question": "What colour is it?", "n": 1, "max_new_tokens": 8, "seed": k}))
                        .await,
                ),
                2 => (
                    "answer_long",
                    client
                        .post("/v1/answer", &json!({"image": png, "question": "Describe the picture in detail.", "n": 1, "max_new_tokens": 64, "seed": k}))
                        .await,
                ),
                _ => (
                    "generate",
                    client
                        .post("/v1/generate", &json!({"prompt": format!("open loop {k}"), "n": 1, "seed": k}))
                        .await,
                ),
            },
            _ => {
                let sample = &self.sample_ids[(k as usize) % self.sample_ids.len().max(1)];
                let client_id = uuid_like(w, k);
                let r = client
                    .post("/v1/feedback", &json!({"sample_id": sample, "key": "quality", "score": (k % 10) as f64 / 10.0, "client_id": client_id}))
                    .await;
                if let Ok((201, body)) = &r {
                    if let Some(id) = body["items"][0]["feedback"]["id"].as_str() {
                        self.acked
                            .lock()
                            .expect("ack lock")
                            .push((sample.clone(), id.to_string()));
                    }
                }
                ("feedback", r)
            }
        };
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        let mut all = self.stats.lock().expect("stats lock");
        for name in [name, "all"] {
            let s = all.entry(name).or_default();
            s.latencies_ms.push(ms);
            *s.statuses.entry(status_class(&result)).or_default() += 1;
        }
    }
}

impl Load {
    async fn run(&self, duration: Duration) -> Phase {
        let sender = Sender {
            client: self.client.clone(),
            png: self.png.clone(),
            sample_ids: self.sample_ids.clone(),
            scenario: self.scenario,
            stats: Arc::default(),
            acked: Arc::default(),
        };
        let started = Instant::now();
        match self.arrival_rate {
            Some(rate) => self.open_loop(&sender, rate, duration).await,
            None => self.closed_loop(&sender, duration).await,
        }
        let elapsed_s = started.elapsed().as_secs_f64();
        let mut ops = BTreeMap::new();
        for (name, s) in sender.stats.lock().expect("stats lock").iter() {
            let mut lat = s.latencies_ms.clone();
            lat.sort_by(f64::total_cmp);
            ops.insert(
                name.to_string(),
                OpReport {
                    requests: lat.len() as u64,
                    ok: s.statuses.get("2xx").copied().unwrap_or(0),
                    status_counts: s.statuses.clone(),
                    server_errors: s.statuses.get("5xx").copied().unwrap_or(0),
                    throughput_rps: lat.len() as f64 / elapsed_s,
                    p50_ms: percentile(&lat, 50.0),
                    p95_ms: percentile(&lat, 95.0),
                    p99_ms: percentile(&lat, 99.0),
                },
            );
        }
        let acked = sender.acked.lock().expect("ack lock").clone();
        Phase {
            ops,
            acked,
            elapsed_s,
            job: None,
        }
    }

    /// `concurrency` senders, each sending its next request when the last
    /// one is answered.
    async fn closed_loop(&self, sender: &Sender, duration: Duration) {
        let issued = AtomicU64::new(0);
        let deadline = Instant::now() + duration;
        let workers = (0..self.concurrency).map(|w| {
            let issued = &issued;
            async move {
                let mut k: u64 = 0;
                while Instant::now() < deadline
                    && issued.fetch_add(1, Ordering::SeqCst) < self.max_requests
                {
                    k += 1;
                    sender.send(w, k).await;
                }
            }
        });
        futures::future::join_all(workers).await;
    }

    /// Requests at a fixed rate for `duration`, each sent when its time
    /// comes whether or not earlier ones were answered (as users arrive);
    /// then waits for the last answers.
    async fn open_loop(&self, sender: &Sender, rate: f64, duration: Duration) {
        let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let deadline = Instant::now() + duration;
        let mut in_flight = tokio::task::JoinSet::new();
        let mut k = 0;
        while Instant::now() < deadline && k < self.max_requests {
            ticks.tick().await;
            k += 1;
            let sender = sender.clone();
            in_flight.spawn(async move { sender.send(0, k).await });
        }
        while in_flight.join_next().await.is_some() {}
    }
}

/// Feedback client ids unique across phases and runs.
fn uuid_like(worker: usize, k: u64) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("load-{nanos}-{worker}-{k}")
}

/// Rates a few served answer groups so the job has data, starts the job,
/// runs the load while it trains, then cancels it.
async fn while_training(load: &Load, config: &str, duration: Duration) -> Result<Phase> {
    let config: Value = serde_json::from_str(config).context("--while-training is not JSON")?;
    let client = &load.client;
    for i in 0..8 {
        let body = json!({"image": *load.png, "question": format!("Training data {i}?"), "n": 4, "max_new_tokens": 8, "seed": i});
        let (status, answer) = client
            .post("/v1/answer", &body)
            .await
            .map_err(anyhow::Error::msg)?;
        if status != 200 {
            bail!("seeding training data: {status} {answer}");
        }
        for (k, sample) in answer["samples"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let feedback = json!({"sample_id": sample["sample_id"], "key": "quality", "score": k as f64 / 4.0});
            client
                .post("/v1/feedback", &feedback)
                .await
                .map_err(anyhow::Error::msg)?;
        }
    }
    let (status, job) = client
        .post("/v1/rl/jobs", &config)
        .await
        .map_err(anyhow::Error::msg)?;
    if status != 202 {
        bail!("starting the job: {status} {job}");
    }
    let id = job["id"].as_str().unwrap_or_default().to_string();
    let path = format!("/v1/rl/jobs/{id}");
    loop {
        let (_, job) = client.get(&path).await.map_err(anyhow::Error::msg)?;
        match job["status"].as_str() {
            Some("running") if job["steps_done"].as_i64().unwrap_or(0) >= 1 => break,
            Some("queued" | "running") => tokio::time::sleep(Duration::from_millis(200)).await,
            _ => bail!("the job ended before the load started: {job}"),
        }
    }
    let mut phase = load.run(duration).await;
    let (_, job) = client.get(&path).await.map_err(anyhow::Error::msg)?;
    if job["status"] != "running" {
        eprintln!(
            "warning: the job was no longer training at the end of the phase: {}",
            job["status"]
        );
    }
    client
        .post(&format!("{path}/cancel"), &json!({}))
        .await
        .map_err(anyhow::Error::msg)?;
    phase.job = Some(
        json!({"id": id, "steps_done_during_phase": job["steps_done"], "status_at_end": job["status"]}),
    );
    Ok(phase)
}

/// Acknowledged feedback items that are not stored.
async fn missing_feedback(
    client: &Client,
    sample_ids: &[String],
    acked: &[(String, String)],
) -> usize {
    let mut stored = std::collections::HashSet::new();
    for id in sample_ids {
        if let Ok((200, sample)) = client.get(&format!("/v1/samples/{id}")).await {
            for f in sample["feedback"].as_array().into_iter().flatten() {
                if let Some(fid) = f["id"].as_str() {
                    stored.insert(fid.to_string());
                }
            }
        }
    }
    acked.iter().filter(|(_, id)| !stored.contains(id)).count()
}

fn print_table(title: &str, ops: &BTreeMap<String, OpReport>) {
    println!("{title}:");
    println!(
        "{:<12} {:>8} {:>8} {:>10} {:>9} {:>9} {:>9}  statuses",
        "op", "requests", "ok", "req/s", "p50 ms", "p95 ms", "p99 ms"
    );
    for (name, r) in ops {
        println!(
            "{name:<12} {:>8} {:>8} {:>10.2} {:>9.1} {:>9.1} {:>9.1}  {:?}",
            r.requests, r.ok, r.throughput_rps, r.p50_ms, r.p95_ms, r.p99_ms, r.status_counts
        );
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    check_local(&args.url)?;
    let client = Arc::new(Client {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(300))
            .build()?,
        base: args.url.trim_end_matches('/').to_string(),
        key: args.api_key.clone(),
    });

    // A few samples to attach feedback to.
    let (status, seed) = client
        .post(
            "/v1/generate",
            &json!({"prompt": "load test seed image", "n": 2, "seed": 1}),
        )
        .await
        .map_err(anyhow::Error::msg)?;
    if status != 200 {
        bail!("could not create seed samples: {status} {seed}");
    }
    let sample_ids: Arc<Vec<String>> = Arc::new(
        seed["images"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|i| i["sample_id"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default(),
    );

    let load = Load {
        client: client.clone(),
        png: Arc::new(test_png()),
        sample_ids: sample_ids.clone(),
        scenario: args.scenario,
        concurrency: args.concurrency,
        arrival_rate: args.arrival_rate,
        max_requests: args.max_requests,
    };
    if args
        .arrival_rate
        .is_some_and(|r| !(r.is_finite() && r > 0.0))
    {
        bail!("--arrival-rate must be a positive number of requests per second");
    }
    let duration = Duration::from_secs(args.duration);
    let rss_samples: Arc<Mutex<Vec<u64>>> = Arc::default();
    if let Some(pid) = args.server_pid {
        let samples = rss_samples.clone();
        tokio::spawn(async move {
            loop {
                if let Some(kib) = rss_kib(pid) {
                    samples.lock().expect("rss lock").push(kib);
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
    let idle = load.run(duration).await;
    let training = match &args.while_training {
        Some(config) => Some(while_training(&load, config, duration).await?),
        None => None,
    };
    let mut acked = idle.acked.clone();
    acked.extend(training.iter().flat_map(|t| t.acked.iter().cloned()));
    let missing = missing_feedback(&client, &sample_ids, &acked).await;
    // "all" repeats every other operation.
    let total_5xx: u64 = [Some(&idle), training.as_ref()]
        .into_iter()
        .flatten()
        .filter_map(|phase| phase.ops.get("all"))
        .map(|o| o.server_errors)
        .sum();
    print_table("idle", &idle.ops);
    if let Some(t) = &training {
        print_table("while a job trains", &t.ops);
        println!(
            "{:<10} {:>12} {:>12} {:>12}",
            "op", "p50 ratio", "p95 ratio", "req/s ratio"
        );
        for (name, busy) in &t.ops {
            if let Some(calm) = idle.ops.get(name) {
                println!(
                    "{name:<10} {:>12.2} {:>12.2} {:>12.2}",
                    busy.p50_ms / calm.p50_ms.max(1e-9),
                    busy.p95_ms / calm.p95_ms.max(1e-9),
                    busy.throughput_rps / calm.throughput_rps.max(1e-9)
                );
            }
        }
    }
    let rss = rss_samples.lock().expect("rss lock").clone();
    let report = json!({
        "scenario": args.scenario,
        "concurrency": args.concurrency,
        "arrival_rate": args.arrival_rate,
        "duration_s": idle.elapsed_s,
        "operations": idle.ops,
        "while_training": training.as_ref().map(|t| json!({"duration_s": t.elapsed_s, "operations": t.ops, "job": t.job})),
        "server_5xx": total_5xx,
        "feedback_acknowledged": acked.len(),
        "feedback_missing_after_run": missing,
        "server_rss_kib": {"first": rss.first(), "max": rss.iter().max(), "last": rss.last()},
    });
    println!(
        "5xx: {total_5xx}; feedback acknowledged {}, missing afterwards {missing}; server RSS KiB first/max/last {:?}/{:?}/{:?}",
        acked.len(),
        rss.first(),
        rss.iter().max(),
        rss.last()
    );
    std::fs::write(&args.report, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", args.report))?;
    if total_5xx > 0 || missing > 0 {
        bail!("the run saw {total_5xx} server errors and {missing} lost feedback items");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_targets() {
        for ok in [
            "http://127.0.0.1:8080",
            "http://127.5.0.1",
            "http://localhost:9",
            "http://[::1]:80",
        ] {
            assert!(check_local(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://10.0.0.1",
            "http://192.168.1.2:8080",
            "http://example.com",
            "http://8.8.8.8",
        ] {
            assert!(check_local(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 51.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }
}
