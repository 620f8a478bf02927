//! The engine: a request that fails inside a batch fails alone.

use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use ulm_core::engine::{AnswerWork, Engine, EngineConfig, EngineError};
use ulm_core::record::AnswerParams;
use ulm_model::bundle::ModelBundle;
use ulm_model::demo::DEFAULT_SEED;

fn work(max_new_tokens: u32) -> AnswerWork {
    AnswerWork {
        image: image::RgbImage::from_pixel(32, 24, image::Rgb([200, 30, 30])),
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
