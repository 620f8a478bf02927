//! The engine: a request that fails to join a batch fails alone; requests
//! join and leave a running batch (continuous batching) unless the engine
//! batches statically; a version swap reaches requests that start after it.

use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use ulm_core::engine::{
    AnswerWork, Batching, Engine, EngineConfig, EngineError, ImageWork, ServingModel,
};
use ulm_core::record::{AnswerParams, GenerateParams};
use ulm_model::bundle::ModelBundle;
use ulm_model::demo::DEFAULT_SEED;

fn work(max_new_tokens: u32) -> AnswerWork {
    AnswerWork {
        image: Some(image::RgbImage::from_pixel(
            32,
            24,
            image::Rgb([200, 30, 30]),
        )),
        question: "What colour is the image?".into(),
        params: AnswerParams {
            n: 2,
            max_new_tokens,
            temperature: 1.0,
            top_p: None,
            top_k: None,
        },
        seeds: vec![1, 2],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_fails_in_a_batch_fails_alone() {
    let bundle = ModelBundle::demo(DEFAULT_SEED, DType::F32, &Device::Cpu).unwrap();
    // A long window so the three requests share one batch.
    let config = EngineConfig {
        batch_window: Duration::from_millis(300),
        ..EngineConfig::default()
    };
    let engine = Engine::start(bundle, "demo-base".into(), config);
    let deadline = Instant::now() + Duration::from_secs(120);
    // max_new_tokens 0 passes the engine's checks and fails the decode loop.
    let (good, bad, other) = tokio::join!(
        engine.answer(work(4), deadline, None),
        engine.answer(work(0), deadline, None),
        engine.answer(work(3), deadline, None),
    );
    let good = good.unwrap();
    assert_eq!(good.samples.len(), 2);
    assert!(good.timings.batch_rows >= 2);
    assert!(other
        .unwrap()
        .samples
        .iter()
        .all(|s| s.token_ids.len() <= 3));
    assert!(matches!(bad, Err(EngineError::InvalidInput(_))), "{bad:?}");
}

fn images(n: u32) -> ImageWork {
    ImageWork {
        prompt: "a red circle above a blue square".into(),
        params: GenerateParams {
            n,
            cfg_weight: 3.0,
            temperature: 1.0,
            top_k: None,
            plan_temperature: None,
            best_of: None,
        },
        seeds: (0..n as u64).collect(),
    }
}

fn demo_engine(batching: Batching) -> Engine {
    let bundle = ModelBundle::demo(DEFAULT_SEED, DType::F32, &Device::Cpu).unwrap();
    let config = EngineConfig {
        batching,
        ..EngineConfig::default()
    };
    Engine::start(bundle, "demo-base".into(), config)
}

/// Waits until the worker is drawing `images` images.
async fn until_drawing(engine: &Engine, images: usize) {
    while engine.running().1 < images {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Which of a long image request and a short answer, sent while the images
/// are being drawn, ends first.
async fn short_answer_during_images(batching: Batching) -> (bool, u64) {
    let engine = demo_engine(batching);
    let deadline = Instant::now() + Duration::from_secs(120);
    let long = tokio::spawn({
        let engine = engine.clone();
        async move { engine.generate(images(16), deadline).await }
    });
    until_drawing(&engine, 16).await;
    let answer = engine.answer(work(2), deadline, None).await.unwrap();
    let images_done = long.is_finished();
    let generated = long.await.unwrap().unwrap();
    assert_eq!(generated.images.len(), 16);
    (!images_done, answer.timings.queue_ms)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_answer_joins_running_images_instead_of_waiting_for_them() {
    let (answer_first, _) = short_answer_during_images(Batching::Continuous).await;
    assert!(
        answer_first,
        "continuous batching: the answer joins the running batch and ends first"
    );
    let (answer_first, queued_ms) = short_answer_during_images(Batching::Static).await;
    assert!(
        !answer_first,
        "static batching: the answer waits for the images ({queued_ms} ms queued)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_reaches_requests_that_start_after_it_and_running_ones_keep_their_version() {
    let engine = demo_engine(Batching::Continuous);
    let deadline = Instant::now() + Duration::from_secs(120);
    let before = tokio::spawn({
        let engine = engine.clone();
        async move { engine.generate(images(8), deadline).await }
    });
    until_drawing(&engine, 8).await;
    let model = engine.serving().model.clone();
    engine.activate(ServingModel {
        version: "v2".into(),
        model,
    });
    // Images asked for after the swap wait for the old version's images to
    // end, then run on the new version; an answer starts on it at once.
    let after = tokio::spawn({
        let engine = engine.clone();
        async move { engine.generate(images(1), deadline).await }
    });
    let answer = engine.answer(work(2), deadline, None).await.unwrap();
    assert_eq!(answer.model_version, "v2");
    assert!(
        !before.is_finished(),
        "the answer did not wait for the images"
    );
    let before = before.await.unwrap().unwrap();
    let after = after.await.unwrap().unwrap();
    assert_eq!(before.model_version, "demo-base");
    assert_eq!(after.model_version, "v2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_is_refused_while_requests_wait_for_room() {
    let bundle = ModelBundle::demo(DEFAULT_SEED, DType::F32, &Device::Cpu).unwrap();
    // Room for one image at a time, two waiting.
    let config = EngineConfig {
        max_queue: 2,
        max_batch_rows: 1,
        ..EngineConfig::default()
    };
    let engine = Engine::start(bundle, "demo-base".into(), config);
    let deadline = Instant::now() + Duration::from_secs(120);
    let running = tokio::spawn({
        let engine = engine.clone();
        async move { engine.generate(images(1), deadline).await }
    });
    until_drawing(&engine, 1).await;
    let waiting: Vec<_> = (0..2)
        .map(|_| {
            let engine = engine.clone();
            tokio::spawn(async move { engine.generate(images(1), deadline).await })
        })
        .collect();
    while engine.queue_depth() < 2 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let refused = engine.generate(images(1), deadline).await;
    assert!(
        matches!(refused, Err(EngineError::QueueFull)),
        "{refused:?}"
    );
    running.await.unwrap().unwrap();
    for w in waiting {
        let out = w.await.unwrap().unwrap();
        assert_eq!(out.timings.batch_rows, 1, "one image at a time");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_request_draws_every_image_from_the_plan_it_reports() {
    let engine = demo_engine(Batching::Continuous);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut planned = images(2);
    planned.params.plan_temperature = Some(1.0);
    let out = engine.generate(planned.clone(), deadline).await.unwrap();
    let plan = out
        .plan
        .clone()
        .expect("a planned request reports its plan");

    // The plan is the planning turn answered as a text-only request.
    let turn = AnswerWork {
        image: None,
        question: ulm_model::plan::plan_request(&planned.prompt),
        params: AnswerParams {
            n: 1,
            max_new_tokens: ulm_model::plan::MAX_PLAN_TOKENS as u32,
            temperature: 1.0,
            top_p: None,
            top_k: None,
        },
        seeds: vec![planned.seeds[0]],
    };
    let answered = engine.answer(turn, deadline, None).await.unwrap();
    assert_eq!(answered.samples[0].text.trim(), plan);

    // Every image is the one the plan draws as a prompt, seed for seed.
    let mut direct = images(2);
    direct.prompt = plan;
    let drawn = engine.generate(direct, deadline).await.unwrap();
    assert!(drawn.plan.is_none());
    let tokens = |o: &ulm_core::engine::GenerateOutput| -> Vec<Vec<u32>> {
        o.images.iter().map(|i| i.tokens.clone()).collect()
    };
    assert_eq!(tokens(&out), tokens(&drawn));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn best_of_keeps_the_candidate_the_model_reads_its_plan_in_best() {
    let engine = demo_engine(Batching::Continuous);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut request = images(2);
    request.params.plan_temperature = Some(1.0);
    request.params.best_of = Some(3);
    let out = engine.generate(request.clone(), deadline).await.unwrap();
    assert_eq!(out.images.len(), 2);
    let plan = out.plan.clone().unwrap();

    // The candidates: the plan drawn from seeds seed * 3 + c.
    let mut candidates = images(6);
    candidates.prompt = plan.clone();
    candidates.seeds = [0u64, 1]
        .iter()
        .flat_map(|s| (0..3).map(move |c| s * 3 + c))
        .collect();
    let drawn = engine.generate(candidates, deadline).await.unwrap();
    let read = ulm_core::engine::ReadWork {
        images: drawn.images.iter().map(|i| i.image.clone()).collect(),
        question: ulm_model::plan::DESCRIBE_QUESTION.into(),
        answer: plan,
    };
    let scores = engine.read(read, deadline).await.unwrap();
    for (image, chunk) in out.images.iter().enumerate() {
        let range = image * 3..image * 3 + 3;
        let best = range
            .clone()
            .max_by(|&a, &b| scores[a].total_cmp(&scores[b]))
            .unwrap();
        assert_eq!(chunk.tokens, drawn.images[best].tokens, "image {image}");
    }

    let mut unplanned = images(1);
    unplanned.params.best_of = Some(2);
    let refused = engine.generate(unplanned, deadline).await.unwrap_err();
    assert!(
        matches!(refused, EngineError::InvalidInput(_)),
        "{refused:?}"
    );
}
