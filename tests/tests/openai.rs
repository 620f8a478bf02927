//! The OpenAI-compatible routes against the real binary: what they answer,
//! that what they serve is stored like any sample, and their errors. (The
//! official `openai` SDK runs against them in CI: tests/python/check_openai_sdk.py.)

use serde_json::{json, Value};
use ulm_e2e::{png_base64, Server};

fn chat_body(extra: Value) -> Value {
    let url = format!("data:image/png;base64,{}", png_base64(40, 30));
    let mut body = json!({
        "model": "anything",
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is in the picture?"},
            {"type": "image_url", "image_url": {"url": url}},
        ]}],
        "max_tokens": 6,
        "seed": 5,
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

#[tokio::test]
async fn a_chat_completion_is_stored_as_answers_with_their_log_probs() {
    let server = Server::start().await;
    let (status, body) = server
        .post(
            "/v1/chat/completions",
            &chat_body(json!({"n": 2, "logprobs": true})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    let choices = body["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    for (i, choice) in choices.iter().enumerate() {
        assert_eq!(choice["index"], i);
        assert_eq!(choice["message"]["role"], "assistant");
        let id = choice["sample_id"].as_str().unwrap();
        let (status, sample) = server.get(&format!("/v1/samples/{id}")).await;
        assert_eq!(status, 200);
        assert_eq!(sample["task"], "answer");
        assert_eq!(sample["prompt"], "What is in the picture?");
        assert_eq!(sample["output_text"], choice["message"]["content"]);
        assert_eq!(sample["model_version"], body["model"]);
        // The returned log-probs are the stored behaviour log-probs.
        let returned: Vec<f64> = choice["logprobs"]["content"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["logprob"].as_f64().unwrap())
            .collect();
        let stored: Vec<f64> = sample["logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l.as_f64().unwrap())
            .collect();
        assert!(!returned.is_empty());
        assert_eq!(returned[..], stored[..returned.len()]);
    }
    let usage = &body["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(
            usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
        )
    );
}

#[tokio::test]
async fn a_streamed_chat_completion_ends_with_the_sample_then_done() {
    let server = Server::start().await;
    let response = server
        .http
        .post(server.url("/v1/chat/completions"))
        .json(&chat_body(
            json!({"stream": true, "stream_options": {"include_usage": true}}),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    let data: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{text}");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert!(chunks.iter().all(|c| c["id"] == chunks[0]["id"]));
    let content: String = chunks
        .iter()
        .flat_map(|c| c["choices"].as_array().unwrap())
        .filter_map(|c| c["delta"]["content"].as_str())
        .collect();
    let finish = chunks
        .iter()
        .flat_map(|c| c["choices"].as_array().unwrap())
        .find(|c| !c["finish_reason"].is_null())
        .expect("a finishing chunk");
    let id = finish["sample_id"].as_str().unwrap();
    let (_, sample) = server.get(&format!("/v1/samples/{id}")).await;
    assert_eq!(sample["output_text"], content.as_str());
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert!(usage["usage"]["completion_tokens"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn image_generations_give_pngs_or_links_to_stored_samples() {
    let server = Server::start().await;
    let (_, models) = server.get("/v1/models").await;
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["object"], "model");
    let side = models["data"][0]["generated_image_size"].as_u64().unwrap();
    let size = format!("{side}x{side}");
    let (status, body) = server
        .post(
            "/v1/images/generations",
            &json!({"prompt": "a red circle", "n": 2, "size": size, "seed": 1}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert!(data
        .iter()
        .all(|d| d["b64_json"].is_string() && d.get("url").is_none()));
    let (status, body) = server
        .post(
            "/v1/images/generations",
            &json!({"prompt": "a red circle", "response_format": "url"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let url = body["data"][0]["url"].as_str().unwrap();
    assert!(url.starts_with(&server.base), "{url}");
    let png = server
        .http
        .get(url)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(&png[..4], b"\x89PNG");
    let id = body["data"][0]["sample_id"].as_str().unwrap();
    let (_, sample) = server.get(&format!("/v1/samples/{id}")).await;
    assert_eq!(sample["task"], "generate");
}

#[tokio::test]
async fn bad_requests_get_openai_shaped_errors() {
    let server = Server::start().await;
    let cases = [
        (
            "/v1/images/generations",
            json!({"prompt": "a red circle", "size": "1024x1024"}),
            422,
            "invalid_parameter",
        ),
        (
            "/v1/images/generations",
            json!({"prompt": "a red circle", "style": "vivid"}),
            422,
            "invalid_body",
        ),
        (
            "/v1/chat/completions",
            chat_body(json!({"messages": [{"role": "system", "content": "Be brief."}]})),
            422,
            "invalid_parameter",
        ),
        (
            "/v1/chat/completions",
            chat_body(json!({"top_logprobs": 3, "logprobs": true})),
            422,
            "invalid_parameter",
        ),
        (
            "/v1/chat/completions",
            chat_body(json!({"max_tokens": 4, "max_completion_tokens": 5})),
            422,
            "invalid_parameter",
        ),
        (
            "/v1/chat/completions",
            chat_body(json!({"messages": [{"role": "user", "content": [
                {"type": "text", "text": "What is it?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}
            ]}]})),
            422,
            "invalid_image",
        ),
        (
            "/v1/chat/completions",
            chat_body(json!({"n": 0})),
            422,
            "invalid_parameter",
        ),
        (
            "/v1/chat/completions",
            chat_body(json!({"max_tokens": null, "max_completion_tokens": 0})),
            422,
            "invalid_parameter",
        ),
    ];
    for (path, body, status, code) in cases {
        let (got, answer) = server.post(path, &body).await;
        assert_eq!(got, status, "{path} {body}: {answer}");
        assert_eq!(answer["error"]["code"], code, "{answer}");
        assert_eq!(answer["error"]["type"], "invalid_request_error", "{answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.len() > 10, "{message}");
        assert!(
            !message.contains("max_new_tokens"),
            "names the client's field: {message}"
        );
    }
}
