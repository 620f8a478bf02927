//! Beyond one machine: two serving replicas and a worker, as separate
//! processes with their own data directories, sharing PostgreSQL
//! (`ULM_TEST_DATABASE_URL`) and an S3-compatible object store (moto's
//! server, `pip install 'moto[server]'`). An image made on one replica is
//! fetched from the other, feedback from both trains a job on the worker,
//! both replicas serve the promoted version without a restart, a cancel
//! asked on a replica stops the worker's job, and kill -9 of the worker
//! mid-job leaves no job stuck.
//!
//! Without PostgreSQL or `moto_server` the test says it is skipped; with
//! `ULM_REQUIRE_CLUSTER` set (CI) it fails instead.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use ulm_e2e::{
    fresh_database, job_finished, serve_round, server_binary, skip_unless_required, start_job,
    Server,
};

const BUCKET: &str = "ulm-cluster-test";

/// A local S3-compatible server on a free port, with the test's bucket.
struct ObjectStore {
    child: Child,
    endpoint: String,
}

impl Drop for ObjectStore {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_object_store() -> Option<ObjectStore> {
    let port = TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let child = Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let store = ObjectStore {
        child,
        endpoint: format!("http://127.0.0.1:{port}"),
    };
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // Creating the bucket doubles as the readiness probe.
        let created = http
            .put(format!("{}/{BUCKET}", store.endpoint))
            .send()
            .await;
        if matches!(&created, Ok(r) if r.status().is_success()) {
            return Some(store);
        }
        assert!(
            Instant::now() < deadline,
            "moto_server did not start: {created:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until `server` serves `version` (what `/v1/models` marks active
/// is the engine's serving version).
async fn wait_serving(server: &Server, version: &str, within: Duration) -> Duration {
    let started = Instant::now();
    while server.active_version().await != version {
        assert!(
            started.elapsed() < within,
            "{} still serves {} after {within:?}, not {version}",
            server.base,
            server.active_version().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    started.elapsed()
}

/// Promotes whatever it learned, however far its weights collapse.
fn promoting_job() -> Value {
    json!({"steps": 3, "lr": 0.02, "beta": 0.0, "lora_rank": 8, "max_kl": 100.0,
           "max_reward_drop": 10.0, "min_effective_share": 0.0})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_images_feedback_and_versions_and_a_dead_worker_leaves_no_job_stuck() {
    let Some(database) = fresh_database().await else {
        return skip_unless_required("ULM_REQUIRE_CLUSTER", "ULM_TEST_DATABASE_URL is not set");
    };
    let Some(s3) = start_object_store().await else {
        return skip_unless_required("ULM_REQUIRE_CLUSTER", "moto_server is not installed");
    };
    let env = [
        ("AWS_ENDPOINT", s3.endpoint.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ];
    // A bucket that does not exist stops a process before it listens.
    let dir = tempfile::tempdir().unwrap();
    let refused = Command::new(server_binary())
        .args(["serve", "--no-auth", "--demo", "--port", "0", "--data-dir"])
        .arg(dir.path())
        .args([
            "--database-url",
            &database,
            "--blob-url",
            "s3://no-such-bucket/x",
        ])
        .envs(env)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        stderr.contains("reaching the blob store s3://no-such-bucket/x"),
        "{stderr}"
    );
    assert!(!String::from_utf8_lossy(&refused.stdout).contains("listening"));

    let blob_url = format!("s3://{BUCKET}/ulm");
    let shared = [
        "--blob-url",
        &blob_url,
        "--version-poll-ms",
        "200",
        "--rl-job-lease-secs",
        "3",
        "--rl-holdout-fraction",
        "0.25",
    ];
    let replica = || {
        let mut args = vec!["--no-auth", "--no-rl-scheduler"];
        args.extend(shared);
        Server::start_sharing("serve", &args, &database, &env)
    };
    let a = replica();
    let b = replica();
    let mut worker = Server::start_sharing("worker", &shared, &database, &env);
    let (status, health) = worker.get("/readyz").await;
    assert_eq!(status, 200, "{health}");
    let (status, _) = worker.get("/v1/models").await;
    assert_eq!(status, 404, "a worker serves no API");

    // An image made on A is fetched from B, which has no copy on its disk.
    let (status, made) = a
        .post(
            "/v1/generate",
            &json!({"prompt": "a red circle", "n": 1, "seed": 3}),
        )
        .await;
    assert_eq!(status, 200, "{made}");
    let sample = made["images"][0]["sample_id"].as_str().unwrap().to_string();
    let (status, on_a) = a.get_bytes(&format!("/v1/images/{sample}")).await;
    assert_eq!(status, 200);
    let (status, on_b) = b.get_bytes(&format!("/v1/images/{sample}")).await;
    assert_eq!(status, 200);
    assert!(on_a.starts_with(b"\x89PNG") && on_a == on_b);
    assert!(!b.data_dir.join("images").exists());
    assert!(!a.data_dir.join("images").exists(), "A keeps blobs remote");

    // Feedback on both replicas trains the worker's job; both serve it.
    serve_round(&a, 4, true).await;
    serve_round(&b, 4, true).await;
    let first = start_job(&a, promoting_job()).await;
    let job = b.wait_job(&first, job_finished).await;
    assert_eq!(job["status"], "promoted", "{job}");
    assert_eq!(job["candidate_version"], "v1");
    assert!(job["worker"].is_string(), "{job}");
    for replica in [&a, &b] {
        let took = wait_serving(replica, "v1", Duration::from_secs(10)).await;
        eprintln!(
            "{} serves v1 {took:?} after the promotion was seen",
            replica.base
        );
        assert_eq!(serve_round(replica, 1, false).await.versions, ["v1"]);
    }
    // The adapters live in the object store, not on any replica's disk.
    let (_, models) = a.get("/v1/models").await;
    let v1 = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "v1")
        .unwrap()
        .clone();
    let key = v1["checkpoint_path"].as_str().unwrap();
    assert!(key.starts_with("adapters/"), "{v1}");
    for replica in [&a, &b] {
        assert!(
            !replica.data_dir.join(key).exists(),
            "{key} is not a local blob"
        );
        assert!(
            replica.data_dir.join("cache").join(key).is_dir(),
            "{key} cached to load it"
        );
    }
    // The worker keeps what it published as its cached copy; nothing staged is left.
    assert!(worker.data_dir.join("cache").join(key).is_dir());
    let staged = worker.data_dir.join("cache").join("staging");
    assert!(!staged.exists() || std::fs::read_dir(&staged).unwrap().next().is_none());

    // A rollback asked of B is served by A too.
    let (status, body) = b.post("/v1/models/demo-base/activate", &json!({})).await;
    assert_eq!(status, 200, "{body}");
    wait_serving(&a, "demo-base", Duration::from_secs(10)).await;
    let (status, body) = a.post("/v1/models/v1/activate", &json!({})).await;
    assert_eq!(status, 200, "{body}");
    wait_serving(&b, "v1", Duration::from_secs(10)).await;

    // A cancel asked of B reaches the job running on the worker.
    let long = json!({"steps": 1000, "lr": 0.001});
    let cancelled = start_job(&a, long.clone()).await;
    b.wait_job(&cancelled, |j| j["steps_done"].as_i64().unwrap() >= 1)
        .await;
    let (status, body) = b
        .post(&format!("/v1/rl/jobs/{cancelled}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 202, "{body}");
    let job = a.wait_job(&cancelled, job_finished).await;
    assert_eq!(job["status"], "cancelled", "{job}");

    // kill -9 of the worker mid-job: the replicas fail the job once its
    // lease lapses, and the next job runs on a new worker.
    let killed = start_job(&a, long).await;
    a.wait_job(&killed, |j| j["steps_done"].as_i64().unwrap() >= 2)
        .await;
    worker.kill9();
    let job = b.wait_job(&killed, job_finished).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert!(job["error"].as_str().unwrap().contains("lease"), "{job}");
    worker.restart();
    let next = start_job(&b, promoting_job()).await;
    let job = a.wait_job(&next, job_finished).await;
    assert_eq!(job["status"], "promoted", "{job}");
    assert_eq!(job["parent_version"], "v1");
    assert_eq!(job["candidate_version"], "v2");
    for replica in [&a, &b] {
        wait_serving(replica, "v2", Duration::from_secs(10)).await;
    }
}
