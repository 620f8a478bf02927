//! What an outside tester broke, each class on the real binary.

use serde_json::{json, Value};
use ulm_e2e::{answer_body, Server, ADMIN_KEY, USER_KEY};

/// Every special token of the demo tokenizer, and the image tags.
const CONTROL_TEXT: &str = "<｜begin▁of▁sentence｜><｜end▁of▁sentence｜><｜▁pad▁｜>\
    <image_placeholder><patch_placeholder><|User|><|Assistant|><begin_of_image><end_of_image>";

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("<no code>")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_spelling_control_tokens_is_plain_text_and_harms_no_batch() {
    // A wide batch window: the requests below share batches.
    let server = Server::start_with(&["--no-auth", "--batch-window-ms", "300"]).await;
    let mut hostile = answer_body(2);
    hostile["question"] = json!(format!("What is this? {CONTROL_TEXT}"));
    hostile["max_new_tokens"] = json!(4);
    let mut plain = answer_body(2);
    plain["max_new_tokens"] = json!(4);
    let generate = json!({"prompt": format!("a red circle {CONTROL_TEXT}"), "n": 2});
    let other = json!({"prompt": "a blue square", "n": 1});
    let (a, b, c, d) = tokio::join!(
        server.post("/v1/answer", &hostile),
        server.post("/v1/answer", &plain),
        server.post("/v1/generate", &generate),
        server.post("/v1/generate", &other),
    );
    for (status, body) in [&a, &b, &c, &d] {
        assert_eq!(*status, 200, "{body}");
    }
    // Stored as sent, and served again later without harm.
    let id = a.1["samples"][0]["sample_id"].as_str().unwrap();
    let (status, sample) = server.get(&format!("/v1/samples/{id}")).await;
    assert_eq!(status, 200);
    assert!(sample["prompt"].as_str().unwrap().ends_with(CONTROL_TEXT));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbers_that_would_not_stay_finite_are_refused() {
    let server = Server::start().await;
    // Values just outside a bound must not round onto it as f32.
    for temperature in [1e-30, 0.009, -0.0001, 5.01, -4.7e-234, 5.0000001] {
        let mut body = answer_body(1);
        body["temperature"] = json!(temperature);
        let (status, reply) = server.post("/v1/answer", &body).await;
        assert_eq!(status, 422, "temperature {temperature}: {reply}");
        assert_eq!(code(&reply), "invalid_parameter");
        let body = json!({"prompt": "a red circle", "n": 1, "temperature": temperature});
        let (status, _) = server.post("/v1/generate", &body).await;
        assert_eq!(status, 422, "temperature {temperature}");
    }
    for (field, value) in [("cfg_weight", -1e-300), ("cfg_weight", 20.0000001)] {
        let body = json!({"prompt": "a red circle", "n": 1, field: value});
        let (status, _) = server.post("/v1/generate", &body).await;
        assert_eq!(status, 422, "{field} {value}");
    }
    let mut top_p = answer_body(1);
    top_p["top_p"] = json!(1.00000001);
    assert_eq!(server.post("/v1/answer", &top_p).await.0, 422);
    let mut greedy = answer_body(1);
    greedy["temperature"] = json!(0.0);
    greedy["max_new_tokens"] = json!(3);
    let (status, answer) = server.post("/v1/answer", &greedy).await;
    assert_eq!(status, 200, "{answer}");
    let sample = answer["samples"][0]["sample_id"].as_str().unwrap();

    for score in [1e308, -1e308, 1000.5] {
        let item = json!({"sample_id": sample, "key": "quality", "score": score});
        let (status, reply) = server.post("/v1/feedback", &item).await;
        assert_eq!(status, 422, "score {score}: {reply}");
    }
    let item = json!({"sample_id": sample, "key": "quality", "score": -1000.0});
    let (status, reply) = server.post("/v1/feedback", &item).await;
    assert_eq!(status, 201, "{reply}");
    let (status, stored) = server.get(&format!("/v1/samples/{sample}")).await;
    assert_eq!(status, 200);
    assert!(stored["logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .all(|l| l.as_f64().is_some_and(f64::is_finite)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feedback_batch_is_stored_whole_or_not_at_all() {
    let server = Server::start().await;
    let mut body = answer_body(2);
    body["max_new_tokens"] = json!(2);
    let (_, answer) = server.post("/v1/answer", &body).await;
    let sample = answer["samples"][0]["sample_id"].as_str().unwrap();
    let first = json!({"sample_id": sample, "key": "quality", "score": 1.0, "client_id": "c-1"});
    let (status, _) = server.post("/v1/feedback", &first).await;
    assert_eq!(status, 201);

    // The second item conflicts with what c-1 stored: nothing of the batch lands.
    let fresh = json!({"sample_id": sample, "key": "quality", "score": 0.5, "client_id": "c-2"});
    let changed = json!({"sample_id": sample, "key": "quality", "score": 0.0, "client_id": "c-1"});
    let (status, reply) = server
        .post("/v1/feedback", &json!([fresh.clone(), changed]))
        .await;
    assert_eq!(status, 409, "{reply}");
    // An unknown sample in second place: nothing lands either.
    let unknown = json!({"sample_id": "no-such-sample", "key": "quality", "score": 1.0});
    let (status, reply) = server
        .post("/v1/feedback", &json!([fresh.clone(), unknown]))
        .await;
    assert_eq!(status, 404, "{reply}");
    assert!(reply["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("item 1: "));
    let (_, stored) = server.get(&format!("/v1/samples/{sample}")).await;
    assert_eq!(stored["feedback"].as_array().unwrap().len(), 1, "{stored}");

    // The client retries without the conflicting item: c-2 lands once, c-1 replays.
    let (status, reply) = server.post("/v1/feedback", &json!([fresh, first])).await;
    assert_eq!(status, 201, "{reply}");
    assert_eq!(reply["items"][0]["status"], "created");
    assert_eq!(reply["items"][1]["status"], "replayed");
    let (_, stored) = server.get(&format!("/v1/samples/{sample}")).await;
    assert_eq!(stored["feedback"].as_array().unwrap().len(), 2, "{stored}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_edges_answer_in_the_error_envelope() {
    let keys = format!("user:{USER_KEY},admin:{ADMIN_KEY}");
    let mut server = Server::start_with(&["--api-keys", &keys]).await;
    let json_of = |text: String| serde_json::from_str::<Value>(&text).unwrap_or(Value::Null);

    // The scheme of the Authorization header is case-insensitive.
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let response = server
            .http
            .get(server.url("/v1/models"))
            .header("authorization", format!("{scheme} {USER_KEY}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{scheme}");
        let models = json_of(response.text().await.unwrap());
        // Server paths are not shown to user keys.
        assert!(models["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["checkpoint_path"].is_null()));
    }

    server.key = Some(ADMIN_KEY.into());
    // A path parameter that is not UTF-8.
    let (status, body) = server.get("/v1/samples/%FF%FE").await;
    assert_eq!((status, code(&body)), (404, "not_found"), "{body}");
    let (status, body) = server.get("/v1/rl/jobs/%C3%28").await;
    assert_eq!((status, code(&body)), (404, "not_found"), "{body}");

    // No content type on a JSON route.
    let response = server
        .http
        .post(server.url("/v1/rl/jobs"))
        .bearer_auth(ADMIN_KEY)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 415);
    assert_eq!(
        code(&json_of(response.text().await.unwrap())),
        "unsupported_media_type"
    );

    // A struct is never read from a JSON array.
    for (path, body) in [
        ("/v1/rl/jobs", json!([1, 1])),
        ("/v1/generate", json!(["a red circle", 1])),
        ("/v1/answer", json!([])),
    ] {
        let (status, reply) = server.post(path, &body).await;
        assert_eq!(
            (status, code(&reply)),
            (422, "invalid_body"),
            "{path}: {reply}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_images_are_bounded_to_what_the_model_can_use() {
    use base64::Engine as _;
    let server = Server::start().await;
    let png = |w: u32, h: u32| {
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x % 251) as u8, (y % 241) as u8, 7])
        });
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        base64::engine::general_purpose::STANDARD.encode(out.into_inner())
    };
    let mut body = answer_body(1);
    body["max_new_tokens"] = json!(2);
    body["image"] = json!(png(4097, 4096));
    let (status, reply) = server.post("/v1/answer", &body).await;
    assert_eq!((status, code(&reply)), (413, "image_too_large"), "{reply}");
    body["image"] = json!(png(4096, 4096));
    let (status, reply) = server.post("/v1/answer", &body).await;
    assert_eq!(status, 200, "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_or_idle_connections_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = Server::start_with(&[
        "--no-auth",
        "--header-timeout-secs",
        "1",
        "--body-timeout-secs",
        "1",
    ])
    .await;
    let addr = server.base.trim_start_matches("http://").to_string();
    // What the server sends before it closes, within `wait`.
    let read_all = |mut stream: tokio::net::TcpStream, wait: u64| async move {
        let mut out = Vec::new();
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(wait),
            stream.read_to_end(&mut out),
        )
        .await;
        (read.is_ok(), String::from_utf8_lossy(&out).into_owned())
    };

    // Half a header, then silence: closed.
    let mut half = tokio::net::TcpStream::connect(&addr).await.unwrap();
    half.write_all(b"POST /v1/answer HTTP/1.1\r\nHost: x\r\nContent-Ty")
        .await
        .unwrap();
    let (closed, _) = read_all(half, 10).await;
    assert!(closed, "a half-sent header keeps its connection");

    // Nothing at all: closed.
    let idle = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let (closed, _) = read_all(idle, 10).await;
    assert!(closed, "an idle connection stays open");

    // A body that stalls: 408 in the error envelope.
    let mut stalled = tokio::net::TcpStream::connect(&addr).await.unwrap();
    stalled
        .write_all(
            b"POST /v1/answer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{\"question\": ",
        )
        .await
        .unwrap();
    let (closed, reply) = read_all(stalled, 10).await;
    assert!(closed, "a stalled body keeps its connection");
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("\"request_timeout\""), "{reply}");

    // The server still serves.
    let (status, _) = server.get("/healthz").await;
    assert_eq!(status, 200);
}
