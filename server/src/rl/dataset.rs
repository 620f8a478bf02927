//! Training data in the CoRL format, one JSON object per line:
//! `caption` (text-to-image prompt), `image` (path relative to the file, or
//! base64), `qa_problem`, `qa_solution`, `qa_type` ("MC" or "OE"). An item
//! may carry a caption, a QA part, or both (unified items).

use std::path::Path;

use base64::Engine as _;
use serde::Deserialize;

use super::reward::{QaItem, TrainItem};
use super::rewards::QaType;
use crate::model::image_processor::decode_image;
use crate::model::ModelError;

const MAX_PIXELS: u64 = 64 * 1024 * 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    #[serde(alias = "prompt")]
    caption: Option<String>,
    image: Option<String>,
    #[serde(alias = "question", alias = "problem")]
    qa_problem: Option<String>,
    #[serde(alias = "solution", alias = "answer")]
    qa_solution: Option<String>,
    qa_type: Option<String>,
}

fn bad(path: &Path, line: usize, message: impl std::fmt::Display) -> ModelError {
    ModelError::InvalidInput(format!("{}:{line}: {message}", path.display()))
}

/// Reads every item of a JSONL dataset; errors name the line.
pub fn read_jsonl(path: &Path) -> Result<Vec<TrainItem>, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut items = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let line: Line = serde_json::from_str(raw).map_err(|e| bad(path, n, e))?;
        let qa = match (line.qa_problem, line.qa_solution) {
            (Some(question), Some(solution)) => {
                let image_ref = line
                    .image
                    .as_deref()
                    .ok_or_else(|| bad(path, n, "a QA item needs an image"))?;
                let bytes = if let Some(b64) = image_ref.strip_prefix("base64:") {
                    base64::engine::general_purpose::STANDARD
                        .decode(b64)
                        .map_err(|e| bad(path, n, e))?
                } else {
                    let file = base.join(image_ref);
                    std::fs::read(&file)
                        .map_err(|e| bad(path, n, format!("{}: {e}", file.display())))?
                };
                let qa_type = match line.qa_type.as_deref() {
                    Some("MC") => QaType::MultipleChoice,
                    Some("OE") | None => QaType::OpenEnded,
                    Some(other) => {
                        return Err(bad(
                            path,
                            n,
                            format!("qa_type must be MC or OE, got {other:?}"),
                        ))
                    }
                };
                Some(QaItem {
                    image: decode_image(&bytes, MAX_PIXELS).map_err(|e| bad(path, n, e))?,
                    question,
                    solution,
                    qa_type,
                })
            }
            (None, None) => None,
            _ => return Err(bad(path, n, "qa_problem and qa_solution come together")),
        };
        if qa.is_none() && line.caption.is_none() {
            return Err(bad(path, n, "an item needs a caption, a QA part, or both"));
        }
        items.push(TrainItem {
            qa,
            caption: line.caption,
        });
    }
    if items.is_empty() {
        return Err(ModelError::InvalidInput(format!(
            "{} has no items",
            path.display()
        )));
    }
    Ok(items)
}
