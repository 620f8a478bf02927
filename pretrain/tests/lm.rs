//! Stage two: next-token prediction reaches every part but the VQ, and
//! lowers both losses.

mod common;

use common::assert_every_gradient;
use ulm_model::image_processor::ImageProcessorConfig;
use ulm_model::processor::Processor;
use ulm_pretrain::data::train_examples;
use ulm_pretrain::lm::{losses, train_lm, ExtraTurns, LmParts, LmTraining};
use ulm_pretrain::model::{PretrainModel, VQ_PREFIX};

fn setup() -> (PretrainModel, Processor, ImageProcessorConfig) {
    let m = PretrainModel::world(3).unwrap();
    let vision = &m.model.cfg.vision;
    let processor = Processor::new(m.tokenizer.clone(), true, vision.num_patches()).unwrap();
    let image_processor = ImageProcessorConfig::janus_default(vision.image_size);
    (m, processor, image_processor)
}

#[test]
fn every_part_but_the_vq_gets_a_gradient() {
    let (m, processor, image_processor) = setup();
    let parts = LmParts {
        model: &m.model,
        processor: &processor,
        image_processor: &image_processor,
    };
    let examples = train_examples(0, 0, 3);
    let both = ExtraTurns {
        describe: true,
        plan: true,
    };
    let step = losses(&parts, &examples, 0, 2, &[false, true, false], both).unwrap();
    let describe = step.describe.expect("the describing turn was asked for");
    let plan = step.plan.expect("the planning turn was asked for");
    // Near uniform at the start: log of the vocabulary and of the codebook.
    let [u, g, d, p] = [&step.understanding, &step.generation, &describe, &plan]
        .map(|t| t.to_scalar::<f32>().unwrap());
    assert!(u > 3.0 && g > 4.0 && d > 3.0 && p > 3.0, "{u} {g} {d} {p}");
    let total = ((&step.understanding + &step.generation).unwrap() + describe).unwrap();
    // The planning turn is text only: it reaches the language model and
    // its text embedding and head, never the vision tower.
    let plan_grads = plan.backward().unwrap();
    for (name, var) in m.params_of_vq(false) {
        let reached = plan_grads.get(&var).is_some();
        let text_side = name.starts_with("language_model.");
        assert_eq!(reached, text_side, "{name}");
    }
    let grads = total.backward().unwrap();
    let params = m.params_of_vq(false);
    assert!(params.iter().any(|(n, _)| n.starts_with("vision_model.")));
    assert_every_gradient(&grads, &params);
    for (name, var) in m.params.iter().filter(|(n, _)| n.starts_with(VQ_PREFIX)) {
        assert!(
            grads.get(var).is_none(),
            "the frozen VQ got a gradient: {name}"
        );
    }
}

#[test]
fn training_lowers_both_losses() {
    let (m, processor, image_processor) = setup();
    let parts = LmParts {
        model: &m.model,
        processor: &processor,
        image_processor: &image_processor,
    };
    let cfg = LmTraining {
        steps: 6,
        batch: 4,
        warmup: 1,
        describe_weight: 0.5,
        plan_weight: 0.5,
        ..LmTraining::default()
    };
    let mut log = Vec::new();
    train_lm(&parts, &m.params_of_vq(false), &cfg, |s| {
        log.push(s.clone())
    })
    .unwrap();
    let (first, last) = (&log[0], log.last().unwrap());
    assert!(
        last.understanding < first.understanding,
        "{first:?} -> {last:?}"
    );
    assert!(last.generation < first.generation, "{first:?} -> {last:?}");
    assert!(last.describe < first.describe, "{first:?} -> {last:?}");
    assert!(last.plan < first.plan, "{first:?} -> {last:?}");
}

#[test]
fn the_describing_and_planning_turns_can_be_left_out() {
    let (m, processor, image_processor) = setup();
    let parts = LmParts {
        model: &m.model,
        processor: &processor,
        image_processor: &image_processor,
    };
    let examples = train_examples(0, 0, 2);
    let step = losses(
        &parts,
        &examples,
        0,
        1,
        &[false, false],
        ExtraTurns::default(),
    )
    .unwrap();
    assert!(step.describe.is_none() && step.plan.is_none());
}
