//! CoRL's verifiable reward functions for understanding (format, QA
//! accuracy, classification) and text-to-image (the model's own
//! text-image matching), as pure functions.
//!
//! They reproduce the reference (`r_base.py`, `r_utils.py`, `r_t2i.py` of
//! ULM-R1) value for value, with three deliberate departures, each marked
//! below: multiple-choice questions take the multiple-choice branch (the
//! reference trainer passes `qa_type` as a list and never reaches it); inputs
//! on which the reference raises get reward 0; soft Jaccard matches words in
//! a fixed order instead of Python's hash order.

use std::sync::LazyLock;

use candle_core::{Result as CandleResult, Tensor, D};
use regex::Regex;

use crate::difflib;

fn re(pattern: &str) -> Regex {
    Regex::new(pattern).expect("reward regexes are valid")
}

static FORMAT: LazyLock<Regex> =
    LazyLock::new(|| re(r"(?s)\A<think>.*?</think>[.\s]*<answer>.*?</answer>\z"));
static ANSWER: LazyLock<Regex> = LazyLock::new(|| re(r"<answer>(.*?)</answer>"));
static THINK_BLOCK: LazyLock<Regex> = LazyLock::new(|| re(r"(?s)<think>.*?</think>"));
static OPTION_LINE: LazyLock<Regex> = LazyLock::new(|| re(r"(?m)^\s*([A-Na-n])\.\s*(.+?)\s*$"));
static ANSWER_TEXT: LazyLock<Vec<Regex>> = LazyLock::new(|| {
    [
        r#"(?i)(?:answer|choice)(?:\s+is|\s*=|\s*:)\s*"([^"]+)""#,
        r"(?i)(?:answer|choice)(?:\s+is|\s*=|\s*:)\s*'([^']+)'",
        r#"(?i)(?:correct|right)(?:\s+answer|\s+choice)(?:\s+is|\s*=|\s*:)\s*"([^"]+)""#,
        r"(?i)(?:correct|right)(?:\s+answer|\s+choice)(?:\s+is|\s*=|\s*:)\s*'([^']+)'",
    ]
    .into_iter()
    .map(re)
    .collect()
});
static ANSWER_LETTER: LazyLock<Vec<Regex>> = LazyLock::new(|| {
    [
        r"(?:answer|choice|option|select|choose|pick)\s(?:is|as|being|would be|should be|:)?\s*(?:option\s|choice\s|letter\s)?([A-Z])(?:\b|\.|\))",
        r"\b(?:select|choose|pick)\s(?:option\s|choice\s|letter\s)?([A-Z])(?:\b|\.|\))",
        r"[Tt]he answer is ([A-Z])",
        r"[Tt]he correct answer is ([A-Z])",
        r"[Aa]nswer is ([A-Z])",
        r"[Oo]ption ([A-Z])",
        r"[Cc]hoice ([A-Z])",
    ]
    .into_iter()
    .map(re)
    .collect()
});

/// 1 when the completion is exactly `<think>…</think>` then `<answer>…</answer>`
/// (only dots and whitespace between).
pub fn format_reward(completion: &str) -> f64 {
    if FORMAT.is_match(completion) {
        1.0
    } else {
        0.0
    }
}

/// 0.125 for each of the four tags that occurs exactly once.
pub fn format_tag_reward(completion: &str) -> f64 {
    ["<think>", "</think>", "<answer>", "</answer>"]
        .iter()
        .filter(|tag| completion.matches(*tag).count() == 1)
        .count() as f64
        * 0.125
}

/// The question kind, which decides how an answer is compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QaType {
    /// Multiple choice: the solution is an option letter.
    MultipleChoice,
    /// Open-ended: compared by soft Jaccard similarity.
    OpenEnded,
}

impl QaType {
    /// How a question's answer is checked.
    pub fn of(multiple_choice: bool) -> Self {
        if multiple_choice {
            Self::MultipleChoice
        } else {
            Self::OpenEnded
        }
    }
}

/// The text of a `<answer>` block, else the whole text.
fn ground_truth(solution: &str) -> String {
    ANSWER
        .captures(solution)
        .map_or_else(|| solution.trim().to_string(), |c| c[1].trim().to_string())
}

/// The completion without think blocks and tags, or its `<answer>` block.
fn student_answer(content: &str) -> (String, bool) {
    if let Some(c) = ANSWER.captures(content) {
        return (c[1].trim().to_string(), true);
    }
    let stripped = THINK_BLOCK.replace_all(content, "");
    let cleaned = [
        "<think>",
        "</think>",
        "<answer>",
        "</answer>",
        "Answer:",
        "Answer",
    ]
    .iter()
    .fold(stripped.to_string(), |s, tag| s.replace(tag, ""));
    (cleaned.trim().to_string(), false)
}

const NUMBER_WORDS: [(&str, u64); 31] = [
    ("zero", 0),
    ("one", 1),
    ("two", 2),
    ("three", 3),
    ("four", 4),
    ("five", 5),
    ("six", 6),
    ("seven", 7),
    ("eight", 8),
    ("nine", 9),
    ("ten", 10),
    ("eleven", 11),
    ("twelve", 12),
    ("thirteen", 13),
    ("fourteen", 14),
    ("fifteen", 15),
    ("sixteen", 16),
    ("seventeen", 17),
    ("eighteen", 18),
    ("nineteen", 19),
    ("twenty", 20),
    ("thirty", 30),
    ("forty", 40),
    ("fifty", 50),
    ("sixty", 60),
    ("seventy", 70),
    ("eighty", 80),
    ("ninety", 90),
    ("hundred", 100),
    ("thousand", 1000),
    ("million", 1_000_000),
];

/// word2number's value of a single number word ("point" alone is 0 there).
fn number_word(word: &str) -> Option<u64> {
    match word {
        "billion" => Some(1_000_000_000),
        "point" => Some(0),
        w => NUMBER_WORDS
            .iter()
            .find(|(name, _)| *name == w)
            .map(|(_, v)| *v),
    }
}

/// Case-insensitive equality that also accepts a number word for its digits.
pub fn safe_string_equal(prediction: &str, answer: &str) -> bool {
    let p = prediction
        .trim_end_matches('.')
        .to_lowercase()
        .trim()
        .to_string();
    let a = answer.to_lowercase().trim().to_string();
    if p == a {
        return true;
    }
    if number_word(&p).is_some_and(|n| n.to_string() == a) {
        return true;
    }
    number_word(&a).is_some_and(|n| p == n.to_string())
}

/// The text of option `letter` in a problem with lines like `A. text`.
pub fn option_text(problem: &str, letter: &str) -> Option<String> {
    OPTION_LINE
        .captures_iter(problem)
        .find(|c| &c[1] == letter)
        .map(|c| c[2].trim().to_string())
}

fn contains_word(haystack: &str, word: &str) -> bool {
    re(&format!(r"\b{}\b", regex::escape(word))).is_match(haystack)
}

fn quoted_answer(response: &str) -> String {
    ANSWER_TEXT
        .iter()
        .find_map(|r| r.captures(response).map(|c| c[1].trim().to_string()))
        .unwrap_or_else(|| response.to_string())
}

fn answer_letter(response: &str) -> String {
    ANSWER_LETTER
        .iter()
        .find_map(|r| r.captures(response).map(|c| c[1].to_string()))
        .unwrap_or_else(|| response.to_string())
}

/// Whether a free-form answer names the true option: by its letter ("The
/// answer is B") or by the option's text.
fn names_option(answer: &str, truth: &str, problem: &str) -> bool {
    if contains_word(answer, truth) {
        let letter = answer_letter(answer);
        return letter.chars().count() <= 2 && safe_string_equal(&letter, truth);
    }
    // The reference raises when the problem lists no such option; we score 0.
    let Some(text) = option_text(problem, truth) else {
        return false;
    };
    contains_word(answer, &text) && safe_string_equal(&quoted_answer(answer), &text)
}

/// The reference's multiple-choice comparison: a bare letter, or an answer
/// that names the option.
fn multiple_choice_match(answer: &str, truth: &str, problem: &str) -> bool {
    if answer.chars().count() <= 2 {
        safe_string_equal(answer, truth)
    } else {
        names_option(answer, truth, problem)
    }
}

/// `common_qa_accuracy_reward` of ULM-R1: exact match, then per question
/// type (multiple choice by letter or option text, open-ended by soft Jaccard).
pub fn qa_accuracy(completion: &str, solution: &str, problem: &str, qa_type: QaType) -> f64 {
    let truth = ground_truth(solution);
    let (answer, _) = student_answer(completion);
    if safe_string_equal(&answer, &truth) {
        return 1.0;
    }
    match qa_type {
        // Departure: the reference trainer never reaches this branch.
        QaType::MultipleChoice => {
            if multiple_choice_match(&answer, &truth, problem) {
                1.0
            } else {
                0.0
            }
        }
        QaType::OpenEnded => soft_jaccard(answer.trim_end_matches(['.', ',', '!', '?']), &truth),
    }
}

/// `r_t2i.qa_accuracy_reward`: multiple choice with partial credit (0.8)
/// for an answer outside `<answer>` tags and 0.2 for `UNK`.
pub fn t2i_qa_accuracy(completion: &str, solution: &str, problem: &str) -> f64 {
    let truth = ground_truth(solution);
    let (answer, tagged) = student_answer(completion);
    if tagged {
        if answer == "UNK" {
            0.2
        } else if multiple_choice_match(&answer, &truth, problem) {
            1.0
        } else {
            0.0
        }
    } else if names_option(&answer, &truth, problem) {
        0.8
    } else {
        0.0
    }
}

/// `common_cls_accuracy_reward`: 1 for the exact (lower-cased) class, 0.9
/// when one contains the other.
pub fn cls_accuracy(completion: &str, solution: &str) -> f64 {
    let truth = ground_truth(solution);
    let answer = ANSWER
        .captures(completion)
        .map_or_else(
            || completion.trim().to_string(),
            |c| c[1].trim().to_string(),
        )
        .to_lowercase();
    if answer == truth {
        1.0
    } else if truth.contains(&answer) || answer.contains(&truth) {
        0.9
    } else {
        0.0
    }
}

fn word_set(text: &str) -> Vec<String> {
    let mut words: Vec<String> = text
        .to_lowercase()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    words.sort();
    words.dedup();
    words
}

/// |A ∩ B| / |A ∪ B| over lower-cased word sets.
pub fn word_jaccard(a: &str, b: &str) -> f64 {
    let (wa, wb) = (word_set(a), word_set(b));
    let inter = wa.iter().filter(|w| wb.contains(w)).count();
    let union = wa.len() + wb.len() - inter;
    if union == 0 {
        0.0
    } else {
        inter as f64 / union as f64
    }
}

/// Jaccard similarity where words that are not equal may still match
/// (difflib ratio >= 0.8) and count by their ratio.
///
/// Departure: words are matched in sorted order, so the result does not
/// depend on hash order as the reference's set iteration does.
pub fn soft_jaccard(a: &str, b: &str) -> f64 {
    const THRESHOLD: f64 = 0.8;
    let (wa, wb) = (word_set(a), word_set(b));
    let exact: Vec<&String> = wa.iter().filter(|w| wb.contains(w)).collect();
    let mut used: Vec<&String> = Vec::new();
    let mut soft = 0.0;
    for w1 in wa.iter().filter(|w| !exact.contains(w)) {
        let mut best: Option<(&String, f64)> = None;
        for w2 in wb
            .iter()
            .filter(|w| !exact.contains(w) && !used.contains(w))
        {
            let r = difflib::ratio(w1, w2);
            if r >= THRESHOLD && best.is_none_or(|(_, br)| r > br) {
                best = Some((w2, r));
            }
        }
        if let Some((w2, r)) = best {
            soft += r;
            used.push(w2);
        }
    }
    let inter = exact.len() as f64 + soft;
    let union = (wa.len() + wb.len()) as f64 - inter;
    if union == 0.0 {
        0.0
    } else {
        inter / union
    }
}

/// Symmetric max-match cosine similarity between image-token rows `[Li, H]`
/// and text-token rows `[Lt, H]` (`token_level_max_match_similarity`).
pub fn max_match_similarity(image: &Tensor, text: &Tensor) -> CandleResult<f64> {
    let norm = |x: &Tensor| -> CandleResult<Tensor> {
        let n = x
            .sqr()?
            .sum_keepdim(D::Minus1)?
            .sqrt()?
            .clamp(1e-12, f64::MAX)?;
        x.broadcast_div(&n)
    };
    let sim = norm(image)?.matmul(&norm(text)?.t()?)?;
    let i2t = sim.max(1)?.mean_all()?.to_scalar::<f32>()? as f64;
    let t2i = sim.max(0)?.mean_all()?.to_scalar::<f32>()? as f64;
    Ok(0.5 * (i2t + t2i))
}
