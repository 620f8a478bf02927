//! Training data in the CoRL format, as JSONL (one JSON object per line) or
//! Parquet (one row per item): `caption` (text-to-image prompt), `image`
//! (path relative to the file, or base64; in Parquet also bytes),
//! `qa_problem`, `qa_solution`, `qa_type` ("MC" or "OE"). An item may carry
//! a caption, a QA part, or both (unified items).

use std::path::Path;

use base64::Engine as _;
use serde::Deserialize;

use crate::reward::verifiable::QaType;
use crate::reward::{QaItem, TrainItem};
use crate::RlError;
use ulm_model::image_processor::decode_image;

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

fn bad(path: &Path, line: usize, message: impl std::fmt::Display) -> RlError {
    RlError::InvalidData(format!("{}:{line}: {message}", path.display()))
}

/// Where an item's image comes from.
enum ImageSource {
    /// A path relative to the dataset file, or `base64:...`.
    Reference(String),
    Bytes(Vec<u8>),
}

/// The fields of one item, whatever the file format.
struct Fields {
    caption: Option<String>,
    image: Option<ImageSource>,
    qa_problem: Option<String>,
    qa_solution: Option<String>,
    qa_type: Option<String>,
}

fn build_item(fields: Fields, base: &Path) -> Result<TrainItem, String> {
    let qa = match (fields.qa_problem, fields.qa_solution) {
        (Some(question), Some(solution)) => {
            let bytes = match fields.image.ok_or("a QA item needs an image")? {
                ImageSource::Bytes(bytes) => bytes,
                ImageSource::Reference(r) => match r.strip_prefix("base64:") {
                    Some(b64) => base64::engine::general_purpose::STANDARD
                        .decode(b64)
                        .map_err(|e| e.to_string())?,
                    None => {
                        let file = base.join(&r);
                        std::fs::read(&file).map_err(|e| format!("{}: {e}", file.display()))?
                    }
                },
            };
            let qa_type = match fields.qa_type.as_deref() {
                Some("MC") => QaType::MultipleChoice,
                Some("OE") | None => QaType::OpenEnded,
                Some(other) => return Err(format!("qa_type must be MC or OE, got {other:?}")),
            };
            Some(QaItem {
                image: decode_image(&bytes, MAX_PIXELS).map_err(|e| e.to_string())?,
                question,
                solution,
                qa_type,
            })
        }
        (None, None) => None,
        _ => return Err("qa_problem and qa_solution come together".into()),
    };
    if qa.is_none() && fields.caption.is_none() {
        return Err("an item needs a caption, a QA part, or both".into());
    }
    Ok(TrainItem {
        qa,
        caption: fields.caption,
    })
}

fn non_empty(path: &Path, items: Vec<TrainItem>) -> Result<Vec<TrainItem>, RlError> {
    if items.is_empty() {
        return Err(RlError::InvalidData(format!(
            "{} has no items",
            path.display()
        )));
    }
    Ok(items)
}

fn io_error(path: &Path, e: impl std::fmt::Display) -> RlError {
    RlError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// A JSONL or Parquet dataset, by extension (`.parquet` is Parquet).
pub fn read_dataset(path: &Path) -> Result<Vec<TrainItem>, RlError> {
    if path.extension().is_some_and(|e| e == "parquet") {
        read_parquet(path)
    } else {
        read_jsonl(path)
    }
}

/// Reads every item of a JSONL dataset; errors name the line.
pub fn read_jsonl(path: &Path) -> Result<Vec<TrainItem>, RlError> {
    let text = std::fs::read_to_string(path).map_err(|e| io_error(path, e))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut items = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let line: Line = serde_json::from_str(raw).map_err(|e| bad(path, n, e))?;
        let fields = Fields {
            caption: line.caption,
            image: line.image.map(ImageSource::Reference),
            qa_problem: line.qa_problem,
            qa_solution: line.qa_solution,
            qa_type: line.qa_type,
        };
        items.push(build_item(fields, base).map_err(|e| bad(path, n, e))?);
    }
    non_empty(path, items)
}

/// Reads a Parquet dataset with the same columns (and aliases) as the JSONL
/// format. `image` may be binary, a string (path or `base64:`), or the
/// Hugging Face image struct `{bytes, path}`. Errors name the row.
pub fn read_parquet(path: &Path) -> Result<Vec<TrainItem>, RlError> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::Field;

    let file = std::fs::File::open(path).map_err(|e| io_error(path, e))?;
    let reader = SerializedFileReader::new(file).map_err(|e| io_error(path, e))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let rows = reader.get_row_iter(None).map_err(|e| io_error(path, e))?;
    let text = |field: &Field| match field {
        Field::Str(s) => Some(s.clone()),
        _ => None,
    };
    let mut items = Vec::new();
    for (i, row) in rows.enumerate() {
        let n = i + 1;
        let row = row.map_err(|e| bad(path, n, e))?;
        let mut fields = Fields {
            caption: None,
            image: None,
            qa_problem: None,
            qa_solution: None,
            qa_type: None,
        };
        for (name, field) in row.get_column_iter() {
            match name.as_str() {
                "caption" | "prompt" => fields.caption = text(field),
                "qa_problem" | "question" | "problem" => fields.qa_problem = text(field),
                "qa_solution" | "solution" | "answer" => fields.qa_solution = text(field),
                "qa_type" => fields.qa_type = text(field),
                "image" => {
                    fields.image = match field {
                        Field::Bytes(b) => Some(ImageSource::Bytes(b.data().to_vec())),
                        Field::Str(s) => Some(ImageSource::Reference(s.clone())),
                        Field::Group(g) => {
                            let mut image = None;
                            for (k, v) in g.get_column_iter() {
                                match (k.as_str(), v) {
                                    ("bytes", Field::Bytes(b)) => {
                                        image = Some(ImageSource::Bytes(b.data().to_vec()))
                                    }
                                    ("path", Field::Str(p)) if image.is_none() => {
                                        image = Some(ImageSource::Reference(p.clone()))
                                    }
                                    _ => {}
                                }
                            }
                            image
                        }
                        Field::Null => None,
                        other => {
                            return Err(bad(
                                path,
                                n,
                                format!(
                                "image must be binary, a string or {{bytes, path}}, got {other}"
                            ),
                            ))
                        }
                    }
                }
                _ => {}
            }
        }
        items.push(build_item(fields, base).map_err(|e| bad(path, n, e))?);
    }
    non_empty(path, items)
}
