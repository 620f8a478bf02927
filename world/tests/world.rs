//! The synthetic world: determinism, disjoint splits, captions that hold and
//! parse back, questions with right answers, and a verifier that reads
//! rendered scenes exactly and rejects claims that do not hold.

use std::collections::HashSet;

use image::{Rgb, RgbImage};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ulm_world::caption::{self, Claim, Group, Relation};
use ulm_world::question::QuestionKind;
use ulm_world::scene::{Category, Colour, Scene, Shape, Size};
use ulm_world::verify::{self, Seen};
use ulm_world::{examples, Example, Split};

const WORLD: u64 = 7;

fn some_examples(n: usize) -> Vec<Example> {
    examples(WORLD, Split::Train).take(n).collect()
}

#[test]
fn examples_are_deterministic_and_cover_every_category() {
    let a = some_examples(300);
    let b = some_examples(300);
    assert_eq!(a, b);
    let categories: HashSet<Category> = a.iter().map(|e| e.scene.category).collect();
    assert_eq!(categories.len(), Category::ALL.len());
    for e in &a {
        assert!((1..=4).contains(&e.scene.objects.len()));
        let cells: HashSet<_> = e.scene.objects.iter().map(|o| o.cell).collect();
        assert_eq!(cells.len(), e.scene.objects.len(), "one object per cell");
        assert_eq!(e.image(64), e.image(64));
    }
    assert_ne!(
        Example::nth(WORLD, Split::Train, 0),
        Example::nth(WORLD + 1, Split::Train, 0)
    );
}

#[test]
fn splits_never_share_a_scene() {
    let contents = |split, n| -> HashSet<String> {
        examples(WORLD, split)
            .take(n)
            .inspect(|e| assert_eq!(e.split, split))
            .map(|e| format!("{:?}", e.scene.content()))
            .collect()
    };
    let train = contents(Split::Train, 3000);
    let validation = contents(Split::Validation, 300);
    let test = contents(Split::Test, 300);
    assert!(train.is_disjoint(&validation));
    assert!(train.is_disjoint(&test));
    assert!(validation.is_disjoint(&test));
    // Varied enough to be worth splitting.
    assert!(test.len() > 200, "{} distinct test scenes", test.len());
}

/// Exact-scene accuracy of the verifier over `n` training scenes, each
/// image passed through `distort`.
fn exact_accuracy(n: usize, side: u32, distort: impl Fn(&mut RgbImage, &mut StdRng)) -> f64 {
    let mut rng = StdRng::seed_from_u64(3);
    let right = some_examples(n)
        .iter()
        .filter(|e| {
            let mut image = e.image(side);
            distort(&mut image, &mut rng);
            verify::is_scene(&verify::read(&image), &e.scene)
        })
        .count();
    right as f64 / n as f64
}

#[test]
fn the_verifier_reads_rendered_scenes_exactly() {
    for (side, n) in [(48, 2000), (64, 2000), (96, 1000), (384, 200)] {
        let accuracy = exact_accuracy(n, side, |_, _| {});
        println!("rendered at {side} px: {:.2} % exact", accuracy * 100.0);
        assert!(accuracy >= 0.995, "{side} px: {accuracy}");
    }
}

#[test]
fn the_verifier_reads_through_noise_and_blur() {
    let noise = |image: &mut RgbImage, rng: &mut StdRng| {
        for p in image.pixels_mut() {
            for c in p.0.iter_mut() {
                *c = (*c as f32 + rng.random_range(-30.0..30.0)).clamp(0.0, 255.0) as u8;
            }
        }
    };
    let accuracy = exact_accuracy(500, 48, noise);
    println!(
        "uniform noise of +-30 at 48 px: {:.2} % exact",
        accuracy * 100.0
    );
    assert!(accuracy >= 0.99, "noise: {accuracy}");
    let blur = |image: &mut RgbImage, _: &mut StdRng| {
        *image = image::imageops::blur(image, 0.7);
    };
    let accuracy = exact_accuracy(500, 48, blur);
    println!(
        "gaussian blur of sigma 0.7 at 48 px: {:.2} % exact",
        accuracy * 100.0
    );
    assert!(accuracy >= 0.97, "blur: {accuracy}");
}

#[test]
fn every_caption_holds_for_its_scene_and_parses_back() {
    for e in some_examples(600) {
        let seen = verify::read(&e.image(64));
        assert_eq!(e.captions.len(), 2);
        assert_eq!(e.captions[0].category, Some(e.scene.category));
        for c in &e.captions {
            assert!(
                verify::check(&c.claim, &seen),
                "{:?} on {:?}",
                c.text,
                e.scene
            );
            assert_eq!(
                caption::parse(&c.text).as_ref(),
                Ok(&c.claim),
                "{:?}",
                c.text
            );
        }
    }
}

/// A claim that cannot hold of the scene it was made for.
fn falsified(claim: &Claim, scene: &Scene) -> Claim {
    match claim {
        Claim::Objects(groups) => {
            let mut groups = groups.clone();
            groups[0].count += 1;
            Claim::Objects(groups)
        }
        Claim::Relation { a, relation, b } => {
            let opposite = match relation {
                Relation::LeftOf => Relation::RightOf,
                Relation::RightOf => Relation::LeftOf,
                Relation::Above => Relation::Below,
                Relation::Below => Relation::Above,
            };
            assert_eq!(scene.objects.len(), 2);
            Claim::Relation {
                a: *a,
                relation: opposite,
                b: *b,
            }
        }
    }
}

#[test]
fn the_verifier_rejects_claims_that_do_not_hold() {
    for e in some_examples(400) {
        let seen = verify::read(&e.image(64));
        for c in &e.captions {
            let wrong = falsified(&c.claim, &e.scene);
            assert!(!verify::check(&wrong, &seen), "{wrong:?} on {:?}", e.scene);
        }
        // A colour no object has.
        let absent = Colour::ALL
            .into_iter()
            .find(|c| e.scene.objects.iter().all(|o| o.colour != *c))
            .expect("at most four colours in a scene");
        let shape = e.scene.objects[0].shape;
        let claim = caption::parse(&format!("a {} {}", absent.name(), shape.name())).unwrap();
        assert!(!verify::check(&claim, &seen));
    }
    // Nothing is read from a blank image, so nothing is claimed of it.
    let blank = RgbImage::from_pixel(64, 64, Rgb(ulm_world::scene::BACKGROUND));
    assert!(verify::read(&blank).is_empty());
    assert!(!verify::check(&caption::parse("a circle").unwrap(), &[]));
}

#[test]
fn the_parser_reads_user_phrasings_and_refuses_others() {
    let claim = caption::parse("A red circle above a blue square.").unwrap();
    let Claim::Relation { a, relation, b } = claim else {
        panic!("a relation")
    };
    assert_eq!((a.shape, a.colour), (Shape::Circle, Some(Colour::Red)));
    assert_eq!(relation, Relation::Above);
    assert_eq!((b.shape, b.colour), (Shape::Square, Some(Colour::Blue)));

    let claim = caption::parse("a photo of 3 big green triangles in the middle").unwrap();
    let Claim::Objects(groups) = claim else {
        panic!("objects")
    };
    let Group { count, desc } = groups[0];
    assert_eq!(count, 3);
    assert_eq!(desc.size, Some(Size::Large));
    assert_eq!(desc.cell.map(|c| (c.row, c.col)), Some((1, 1)));

    let claim = caption::parse("a circle, two squares and an orange triangle").unwrap();
    assert!(matches!(claim, Claim::Objects(ref g) if g.len() == 3 && g[1].count == 2));

    for bad in [
        "",
        "a dog",
        "a red",
        "five circles",
        "two circles above a square",
        "a circle at the moon",
    ] {
        assert!(caption::parse(bad).is_err(), "{bad:?} parsed");
    }
}

/// The read scene's answer to an open-ended question, worked out from the
/// question's words: a second derivation of the answer, from pixels.
fn count_answer(text: &str, seen: &[Seen]) -> Option<usize> {
    let what = text
        .strip_prefix("How many ")?
        .strip_suffix(" are there?")?;
    Some(if what == "objects" {
        seen.len()
    } else if let Some(shape) = Shape::ALL.into_iter().find(|s| s.plural() == what) {
        seen.iter().filter(|s| s.shape == shape).count()
    } else {
        let colour = Colour::ALL
            .into_iter()
            .find(|c| what == format!("{} objects", c.name()))?;
        seen.iter().filter(|s| s.colour == colour).count()
    })
}

#[test]
fn questions_have_right_answers() {
    let mut kinds = HashSet::new();
    let (mut yes, mut no, mut multiple_choice, mut counts) = (0, 0, 0, 0);
    for e in some_examples(600) {
        let seen = verify::read(&e.image(64));
        for q in &e.questions {
            kinds.insert(q.kind);
            if q.multiple_choice {
                multiple_choice += 1;
                let options: Vec<&str> = q.text.lines().skip(1).collect();
                assert!((2..=4).contains(&options.len()), "{q:?}");
                let distinct: HashSet<&str> = options.iter().map(|o| &o[3..]).collect();
                assert_eq!(distinct.len(), options.len(), "{q:?}");
                assert!(options
                    .iter()
                    .any(|o| o.starts_with(&format!("{}. ", q.answer))));
                continue;
            }
            match q.answer.as_str() {
                "yes" => yes += 1,
                "no" => no += 1,
                _ => {}
            }
            if q.kind == QuestionKind::Count {
                counts += 1;
                assert_eq!(count_answer(&q.text, &seen), q.answer.parse().ok(), "{q:?}");
            }
            if q.kind == QuestionKind::Position {
                assert!(
                    !q.text.contains(&q.answer),
                    "the answer is in the question: {q:?}"
                );
            }
            if q.kind == QuestionKind::Existence {
                let what = q
                    .text
                    .trim_start_matches("Is there ")
                    .trim_end_matches(" in the image?");
                let Ok(Claim::Objects(groups)) = caption::parse(what) else {
                    panic!("{what:?} is an object")
                };
                let present = seen.iter().any(|s| groups[0].desc.matches(s));
                assert_eq!(present, q.answer == "yes", "{q:?}");
            }
        }
    }
    assert_eq!(kinds.len(), QuestionKind::ALL.len());
    assert!(multiple_choice > 500 && counts > 50);
    assert!(yes > 100 && no > 100, "yes {yes}, no {no}");
}

#[test]
fn partial_credit_is_full_exactly_when_the_claim_holds() {
    for e in some_examples(300) {
        let seen = verify::read(&e.image(64));
        for c in &e.captions {
            assert_eq!(verify::score(&c.claim, &seen), 1.0);
            let wrong = falsified(&c.claim, &e.scene);
            let partial = verify::score(&wrong, &seen);
            assert!((0.0..1.0).contains(&partial), "{wrong:?}: {partial}");
            if matches!(wrong, Claim::Relation { .. }) {
                // Both objects are there, in the other order.
                assert_eq!(partial, 0.5);
            }
        }
    }
}

#[test]
fn a_full_caption_lays_out_what_its_rendering_reads_as() {
    for example in some_examples(200) {
        let full = &example.captions[1];
        let planned = verify::laid_out(&caption::parse(&full.text).unwrap()).unwrap();
        let read = verify::read(&example.image(96));
        let keys = |seen: &[Seen]| {
            let mut keys: Vec<_> = seen.iter().map(Seen::key).collect();
            keys.sort();
            keys
        };
        assert_eq!(keys(&planned), keys(&read), "{}", full.text);
        assert!(
            verify::check(&example.captions[0].claim, &planned),
            "{}",
            example.captions[0].text
        );
    }
    let unplannable = [
        "a red circle above a blue square",
        "two small red circles at the top left",
        "a small red circle at the top left and a large blue square at the top left",
        "a small red circle and a large blue square at the top left",
    ];
    for text in unplannable {
        assert_eq!(
            verify::laid_out(&caption::parse(text).unwrap()),
            None,
            "{text}"
        );
    }
}
