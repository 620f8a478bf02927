//! `ulm-live-loop` end to end, tiny, against the built-in world model: one
//! round of rated requests, one job the gate is told to pass, and the
//! promoted version measured afresh. The users' ratings are the verifier's
//! reversed; the job is judged by the auditor's key.

use std::process::Command;

use serde_json::Value;
use ulm_e2e::{live_loop_binary, Server};

#[tokio::test]
async fn the_live_loop_rates_trains_and_measures_each_served_version() {
    let server = Server::start_default(&["--no-auth", "--rl-holdout-fraction", "0.25"]).await;
    let out = tempfile::tempdir().unwrap();
    let config = r#"{"steps": 2, "groups_per_step": 2, "lr": 0.001, "max_new_tokens": 8,
                     "max_reward_drop": 10.0, "max_kl": 1000.0, "min_effective_share": 0.0}"#;
    let url = server.url("");
    let binary = live_loop_binary();
    let args = [
        "--url",
        url.trim_end_matches('/'),
        "--rater",
        "adversarial",
        "--rounds",
        "1",
        "--scenes-per-round",
        "3",
        "--n",
        "2",
        "--max-new-tokens",
        "8",
        "--eval-question-scenes",
        "2",
        "--eval-prompts-per-category",
        "1",
        "--eval-seeds",
        "1",
        "--job-config",
        config,
        "--out",
        out.path().to_str().unwrap(),
    ]
    .map(String::from);
    let output = tokio::task::spawn_blocking(move || {
        Command::new(binary)
            .args(args)
            .env_remove("ULM_LOAD_API_KEY")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let report: Value =
        serde_json::from_slice(&std::fs::read(out.path().join("live-loop.json")).unwrap()).unwrap();
    let rounds = report["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2, "{report:#}");
    let (before, after) = (&rounds[0], &rounds[1]);

    // The loop's own settings were sent with the job.
    assert_eq!(report["job_config"]["feedback_keys"][0], "user");
    assert_eq!(report["job_config"]["mix"]["prompts"], 0.0);
    let job = &after["job"];
    assert_eq!(job["status"], "promoted", "{job:#}");
    assert_eq!(job["evaluation"]["judged_by"][0], "audit", "{job:#}");
    assert_eq!(job["data_counts"]["rated_requests"], 6, "{job:#}");

    // The users said the reverse of the verifier.
    let served = &after["served"];
    let careful = (served["answer_quality"].as_f64().unwrap()
        + served["image_quality"].as_f64().unwrap())
        / 2.0;
    let user = served["user_score"].as_f64().unwrap();
    assert!((user - (1.0 - careful)).abs() < 1e-9, "{served:#}");

    // The promoted version is what was measured after the job.
    assert_eq!(before["version"], "base");
    assert_eq!(after["version"], job["candidate_version"], "{report:#}");
    for round in rounds {
        for task in ["generation", "understanding"] {
            let accuracy = round["accuracy"][task].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&accuracy), "{round:#}");
        }
    }
    // The trained world model answers most questions right.
    assert!(
        before["accuracy"]["understanding"].as_f64().unwrap() > 0.3,
        "{before:#}"
    );
    for file in ["live-loop.md", "live-loop.png"] {
        assert!(
            out.path().join(file).metadata().unwrap().len() > 100,
            "{file}"
        );
    }
}
