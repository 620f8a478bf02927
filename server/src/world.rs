//! `ulm-server world` and `ulm-server verify`: the synthetic world of
//! coloured shapes as a dataset in the CoRL format, and its verifier on any
//! image and caption.

use std::io::{BufWriter, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;

use ulm_world::{caption, examples, verify, Split};

#[derive(Args, Debug, Clone)]
pub struct WorldArgs {
    /// Output directory: data.jsonl (CoRL format, one line per question),
    /// scenes.jsonl (each example in full) and images/.
    #[arg(long)]
    pub out: PathBuf,
    /// train, validation or test.
    #[arg(long, default_value = "train")]
    pub split: String,
    /// Examples (scenes) to write.
    #[arg(long, default_value_t = 1000)]
    pub count: usize,
    /// Image side in pixels: the model's image size.
    #[arg(long, default_value_t = 64)]
    pub side: u32,
    /// The world's seed: the same seed gives the same examples.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

fn parse_split(name: &str) -> Result<Split> {
    Split::ALL
        .into_iter()
        .find(|s| s.name() == name)
        .with_context(|| format!("unknown split {name:?} (train, validation, test)"))
}

/// Writes the examples; returns the number of lines in data.jsonl.
pub fn write_world(args: &WorldArgs) -> Result<usize> {
    let split = parse_split(&args.split)?;
    if !(16..=1024).contains(&args.side) {
        bail!("--side must be between 16 and 1024, got {}", args.side);
    }
    std::fs::create_dir_all(args.out.join("images"))
        .with_context(|| format!("creating {}", args.out.display()))?;
    let create = |name: &str| -> Result<BufWriter<std::fs::File>> {
        let path = args.out.join(name);
        let file = std::fs::File::create(&path).with_context(|| path.display().to_string())?;
        Ok(BufWriter::new(file))
    };
    let (mut data, mut scenes) = (create("data.jsonl")?, create("scenes.jsonl")?);
    let mut lines = 0;
    for (index, example) in examples(args.seed, split).take(args.count).enumerate() {
        let image = format!("images/{index:06}.png");
        example
            .image(args.side)
            .save(args.out.join(&image))
            .with_context(|| image.clone())?;
        // Captions take turns across the example's questions, so both the
        // category caption and the full description are trained on.
        for (i, question) in example.questions.iter().enumerate() {
            let caption = &example.captions[i % example.captions.len()];
            let line = json!({
                "caption": caption.text,
                "image": image,
                "qa_problem": question.text,
                "qa_solution": question.answer,
                "qa_type": if question.multiple_choice { "MC" } else { "OE" },
            });
            writeln!(data, "{line}")?;
            lines += 1;
        }
        writeln!(scenes, "{}", json!({"image": image, "example": example}))?;
    }
    data.flush()?;
    scenes.flush()?;
    Ok(lines)
}

#[derive(Args, Debug, Clone)]
pub struct VerifyArgs {
    /// The image to read (PNG, JPEG or WebP).
    #[arg(long)]
    pub image: PathBuf,
    /// A caption in the world's language, e.g. "a red circle above a blue square".
    #[arg(long)]
    pub caption: String,
}

/// What the verifier reads in the image and whether the caption holds, as JSON.
pub fn verify_caption(args: &VerifyArgs) -> Result<serde_json::Value> {
    let claim = caption::parse(&args.caption)?;
    let image = image::open(&args.image)
        .with_context(|| args.image.display().to_string())?
        .to_rgb8();
    let seen = verify::read(&image);
    Ok(json!({
        "claim": claim,
        "objects": seen,
        "holds": verify::check(&claim, &seen),
        "score": verify::score(&claim, &seen),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_written_world_is_a_training_dataset_whose_captions_hold() {
        let dir = tempfile::tempdir().unwrap();
        let args = WorldArgs {
            out: dir.path().to_path_buf(),
            split: "validation".into(),
            count: 12,
            side: 64,
            seed: 3,
        };
        let lines = write_world(&args).unwrap();
        let items = ulm_rl::dataset::read_dataset(&dir.path().join("data.jsonl")).unwrap();
        assert_eq!(items.len(), lines);
        assert!(lines >= 12 * 4, "{lines}");
        for item in &items {
            assert!(item.caption.is_some());
            let qa = item.qa.as_ref().unwrap();
            assert_eq!((qa.image.width(), qa.image.height()), (64, 64));
        }
        let first = verify_caption(&VerifyArgs {
            image: dir.path().join("images/000000.png"),
            caption: items[0].caption.clone().unwrap(),
        })
        .unwrap();
        assert_eq!(first["holds"], true);
        assert_eq!(write_world(&args).unwrap(), lines, "deterministic");
        let bad = WorldArgs {
            split: "dev".into(),
            ..args
        };
        assert!(write_world(&bad)
            .unwrap_err()
            .to_string()
            .contains("unknown split"));
    }
}
