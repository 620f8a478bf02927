//! The `corl` subcommand end to end on the demo model, tiny: every arm
//! trains on its part of the data, every checkpoint and the model itself
//! are evaluated, results, table and curves are written, and a rerun
//! reuses what is on disk.

use std::path::Path;

use ulm_e2e::{jsonl, run_command};

fn corl(out: &Path) -> String {
    let out = out.to_str().unwrap();
    run_command(&[
        "corl",
        "--demo",
        "--out",
        out,
        "--seeds",
        "2",
        "--steps",
        "2",
        "--eval-every",
        "1",
        "--batch-size",
        "1",
        "--group-size",
        "2",
        "--max-new-tokens",
        "2",
        "--train-scenes",
        "2",
        "--side",
        "32",
        "--prompts",
        "1",
        "--eval-seeds",
        "2",
        "--question-scenes",
        "1",
        "--train-options",
        "--beta 0",
    ])
}

/// The fields of each line of a JSONL file.
fn lines(path: &Path) -> Vec<serde_json::Map<String, serde_json::Value>> {
    jsonl(path)
        .into_iter()
        .map(|l| l.as_object().cloned().unwrap())
        .collect()
}

#[test]
fn every_arm_trains_on_its_data_is_evaluated_and_a_rerun_reuses_the_runs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("corl");
    let printed = corl(&out);
    let arms = ["none", "unified", "generation", "understanding", "verifier"];
    for arm in arms {
        assert!(printed.contains(&format!("| {arm} |")), "{printed}");
    }

    // Each arm's data holds the parts of its task only.
    let world = out.join("world-0");
    assert!(lines(&world.join("captions.jsonl"))
        .iter()
        .all(|l| l.keys().eq(["caption"].iter())));
    assert!(lines(&world.join("questions.jsonl"))
        .iter()
        .all(|l| !l.contains_key("caption") && l.contains_key("qa_problem")));
    assert!(lines(&world.join("data.jsonl"))
        .iter()
        .all(|l| l.contains_key("caption") && l.contains_key("qa_problem")));

    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let runs = results["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2 * arms.len());
    for run in runs {
        let steps: Vec<u64> = run["evals"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e[0].as_u64().unwrap())
            .collect();
        let seed = run["seed"].as_u64().unwrap();
        if run["arm"] == "none" {
            assert_eq!(steps, [0, 2]);
            assert!(run["command"].is_null());
        } else {
            assert_eq!(steps, [0, 1, 2], "{}", run["arm"]);
            let command = run["command"].as_str().unwrap();
            assert!(command.contains(&format!("--seed {seed}")), "{command}");
        }
        // Seeds draw their own test images: 2 per prompt, seed 0 from 0, seed 1 from 2.
        for eval in run["evals"].as_array().unwrap() {
            assert_eq!(eval[1]["first_seed"].as_u64(), Some(2 * seed));
        }
    }
    let summaries = results["arms"].as_array().unwrap();
    assert_eq!(summaries.len(), arms.len());
    for summary in summaries {
        assert_eq!(summary["generation"]["values"].as_array().unwrap().len(), 2);
        assert!(!summary["understanding_by_type"]
            .as_object()
            .unwrap()
            .is_empty());
    }
    // The unified arm trained both tasks, the one-task arms one each.
    let rewards = |arm: &str| {
        let step = &lines(&out.join(arm).join("seed-0").join("metrics.jsonl"))[0];
        (
            step["reward_generation"].is_number(),
            step["reward_understanding"].is_number(),
        )
    };
    assert_eq!(rewards("unified"), (true, true));
    assert_eq!(rewards("verifier"), (true, true));
    assert_eq!(rewards("generation"), (true, false));
    assert_eq!(rewards("understanding"), (false, true));

    let png = image::open(out.join("curves.png")).unwrap();
    assert!(png.width() > 500 && png.height() > 300);

    let metrics = out.join("unified").join("seed-1").join("metrics.jsonl");
    let trained_at = std::fs::metadata(&metrics).unwrap().modified().unwrap();
    let again = corl(&out);
    assert_eq!(again, printed, "the same runs, read back");
    assert_eq!(
        std::fs::metadata(&metrics).unwrap().modified().unwrap(),
        trained_at,
        "no arm trained again"
    );
}
