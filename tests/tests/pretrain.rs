//! The pretraining recipe, short, end to end on the real binary: metrics,
//! summary and a checkpoint that the other commands load (eval among
//! them), and the world and verifier commands on its output.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use ulm_e2e::{jsonl, server_binary};

fn run(args: &[&str], dir: &Path) -> Output {
    let out = Command::new(server_binary())
        .args(args)
        .current_dir(dir)
        .env_remove("ULM_MODEL")
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn a_short_recipe_writes_metrics_and_a_checkpoint_that_generates_and_answers() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = run(
        &[
            "pretrain",
            "--out",
            "run",
            "--vq-steps",
            "3",
            "--vq-batch",
            "2",
            "--lm-steps",
            "3",
            "--lm-batch",
            "2",
            "--eval-scenes",
            "4",
            "--early-checkpoint",
            "2",
        ],
        d,
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["vq_steps"], 3);
    assert_eq!(summary["lm_steps"], 3);
    assert!(summary["lm_generation"].as_f64().unwrap().is_finite());
    let vq = jsonl(&d.join("run/metrics-vq.jsonl"));
    let lm = jsonl(&d.join("run/metrics-lm.jsonl"));
    assert_eq!((vq.len(), lm.len()), (3, 3));
    assert!(lm
        .iter()
        .all(|s| s["understanding"].as_f64().unwrap() > 0.0));
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("run/summary.json")).unwrap())
            .unwrap();
    assert_eq!(saved, summary);
    for plot in ["loss-vq.png", "loss-lm.png", "vq-reconstructions.png"] {
        let image = image::open(d.join("run").join(plot)).unwrap();
        assert!(image.width() > 100, "{plot}");
    }
    // The describing and planning turns are on by default, and the
    // checkpoint draws from plans.
    assert!(lm.iter().all(|s| s["describe"].as_f64().unwrap() > 0.0));
    assert!(lm.iter().all(|s| s["plan"].as_f64().unwrap() > 0.0));
    let sampling: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.join("run/checkpoint/generation_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(sampling["guidance_scale"], 1.5);
    assert!(
        sampling["plan_temperature"].as_f64().is_some(),
        "{sampling}"
    );
    assert!(sampling["best_of"].as_u64().unwrap() > 1, "{sampling}");

    // Stage two again from the first run's VQ, without the describing and
    // planning turns.
    let again = run(
        &[
            "pretrain",
            "--out",
            "again",
            "--vq-from",
            "run/checkpoint",
            "--describe-weight",
            "0",
            "--plan-weight",
            "0",
            "--lm-steps",
            "2",
            "--lm-batch",
            "2",
            "--eval-scenes",
            "4",
            "--early-checkpoint",
            "0",
        ],
        d,
    );
    let summary: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(summary["vq_steps"], 0);
    assert!(!d.join("again/metrics-vq.jsonl").exists());
    assert!(jsonl(&d.join("again/metrics-lm.jsonl"))
        .iter()
        .all(|s| s["describe"].is_null() && s["plan"].is_null()));
    let sampling =
        std::fs::read_to_string(d.join("again/checkpoint/generation_config.json")).unwrap();
    assert!(!sampling.contains("plan"), "{sampling}");
    let vq_tensors = |dir: &str| {
        let bytes = std::fs::read(d.join(dir).join("model.safetensors")).unwrap();
        let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut named: Vec<(String, Vec<u8>)> = tensors
            .tensors()
            .into_iter()
            .filter(|(name, _)| name.starts_with("gen_vision_model."))
            .map(|(name, view)| (name, view.data().to_vec()))
            .collect();
        named.sort();
        named
    };
    let copied = vq_tensors("again/checkpoint");
    assert!(!copied.is_empty());
    assert_eq!(
        copied,
        vq_tensors("run/checkpoint"),
        "the VQ was not copied as it was"
    );

    let drawn = run(
        &[
            "generate",
            "--model",
            "run/checkpoint",
            "--prompt",
            "a red circle",
            "--n",
            "1",
            "--out",
            "gen",
        ],
        d,
    );
    let said = String::from_utf8_lossy(&drawn.stderr);
    assert!(said.contains("plan: "), "the checkpoint plans: {said}");
    let out = run(
        &[
            "verify",
            "--image",
            "gen/image-0.png",
            "--caption",
            "a red circle",
        ],
        d,
    );
    let verdict: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(verdict["holds"].is_boolean() && verdict["score"].is_number());

    run(
        &["world", "--out", "world", "--count", "2", "--split", "test"],
        d,
    );
    let out = run(
        &[
            "answer",
            "--model",
            "run/checkpoint",
            "--image",
            "world/images/000000.png",
            "--question",
            "What colour is the circle?",
            "--max-new-tokens",
            "8",
        ],
        d,
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("[0]"));

    // The early checkpoint is a whole model too; eval measures it and draws
    // its picture.
    run(
        &[
            "eval",
            "--model",
            "run/checkpoint-early",
            "--prompts",
            "1",
            "--seeds",
            "1",
            "--question-scenes",
            "1",
            "--out",
            "eval.json",
            "--grid",
            "grid.png",
        ],
        d,
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("eval.json")).unwrap()).unwrap();
    assert!(report["generation_overall"].is_number());
    assert!(image::open(d.join("grid.png")).unwrap().height() > 100);
}
