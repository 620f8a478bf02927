//! The `train` subcommand end to end: dataset, steps, metrics, checkpoints,
//! resume, and checkpoints that load back.

use std::path::Path;
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use ulm_model::bundle::ModelBundle;
use ulm_model::demo::DEFAULT_SEED;
use ulm_model::ops::Pass;
use ulm_rl::lora;

fn write_dataset(dir: &Path) -> std::path::PathBuf {
    let img = image::RgbImage::from_fn(40, 24, |x, y| {
        image::Rgb([(x * 6) as u8, (y * 9) as u8, 40])
    });
    img.save(dir.join("q1.png")).unwrap();
    let data = dir.join("data.jsonl");
    std::fs::write(
        &data,
        concat!(
            r#"{"caption": "a red square", "image": "q1.png", "qa_problem": "What colour?\nA. red\nB. blue", "qa_solution": "A", "qa_type": "MC"}"#,
            "\n",
            r#"{"caption": "a blue circle"}"#,
            "\n"
        ),
    )
    .unwrap();
    data
}

fn train(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ulm-server"))
        .arg("train")
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

/// `train` on `data` into `out` with the common settings and `extra` flags.
fn train_on(data: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend(extra);
    args.extend(COMMON);
    train(&args)
}

fn logits(bundle: &ModelBundle) -> Tensor {
    let lm = &bundle.model.language_model;
    let ids = Tensor::new(&[[256u32, 266, 58, 32, 72]], &Device::Cpu).unwrap();
    let ctx = lm.context(&[(0..5).collect()], &[vec![true; 5]]).unwrap();
    lm.logits(
        &lm.forward_hidden(&lm.embed(&ids).unwrap(), &ctx, None, Pass::Inference)
            .unwrap(),
    )
    .unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

const COMMON: [&str; 11] = [
    "--demo",
    "--batch-size",
    "2",
    "--group-size",
    "2",
    "--max-new-tokens",
    "4",
    "--lr",
    "1e-2",
    "--rewards",
    "format_tag=1,qa_accuracy=1,t2i_match=1",
];

#[test]
fn train_lora_resume_and_reload() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_dataset(tmp.path());
    let out = tmp.path().join("run");
    let o = train_on(&data, &out, &["--steps", "2", "--save-every", "1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    let curves = image::open(out.join("curves.png")).expect("train draws its curves");
    assert_eq!((curves.width(), curves.height()), (1120, 720));
    for m in &lines {
        assert_eq!(m["applied"], true);
        assert!(m["reward_understanding"].is_number() && m["reward_generation"].is_number());
        for key in [
            "loss",
            "kl",
            "grad_norm",
            "clip_fraction",
            "tokens_per_s",
            "rollout_s",
            "train_s",
        ] {
            assert!(m[key].is_number(), "metric {key} missing");
        }
    }
    for step in [1, 2] {
        let ckpt = out.join(format!("checkpoint-{step}"));
        for file in [
            "adapter_model.safetensors",
            "adapter_config.json",
            "optimizer.safetensors",
            "trainer_state.json",
        ] {
            assert!(
                ckpt.join(file).exists(),
                "{file} missing in checkpoint-{step}"
            );
        }
    }

    // Resume continues from the saved step.
    let out2 = tmp.path().join("resumed");
    let resume = out.join("checkpoint-2");
    let o = train_on(
        &data,
        &out2,
        &["--steps", "3", "--resume", resume.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let metrics = std::fs::read_to_string(out2.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = metrics
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, vec![2]);

    // The adapters load onto the base model and change it.
    let base = ModelBundle::demo(DEFAULT_SEED, DType::F32, &Device::Cpu).unwrap();
    let mut adapted = ModelBundle::demo(DEFAULT_SEED, DType::F32, &Device::Cpu).unwrap();
    let loaded = lora::load(&mut adapted.model, &resume, &Device::Cpu).unwrap();
    assert!(max_diff(&logits(&base), &logits(&adapted)) > 1e-4);
    loaded.set_enabled(false);
    assert!(max_diff(&logits(&base), &logits(&adapted)) < 1e-6);
}

#[test]
fn full_fine_tuning_writes_a_loadable_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_dataset(tmp.path());
    let out = tmp.path().join("full");
    let o = train_on(&data, &out, &["--steps", "1", "--full"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ckpt = out.join("checkpoint-1");
    let trained = ModelBundle::load(&ckpt, DType::F32, &Device::Cpu).unwrap();
    let base = ModelBundle::demo(DEFAULT_SEED, DType::F32, &Device::Cpu).unwrap();
    assert!(
        max_diff(&logits(&base), &logits(&trained)) > 1e-4,
        "one step at lr 1e-2 moves the model"
    );
}

#[test]
fn bad_datasets_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("bad.jsonl");
    std::fs::write(&data, "{\"caption\": \"ok\"}\n{\"qa_problem\": \"q\"}\n").unwrap();
    let o = train(&[
        "--data",
        data.to_str().unwrap(),
        "--out",
        tmp.path().join("o").to_str().unwrap(),
        "--steps",
        "1",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("bad.jsonl:2"), "{err}");
}
