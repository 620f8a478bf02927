//! Rewards that use the model, a service or the world's verifier: self-cycle,
//! external HTTP, verifier.

use std::time::Duration;

use candle_core::{DType, Device};
use image::RgbImage;
use ulm_model::bundle::ModelBundle;
use ulm_model::demo::DEFAULT_SEED;
use ulm_model::generate::{generate_images_batch, ImageItem};
use ulm_model::sampling::SamplingParams;
use ulm_rl::reward::{
    HttpReward, Reward, RewardContext, RewardTask, Scored, SelfCycle, TrainItem, WorldVerifier,
};
use ulm_world::{examples, Split};

fn images(bundle: &ModelBundle) -> Vec<image::RgbImage> {
    let item = ImageItem {
        prompt: bundle.processor.generation_prompt("a red square").unwrap(),
        cfg_weight: 5.0,
        sampling: SamplingParams {
            temperature: 1.0,
            top_k: None,
            top_p: None,
        },
        seeds: vec![1, 2],
    };
    generate_images_batch(
        &bundle.model,
        &[item],
        bundle.processor.special.pad,
        &mut |_| true,
    )
    .unwrap()
    .remove(0)
    .into_iter()
    .map(|s| s.unwrap().image)
    .collect()
}

/// A sample as the rewards see it: an answer text or an image.
fn scored<'a>(
    item: &'a TrainItem,
    text: Option<&'a str>,
    image: Option<&'a RgbImage>,
) -> Scored<'a> {
    Scored {
        item,
        text,
        image,
        tokens: &[],
        human_score: None,
    }
}

#[test]
fn self_cycle_scores_are_bounded_and_deterministic() {
    let bundle = ModelBundle::demo(DEFAULT_SEED, DType::F32, &Device::Cpu).unwrap();
    let ctx = RewardContext::of(&bundle);
    let item = TrainItem {
        qa: None,
        caption: Some("a red square".into()),
    };
    let imgs = images(&bundle);
    let samples: Vec<Scored> = imgs
        .iter()
        .map(|img| scored(&item, None, Some(img)))
        .collect();
    let reward = SelfCycle {
        max_new_tokens: 8,
        ..SelfCycle::default()
    };
    let a = reward.score(&ctx, &samples).unwrap();
    assert_eq!(a.len(), 2);
    assert!(a.iter().all(|s| (0.0..=1.0).contains(s)));
    assert_eq!(a, reward.score(&ctx, &samples).unwrap());
}

#[test]
fn the_verifier_reward_scores_images_against_their_captions() {
    let bundle = ModelBundle::demo(DEFAULT_SEED, DType::F32, &Device::Cpu).unwrap();
    let ctx = RewardContext::of(&bundle);
    let example = examples(1, Split::Train)
        .find(|e| e.scene.objects.len() == 2)
        .unwrap();
    let image = example.image(64);
    let blank = RgbImage::from_pixel(64, 64, image::Rgb(ulm_world::scene::BACKGROUND));
    let score = |caption: &str, image: &RgbImage| {
        let item = TrainItem {
            qa: None,
            caption: Some(caption.into()),
        };
        WorldVerifier
            .score(&ctx, &[scored(&item, None, Some(image))])
            .unwrap()[0]
    };
    assert_eq!(WorldVerifier.task(), RewardTask::Generation);
    let caption = &example.captions[1].text;
    assert_eq!(score(caption, &image), 1.0, "{caption}");
    // One of the two objects drawn: half the credit.
    let first = &example.scene.objects[0];
    let other = if first.shape.name() == "circle" {
        "square"
    } else {
        "circle"
    };
    let half = format!("a {} and four {other}s", first.shape.name());
    assert_eq!(score(&half, &image), 0.5, "{half}");
    assert_eq!(score(caption, &blank), 0.0);
    assert_eq!(score("a portrait of a cat", &image), 0.0);
}

/// A loopback scoring service: score = answer length, or 0.5 for images.
fn start_service(wrong_count: bool) -> String {
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let addr = server.server_addr().to_ip().unwrap();
    std::thread::spawn(move || {
        for mut request in server.incoming_requests() {
            let body: serde_json::Value = serde_json::from_reader(request.as_reader()).unwrap();
            let mut scores: Vec<f32> = body["samples"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| match s["text"].as_str() {
                    Some(t) => t.len() as f32,
                    None if s["image_png_base64"].is_string() => 0.5,
                    None => -1.0,
                })
                .collect();
            if wrong_count {
                scores.pop();
            }
            let json = serde_json::json!({"scores": scores}).to_string();
            let header = tiny_http::Header::from_bytes("Content-Type", "application/json").unwrap();
            let _ = request.respond(tiny_http::Response::from_string(json).with_header(header));
        }
    });
    format!("http://{addr}/score")
}

#[test]
fn http_reward_posts_samples_and_validates_the_answer() {
    let bundle = ModelBundle::demo(DEFAULT_SEED, DType::F32, &Device::Cpu).unwrap();
    let ctx = RewardContext::of(&bundle);
    let item = TrainItem {
        qa: None,
        caption: Some("a cat".into()),
    };
    let imgs = images(&bundle);
    let text = [
        scored(&item, Some("abc"), None),
        scored(&item, Some("hello"), None),
    ];
    let pics: Vec<Scored> = imgs
        .iter()
        .map(|img| scored(&item, None, Some(img)))
        .collect();
    let reward = |url: String, task| HttpReward {
        name: "external".into(),
        url,
        task,
        timeout: Duration::from_secs(10),
    };

    let url = start_service(false);
    assert_eq!(
        reward(url.clone(), RewardTask::Understanding)
            .score(&ctx, &text)
            .unwrap(),
        vec![3.0, 5.0]
    );
    assert_eq!(
        reward(url, RewardTask::Generation)
            .score(&ctx, &pics)
            .unwrap(),
        vec![0.5, 0.5]
    );

    let short = start_service(true);
    let err = reward(short, RewardTask::Understanding)
        .score(&ctx, &text)
        .unwrap_err();
    assert!(err.to_string().contains("expected 2"), "{err}");

    // Nothing listens there: an error, not a panic.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/score", l.local_addr().unwrap())
    };
    assert!(reward(closed, RewardTask::Understanding)
        .score(&ctx, &text)
        .is_err());
}
