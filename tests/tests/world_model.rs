//! What the README's first command serves: the built-in model pretrained
//! on the synthetic world draws what a prompt says and answers questions
//! about an image, as the verifier checks.

use base64::Engine as _;
use serde_json::json;
use ulm_e2e::Server;
use ulm_world::{caption, examples, verify, Split};

/// Images of a single-object prompt that must hold it, of 8 drawn from
/// one plan (each the best of 8 candidates): the shipped model draws 8;
/// the random demo model none.
const MIN_IMAGES_RIGHT: usize = 6;
/// Images of the example, "a red circle above a blue square", that
/// must hold it, of 8 each from its own plan (and the best of 16
/// candidates): the shipped model draws 7 (the previous model, without
/// plans, 0 of 32); the random demo model none.
const MIN_EXAMPLE_RIGHT: usize = 5;
/// Share of exactly right answers to the questions about 8 test scenes:
/// the shipped model gets 38 of 40; the random demo model none.
const MIN_ANSWER_SHARE: f64 = 0.6;

/// How many of a response's images the verifier finds `prompt` true of.
fn images_right(out: &serde_json::Value, prompt: &str) -> usize {
    let claim = caption::parse(prompt).unwrap();
    out["images"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|image| {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(image["png_base64"].as_str().unwrap())
                .unwrap();
            let image = image::load_from_memory(&bytes).unwrap().to_rgb8();
            verify::check(&claim, &verify::read(&image))
        })
        .count()
}

fn png(image: &image::RgbImage) -> String {
    let mut out = std::io::Cursor::new(Vec::new());
    image.write_to(&mut out, image::ImageFormat::Png).unwrap();
    base64::engine::general_purpose::STANDARD.encode(out.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_without_a_model_draws_and_answers_the_world() {
    let server = Server::start_default(&["--no-auth"]).await;
    let (status, models) = server.get("/v1/models").await;
    assert_eq!(status, 200, "{models}");
    assert_eq!(models["data"][0]["demo"], false, "{models}");
    // The checkpoint's generation_config.json: what it draws best with.
    assert_eq!(
        models["data"][0]["sampling"],
        json!({"cfg_weight": 1.5, "temperature": 0.7, "plan_temperature": 0.5, "best_of": 16}),
        "{models}"
    );

    let prompt = "a photo of a green triangle";
    let (status, out) = server
        .post(
            "/v1/generate",
            &json!({"prompt": prompt, "n": 8, "seed": 0}),
        )
        .await;
    assert_eq!(status, 200, "{out}");
    let plan = out["plan"]
        .as_str()
        .expect("the world model plans")
        .to_string();
    let id = out["images"][0]["sample_id"].as_str().unwrap();
    let (status, sample) = server.get(&format!("/v1/samples/{id}")).await;
    assert_eq!(status, 200, "{sample}");
    let params = &sample["params"];
    assert_eq!(params["cfg_weight"], 1.5, "{sample}");
    assert!(
        (params["temperature"].as_f64().unwrap() - 0.7).abs() < 1e-6,
        "{sample}"
    );
    assert_eq!(params["best_of"], 8, "{sample}");
    assert_eq!(sample["prompt"], prompt, "the user's prompt is kept");
    assert_eq!(
        sample["output_text"],
        plan.as_str(),
        "and the plan beside it"
    );
    let right = images_right(&out, prompt);
    assert!(
        right >= MIN_IMAGES_RIGHT,
        "{right} of 8 images hold {prompt:?} (plan {plan:?})"
    );

    // The example, each image from its own plan.
    let prompt = "a red circle above a blue square";
    let mut right = 0;
    let mut plans = Vec::new();
    for seed in 0..8 {
        let (status, out) = server
            .post(
                "/v1/generate",
                &json!({"prompt": prompt, "n": 1, "seed": seed}),
            )
            .await;
        assert_eq!(status, 200, "{out}");
        right += images_right(&out, prompt);
        plans.push(out["plan"].as_str().unwrap().to_string());
    }
    assert!(
        right >= MIN_EXAMPLE_RIGHT,
        "{right} of 8 images hold {prompt:?}; plans {plans:#?}"
    );

    // Without a plan the prompt is drawn from directly.
    let (status, out) = server
        .post(
            "/v1/generate",
            &json!({"prompt": prompt, "n": 1, "seed": 0, "plan": false}),
        )
        .await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["plan"], json!(null), "{out}");

    let (mut correct, mut asked) = (0, 0);
    for example in examples(0, Split::Test).take(8) {
        let image = png(&example.image(48));
        for question in &example.questions {
            let body = json!({"image": image, "question": question.text, "n": 1,
                              "max_new_tokens": 8, "temperature": 0.0});
            let (status, out) = server.post("/v1/answer", &body).await;
            assert_eq!(status, 200, "{out}");
            let text = out["samples"][0]["text"]
                .as_str()
                .unwrap()
                .trim()
                .to_string();
            correct += (text == question.answer) as usize;
            asked += 1;
        }
    }
    let share = correct as f64 / asked as f64;
    assert!(
        share >= MIN_ANSWER_SHARE,
        "{correct} of {asked} answers right"
    );
}
