//! The Rust client generated from the committed spec, against the real server.

use std::num::NonZeroU32;

use ulm_client::types;
use ulm_e2e::{png_base64, Server, USER_KEY};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_client_round_trip() {
    let server = Server::start_with(&["--api-keys", &format!("user:{USER_KEY}")]).await;
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {USER_KEY}").parse().unwrap(),
    );
    let http = reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap();
    let client = ulm_client::Client::new_with_client(&server.base, http);

    let health = client.healthz().await.unwrap();
    assert_eq!(health.status, "ok");
    let models = client.list_models().await.unwrap();
    assert!(models.data[0].demo);

    let generated = client
        .generate(&types::GenerateRequest {
            prompt: "a blue square".into(),
            n: NonZeroU32::new(2).unwrap(),
            cfg_weight: Some(4.0),
            temperature: None,
            top_k: None,
            seed: Some(11),
            plan: None,
            best_of: None,
        })
        .await
        .unwrap();
    assert_eq!(generated.images.len(), 2);
    assert_eq!(generated.plan, None, "the demo model does not plan");
    let image_sample = generated.images[0].sample_id.clone();

    let answered = client
        .answer(&types::AnswerRequest {
            image: png_base64(32, 20),
            question: "What colour?".into(),
            n: NonZeroU32::new(2).unwrap(),
            max_new_tokens: NonZeroU32::new(6).unwrap(),
            temperature: Some(0.8),
            top_p: Some(0.9),
            top_k: None,
            seed: Some(1),
            stream: None,
        })
        .await
        .unwrap();
    assert_eq!(answered.samples.len(), 2);

    let stored = client
        .post_feedback(&types::FeedbackItem {
            sample_id: image_sample.clone(),
            key: "quality".into(),
            score: Some(0.7),
            value: None,
            comment: Some("nice".into()),
            correction: None,
            source: Some(types::FeedbackSource {
                type_: types::FeedbackSourceType::Human,
                user_id: Some("tester".into()),
            }),
            client_id: Some("client-test-1".into()),
        })
        .await
        .unwrap();
    assert_eq!(stored.items[0].status, types::FeedbackStatus::Created);

    let sample = client.get_sample(&image_sample).await.unwrap();
    assert_eq!(sample.feedback.len(), 1);
    assert_eq!(sample.feedback[0].comment.as_deref(), Some("nice"));

    // Errors come back typed, with the documented code.
    let err = client.get_sample("missing").await.unwrap_err();
    match err {
        ulm_client::Error::ErrorResponse(body) => assert_eq!(body.error.code, "not_found"),
        other => panic!("expected a typed error, got {other:?}"),
    }
}
