//! Parity with the reference implementation on every fixture directory under
//! `JANUS_FIXTURES` (default `tests/fixtures/janus`): prompts and ids, image
//! preprocessing, understanding (all-position logits, hidden state, greedy
//! decode), text-to-image with CFG (teacher forced), VQ encode and decode.
//! Tolerances are those of the fixtures README, section 7. `ULM_TEST_DEVICE`
//! runs them on another device (`cuda`).

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::{full_hidden, janus_fixture_dirs, row_embeds, test_device, Report, Tol};
use ulm_model::bundle::ModelBundle;
use ulm_model::decode::{CfgDecoder, TextDecoder, TextPrompt};
use ulm_model::generate::to_rgb8;
use ulm_model::image_processor::resize_bicubic;
use ulm_model::ops::Pass;

/// Activations, hidden states and logits (README 7: ~1e-5).
const TOL: Tol = Tol::new(2e-5, 1e-5);
/// CFG logits amplify differences by the guidance weight (README 7: ~4e-5).
const TOL_CFG: Tol = Tol::new(5e-5, 1e-5);
/// Normalised pixels: the resize rounds to u8 first (README 7).
const TOL_PIXELS: Tol = Tol::new(2.0 / 255.0 + 1e-6, 0.0);
/// Decoded VQ output, ~1.5e-5 (README 7).
const TOL_DECODED: Tol = Tol::new(3e-5, 1e-5);

fn u8_image_tensor(img: &image::RgbImage) -> Tensor {
    let (w, h) = img.dimensions();
    let data: Vec<u32> = img.as_raw().iter().map(|&b| b as u32).collect();
    Tensor::from_vec(data, (h as usize, w as usize, 3), &Device::Cpu).unwrap()
}

/// Pixels of two u8 tensors differing by more than 1, and by exactly 1.
fn u8_mismatches(actual: &Tensor, expected: &Tensor) -> (usize, usize) {
    let values = |t: &Tensor| -> Vec<i64> {
        t.to_dtype(DType::I64)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .unwrap()
    };
    let (a, e) = (values(actual), values(expected));
    assert_eq!(a.len(), e.len());
    let off: Vec<i64> = a.iter().zip(&e).map(|(x, y)| (x - y).abs()).collect();
    (
        off.iter().filter(|&&d| d > 1).count(),
        off.iter().filter(|&&d| d == 1).count(),
    )
}

fn check_und(dir: &Path, bundle: &ModelBundle, r: &mut Report) {
    let Some(case) = r.case(dir, "und") else {
        return;
    };
    let model = &bundle.model;
    let dev = model.device();

    let prompt = bundle
        .processor
        .understanding_prompt(case.str("question"))
        .unwrap();
    r.equal(
        "und sft_format",
        bundle.processor.sft_format(case.str("question")),
        case.str("sft_format").to_string(),
    );
    r.equal("und input_ids", prompt.ids.clone(), case.u32s("input_ids"));
    let mask: Vec<u32> = prompt.images_seq_mask.iter().map(|&m| m as u32).collect();
    r.equal("und images_seq_mask", mask, case.u32s("images_seq_mask"));
    let (start, len) = prompt.image_span().unwrap();
    r.equal(
        "und image span",
        (start, start + len),
        (
            case.f64("image_token_start") as usize,
            case.f64("image_token_end") as usize,
        ),
    );

    // Image preprocessing: PIL-exact resize, padding, normalisation.
    let img = image::open(dir.join("cases/und_input.png"))
        .unwrap()
        .to_rgb8();
    let ip = &bundle.image_processor;
    let (rows, cols) = ip.target_size(img.width(), img.height());
    r.equal("und resize_hw", vec![rows, cols], case.ids("resize_hw"));
    let resized = resize_bicubic(&img, cols, rows);
    let (over1, at1) = u8_mismatches(&u8_image_tensor(&resized), case.t("image_resized_u8"));
    r.check(
        "und bicubic resize",
        over1 == 0,
        format!("{at1} values off by 1, {over1} by more"),
    );
    let (over1, at1) = u8_mismatches(
        &u8_image_tensor(&ip.resize_and_pad(&img)),
        case.t("image_padded_u8"),
    );
    r.check(
        "und padded image",
        over1 == 0,
        format!("{at1} values off by 1, {over1} by more"),
    );
    let pixels = ip.preprocess(&img, dev).unwrap();
    let ref_pixels = case.t("pixel_values").squeeze(0).unwrap();
    // One level of the uint8 image is 2/255 after normalisation.
    r.close("und pixel_values", &pixels, &ref_pixels, TOL_PIXELS);

    // Forward on the reference pixels, so later stages are compared in isolation.
    let features = model
        .vision_tower
        .forward(&ref_pixels, Pass::Inference)
        .unwrap();
    r.close(
        "und vision_features",
        &features,
        case.t("vision_features"),
        TOL,
    );
    let image_embeds = model.image_embeds(&ref_pixels, Pass::Inference).unwrap();
    r.close(
        "und image_embeds",
        &image_embeds,
        case.t("image_embeds"),
        TOL,
    );
    let t = prompt.ids.len();
    let embeds = row_embeds(model, &prompt.ids, &prompt.images_seq_mask, &image_embeds);
    r.close("und inputs_embeds", &embeds, case.t("inputs_embeds"), TOL);
    let lm = &model.language_model;
    let hidden = full_hidden(model, &embeds);
    let logits = lm.logits(&hidden).unwrap();
    r.close("und logits (all positions)", &logits, case.t("logits"), TOL);
    r.close(
        "und last_hidden_state",
        &hidden.get(t - 1).unwrap(),
        case.t("last_hidden_state"),
        TOL,
    );
    r.equal(
        "und argmax_per_position",
        ulm_model::generate::argmax_rows(&logits).unwrap(),
        case.u32s("argmax_per_position"),
    );

    // Greedy decode with the KV cache through the serving decoder.
    let text_prompt = TextPrompt {
        prompt: prompt.clone(),
        pixels: Some(ref_pixels.clone()),
        samples: 1,
    };
    let mut decoder =
        TextDecoder::new(model, &[text_prompt], bundle.processor.special.pad).unwrap();
    let expected_ids = case.u32s("greedy_new_ids");
    let mut ids = Vec::new();
    let mut step_logits = Vec::new();
    for _ in 0..expected_ids.len() {
        let l = decoder.logits().squeeze(0).unwrap();
        let id = ulm_model::sampling::argmax(&l.to_vec1::<f32>().unwrap());
        step_logits.push(l);
        ids.push(id);
        decoder.advance(model, &[id]).unwrap();
    }
    r.equal("und greedy_new_ids", ids, expected_ids);
    r.close(
        "und greedy_step_logits",
        &Tensor::stack(&step_logits, 0).unwrap(),
        case.t("greedy_step_logits"),
        TOL,
    );
}

fn check_gen(dir: &Path, bundle: &ModelBundle, r: &mut Report) {
    let Some(case) = r.case(dir, "gen") else {
        return;
    };
    let model = &bundle.model;
    let prompt = bundle
        .processor
        .generation_prompt(case.str("prompt"))
        .unwrap();
    r.equal(
        "gen cond_input_ids",
        prompt.cond_ids.clone(),
        case.ids("cond_input_ids"),
    );
    r.equal(
        "gen uncond_input_ids",
        prompt.uncond_ids.clone(),
        case.ids("uncond_input_ids"),
    );
    r.equal(
        "gen image tokens per image",
        model.cfg.gen_vision.image_tokens(),
        case.f64("image_token_num_per_image") as usize,
    );

    let fixed = case.u32s("fixed_tokens");
    let fixed_t = Tensor::new(fixed.as_slice(), model.device())
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    r.close(
        "gen gen_img_embeds",
        &model
            .gen_token_embeds(&fixed_t)
            .unwrap()
            .squeeze(0)
            .unwrap(),
        case.t("gen_img_embeds"),
        TOL,
    );

    let cfg_weight = case.f64("cfg_weight") as f32;
    let mut decoder =
        CfgDecoder::new(model, &[&prompt], &[1], bundle.processor.special.pad).unwrap();
    let (mut cond, mut uncond, mut cfg) = (Vec::new(), Vec::new(), Vec::new());
    for (i, &token) in fixed.iter().enumerate() {
        cond.push(decoder.cond_logits().unwrap().squeeze(0).unwrap());
        uncond.push(decoder.uncond_logits().unwrap().squeeze(0).unwrap());
        cfg.push(
            decoder
                .cfg_logits(&[cfg_weight])
                .unwrap()
                .squeeze(0)
                .unwrap(),
        );
        if i + 1 < fixed.len() {
            decoder.advance(model, &[token]).unwrap();
        }
    }
    let stack = |v: &[Tensor]| Tensor::stack(v, 0).unwrap();
    r.close("gen cond_logits", &stack(&cond), case.t("cond_logits"), TOL);
    r.close(
        "gen uncond_logits",
        &stack(&uncond),
        case.t("uncond_logits"),
        TOL,
    );
    r.close(
        "gen cfg_logits",
        &stack(&cfg),
        case.t("cfg_logits"),
        TOL_CFG,
    );

    let entries = model.gen_vision.codebook_entries(&fixed_t).unwrap();
    r.close(
        "gen codebook_entries",
        &entries.squeeze(0).unwrap(),
        case.t("codebook_entries"),
        TOL,
    );
    let decoded = model
        .gen_vision
        .decode_entries(&entries)
        .unwrap()
        .squeeze(0)
        .unwrap();
    r.close("gen decoded", &decoded, case.t("decoded"), TOL_DECODED);
    let img = to_rgb8(&decoded).unwrap();
    let (over1, at1) = u8_mismatches(&u8_image_tensor(&img), case.t("decoded_u8"));
    r.check(
        "gen decoded_u8",
        over1 == 0,
        format!("{at1} values off by 1, {over1} by more"),
    );
    let png = image::open(dir.join("cases").join(case.str("decoded_png")))
        .unwrap()
        .to_rgb8();
    let (over1, at1) = u8_mismatches(&u8_image_tensor(&img), &u8_image_tensor(&png));
    r.check(
        "gen decoded png",
        over1 == 0,
        format!("{at1} values off by 1, {over1} by more"),
    );
}

fn check_vq_encode(dir: &Path, bundle: &ModelBundle, r: &mut Report) {
    let Some(case) = r.case(dir, "vq_encode") else {
        return;
    };
    let vq = &bundle.model.gen_vision;
    let enc = vq.encode(case.t("pixel_values")).unwrap();
    r.close(
        "vq encoder_latent",
        &enc.latent,
        case.t("encoder_latent"),
        TOL,
    );
    r.close("vq distances", &enc.distances, case.t("distances"), TOL);
    let indices: Vec<u32> = enc.indices.flatten_all().unwrap().to_vec1().unwrap();
    r.equal("vq indices", indices, case.u32s("indices"));
    let quant = vq.codebook_entries(&enc.indices).unwrap();
    r.close("vq quant", &quant, case.t("quant"), TOL);
    r.close(
        "vq reconstruction",
        &vq.decode_entries(&quant).unwrap(),
        case.t("reconstruction"),
        TOL_DECODED,
    );
}

#[test]
fn every_fixture_matches_the_reference() {
    for dir in janus_fixture_dirs() {
        let bundle = ModelBundle::load(&dir, DType::F32, &test_device())
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let mut report = Report::default();
        check_und(&dir, &bundle, &mut report);
        check_gen(&dir, &bundle, &mut report);
        check_vq_encode(&dir, &bundle, &mut report);
        report.finish(&dir.display().to_string());
    }
}

#[test]
fn tolerances_scale_with_the_quantity_and_still_catch_errors() {
    let expected = Tensor::new(&[4.0f32, -3.5, 0.001, 2.0], &Device::Cpu).unwrap();
    let close = |offsets: [f32; 4]| {
        let actual = (&expected + Tensor::new(&offsets, &Device::Cpu).unwrap()).unwrap();
        let mut r = Report::default();
        r.close("distances", &actual, &expected, TOL);
        r.failures.is_empty()
    };
    // The outside tester's case: distances of magnitude 4 off by 2.2e-5.
    assert!(close([2.2e-5, -2.2e-5, 1e-5, 1e-5]));
    // A real error, large or small in magnitude, still fails.
    assert!(!close([1e-3, 0.0, 0.0, 0.0]));
    assert!(!close([0.0, 0.0, 5e-5, 0.0]));
    assert!(!close([f32::NAN, 0.0, 0.0, 0.0]));
}
