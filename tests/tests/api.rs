//! The server over HTTP: every endpoint, auth, bad inputs, durability.

use base64::Engine as _;
use serde_json::{json, Value};
use ulm_e2e::{answer_body, png_base64, Server, ADMIN_KEY, USER_KEY};

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("<no code>")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_answer_feedback_and_lookup() {
    let server = Server::start().await;

    let (status, gen) = server
        .post(
            "/v1/generate",
            &json!({"prompt": "a red circle", "n": 2, "seed": 42}),
        )
        .await;
    assert_eq!(status, 200, "{gen}");
    let images = gen["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    assert_eq!(
        gen["plan"],
        json!(null),
        "the demo model draws from the prompt"
    );
    assert_eq!(images[0]["seed"], 42);
    assert_eq!(images[1]["seed"], 43);
    let sample_id = images[0]["sample_id"].as_str().unwrap();
    let png = base64::engine::general_purpose::STANDARD
        .decode(images[0]["png_base64"].as_str().unwrap())
        .unwrap();
    let decoded = image::load_from_memory(&png).unwrap();
    assert_eq!(decoded.width(), 64);
    let (status, fetched) = server.get_bytes(&format!("/v1/images/{sample_id}")).await;
    assert_eq!(status, 200);
    assert_eq!(fetched, png);

    // Same seed, same image.
    let (_, again) = server
        .post(
            "/v1/generate",
            &json!({"prompt": "a red circle", "n": 1, "seed": 42}),
        )
        .await;
    assert_eq!(again["images"][0]["png_base64"], images[0]["png_base64"]);

    let (status, ans) = server.post("/v1/answer", &answer_body(3)).await;
    assert_eq!(status, 200, "{ans}");
    let samples = ans["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 3);
    assert!(ans["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    let answer_id = samples[0]["sample_id"].as_str().unwrap();

    let (status, sample) = server.get(&format!("/v1/samples/{answer_id}")).await;
    assert_eq!(status, 200);
    assert_eq!(sample["task"], "answer");
    assert_eq!(sample["model_version"], ans["model_version"]);
    let tokens = sample["token_ids"].as_array().unwrap().len();
    assert_eq!(
        tokens,
        samples[0]["completion_tokens"].as_u64().unwrap() as usize
    );
    assert_eq!(sample["logprobs"].as_array().unwrap().len(), tokens);
    assert_eq!(sample["guided_logprobs"], json!([]), "answers are unguided");

    // Feedback: one item, replay, conflict, batch, unknown sample.
    let item = json!({"sample_id": answer_id, "key": "correct", "score": 1.0, "correction": "A",
                      "source": {"type": "human", "user_id": "u1"}, "client_id": "fb-1"});
    let (status, first) = server.post("/v1/feedback", &item).await;
    assert_eq!(status, 201, "{first}");
    assert_eq!(first["items"][0]["status"], "created");
    let (status, replay) = server.post("/v1/feedback", &item).await;
    assert_eq!(status, 201);
    assert_eq!(replay["items"][0]["status"], "replayed");
    assert_eq!(
        replay["items"][0]["feedback"]["id"],
        first["items"][0]["feedback"]["id"]
    );
    let mut changed = item.clone();
    changed["score"] = json!(0.0);
    let (status, conflict) = server.post("/v1/feedback", &changed).await;
    assert_eq!((status, code(&conflict)), (409, "conflict"));
    let batch = json!([
        {"sample_id": sample_id, "key": "quality", "score": 0.8},
        {"sample_id": sample_id, "key": "style", "value": "good"}
    ]);
    let (status, stored) = server.post("/v1/feedback", &batch).await;
    assert_eq!(status, 201, "{stored}");
    assert_eq!(stored["items"].as_array().unwrap().len(), 2);
    let (status, unknown) = server
        .post(
            "/v1/feedback",
            &json!({"sample_id": "no-such-sample", "key": "quality", "score": 1}),
        )
        .await;
    assert_eq!((status, code(&unknown)), (404, "not_found"));
    // A batch with one unknown sample stores nothing.
    let mixed = json!([
        {"sample_id": sample_id, "key": "quality", "score": 0.1},
        {"sample_id": "missing", "key": "quality", "score": 0.2}
    ]);
    let (status, _) = server.post("/v1/feedback", &mixed).await;
    assert_eq!(status, 404);

    let (_, with_feedback) = server.get(&format!("/v1/samples/{sample_id}")).await;
    assert_eq!(with_feedback["feedback"].as_array().unwrap().len(), 2);
    // Images drawn with CFG keep the guided log-probs beside the
    // conditional ones: one of each per image token, and not the same.
    let per_token = |key: &str| -> Vec<f64> {
        with_feedback[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l.as_f64().unwrap())
            .collect()
    };
    let (conditional, guided) = (per_token("logprobs"), per_token("guided_logprobs"));
    assert_eq!(
        guided.len(),
        with_feedback["token_ids"].as_array().unwrap().len()
    );
    assert_eq!(guided.len(), conditional.len());
    assert_ne!(guided, conditional);
    assert_eq!(
        with_feedback["image_url"],
        format!("/v1/images/{sample_id}")
    );
    let (_, answered) = server.get(&format!("/v1/samples/{answer_id}")).await;
    assert_eq!(answered["feedback"][0]["correction"], "A");
    assert_eq!(answered["feedback"][0]["source"]["type"], "human");

    let (status, models) = server.get("/v1/models").await;
    assert_eq!(status, 200);
    assert_eq!(models["data"][0]["demo"], true);
    // A model with no generation_config.json samples as Janus-Pro does.
    assert_eq!(
        models["data"][0]["sampling"],
        serde_json::json!({"cfg_weight": 5.0, "temperature": 1.0})
    );

    let (status, metrics) = server.get("/metrics").await;
    assert_eq!(status, 200);
    let metrics = metrics.as_str().unwrap().to_string();
    for name in [
        "ulm_http_requests_total",
        "ulm_http_request_duration_seconds_bucket",
        "ulm_queue_depth",
        "ulm_batch_rows_bucket",
        "ulm_tokens_generated_total",
        "ulm_images_generated_total",
        "ulm_feedback_received_total",
        "ulm_model_info",
    ] {
        assert!(metrics.contains(name), "metrics lack {name}");
    }

    let (status, docs) = server.get("/docs/").await;
    assert_eq!(status, 200);
    assert!(
        docs.as_str().unwrap().contains("swagger"),
        "docs page is not the UI"
    );
    let (status, spec) = server.get("/openapi.json").await;
    assert_eq!(status, 200);
    assert!(spec["paths"]["/v1/generate"].is_object());
    let (status, ready) = server.get("/readyz").await;
    assert_eq!((status, ready["status"].as_str()), (200, Some("ready")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_answer_sends_tokens_then_the_stored_response() {
    let server = Server::start().await;
    let mut body = answer_body(2);
    body["stream"] = json!(true);
    let resp = server
        .http
        .post(server.url("/v1/answer"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let text = resp.text().await.unwrap();
    let mut tokens = 0;
    let mut done = None;
    for block in text.split("\n\n") {
        let event = block
            .lines()
            .find_map(|l| l.strip_prefix("event: "))
            .unwrap_or_default();
        let data = block
            .lines()
            .find_map(|l| l.strip_prefix("data: "))
            .unwrap_or_default();
        match event {
            "token" => tokens += 1,
            "done" => done = Some(serde_json::from_str::<Value>(data).unwrap()),
            "" => {}
            other => panic!("unexpected event {other}: {data}"),
        }
    }
    let done = done.expect("a done event");
    assert_eq!(
        tokens as u64,
        done["usage"]["completion_tokens"].as_u64().unwrap()
    );
    let id = done["samples"][1]["sample_id"].as_str().unwrap();
    let (status, _) = server.get(&format!("/v1/samples/{id}")).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_and_roles() {
    let keys = format!("user:{USER_KEY},admin:{ADMIN_KEY}");
    let mut server = Server::start_with(&["--api-keys", &keys]).await;
    let (status, body) = server
        .post("/v1/generate", &json!({"prompt": "x", "n": 1}))
        .await;
    assert_eq!((status, code(&body)), (401, "unauthorized"));
    server.key = Some("wrong-key-0123456789abcdef".into());
    let (status, body) = server.get("/v1/models").await;
    assert_eq!((status, code(&body)), (401, "unauthorized"));
    server.key = Some(USER_KEY.into());
    let (status, _) = server
        .post("/v1/generate", &json!({"prompt": "x", "n": 1}))
        .await;
    assert_eq!(status, 200);
    server.key = Some(ADMIN_KEY.into());
    let (status, _) = server.get("/v1/models").await;
    assert_eq!(status, 200);
    server.key = None;
    for public in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        assert_eq!(server.get(public).await.0, 200, "{public} should be public");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_gets_its_documented_error_and_nothing_breaks() {
    let server = Server::start_with(&[
        "--no-auth",
        "--max-body-bytes",
        "200000",
        "--max-image-pixels",
        "250000",
    ])
    .await;
    let (_, gen) = server
        .post(
            "/v1/generate",
            &json!({"prompt": "keep me", "n": 1, "seed": 1}),
        )
        .await;
    let kept_id = gen["images"][0]["sample_id"].as_str().unwrap().to_string();
    let (_, fb) = server
        .post(
            "/v1/feedback",
            &json!({"sample_id": kept_id, "key": "quality", "score": 0.5}),
        )
        .await;
    assert_eq!(fb["items"][0]["status"], "created");
    let (_, before) = server.get(&format!("/v1/samples/{kept_id}")).await;

    let big_png = png_base64(600, 600);
    // (what, path, body, content type, status, code)
    type Case<'a> = (&'a str, &'a str, Vec<u8>, &'a str, u16, &'a str);
    let cases: Vec<Case> = vec![
        ("generate: malformed JSON", "/v1/generate", b"{\"prompt\": ".to_vec(), "application/json", 400, "invalid_json"),
        ("generate: not JSON at all", "/v1/generate", b"prompt=cat".to_vec(), "application/json", 400, "invalid_json"),
        ("generate: wrong content type", "/v1/generate", b"{\"prompt\":\"x\"}".to_vec(), "text/plain", 415, "unsupported_media_type"),
        ("generate: wrong type", "/v1/generate", br#"{"prompt": 5}"#.to_vec(), "application/json", 422, "invalid_body"),
        ("generate: missing prompt", "/v1/generate", br#"{"n": 1}"#.to_vec(), "application/json", 422, "invalid_body"),
        ("generate: unknown field", "/v1/generate", br#"{"prompt": "x", "colour": 1}"#.to_vec(), "application/json", 422, "invalid_body"),
        ("generate: empty prompt", "/v1/generate", br#"{"prompt": "   "}"#.to_vec(), "application/json", 422, "invalid_parameter"),
        ("generate: n = 0", "/v1/generate", br#"{"prompt": "x", "n": 0}"#.to_vec(), "application/json", 422, "invalid_parameter"),
        ("generate: n too large", "/v1/generate", br#"{"prompt": "x", "n": 17}"#.to_vec(), "application/json", 422, "invalid_parameter"),
        ("generate: negative n", "/v1/generate", br#"{"prompt": "x", "n": -1}"#.to_vec(), "application/json", 422, "invalid_body"),
        ("generate: cfg out of range", "/v1/generate", br#"{"prompt": "x", "cfg_weight": 100}"#.to_vec(), "application/json", 422, "invalid_parameter"),
        ("generate: negative temperature", "/v1/generate", br#"{"prompt": "x", "temperature": -1}"#.to_vec(), "application/json", 422, "invalid_parameter"),
        ("generate: top_k 0", "/v1/generate", br#"{"prompt": "x", "top_k": 0}"#.to_vec(), "application/json", 422, "invalid_parameter"),
        ("generate: a plan from a model that does not plan", "/v1/generate", br#"{"prompt": "x", "plan": true}"#.to_vec(), "application/json", 422, "invalid_parameter"),
        ("generate: plan not a boolean", "/v1/generate", br#"{"prompt": "x", "plan": "yes"}"#.to_vec(), "application/json", 422, "invalid_body"),
        ("generate: best_of without a plan", "/v1/generate", br#"{"prompt": "x", "best_of": 2}"#.to_vec(), "application/json", 422, "invalid_parameter"),
        ("generate: best_of 0", "/v1/generate", br#"{"prompt": "x", "best_of": 0}"#.to_vec(), "application/json", 422, "invalid_parameter"),
        ("generate: best_of too large", "/v1/generate", br#"{"prompt": "x", "best_of": 17}"#.to_vec(), "application/json", 422, "invalid_parameter"),
        ("generate: seed too large", "/v1/generate", br#"{"prompt": "x", "seed": 18446744073709551615}"#.to_vec(), "application/json", 422, "invalid_parameter"),
        ("generate: prompt too long", "/v1/generate", serde_json::to_vec(&json!({"prompt": "a".repeat(5000)})).unwrap(), "application/json", 422, "invalid_parameter"),
        ("generate: body too large", "/v1/generate", serde_json::to_vec(&json!({"prompt": "a".repeat(300_000)})).unwrap(), "application/json", 413, "payload_too_large"),
        ("answer: invalid base64", "/v1/answer", br#"{"image": "***", "question": "q"}"#.to_vec(), "application/json", 422, "invalid_image"),
        ("answer: not an image", "/v1/answer", serde_json::to_vec(&json!({"image": base64::engine::general_purpose::STANDARD.encode(b"hello world"), "question": "q"})).unwrap(), "application/json", 422, "invalid_image"),
        ("answer: empty image", "/v1/answer", br#"{"image": "", "question": "q"}"#.to_vec(), "application/json", 422, "invalid_image"),
        ("answer: too many pixels", "/v1/answer", serde_json::to_vec(&json!({"image": big_png, "question": "q"})).unwrap(), "application/json", 413, "image_too_large"),
        ("answer: empty question", "/v1/answer", serde_json::to_vec(&json!({"image": png_base64(8, 8), "question": ""})).unwrap(), "application/json", 422, "invalid_parameter"),
        ("answer: max_new_tokens 0", "/v1/answer", serde_json::to_vec(&json!({"image": png_base64(8, 8), "question": "q", "max_new_tokens": 0})).unwrap(), "application/json", 422, "invalid_parameter"),
        ("answer: top_p 0", "/v1/answer", serde_json::to_vec(&json!({"image": png_base64(8, 8), "question": "q", "top_p": 0.0})).unwrap(), "application/json", 422, "invalid_parameter"),
        ("answer: context overflow", "/v1/answer", serde_json::to_vec(&json!({"image": png_base64(8, 8), "question": "q", "max_new_tokens": 2048})).unwrap(), "application/json", 422, "invalid_parameter"),
        ("feedback: unknown sample", "/v1/feedback", br#"{"sample_id": "nope", "key": "k", "score": 1}"#.to_vec(), "application/json", 404, "not_found"),
        ("feedback: no judgement", "/v1/feedback", serde_json::to_vec(&json!({"sample_id": kept_id, "key": "k"})).unwrap(), "application/json", 422, "invalid_parameter"),
        ("feedback: empty key", "/v1/feedback", serde_json::to_vec(&json!({"sample_id": kept_id, "key": "", "score": 1})).unwrap(), "application/json", 422, "invalid_parameter"),
        ("feedback: bad source", "/v1/feedback", serde_json::to_vec(&json!({"sample_id": kept_id, "key": "k", "score": 1, "source": {"type": "alien"}})).unwrap(), "application/json", 422, "invalid_body"),
        ("feedback: empty batch", "/v1/feedback", b"[]".to_vec(), "application/json", 422, "invalid_parameter"),
        ("feedback: scalar body", "/v1/feedback", b"42".to_vec(), "application/json", 422, "invalid_body"),
        // PostgreSQL text cannot hold NUL: refused on every database alike.
        ("generate: NUL in prompt", "/v1/generate", br#"{"prompt": "a\u0000b"}"#.to_vec(), "application/json", 422, "invalid_parameter"),
        ("answer: NUL in question", "/v1/answer", serde_json::to_vec(&json!({"image": png_base64(8, 8), "question": "q\u{0}"})).unwrap(), "application/json", 422, "invalid_parameter"),
        ("feedback: NUL in comment", "/v1/feedback", serde_json::to_vec(&json!({"sample_id": kept_id, "key": "k", "score": 1, "comment": "x\u{0}"})).unwrap(), "application/json", 422, "invalid_parameter"),
    ];
    for (what, path, body, content_type, status, expected_code) in cases {
        let (got, body) = server.post_raw(path, body, content_type).await;
        assert_eq!(
            (got, code(&body)),
            (status, expected_code),
            "{what}: {body}"
        );
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{what}: no message"
        );
    }
    for (path, status, expected_code) in [
        ("/v1/samples/does-not-exist", 404, "not_found"),
        ("/v1/images/does-not-exist", 404, "not_found"),
        ("/nowhere", 404, "not_found"),
    ] {
        let (got, body) = server.get(path).await;
        assert_eq!((got, code(&body)), (status, expected_code), "{path}");
    }
    // A body refused before it was read ends its connection, and says so.
    let resp = server
        .http
        .post(server.url("/v1/generate"))
        .json(&json!({"prompt": "a".repeat(300_000)}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    assert_eq!(resp.headers()["connection"], "close");
    let resp = server
        .http
        .delete(server.url("/v1/generate"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
    let (answer_id_status, answer) = server.post("/v1/answer", &answer_body(1)).await;
    assert_eq!(answer_id_status, 200, "{answer}");
    let (_, no_image) = server
        .get(&format!(
            "/v1/images/{}",
            answer["samples"][0]["sample_id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(code(&no_image), "not_found");

    // Still up, and what was stored is unchanged.
    assert_eq!(server.get("/readyz").await.0, 200);
    let (_, after) = server.get(&format!("/v1/samples/{kept_id}")).await;
    assert_eq!(before, after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samples_and_feedback_survive_restart_and_kill9() {
    let mut server = Server::start().await;
    let (_, gen) = server
        .post(
            "/v1/generate",
            &json!({"prompt": "durable", "n": 1, "seed": 3}),
        )
        .await;
    let id = gen["images"][0]["sample_id"].as_str().unwrap().to_string();
    let (status, _) = server
        .post(
            "/v1/feedback",
            &json!({"sample_id": id, "key": "quality", "score": 0.9}),
        )
        .await;
    assert_eq!(status, 201);
    let (_, before) = server.get(&format!("/v1/samples/{id}")).await;
    let (_, png_before) = server.get_bytes(&format!("/v1/images/{id}")).await;

    server.restart();
    let (status, after) = server.get(&format!("/v1/samples/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(before, after);
    assert_eq!(
        server.get_bytes(&format!("/v1/images/{id}")).await.1,
        png_before
    );

    // Feedback acknowledged right before a SIGKILL is there after restart.
    let mut acked = Vec::new();
    for i in 0..5 {
        let (status, body) = server
            .post("/v1/feedback", &json!({"sample_id": id, "key": format!("k{i}"), "score": i, "client_id": format!("kill-{i}")}))
            .await;
        assert_eq!(status, 201);
        acked.push(
            body["items"][0]["feedback"]["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    server.kill9();
    assert!(!server.is_running());
    server.restart();
    let (_, sample) = server.get(&format!("/v1/samples/{id}")).await;
    let stored: Vec<&str> = sample["feedback"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap())
        .collect();
    for id in &acked {
        assert!(stored.contains(&id.as_str()), "feedback {id} lost");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_with_retry_after() {
    let server =
        Server::start_with(&["--no-auth", "--max-queue", "1", "--max-batch-rows", "1"]).await;
    let requests = (0..12).map(|i| {
        let http = server.http.clone();
        let url = server.url("/v1/generate");
        async move {
            let resp = http
                .post(url)
                .json(&json!({"prompt": format!("p{i}"), "n": 4}))
                .send()
                .await
                .unwrap();
            let retry = resp
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
            let status = resp.status().as_u16();
            let body: Value = resp.json().await.unwrap();
            (status, retry, body)
        }
    });
    let results = futures::future::join_all(requests).await;
    let ok = results.iter().filter(|r| r.0 == 200).count();
    let busy: Vec<_> = results.iter().filter(|r| r.0 == 429).collect();
    assert!(ok >= 1, "some requests are served");
    assert!(
        !busy.is_empty(),
        "a one-slot queue must refuse some of 12 concurrent requests"
    );
    for (_, retry, body) in &busy {
        assert_eq!(retry.as_deref(), Some("1"));
        assert_eq!(code(body), "queue_full");
    }
    assert_eq!(
        ok + busy.len(),
        results.len(),
        "only 200 or 429: {results:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_file_supplies_options_and_flags_override_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ulm.toml");
    // port 1 would fail to bind: the harness's --port 0 must win over the file.
    std::fs::write(&path, "no_auth = true\nport = 1\nmax_queue = 2\n").unwrap();
    let server = Server::start_with(&["--config", path.to_str().unwrap()]).await;
    let (status, _) = server
        .post(
            "/v1/generate",
            &json!({"prompt": "from a config file", "n": 1}),
        )
        .await;
    assert_eq!(status, 200, "no_auth came from the file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_for_a_disconnected_client_is_dropped() {
    let server = Server::start().await;
    let impatient = reqwest::Client::builder()
        .timeout(std::time::Duration::from_millis(150))
        .build()
        .unwrap();
    let gone = impatient
        .post(server.url("/v1/generate"))
        .json(&json!({"prompt": "sixteen images nobody waits for", "n": 16}))
        .send()
        .await;
    assert!(
        gone.is_err(),
        "the client gave up before the images were ready"
    );
    // Long enough for 16 demo images to finish had the work continued.
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    let (_, metrics) = server.get("/metrics").await;
    let produced = metrics
        .as_str()
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("ulm_images_generated_total "))
        .map_or(0.0, |v| v.trim().parse::<f64>().unwrap());
    assert_eq!(produced, 0.0, "the abandoned generation kept running");
    assert_eq!(server.get("/readyz").await.0, 200);
}
