//! What the binary does before it reports ready.

use std::process::{Command, Stdio};

use ulm_e2e::server_binary;

/// candle's CPU backend has no bf16 matmul: the server must say so and exit,
/// not listen, answer `/readyz` and then fail every request.
#[test]
fn a_dtype_the_device_cannot_compute_is_refused_before_listening() {
    let data = tempfile::tempdir().unwrap();
    let out = Command::new(server_binary())
        .args(["serve", "--no-auth", "--port", "0", "--dtype", "bf16"])
        .arg("--data-dir")
        .arg(data.path())
        .env_remove("ULM_MODEL")
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stdout}\n{stderr}");
    assert!(!stdout.contains("listening on"), "{stdout}");
    assert!(
        stderr.contains("the model cannot run in bf16 on cpu")
            && stderr.contains("use --dtype f32 or f16 on the CPU"),
        "{stderr}"
    );
}

/// f16, which the CPU computes, serves.
#[test]
fn half_precision_the_cpu_computes_serves() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let server = ulm_e2e::Server::start_with(&["--no-auth", "--dtype", "f16"]).await;
        let body = serde_json::json!({"prompt": "a red square", "n": 1, "seed": 3});
        let (status, out) = server.post("/v1/generate", &body).await;
        assert_eq!(status, 200, "{out}");
    });
}
