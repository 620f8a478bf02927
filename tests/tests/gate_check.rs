//! The `gate-check` subcommand end to end on the demo model, tiny: the
//! model draws the held-out groups, each candidate found under
//! `--candidates` is scored by the gate and by fresh samples, and the
//! results, table and figure are written. A candidate identical to the
//! model (adapters trained at learning rate 0) is the exact case: no
//! change either way, every sample counted, a right verdict.

use std::path::Path;

use serde_json::Value;
use ulm_e2e::run_command as run;

/// One training step on the world's data, adapters saved.
fn candidate(data: &Path, out: &Path, lr: &str) {
    run(&[
        "train",
        "--demo",
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "1",
        "--save-every",
        "1",
        "--batch-size",
        "1",
        "--group-size",
        "2",
        "--max-new-tokens",
        "2",
        "--beta",
        "0",
        "--lr",
        lr,
    ]);
}

#[test]
fn the_gate_is_checked_against_fresh_samples_of_every_candidate() {
    let dir = tempfile::tempdir().unwrap();
    let world = dir.path().join("world");
    run(&[
        "world",
        "--out",
        world.to_str().unwrap(),
        "--count",
        "2",
        "--side",
        "32",
    ]);
    let data = world.join("data.jsonl");
    let candidates = dir.path().join("candidates");
    candidate(&data, &candidates.join("still"), "0");
    candidate(&data, &candidates.join("moved"), "0.5");

    let out = dir.path().join("gate");
    let printed = run(&[
        "gate-check",
        "--demo",
        "--candidates",
        candidates.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--scenes",
        "2",
        "--group-size",
        "2",
        "--fresh-samples",
        "2",
        "--max-new-tokens",
        "2",
    ]);
    assert!(
        printed.contains("| checkpoint | task | estimated change"),
        "{printed}"
    );
    assert_eq!(
        printed,
        std::fs::read_to_string(out.join("gate-check.md")).unwrap()
    );
    let check: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("gate-check.json")).unwrap())
            .unwrap();
    // Two scenes: a question and a caption each, two samples per group.
    assert_eq!(check["groups"], 4, "{check}");
    assert_eq!(check["held_out_samples"], 8);
    // Each candidate on each task.
    let candidates = check["candidates"].as_array().unwrap();
    assert_eq!(candidates.len(), 4, "{check}");
    let rows = |name: &str| -> Vec<&Value> {
        candidates
            .iter()
            .filter(|c| c["checkpoint"].as_str().unwrap().starts_with(name))
            .collect()
    };
    let number = |c: &Value, key: &str| c[key].as_f64().unwrap();

    let still = rows("still");
    assert_eq!(still.len(), 2, "{check}");
    for row in still {
        assert!(number(row, "estimated_change").abs() < 1e-9, "{row}");
        assert_eq!(number(row, "fresh_change"), 0.0, "{row}");
        assert!((number(row, "effective_share") - 1.0).abs() < 1e-6, "{row}");
        assert!(number(row, "kl_to_base").abs() < 1e-9, "{row}");
        assert_eq!(row["verdict"], "promote");
        assert_eq!(row["verdict_agrees"], true);
    }
    let moved = rows("moved");
    let tasks: Vec<&str> = moved.iter().map(|r| r["task"].as_str().unwrap()).collect();
    assert_eq!(tasks, ["understanding", "generation"]);
    for row in &moved {
        assert!(number(row, "kl_to_base") > 1e-4, "{row}");
    }
    assert!(
        moved
            .iter()
            .any(|r| number(r, "effective_share") < 1.0 - 1e-6),
        "{check}"
    );
    for task in check["agreement"].as_array().unwrap() {
        assert_eq!(task["all"]["candidates"], 2, "{task}");
    }

    let png = std::fs::read(out.join("gate-check.png")).unwrap();
    let figure = image::load_from_memory(&png).unwrap();
    assert_eq!((figure.width(), figure.height()), (1440, 960));
}
