//! The reward functions against every case of the rewards fixtures under
//! `REWARD_FIXTURES` (default `tests/fixtures/rewards`).

use std::path::PathBuf;

use serde_json::Value;
use ulm_rl::reward::verifiable::{
    cls_accuracy, format_reward, format_tag_reward, qa_accuracy, soft_jaccard, t2i_qa_accuracy,
    word_jaccard, QaType,
};

fn root() -> PathBuf {
    std::env::var_os("REWARD_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/rewards")
        })
}

fn cases(file: &str) -> Vec<Value> {
    let path = root().join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn s<'a>(case: &'a Value, key: &str) -> &'a str {
    case[key].as_str().unwrap_or("")
}

/// Our value for a case. `trainer_list` cases are how the reference trainer
/// calls the function (qa_type as a list, never equal to 'MC'), i.e. the
/// open-ended branch; scalar cases use the branch their qa_type names.
fn evaluate(case: &Value) -> f64 {
    let (c, sol, prob) = (
        s(case, "completion"),
        s(case, "solution"),
        s(case, "problem"),
    );
    match s(case, "fn") {
        "format_reward" => format_reward(c),
        "format_tag_reward" => format_tag_reward(c),
        "common_qa_accuracy_reward" => {
            let qa_type = if s(case, "kwargs_style") == "trainer_list" || s(case, "qa_type") != "MC"
            {
                QaType::OpenEnded
            } else {
                QaType::MultipleChoice
            };
            qa_accuracy(c, sol, prob, qa_type)
        }
        "qa_accuracy_reward" => t2i_qa_accuracy(c, sol, prob),
        "soft_jaccard" => soft_jaccard(c, sol),
        "word_jaccard" => word_jaccard(c, sol),
        "common_cls_accuracy_reward" => cls_accuracy(c, sol),
        other => panic!("unknown reward function {other}"),
    }
}

#[test]
fn every_reward_case_matches_the_reference() {
    let all = cases("rewards.jsonl");
    assert!(all.len() >= 100, "expected the full rewards fixture");
    let mut failures = Vec::new();
    for case in &all {
        let expected = case["expected"].as_f64().unwrap();
        let got = evaluate(case);
        if (got - expected).abs() > 1e-9 {
            failures.push(format!(
                "{} {:?} / {:?}: got {got}, expected {expected} ({})",
                s(case, "fn"),
                s(case, "completion"),
                s(case, "solution"),
                s(case, "note")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        all.len(),
        failures.join("\n")
    );
}

/// Where the reference raises, we give a defined reward of 0 and never panic.
#[test]
fn inputs_on_which_the_reference_raises_score_zero() {
    let all = cases("rewards_raises.jsonl");
    assert!(!all.is_empty());
    for case in &all {
        assert_eq!(evaluate(case), 0.0, "{case}");
    }
}

/// Soft Jaccard is deterministic here; the reference's value depends on the
/// hash seed, so any value it was observed to take is accepted.
#[test]
fn order_dependent_cases_are_deterministic_and_among_the_observed_values() {
    for case in cases("rewards_order_dependent.jsonl") {
        let got = evaluate(&case);
        assert_eq!(got, evaluate(&case));
        let observed: Vec<f64> = case["observed_values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert!(
            observed.iter().any(|o| (o - got).abs() < 1e-9),
            "{got} not in {observed:?}"
        );
    }
}

/// Our multiple-choice branch (which the reference trainer cannot reach).
#[test]
fn multiple_choice_questions_take_the_multiple_choice_branch() {
    let problem = "What color is the circle?\nA. red\nB. blue\nC. green";
    assert_eq!(
        qa_accuracy("<answer>A</answer>", "A", problem, QaType::MultipleChoice),
        1.0
    );
    assert_eq!(
        qa_accuracy("The answer is A", "A", problem, QaType::MultipleChoice),
        1.0
    );
    assert_eq!(
        qa_accuracy("<answer>B</answer>", "A", problem, QaType::MultipleChoice),
        0.0
    );
    assert_eq!(
        qa_accuracy(
            "the answer is \"blue\"",
            "A",
            problem,
            QaType::MultipleChoice
        ),
        0.0
    );
    assert_eq!(
        qa_accuracy("answer is \"red\"", "A", problem, QaType::MultipleChoice),
        1.0
    );
}
