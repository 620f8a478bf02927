//! Questions about a scene, with their answers: colour, shape, count,
//! position and existence, open-ended or multiple choice (options `A.` to
//! `D.` on their own lines, answered by the letter, as the CoRL data).

use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::Rng;
use serde::Serialize;

use crate::caption::Relation;
use crate::scene::{Cell, Colour, Object, Scene, Shape};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QuestionKind {
    Colour,
    Shape,
    Count,
    Position,
    Existence,
}

impl QuestionKind {
    pub const ALL: [QuestionKind; 5] = [
        QuestionKind::Colour,
        QuestionKind::Shape,
        QuestionKind::Count,
        QuestionKind::Position,
        QuestionKind::Existence,
    ];

    pub fn name(self) -> &'static str {
        match self {
            QuestionKind::Colour => "colour",
            QuestionKind::Shape => "shape",
            QuestionKind::Count => "count",
            QuestionKind::Position => "position",
            QuestionKind::Existence => "existence",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Question {
    pub kind: QuestionKind,
    /// The full problem text; for multiple choice with its options.
    pub text: String,
    /// The answer: the option letter for multiple choice, else the words.
    pub answer: String,
    pub multiple_choice: bool,
}

const LETTERS: [&str; 4] = ["A", "B", "C", "D"];

/// One question of each kind the scene allows, each multiple choice with
/// probability one half.
pub fn questions(scene: &Scene, rng: &mut StdRng) -> Vec<Question> {
    QuestionKind::ALL
        .into_iter()
        .filter_map(|kind| {
            let (text, answer, options) = ask(kind, scene, rng)?;
            Some(if rng.random_bool(0.5) {
                multiple_choice(kind, &text, &answer, options, rng)
            } else {
                Question {
                    kind,
                    text,
                    answer,
                    multiple_choice: false,
                }
            })
        })
        .collect()
}

fn multiple_choice(
    kind: QuestionKind,
    text: &str,
    answer: &str,
    options: Vec<String>,
    rng: &mut StdRng,
) -> Question {
    let mut wrong: Vec<String> = options.into_iter().filter(|o| o != answer).collect();
    wrong.shuffle(rng);
    wrong.truncate(LETTERS.len() - 1);
    let mut shown = wrong;
    shown.push(answer.to_string());
    shown.shuffle(rng);
    let right = shown
        .iter()
        .position(|o| o == answer)
        .expect("answer shown");
    let lines: Vec<String> = shown
        .iter()
        .zip(LETTERS)
        .map(|(o, letter)| format!("{letter}. {o}"))
        .collect();
    Question {
        kind,
        text: format!("{text}\n{}", lines.join("\n")),
        answer: LETTERS[right].to_string(),
        multiple_choice: true,
    }
}

/// The question's text, its answer and the answers it could have had.
fn ask(
    kind: QuestionKind,
    scene: &Scene,
    rng: &mut StdRng,
) -> Option<(String, String, Vec<String>)> {
    let objects = &scene.objects;
    let names = |items: Vec<&str>| items.into_iter().map(String::from).collect::<Vec<_>>();
    match kind {
        QuestionKind::Colour => {
            let o = objects.choose(rng)?;
            let text = format!("What colour is {}?", refer(o, objects, false));
            Some((
                text,
                o.colour.name().into(),
                names(Colour::ALL.map(Colour::name).to_vec()),
            ))
        }
        QuestionKind::Shape => {
            let o = objects.choose(rng)?;
            let unique_colour = objects.iter().filter(|x| x.colour == o.colour).count() == 1;
            let who = if unique_colour {
                format!("the {} object", o.colour.name())
            } else {
                format!("the object {}", o.cell.phrase())
            };
            let text = format!("What shape is {who}?");
            Some((
                text,
                o.shape.name().into(),
                names(Shape::ALL.map(Shape::name).to_vec()),
            ))
        }
        QuestionKind::Count => {
            let (what, n) = match rng.random_range(0..3) {
                0 => ("objects".to_string(), objects.len()),
                1 => {
                    let shape = *Shape::ALL.choose(rng)?;
                    let n = objects.iter().filter(|o| o.shape == shape).count();
                    (shape.plural().to_string(), n)
                }
                _ => {
                    let colour = *Colour::ALL.choose(rng)?;
                    let n = objects.iter().filter(|o| o.colour == colour).count();
                    (format!("{} objects", colour.name()), n)
                }
            };
            let text = format!("How many {what} are there?");
            Some((
                text,
                n.to_string(),
                (0..=4).map(|n| n.to_string()).collect(),
            ))
        }
        QuestionKind::Position => {
            // Only objects named without their place: "where is the
            // circle at the top left" would give the answer away.
            let named: Vec<(&Object, String)> = objects
                .iter()
                .filter_map(|o| Some((o, refer_by_looks(o, objects, true)?)))
                .collect();
            let (o, who) = named.choose(rng)?;
            let others: Vec<&(&Object, String)> =
                named.iter().filter(|(x, _)| x.cell != o.cell).collect();
            match others.choose(rng) {
                Some((other, whom)) if rng.random_bool(0.5) => {
                    let relation = *Relation::ALL.choose(rng)?;
                    let text = format!("Is {who} {} {whom}?", relation.phrase());
                    let answer = if relation.holds_between(o.cell, other.cell) {
                        "yes"
                    } else {
                        "no"
                    };
                    Some((text, answer.into(), names(vec!["yes", "no"])))
                }
                _ => {
                    let text = format!("Where is {who} in the image?");
                    let cells = Cell::all().map(|c| c.name().to_string()).collect();
                    Some((text, o.cell.name().into(), cells))
                }
            }
        }
        QuestionKind::Existence => {
            let present = rng.random_bool(0.5);
            let (shape, colour) = if present {
                let o = objects.choose(rng)?;
                (o.shape, o.colour)
            } else {
                let absent: Vec<(Shape, Colour)> = Shape::ALL
                    .into_iter()
                    .flat_map(|s| Colour::ALL.map(|c| (s, c)))
                    .filter(|(s, c)| !objects.iter().any(|o| o.shape == *s && o.colour == *c))
                    .collect();
                *absent.choose(rng)?
            };
            let text = format!(
                "Is there {} {} {} in the image?",
                if colour == Colour::Orange { "an" } else { "a" },
                colour.name(),
                shape.name()
            );
            let answer = if present { "yes" } else { "no" };
            Some((text, answer.into(), names(vec!["yes", "no"])))
        }
    }
}

/// The shortest description that names `object` alone in the scene: by
/// shape, by colour and shape, and failing those by its place. `by_colour`
/// says whether colour may be used (not when the question asks for it).
fn refer(object: &Object, objects: &[Object], by_colour: bool) -> String {
    refer_by_looks(object, objects, by_colour)
        .unwrap_or_else(|| format!("the {} {}", object.shape.name(), object.cell.phrase()))
}

/// "the circle" or "the red circle" when that names `object` alone.
fn refer_by_looks(object: &Object, objects: &[Object], by_colour: bool) -> Option<String> {
    let unique = |f: &dyn Fn(&Object) -> bool| objects.iter().filter(|o| f(o)).count() == 1;
    if unique(&|o| o.shape == object.shape) {
        Some(format!("the {}", object.shape.name()))
    } else if by_colour && unique(&|o| o.shape == object.shape && o.colour == object.colour) {
        Some(format!(
            "the {} {}",
            object.colour.name(),
            object.shape.name()
        ))
    } else {
        None
    }
}
