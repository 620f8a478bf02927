//! Peak memory of one GRPO step on served groups at the Janus-Pro-1B widths
//! (hidden 2048, 16 heads, intermediate 5504, vocab 102400, SigLIP-L at
//! 384 px, VQ-16 with 16384 codes, 576 image tokens), with fewer layers so
//! that it runs on a CPU, random weights. Memory is counted by the global
//! allocator: the step's peak above what was allocated before it (the
//! weights), so it is what grows with rows, length and vocabulary.
//!
//! `cargo bench -p ulm-rl --bench memory -- [--layers N] [--rows 2,4] [--only lora|full] [--quick]`
//! (`--quick`: 2 rows, no length or vocabulary sweep).
//! `-- --device cuda --dtype bf16` (build with `--features cuda`) runs every
//! case on the GPU in that dtype and times the step; the allocator counts
//! host memory only, so the peak column is left out there.
//! Prints a Markdown table.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use candle_core::{DType, Device};
use ulm_model::bundle::{parse_device, parse_dtype, ModelBundle, ModelSource};
use ulm_model::demo::{build_random, demo_tokenizer, janus_pro_1b_widths_json, SeededBackend};
use ulm_model::image_processor::ImageProcessorConfig;
use ulm_model::processor::Processor;
use ulm_rl::lora::{attach, LoraConfig};
use ulm_rl::policy::{build_trainable, is_language_model};
use ulm_rl::reward::verifiable::QaType;
use ulm_rl::reward::{QaItem, RewardTask, TrainItem};
use ulm_rl::trainer::{Adaptation, ServedGroup, ServedSample, Trainer, TrainerConfig};

/// The system allocator, counting live bytes and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const GIB: f64 = (1u64 << 30) as f64;

/// Janus-Pro-1B widths with `layers` LLaMA layers, one SigLIP-L layer and
/// a narrow VQ (the step never decodes an image), at vocabulary `vocab`.
fn janus_pro_1b_widths(layers: usize, vocab: usize) -> serde_json::Value {
    let mut c = janus_pro_1b_widths_json(layers, 1);
    c["language_config"]["vocab_size"] = vocab.into();
    let q = &mut c["gen_vision_config"]["params"];
    q["ch"] = 32.into();
    q["num_res_blocks"] = 1.into();
    q["z_channels"] = 32.into();
    c
}

/// One understanding group and one generation group of `rows` samples,
/// answers `length` tokens long, as the server would have stored them.
fn served(rows: usize, length: usize, image_tokens: usize) -> Vec<ServedGroup> {
    let sample = |k: usize, n: usize, vocab: u32| ServedSample {
        tokens: (0..n).map(|i| ((i * 31 + k * 7) as u32) % vocab).collect(),
        logprobs: vec![-3.0; n],
        guided_logprobs: Vec::new(),
        score: k as f32,
    };
    vec![
        ServedGroup {
            item: TrainItem {
                qa: Some(QaItem {
                    image: image::RgbImage::from_fn(384, 384, |x, y| {
                        image::Rgb([x as u8, y as u8, 90])
                    }),
                    question: "What is in the picture?".into(),
                    solution: String::new(),
                    qa_type: QaType::OpenEnded,
                }),
                caption: None,
            },
            task: RewardTask::Understanding,
            guidance: None,
            // Text ids below 256 are plain bytes of the demo tokenizer.
            samples: (0..rows).map(|k| sample(k, length, 250)).collect(),
        },
        ServedGroup {
            item: TrainItem {
                qa: None,
                caption: Some("a red square next to a blue circle".into()),
            },
            task: RewardTask::Generation,
            guidance: None,
            samples: (0..rows).map(|k| sample(k, image_tokens, 16384)).collect(),
        },
    ]
}

struct Case {
    lora: bool,
    dtype: DType,
    rows: usize,
    length: usize,
    vocab: usize,
}

/// (peak above the weights in bytes, step seconds, whether the update applied)
fn measure(case: &Case, layers: usize, dev: &Device) -> (usize, f64, bool) {
    let config = janus_pro_1b_widths(layers, case.vocab);
    let (model, _) = build_random(config.clone(), 3, case.dtype, dev).unwrap();
    let processor = Processor::new(
        demo_tokenizer().unwrap(),
        true,
        model.cfg.vision.num_patches(),
    )
    .unwrap();
    let image_processor = ImageProcessorConfig::janus_default(model.cfg.vision.image_size);
    let image_tokens = model.cfg.gen_vision.image_tokens();
    let mut bundle = ModelBundle {
        model,
        processor,
        image_processor,
        sampling: Default::default(),
        source: ModelSource::Demo { seed: 3 },
    };
    let adaptation = if case.lora {
        Adaptation::Lora(attach(&mut bundle.model, &LoraConfig::default(), 1).unwrap())
    } else {
        let cfg = bundle.model.cfg.clone();
        let vb = candle_nn::VarBuilder::from_backend(
            Box::new(SeededBackend::new(3)),
            case.dtype,
            dev.clone(),
        );
        let trainable = build_trainable(&cfg, vb, is_language_model).unwrap();
        let reference = std::mem::replace(&mut bundle.model, trainable.model);
        Adaptation::Full {
            params: trainable.params,
            reference: Box::new(reference),
        }
    };
    let config = TrainerConfig {
        group_size: case.rows,
        micro_batch_rows: case.rows,
        beta: 0.04,
        ..TrainerConfig::default()
    };
    let mut trainer = Trainer::new(bundle, adaptation, config, Vec::new()).unwrap();
    let groups = served(case.rows, case.length, image_tokens);
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let started = Instant::now();
    let metrics = trainer.step_served(&groups).unwrap();
    dev.synchronize().unwrap();
    let seconds = started.elapsed().as_secs_f64();
    let peak = PEAK.load(Ordering::Relaxed) - before;
    (peak, seconds, metrics.applied)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
    };
    let device = parse_device(value("--device").map_or("cpu", |s| s.as_str())).unwrap();
    // On the CPU, f32 and (standing in for bf16, which has no CPU matmul
    // in candle) f16; elsewhere only the dtype asked for.
    let only_dtype = value("--dtype").map(|s| parse_dtype(s).unwrap());
    let layers = args
        .iter()
        .position(|a| a == "--layers")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let mut cases = Vec::new();
    let rows_list: Vec<usize> = match args.iter().position(|a| a == "--rows") {
        Some(i) => args[i + 1]
            .split(',')
            .map(|r| r.parse().expect("--rows takes a list like 2,4"))
            .collect(),
        None if quick => vec![2],
        None => vec![2, 4, 8],
    };
    for lora in [true, false] {
        for &rows in &rows_list {
            cases.push(Case {
                lora,
                dtype: DType::F32,
                rows,
                length: 64,
                vocab: 102400,
            });
        }
    }
    if !quick {
        for length in [128, 256] {
            cases.push(Case {
                lora: true,
                dtype: DType::F32,
                rows: 2,
                length,
                vocab: 102400,
            });
        }
        for vocab in [25600, 51200] {
            cases.push(Case {
                lora: true,
                dtype: DType::F32,
                rows: 2,
                length: 64,
                vocab,
            });
        }
    }
    if only_dtype.is_none() {
        for lora in [true, false] {
            cases.push(Case {
                lora,
                dtype: DType::F16,
                rows: 2,
                length: 64,
                vocab: 102400,
            });
        }
    }
    if let Some(dtype) = only_dtype {
        for case in &mut cases {
            case.dtype = dtype;
        }
    }
    // `--only lora` or `--only full`.
    if let Some(only) = args
        .iter()
        .position(|a| a == "--only")
        .map(|i| &args[i + 1])
    {
        cases.retain(|c| c.lora == (only == "lora"));
    }
    println!("{layers} LLaMA layer(s), 1 SigLIP-L layer; one understanding group (answers of the given length) and one generation group (576 image tokens), each of `rows` samples, in one micro-batch.\n");
    println!("| adaptation | dtype | rows | answer tokens | vocab | step peak above weights | step s | applied |");
    println!("|---|---|---:|---:|---:|---:|---:|---|");
    let on_cpu = device.is_cpu();
    for case in &cases {
        let (peak, seconds, applied) = measure(case, layers, &device);
        let peak = if on_cpu {
            format!("{:.2} GiB", peak as f64 / GIB)
        } else {
            "(host only)".into()
        };
        println!(
            "| {} | {:?} | {} | {} | {} | {} | {:.2} | {} |",
            if case.lora { "LoRA r16" } else { "full" },
            case.dtype,
            case.rows,
            case.length,
            case.vocab,
            peak,
            seconds,
            if applied { "yes" } else { "no" }
        );
    }
}
