//! The online loop played end to end against a running server on the world
//! model: users ask questions about world scenes and request images of
//! world captions, `n` samples each, and rate every sample through
//! `/v1/feedback`; the scheduler trains on the ratings and its gate decides;
//! after each job the served version's test-split accuracy is measured over
//! HTTP, as `ulm-server eval` measures a checkpoint.
//!
//! Two raters: `careful` scores by the world's verifier (partial credit for
//! images, answer accuracy for answers); `adversarial` scores the reverse.
//! Beside the users an auditor rates every sample by the verifier under its
//! own key, and jobs are gated on the audit (`gate_feedback_keys`): what the
//! users taught is judged by a rating they cannot bend (`--gate-key user`
//! shows what happens without it).

use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use clap::{Parser, ValueEnum};
use futures::stream::{self, StreamExt, TryStreamExt};
use serde::Serialize;
use serde_json::{json, Value};
use ulm_plot::{grid, png, Panel, Scale, Series};
use ulm_rl::reward::verifiable::{qa_accuracy, QaType};
use ulm_world::scene::Category;
use ulm_world::{examples, test_prompts, verify, Example, Split};

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Rater {
    /// Scores by the verifier: what a person who checks would give.
    Careful,
    /// One minus the careful score: rewards wrong answers and images.
    Adversarial,
}

/// The feedback keys: the users' ratings train, the audit gates.
const USER_KEY: &str = "user";
const AUDIT_KEY: &str = "audit";

#[derive(Parser, Debug)]
#[command(
    name = "ulm-live-loop",
    about = "Plays rating users against a server on the world model and measures each served version"
)]
struct Args {
    /// Server base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Admin key (jobs are admin-only) unless the server runs --no-auth.
    #[arg(long, env = "ULM_LOAD_API_KEY")]
    api_key: Option<String>,
    #[arg(long, value_enum, default_value = "careful")]
    rater: Rater,
    /// The feedback key the gate judges by: the auditor's, or the users'
    /// own (what happens without an audit).
    #[arg(long, default_value = AUDIT_KEY, value_parser = [AUDIT_KEY, USER_KEY])]
    gate_key: String,
    /// Rounds of requests, ratings and one job each.
    #[arg(long, default_value_t = 4)]
    rounds: usize,
    /// Train-split scenes per round: one question and one caption of each.
    #[arg(long, default_value_t = 24)]
    scenes_per_round: usize,
    /// First train-split scene (runs that should not share prompts start apart).
    #[arg(long, default_value_t = 0)]
    first_scene: usize,
    /// Samples per request: the GRPO group.
    #[arg(long, default_value_t = 4)]
    n: u32,
    /// Most new tokens per answer.
    #[arg(long, default_value_t = 16)]
    max_new_tokens: u32,
    /// The world whose scenes are asked about (the model's: 0).
    #[arg(long, default_value_t = 0)]
    world_seed: u64,
    /// Job configuration (JSON) sent with each job. The loop sets its
    /// `feedback_keys`, `gate_feedback_keys` and a feedback-only `mix`.
    #[arg(
        long,
        default_value = r#"{"steps": 20, "lr": 0.002, "max_new_tokens": 16}"#
    )]
    job_config: String,
    /// Test scenes whose every question is asked greedily at each measurement.
    #[arg(long, default_value_t = 60)]
    eval_question_scenes: usize,
    /// Test prompts per generation category at each measurement.
    #[arg(long, default_value_t = 10)]
    eval_prompts_per_category: usize,
    /// Images per test prompt (seeds `eval_first_seed`, +1, ...).
    #[arg(long, default_value_t = 2)]
    eval_seeds: u32,
    #[arg(long, default_value_t = 0)]
    eval_first_seed: u64,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Seconds to wait for one job.
    #[arg(long, default_value_t = 1800)]
    job_timeout: u64,
    /// Directory for live-loop.json, live-loop.md and live-loop.png.
    #[arg(long, default_value = "live-loop")]
    out: PathBuf,
    /// Instead of playing: draw the accuracy per round of earlier runs
    /// (their output directories, each named in the legend) into
    /// `--out`/live-loop-compare.png.
    #[arg(long, num_args = 1..)]
    compare: Vec<PathBuf>,
}

struct Client {
    http: reqwest::Client,
    base: String,
    key: Option<String>,
}

impl Client {
    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let req = self.http.request(method, format!("{}{path}", self.base));
        match &self.key {
            Some(k) => req.bearer_auth(k),
            None => req,
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder, what: &str) -> Result<Value> {
        let response = req.send().await.with_context(|| what.to_string())?;
        let status = response.status();
        let body: Value = response.json().await.with_context(|| what.to_string())?;
        if !status.is_success() {
            bail!("{what}: HTTP {status}: {body}");
        }
        Ok(body)
    }

    async fn get(&self, path: &str) -> Result<Value> {
        self.send(self.request(reqwest::Method::GET, path), path)
            .await
    }

    async fn post(&self, path: &str, body: &Value) -> Result<Value> {
        self.send(self.request(reqwest::Method::POST, path).json(body), path)
            .await
    }

    /// The active version and the side of the images it reads.
    async fn active(&self) -> Result<(String, u32)> {
        let models = self.get("/v1/models").await?;
        let active = models["data"]
            .as_array()
            .and_then(|all| all.iter().find(|m| m["active"] == true))
            .context("no active model in GET /v1/models")?;
        let side = active["understanding_image_size"]
            .as_u64()
            .context("understanding_image_size")?;
        Ok((
            active["id"].as_str().unwrap_or_default().to_string(),
            side as u32,
        ))
    }

    async fn answer(&self, image_png: &str, question: &str, mut body: Value) -> Result<Vec<Value>> {
        body["image"] = json!(image_png);
        body["question"] = json!(question);
        let response = self.post("/v1/answer", &body).await?;
        Ok(response["samples"].as_array().cloned().unwrap_or_default())
    }

    /// The images of a generate request, decoded, with their sample ids.
    async fn generate(&self, body: &Value) -> Result<Vec<(String, image::RgbImage)>> {
        let response = self.post("/v1/generate", body).await?;
        let images = response["images"].as_array().cloned().unwrap_or_default();
        images
            .iter()
            .map(|i| {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(i["png_base64"].as_str().unwrap_or_default())?;
                let image = image::load_from_memory(&bytes)?.to_rgb8();
                Ok((
                    i["sample_id"].as_str().unwrap_or_default().to_string(),
                    image,
                ))
            })
            .collect()
    }
}

fn png_base64(image: &image::RgbImage) -> Result<String> {
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, image::ImageFormat::Png)?;
    Ok(base64::engine::general_purpose::STANDARD.encode(out.into_inner()))
}

#[derive(Debug, Clone, Default, Serialize)]
struct Accuracy {
    /// Mean over categories of the share of images the verifier accepts (as GenEval).
    generation: f64,
    /// Share of questions answered right.
    understanding: f64,
    generation_by_category: BTreeMap<String, f64>,
}

/// The served version's test-split accuracy: every question of the first
/// test scenes greedily, and images of the first test captions per category
/// at the model's sampling defaults, the same seeds every time.
async fn measure(client: &Client, args: &Args, side: u32) -> Result<Accuracy> {
    let scenes: Vec<Example> = examples(args.world_seed, Split::Test)
        .take(args.eval_question_scenes)
        .collect();
    let images = scenes
        .iter()
        .map(|scene| png_base64(&scene.image(side)))
        .collect::<Result<Vec<_>>>()?;
    let questions = scenes
        .iter()
        .zip(&images)
        .flat_map(|(scene, image)| scene.questions.iter().map(move |q| (image, q)));
    let right: Vec<bool> = stream::iter(questions.map(|(image, q)| async move {
        let body = json!({"n": 1, "max_new_tokens": args.max_new_tokens, "temperature": 0.0});
        let samples = client.answer(image, &q.text, body).await?;
        let text = samples
            .first()
            .and_then(|s| s["text"].as_str())
            .unwrap_or_default();
        Ok::<_, anyhow::Error>(
            qa_accuracy(text, &q.answer, &q.text, QaType::of(q.multiple_choice)) >= 1.0,
        )
    }))
    .buffered(args.concurrency)
    .try_collect()
    .await?;
    let understanding = right.iter().filter(|r| **r).count() as f64 / right.len().max(1) as f64;

    let mut generation_by_category = BTreeMap::new();
    for category in Category::ALL {
        let prompts = test_prompts(args.world_seed, category, args.eval_prompts_per_category);
        let held: Vec<usize> = stream::iter(prompts.iter().map(|e| async move {
            let caption = &e.captions[0];
            let body =
                json!({"prompt": caption.text, "n": args.eval_seeds, "seed": args.eval_first_seed});
            let images = client.generate(&body).await?;
            Ok::<_, anyhow::Error>(
                images
                    .iter()
                    .filter(|(_, image)| verify::check(&caption.claim, &verify::read(image)))
                    .count(),
            )
        }))
        .buffered(args.concurrency)
        .try_collect()
        .await?;
        let total = (prompts.len() * args.eval_seeds as usize).max(1);
        generation_by_category.insert(
            category.name().to_string(),
            held.iter().sum::<usize>() as f64 / total as f64,
        );
    }
    let generation =
        generation_by_category.values().sum::<f64>() / generation_by_category.len() as f64;
    Ok(Accuracy {
        generation,
        understanding,
        generation_by_category,
    })
}

/// What the rater gives a sample whose careful (verifier) score is `careful`.
fn rated(rater: Rater, careful: f64) -> f64 {
    match rater {
        Rater::Careful => careful,
        Rater::Adversarial => 1.0 - careful,
    }
}

#[derive(Debug, Clone, Default, Serialize)]
struct Served {
    /// Requests per task, `n` samples each.
    requests: usize,
    /// Mean careful (verifier) score of the round's samples: how good what
    /// was served is, whatever the users said.
    answer_quality: f64,
    image_quality: f64,
    /// Mean score the users gave.
    user_score: f64,
}

/// One round of users: requests about the round's train scenes, every
/// sample rated by the rater (key `user`) and the auditor (key `audit`).
async fn serve_round(client: &Client, args: &Args, round: usize, side: u32) -> Result<Served> {
    let first = args.first_scene + round * args.scenes_per_round;
    let scenes: Vec<Example> = examples(args.world_seed, Split::Train)
        .skip(first)
        .take(args.scenes_per_round)
        .collect();
    let scored: Vec<(f64, f64, f64)> = stream::iter(scenes.iter().enumerate().map(|(i, scene)| {
        async move {
            let question = &scene.questions[(first + i) % scene.questions.len()];
            let caption = &scene.captions[(first + i) % scene.captions.len()];
            // Seeded by the scene: runs with either rater are served the
            // same samples for as long as they serve the same version.
            let seed = (first + i) as u64 * args.n as u64;
            let body = json!({"n": args.n, "max_new_tokens": args.max_new_tokens, "seed": seed});
            let answers = client
                .answer(&png_base64(&scene.image(side))?, &question.text, body)
                .await?;
            let mut feedback = Vec::new();
            let mut answer_scores = Vec::new();
            for sample in &answers {
                let text = sample["text"].as_str().unwrap_or_default();
                let careful = qa_accuracy(
                    text,
                    &question.answer,
                    &question.text,
                    QaType::of(question.multiple_choice),
                );
                answer_scores.push(careful);
                feedback.push((sample["sample_id"].clone(), careful));
            }
            let images = client
                .generate(&json!({"prompt": caption.text, "n": args.n, "seed": seed}))
                .await?;
            let mut image_scores = Vec::new();
            for (id, image) in &images {
                let careful = verify::score(&caption.claim, &verify::read(image));
                image_scores.push(careful);
                feedback.push((json!(id), careful));
            }
            let items: Vec<Value> = feedback
                .iter()
                .flat_map(|(id, careful)| {
                    [
                        json!({"sample_id": id, "key": USER_KEY, "score": rated(args.rater, *careful)}),
                        json!({"sample_id": id, "key": AUDIT_KEY, "score": careful,
                               "source": {"type": "model"}}),
                    ]
                })
                .collect();
            client
                .post("/v1/feedback", &Value::Array(items))
                .await?;
            let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len().max(1) as f64;
            let user: Vec<f64> = feedback.iter().map(|(_, c)| rated(args.rater, *c)).collect();
            Ok::<_, anyhow::Error>((mean(&answer_scores), mean(&image_scores), mean(&user)))
        }
    }))
    .buffered(args.concurrency)
    .try_collect()
    .await?;
    let count = scored.len().max(1) as f64;
    Ok(Served {
        requests: scored.len(),
        answer_quality: scored.iter().map(|s| s.0).sum::<f64>() / count,
        image_quality: scored.iter().map(|s| s.1).sum::<f64>() / count,
        user_score: scored.iter().map(|s| s.2).sum::<f64>() / count,
    })
}

#[derive(Debug, Clone, Serialize)]
struct Job {
    id: String,
    status: String,
    verdict: Option<String>,
    reason: Option<String>,
    candidate_version: Option<String>,
    data_counts: Value,
    /// Both policies' scores on the held-out groups, the decision, its
    /// bounds and the keys it judged by.
    evaluation: Value,
}

fn job_config(args: &Args) -> Result<Value> {
    let mut config: Value = serde_json::from_str(&args.job_config).context("--job-config")?;
    let Some(fields) = config.as_object_mut() else {
        bail!("--job-config must be a JSON object");
    };
    fields.insert("feedback_keys".into(), json!([USER_KEY]));
    fields.insert("gate_feedback_keys".into(), json!([args.gate_key]));
    fields.insert(
        "mix".into(),
        json!({"feedback": 1.0, "reference_answers": 0.0, "prompts": 0.0}),
    );
    Ok(config)
}

async fn run_job(client: &Client, args: &Args, config: &Value) -> Result<Job> {
    let started = client.post("/v1/rl/jobs", config).await?;
    let id = started["id"].as_str().context("job id")?.to_string();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.job_timeout);
    loop {
        let job = client.get(&format!("/v1/rl/jobs/{id}")).await?;
        let status = job["status"].as_str().unwrap_or_default().to_string();
        if ["promoted", "rejected", "failed", "cancelled"].contains(&status.as_str()) {
            let decision = &job["evaluation"]["decision"];
            let text = |v: &Value| v.as_str().map(String::from);
            return Ok(Job {
                id,
                verdict: text(&decision["verdict"]),
                reason: text(&decision["reason"]).or_else(|| text(&job["error"])),
                status,
                candidate_version: text(&job["candidate_version"]),
                data_counts: job["data_counts"].clone(),
                evaluation: job["evaluation"].clone(),
            });
        }
        if tokio::time::Instant::now() > deadline {
            bail!("job {id} still {status} after {} s", args.job_timeout);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

#[derive(Debug, Clone, Serialize)]
struct Round {
    round: usize,
    /// What the users were served and how good it was (none in round 0).
    served: Option<Served>,
    job: Option<Job>,
    /// The version served after the round's job.
    version: String,
    accuracy: Accuracy,
}

#[derive(Serialize)]
struct Report<'a> {
    rater: Rater,
    gate_key: &'a str,
    job_config: Value,
    eval_question_scenes: usize,
    eval_prompts_per_category: usize,
    eval_seeds: u32,
    rounds: &'a [Round],
}

fn table(args: &Args, rounds: &[Round]) -> String {
    let mut out = format!(
        "Rater: {:?}; the gate judges by the `{}` key\n\n| round | job | verdict | served version | generation | understanding | served answers (verifier) | served images (verifier) |\n|---:|---|---|---|---:|---:|---:|---:|\n",
        args.rater, args.gate_key
    );
    for r in rounds {
        let (job, verdict) = match &r.job {
            Some(j) => (j.status.as_str(), j.verdict.as_deref().unwrap_or("-")),
            None => ("-", "-"),
        };
        let quality = |f: fn(&Served) -> f64| {
            r.served
                .as_ref()
                .map_or("-".to_string(), |s| format!("{:.3}", f(s)))
        };
        out += &format!(
            "| {} | {job} | {verdict} | {} | {:.1} | {:.1} | {} | {} |\n",
            r.round,
            r.version,
            100.0 * r.accuracy.generation,
            100.0 * r.accuracy.understanding,
            quality(|s| s.answer_quality),
            quality(|s| s.image_quality),
        );
    }
    out
}

fn figure(args: &Args, rounds: &[Round]) -> Vec<u8> {
    let rater = format!("{:?} rater, gate on {}", args.rater, args.gate_key);
    let series = |name: &str, value: &dyn Fn(&Round) -> Option<f64>| Series {
        name: name.into(),
        points: rounds
            .iter()
            .filter_map(|r| value(r).map(|v| (r.round as f64, v)))
            .collect(),
    };
    let panels = [
        Panel {
            title: format!("{rater}: served test accuracy"),
            x_label: "round".into(),
            y_label: "accuracy (%)".into(),
            scale: Scale::Linear,
            series: vec![
                series("generation", &|r| Some(100.0 * r.accuracy.generation)),
                series("understanding", &|r| Some(100.0 * r.accuracy.understanding)),
            ],
        },
        Panel {
            title: format!("{rater}: verifier score of samples"),
            x_label: "round".into(),
            y_label: "mean verifier score".into(),
            scale: Scale::Linear,
            series: vec![
                series("answers", &|r| r.served.as_ref().map(|s| s.answer_quality)),
                series("images", &|r| r.served.as_ref().map(|s| s.image_quality)),
            ],
        },
    ];
    png(&grid(&panels, 2, (720, 480)))
}

fn write_report(args: &Args, config: &Value, rounds: &[Round]) -> Result<()> {
    std::fs::create_dir_all(&args.out).with_context(|| args.out.display().to_string())?;
    let report = Report {
        rater: args.rater,
        gate_key: &args.gate_key,
        job_config: config.clone(),
        eval_question_scenes: args.eval_question_scenes,
        eval_prompts_per_category: args.eval_prompts_per_category,
        eval_seeds: args.eval_seeds,
        rounds,
    };
    std::fs::write(
        args.out.join("live-loop.json"),
        serde_json::to_vec_pretty(&report)?,
    )?;
    std::fs::write(args.out.join("live-loop.md"), table(args, rounds))?;
    std::fs::write(args.out.join("live-loop.png"), figure(args, rounds))?;
    Ok(())
}

/// Accuracy per round of several runs, one panel per task.
fn compare(runs: &[PathBuf], out: &std::path::Path) -> Result<()> {
    let mut panels = Vec::new();
    for (task, title) in [
        (
            "generation",
            "generation: test accuracy of the served version",
        ),
        (
            "understanding",
            "understanding: test accuracy of the served version",
        ),
    ] {
        let series = runs
            .iter()
            .map(|dir| {
                let path = dir.join("live-loop.json");
                let text =
                    std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
                let report: Value = serde_json::from_str(&text)?;
                let rounds = report["rounds"].as_array().cloned().unwrap_or_default();
                Ok(Series {
                    name: dir
                        .file_name()
                        .map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into()),
                    points: rounds
                        .iter()
                        .filter_map(|r| {
                            Some((r["round"].as_f64()?, 100.0 * r["accuracy"][task].as_f64()?))
                        })
                        .collect(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        panels.push(Panel {
            title: title.into(),
            x_label: "round".into(),
            y_label: "accuracy (%)".into(),
            scale: Scale::Linear,
            series,
        });
    }
    std::fs::create_dir_all(out)?;
    std::fs::write(
        out.join("live-loop-compare.png"),
        png(&grid(&panels, 2, (720, 480))),
    )?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if !args.compare.is_empty() {
        return compare(&args.compare, &args.out);
    }
    if args.n < 2 {
        bail!("--n must be at least 2: a group of one sample teaches nothing");
    }
    if args.scenes_per_round == 0 || args.eval_seeds == 0 {
        bail!("--scenes-per-round and --eval-seeds must be positive");
    }
    let config = job_config(&args)?;
    let client = Client {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(600))
            .build()?,
        base: args.url.trim_end_matches('/').to_string(),
        key: args.api_key.clone(),
    };
    let (version, side) = client.active().await?;
    let mut rounds = vec![Round {
        round: 0,
        served: None,
        job: None,
        accuracy: measure(&client, &args, side).await?,
        version,
    }];
    write_report(&args, &config, &rounds)?;
    eprintln!("{}", table(&args, &rounds));
    for round in 1..=args.rounds {
        let served = serve_round(&client, &args, round - 1, side).await?;
        let job = run_job(&client, &args, &config).await?;
        let (version, _) = client.active().await?;
        let previous = rounds.last().expect("round 0");
        // The same version answers the same greedy questions and seeded
        // prompts the same way: measured once.
        let accuracy = if version == previous.version {
            previous.accuracy.clone()
        } else {
            measure(&client, &args, side).await?
        };
        rounds.push(Round {
            round,
            served: Some(served),
            job: Some(job),
            version,
            accuracy,
        });
        write_report(&args, &config, &rounds)?;
        eprintln!("{}", table(&args, &rounds));
    }
    print!("{}", table(&args, &rounds));
    Ok(())
}
