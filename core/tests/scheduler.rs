//! A job's data from the store and its training run, without HTTP: every
//! source of the mix (rated served groups, questions with a reference
//! answer, unrated generation prompts), the held-out split, what is skipped
//! and why, and a run that draws on all three sources.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use candle_core::{DType, Device};
use ulm_core::engine::ServingModel;
use ulm_core::record::{
    AnswerParams, FinishReason, GenerateParams, RequestParams, SampleRecord, Task,
};
use ulm_core::scheduler::config::JobConfig;
use ulm_core::scheduler::data::{gather, hash_unit, JobData, Shape};
use ulm_core::scheduler::job::{self, JobInputs, Progress, RunEnd};
use ulm_core::store::{now_ms, FeedbackRecord, Store};
use ulm_model::bundle::ModelBundle;
use ulm_model::demo::DEFAULT_SEED;
use ulm_rl::trainer::ServedGroup;

const IMAGE_TOKENS: usize = 64;

struct Fixture {
    store: Store,
    _dir: tempfile::TempDir,
}

fn png() -> Vec<u8> {
    let img = image::RgbImage::from_fn(24, 16, |x, y| {
        image::Rgb([(x * 9) as u8, (y * 11) as u8, 7])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// How the fixture's requests were drawn: no truncation, CFG 5 for images.
fn params(task: Task, n: usize, temperature: f64) -> RequestParams {
    let temperature = temperature as f32;
    match task {
        Task::Answer => RequestParams::Answer(AnswerParams {
            n: n as u32,
            max_new_tokens: 4,
            temperature,
            top_p: None,
            top_k: None,
        }),
        Task::Generate => RequestParams::Generate(GenerateParams {
            n: n as u32,
            cfg_weight: 5.0,
            temperature,
            top_k: None,
            plan_temperature: None,
            best_of: None,
        }),
    }
}

/// Stores one served request of `n` samples; returns their ids.
async fn serve(
    store: &Store,
    request: &str,
    task: Task,
    prompt: &str,
    n: usize,
    temperature: f64,
) -> Vec<String> {
    let params = params(task, n, temperature);
    serve_with(store, request, task, prompt, n, params, true).await
}

/// [`serve`] with the request's parameters, and images with or without
/// their guided log-probs.
async fn serve_with(
    store: &Store,
    request: &str,
    task: Task,
    prompt: &str,
    n: usize,
    params: RequestParams,
    guided_logprobs: bool,
) -> Vec<String> {
    let image = match task {
        Task::Answer => Some(store.put_image(png()).await.unwrap()),
        Task::Generate => None,
    };
    let tokens = match task {
        Task::Answer => 4,
        Task::Generate => IMAGE_TOKENS,
    };
    let records: Vec<SampleRecord> = (0..n)
        .map(|i| SampleRecord {
            id: format!("{request}-{i}"),
            request_id: request.to_string(),
            group_index: i as i64,
            task,
            model_version: "demo-base".into(),
            prompt: prompt.into(),
            input_image_sha256: image.clone(),
            params,
            seed: i as i64,
            output_text: Some(format!("answer {i}")),
            output_image_sha256: None,
            token_ids: (0..tokens as u32)
                .map(|t| (t * 7 + i as u32) % 200)
                .collect(),
            logprobs: vec![-3.0; tokens],
            guided_logprobs: match task {
                Task::Generate if guided_logprobs => vec![-2.5; tokens],
                _ => Vec::new(),
            },
            finish_reason: Some(FinishReason::Length),
            queue_ms: 0,
            compute_ms: 0,
            created_at: now_ms(),
        })
        .collect();
    store.insert_samples(&records).await.unwrap();
    records.into_iter().map(|r| r.id).collect()
}

async fn rate(store: &Store, sample: &str, score: Option<f64>, correction: Option<&str>) {
    rate_under(store, "quality", sample, score, correction).await
}

async fn rate_under(
    store: &Store,
    key: &str,
    sample: &str,
    score: Option<f64>,
    correction: Option<&str>,
) {
    store
        .insert_feedback(&[FeedbackRecord {
            id: uuid::Uuid::new_v4().to_string(),
            client_id: None,
            body_sha256: String::new(),
            sample_id: sample.into(),
            key: key.into(),
            score,
            value: None,
            comment: None,
            correction: correction.map(String::from),
            source: "human".into(),
            user_id: None,
            created_at: now_ms(),
        }])
        .await
        .unwrap();
}

/// Six rated answer groups, one rated at another temperature, one rated
/// single sample, a group with a reference answer only, and two unrated
/// generation requests.
async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), None, None).await.unwrap();
    for g in 0..6 {
        let ids = serve(
            &store,
            &format!("rated-{g}"),
            Task::Answer,
            "What is it?",
            4,
            1.0,
        )
        .await;
        for (i, id) in ids.iter().enumerate() {
            rate(&store, id, Some(i as f64 / 4.0), None).await;
        }
    }
    let hot = serve(&store, "hot", Task::Answer, "What is it?", 4, 0.7).await;
    rate(&store, &hot[0], Some(1.0), None).await;
    let single = serve(&store, "single", Task::Answer, "What is it?", 1, 1.0).await;
    rate(&store, &single[0], Some(1.0), None).await;
    let reference = serve(&store, "reference", Task::Answer, "Which? A or B", 3, 1.0).await;
    rate(&store, &reference[1], None, Some("B")).await;
    serve(&store, "draw-1", Task::Generate, "a red square", 2, 1.0).await;
    serve(&store, "draw-2", Task::Generate, "a blue circle", 2, 1.0).await;
    Fixture { store, _dir: dir }
}

/// A job on the demo model, starting from the base, which is also served.
fn inputs_on_the_demo(config: JobConfig, data: JobData) -> JobInputs {
    let base = ModelBundle::demo(DEFAULT_SEED, DType::F32, &Device::Cpu).unwrap();
    let active = Arc::new(ServingModel {
        version: "demo-base".into(),
        model: base.model.clone(),
    });
    JobInputs {
        base,
        parent_checkpoint: None,
        active,
        config,
        data,
    }
}

/// The fixture's data for `config`, 30% held out.
async fn data_for(f: &Fixture, config: &JobConfig) -> JobData {
    gather(&f.store, config, 0.3, now_ms(), shape())
        .await
        .unwrap()
}

/// A job run on the demo model: how it ended and everything it reported.
async fn run_on_the_demo(
    config: JobConfig,
    data: JobData,
    cancelled: bool,
) -> (RunEnd, Vec<Progress>) {
    let inputs = inputs_on_the_demo(config, data);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let end =
        tokio::task::spawn_blocking(move || job::run(inputs, &AtomicBool::new(cancelled), &tx))
            .await
            .unwrap()
            .unwrap();
    let mut progress = Vec::new();
    while let Ok(p) = rx.try_recv() {
        progress.push(p);
    }
    (end, progress)
}

/// Each group's sample scores.
fn scores(groups: &[ServedGroup]) -> Vec<Vec<f32>> {
    groups
        .iter()
        .map(|g| g.samples.iter().map(|s| s.score).collect())
        .collect()
}

fn shape() -> Shape {
    let demo = ModelBundle::demo(DEFAULT_SEED, DType::F32, &Device::Cpu).unwrap();
    Shape {
        image_tokens: IMAGE_TOKENS,
        input_images: demo.image_processor,
        sampling_temperature: demo.sampling.temperature,
    }
}

#[tokio::test]
async fn a_job_gathers_every_source_and_holds_out_a_stable_share() {
    let f = fixture().await;
    let config = JobConfig::default();
    let data = data_for(&f, &config).await;
    let c = &data.counts;
    assert_eq!(c.rated_requests, 9, "{c:?}");
    assert_eq!(c.skipped_other_temperature, 1, "{c:?}");
    assert_eq!(c.skipped_single_sample, 1, "{c:?}");
    // Six scored groups plus the reference-answer group scored by accuracy.
    assert_eq!(c.train_groups + c.eval_groups, 7, "{c:?}");
    assert!(c.eval_groups >= 1 && c.train_groups >= 1, "{c:?}");
    assert_eq!(c.prompts, 2, "{c:?}");
    let reference_group = data
        .train
        .iter()
        .chain(&data.eval)
        .find(|g| g.samples.len() == 3)
        .expect("the reference-answer group");
    assert_eq!(reference_group.item.qa.as_ref().unwrap().solution, "B");
    // Held-out groups never give reference answers for training either.
    assert_eq!(
        c.reference_answers,
        usize::from(data.train.iter().any(|g| g.samples.len() == 3))
    );

    // The same split every time: evaluation groups are never trained on.
    let again = gather(&f.store, &config, 0.3, now_ms(), shape())
        .await
        .unwrap();
    assert_eq!(scores(&again.eval), scores(&data.eval));

    // Only the chosen feedback keys count.
    let other_keys = JobConfig {
        feedback_keys: Some(vec!["helpfulness".into()]),
        ..JobConfig::default()
    };
    let data = gather(&f.store, &other_keys, 0.3, now_ms(), shape())
        .await
        .unwrap();
    assert_eq!(data.counts.skipped_unscored, 6, "{:?}", data.counts);
}

/// Users' ratings train; the gate judges the held-out groups by the trusted
/// key alone, so a rater who scores backwards cannot vouch for what it
/// taught. A group scored only under the other role's keys is skipped.
#[tokio::test]
async fn the_gate_judges_held_out_groups_by_its_own_keys() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), None, None).await.unwrap();
    let fraction = 0.3;
    let ids_where = |held_out: bool, n: usize| {
        (0..)
            .map(move |k| format!("request-{held_out}-{k}"))
            .filter(move |id| (hash_unit(id) < fraction) == held_out)
            .take(n)
    };
    for request in ids_where(true, 3).chain(ids_where(false, 3)) {
        let ids = serve(&store, &request, Task::Answer, "What is it?", 4, 1.0).await;
        for (i, id) in ids.iter().enumerate() {
            let user = i as f64 / 4.0;
            rate_under(&store, "user", id, Some(user), None).await;
            rate_under(&store, "audit", id, Some(1.0 - user), None).await;
        }
    }
    let only_user = ids_where(true, 4).last().unwrap();
    let only_audit = ids_where(false, 4).last().unwrap();
    for (request, key) in [(&only_user, "user"), (&only_audit, "audit")] {
        for id in serve(&store, request, Task::Answer, "What is it?", 2, 1.0).await {
            rate_under(&store, key, &id, Some(1.0), None).await;
        }
    }
    let config = JobConfig {
        feedback_keys: Some(vec!["user".into()]),
        gate_feedback_keys: Some(vec!["audit".into()]),
        ..JobConfig::default()
    };
    let data = gather(&store, &config, fraction, now_ms(), shape())
        .await
        .unwrap();
    assert_eq!(scores(&data.train), vec![vec![0.0, 0.25, 0.5, 0.75]; 3]);
    assert_eq!(scores(&data.eval), vec![vec![1.0, 0.75, 0.5, 0.25]; 3]);
    assert_eq!(data.counts.skipped_unscored, 2, "{:?}", data.counts);

    // Without gate keys both roles take the training keys' scores.
    let same = JobConfig {
        gate_feedback_keys: None,
        ..config
    };
    let data = gather(&store, &same, fraction, now_ms(), shape())
        .await
        .unwrap();
    let mut eval = scores(&data.eval);
    eval.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let mut expected = vec![vec![0.0, 0.25, 0.5, 0.75]; 3];
    expected.push(vec![1.0, 1.0]);
    assert_eq!(eval, expected);
}

/// Held-out groups whose importance weights cannot be formed are left out
/// of the evaluation, counted by reason; images drawn with CFG are weighed
/// by their guided log-probs.
#[tokio::test]
async fn held_out_groups_the_gate_cannot_weigh_are_left_out_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), None, None).await.unwrap();
    let answer = |top_k: Option<u32>, top_p: Option<f32>, temperature: f32| {
        RequestParams::Answer(AnswerParams {
            n: 2,
            max_new_tokens: 4,
            temperature,
            top_p,
            top_k,
        })
    };
    let image = |cfg_weight: f32| {
        RequestParams::Generate(GenerateParams {
            n: 2,
            cfg_weight,
            temperature: 1.0,
            top_k: None,
            plan_temperature: None,
            best_of: None,
        })
    };
    let requests = [
        ("plain", Task::Answer, answer(None, None, 1.0), true),
        ("top-p", Task::Answer, answer(None, Some(0.9), 1.0), true),
        ("top-p-1", Task::Answer, answer(None, Some(1.0), 1.0), true),
        ("top-k", Task::Answer, answer(Some(40), None, 1.0), true),
        ("greedy", Task::Answer, answer(None, None, 0.0), true),
        ("guided", Task::Generate, image(5.0), true),
        ("guided-old-row", Task::Generate, image(5.0), false),
        ("unguided-old-row", Task::Generate, image(1.0), false),
    ];
    for (request, task, params, guided) in requests {
        let ids = serve_with(&store, request, task, "a red square", 2, params, guided).await;
        for (i, id) in ids.iter().enumerate() {
            rate(&store, id, Some(i as f64), None).await;
        }
    }
    let at_1 = JobConfig {
        temperature: Some(1.0),
        ..JobConfig::default()
    };
    // Everything held out.
    let data = gather(&store, &at_1, 1.0, now_ms(), shape()).await.unwrap();
    let c = &data.counts;
    assert_eq!(
        (
            c.unweighable_truncated,
            c.unweighable_greedy,
            c.unweighable_no_guided_logprobs
        ),
        (2, 1, 1),
        "{c:?}"
    );
    assert_eq!((c.eval_groups, c.train_groups), (4, 0), "{c:?}");
    let mut guidance: Vec<Option<f32>> = data.eval.iter().map(|g| g.guidance).collect();
    guidance.sort_by(|a, b| a.partial_cmp(b).unwrap());
    assert_eq!(guidance, [None, None, Some(1.0), Some(5.0)]);
    let guided = data.eval.iter().find(|g| g.guided()).unwrap();
    assert!(guided
        .samples
        .iter()
        .all(|s| s.guided_logprobs.len() == IMAGE_TOKENS));

    // Nothing held out by the hash: the one forced out is weighable, and
    // the groups the gate cannot weigh still train.
    let data = gather(&store, &at_1, 1e-9, now_ms(), shape())
        .await
        .unwrap();
    let c = &data.counts;
    assert_eq!((c.eval_groups, c.train_groups), (1, 7), "{c:?}");
    assert_eq!(
        c.unweighable_truncated + c.unweighable_greedy + c.unweighable_no_guided_logprobs,
        0
    );
}

/// A job that names no temperature takes the served model's default, the
/// one requests that name none are drawn at; a named one wins.
#[tokio::test]
async fn a_job_without_a_temperature_trains_on_what_the_model_serves_by_default() {
    let f = fixture().await;
    let serving_at_0_7 = Shape {
        sampling_temperature: 0.7,
        ..shape()
    };
    let data = gather(
        &f.store,
        &JobConfig::default(),
        0.3,
        now_ms(),
        serving_at_0_7,
    )
    .await
    .unwrap();
    // The six rated groups and the reference group were drawn at 1.0.
    assert_eq!(
        data.counts.skipped_other_temperature, 7,
        "{:?}",
        data.counts
    );
    let at_1 = JobConfig {
        temperature: Some(1.0),
        ..JobConfig::default()
    };
    let serving_at_0_7 = Shape {
        sampling_temperature: 0.7,
        ..shape()
    };
    let data = gather(&f.store, &at_1, 0.3, now_ms(), serving_at_0_7)
        .await
        .unwrap();
    assert_eq!(
        data.counts.skipped_other_temperature, 1,
        "{:?}",
        data.counts
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_run_draws_on_every_source_and_evaluates() {
    let f = fixture().await;
    let config = JobConfig {
        steps: 3,
        groups_per_step: 2,
        group_size: 2,
        max_new_tokens: 4,
        lr: 1e-3,
        lora_rank: 4,
        ..JobConfig::default()
    };
    let data = data_for(&f, &config).await;
    let has_reference = data.counts.reference_answers > 0;
    let (end, progress) = run_on_the_demo(config, data, false).await;
    let mut sources = Vec::new();
    let mut evaluating = false;
    for p in progress {
        match p {
            Progress::Step(s) => {
                assert!(s.applied, "{s:?}");
                sources.push(s.source);
            }
            Progress::Evaluating => evaluating = true,
        }
    }
    assert!(evaluating);
    let mut expected = vec!["feedback", "prompts"];
    if has_reference {
        expected.insert(1, "reference_answers");
    }
    sources.sort();
    expected.sort();
    assert_eq!(sources, expected);
    let RunEnd::Trained(trained) = end else {
        panic!("the run was cancelled")
    };
    assert!(trained.evaluation.groups >= 1);
    assert!(trained.evaluation.candidate.reward.is_finite());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_run_stops_before_its_first_step() {
    let f = fixture().await;
    let config = JobConfig::default();
    let data = data_for(&f, &config).await;
    let (end, progress) = run_on_the_demo(config, data, true).await;
    assert!(matches!(end, RunEnd::Cancelled));
    assert!(progress.is_empty());
}

#[tokio::test]
async fn non_finite_numbers_are_never_stored_and_old_rows_do_not_break_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), None, None).await.unwrap();
    let ids = serve(&store, "nan", Task::Answer, "What is it?", 3, 1.0).await;
    // Rows as an earlier version could write them: a null log-prob, an
    // unbounded score.
    let url = format!("sqlite://{}", dir.path().join("ulm.sqlite").display());
    let raw = sqlx::SqlitePool::connect(&url).await.unwrap();
    sqlx::query("UPDATE samples SET logprobs = '[-1.5, null, -2.0, -3.0]' WHERE id = $1")
        .bind(&ids[0])
        .execute(&raw)
        .await
        .unwrap();
    for (i, id) in ids.iter().enumerate() {
        rate(
            &store,
            id,
            Some(if i == 1 { 1e308 } else { i as f64 }),
            None,
        )
        .await;
    }
    let read = store.get_sample(&ids[0]).await.unwrap();
    assert!(read.logprobs.is_empty(), "unusable log-probs read as none");
    let data = gather(&store, &JobConfig::default(), 0.0, now_ms(), shape())
        .await
        .unwrap();
    // The sample without log-probs and the one with an unbounded score are
    // left out; one sample remains, too few for a group.
    assert!(data.train.is_empty() && data.eval.is_empty());
    assert_eq!(data.counts.skipped_unscored, 1);

    // What is written now never holds a non-finite number.
    let mut fresh = read.clone();
    fresh.id = "fresh".into();
    fresh.request_id = "fresh".into();
    fresh.logprobs = vec![-1.0, f32::NAN, f32::INFINITY, -2.0];
    store.insert_samples(&[fresh]).await.unwrap();
    let text: String = sqlx::query_scalar("SELECT logprobs FROM samples WHERE id = 'fresh'")
        .fetch_one(&raw)
        .await
        .unwrap();
    assert_eq!(text, "[]");
}

#[tokio::test]
async fn a_group_that_fails_alone_is_dropped_and_the_job_goes_on() {
    let f = fixture().await;
    let config = JobConfig {
        steps: 2,
        groups_per_step: 2,
        max_new_tokens: 4,
        lr: 1e-3,
        lora_rank: 4,
        mix: ulm_core::scheduler::config::DataMix {
            feedback: 1.0,
            reference_answers: 0.0,
            prompts: 0.0,
        },
        ..JobConfig::default()
    };
    let mut data = data_for(&f, &config).await;
    assert!(data.train.len() >= 2);
    // Tokens the model has no embedding for: the training forward fails.
    let mut bad = data.train[0].clone();
    for sample in &mut bad.samples {
        sample.tokens = vec![u32::MAX - 7; sample.tokens.len()];
    }
    data.train.insert(1, bad);
    let groups = data.train.len();
    let (end, progress) = run_on_the_demo(config, data, false).await;
    assert!(matches!(end, RunEnd::Trained(_)));
    let steps: Vec<_> = progress
        .into_iter()
        .filter_map(|p| match p {
            Progress::Step(s) => Some(s),
            Progress::Evaluating => None,
        })
        .collect();
    assert_eq!(steps.len(), 2, "both steps ran");
    let dropped: Vec<&String> = steps.iter().flat_map(|s| &s.dropped).collect();
    assert_eq!(dropped.len(), 1, "{dropped:?} of {groups} groups");
    assert!(steps.iter().all(|s| s.applied));
}
