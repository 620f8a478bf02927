//! Captions: what a caption claims about an image ([`Claim`]), the varied
//! English a scene is described in, and the parser that reads such English
//! back, so that any prompt in this language (a user's too) can be checked
//! against an image by the verifier.

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::Rng;
use serde::Serialize;

use crate::scene::{Category, Cell, Colour, Object, Scene, Shape, Size};

/// What an object phrase asks for; what it leaves out may be anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Desc {
    pub shape: Shape,
    pub colour: Option<Colour>,
    pub size: Option<Size>,
    pub cell: Option<Cell>,
}

impl Desc {
    pub fn shape(shape: Shape) -> Desc {
        Desc {
            shape,
            colour: None,
            size: None,
            cell: None,
        }
    }

    pub fn coloured(shape: Shape, colour: Colour) -> Desc {
        Desc {
            colour: Some(colour),
            ..Desc::shape(shape)
        }
    }

    /// Every attribute of `object`.
    pub fn full(object: &Object) -> Desc {
        Desc {
            shape: object.shape,
            colour: Some(object.colour),
            size: Some(object.size),
            cell: Some(object.cell),
        }
    }

    /// "small red circle(s) at the top left", without article or number.
    fn words(&self, plural: bool) -> String {
        let mut words: Vec<String> = Vec::new();
        words.extend(self.size.map(|s| s.name().to_string()));
        words.extend(self.colour.map(|c| c.name().to_string()));
        words.push(
            if plural {
                self.shape.plural()
            } else {
                self.shape.name()
            }
            .to_string(),
        );
        words.extend(self.cell.map(Cell::phrase));
        words.join(" ")
    }
}

/// `count` objects that each match `desc`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Group {
    pub count: u8,
    pub desc: Desc,
}

impl Group {
    fn phrase(&self) -> String {
        let words = self.desc.words(self.count > 1);
        match self.count {
            1 => format!("{} {words}", article(&words)),
            n => format!("{} {words}", NUMBERS[n as usize]),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Relation {
    LeftOf,
    RightOf,
    Above,
    Below,
}

impl Relation {
    pub const ALL: [Relation; 4] = [
        Relation::LeftOf,
        Relation::RightOf,
        Relation::Above,
        Relation::Below,
    ];

    pub fn phrase(self) -> &'static str {
        match self {
            Relation::LeftOf => "to the left of",
            Relation::RightOf => "to the right of",
            Relation::Above => "above",
            Relation::Below => "below",
        }
    }

    /// Whether the relation holds between cells `a` and `b`.
    pub fn holds_between(self, a: Cell, b: Cell) -> bool {
        match self {
            Relation::LeftOf => a.col < b.col,
            Relation::RightOf => a.col > b.col,
            Relation::Above => a.row < b.row,
            Relation::Below => a.row > b.row,
        }
    }
}

/// What a caption says of an image, in a form the verifier checks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Claim {
    /// For each group, exactly `count` objects match its description.
    /// Objects the caption does not mention may be there too (as GenEval).
    Objects(Vec<Group>),
    /// An object matching `a` stands in `relation` to one matching `b`.
    Relation {
        a: Desc,
        relation: Relation,
        b: Desc,
    },
}

impl Claim {
    /// The claim in plain English, no framing: "a red circle and two squares".
    pub fn phrase(&self) -> String {
        match self {
            Claim::Objects(groups) => {
                let phrases: Vec<String> = groups.iter().map(Group::phrase).collect();
                match phrases.split_last() {
                    Some((last, [])) => last.clone(),
                    Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
                    None => String::new(),
                }
            }
            Claim::Relation { a, relation, b } => {
                let one = |desc: &Desc| {
                    Group {
                        count: 1,
                        desc: *desc,
                    }
                    .phrase()
                };
                format!("{} {} {}", one(a), relation.phrase(), one(b))
            }
        }
    }
}

/// A caption of a scene: the English, what it claims, and the category of
/// the prompt it is.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Caption {
    pub text: String,
    pub claim: Claim,
    /// GenEval's category, or `None` for a full description of the scene.
    pub category: Option<Category>,
}

/// Framings a caption may come in; the parser removes them.
const FRAMES: [(&str, &str); 6] = [
    ("", ""),
    ("a photo of ", ""),
    ("an image of ", ""),
    ("a picture of ", ""),
    ("a drawing of ", ""),
    ("", " on a plain background"),
];

const NUMBERS: [&str; 5] = ["zero", "one", "two", "three", "four"];

fn article(next: &str) -> &'static str {
    if next.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

/// The claim of `scene`'s own category; it holds for the scene.
pub fn category_claim(scene: &Scene, rng: &mut StdRng) -> Claim {
    let objects = &scene.objects;
    let group = |desc| Group { count: 1, desc };
    match scene.category {
        Category::SingleObject => Claim::Objects(vec![group(Desc::shape(objects[0].shape))]),
        Category::Colours => Claim::Objects(vec![group(Desc::coloured(
            objects[0].shape,
            objects[0].colour,
        ))]),
        Category::TwoObjects => Claim::Objects(
            objects
                .iter()
                .map(|o| group(Desc::shape(o.shape)))
                .collect(),
        ),
        Category::ColourAttribution => Claim::Objects(
            objects
                .iter()
                .map(|o| group(Desc::coloured(o.shape, o.colour)))
                .collect(),
        ),
        Category::Counting => {
            let shape = objects[0].shape;
            let same: Vec<&Object> = objects.iter().filter(|o| o.shape == shape).collect();
            let colour = same[0].colour;
            let one_colour = same.iter().all(|o| o.colour == colour);
            let desc = if one_colour && rng.random_bool(0.5) {
                Desc::coloured(shape, colour)
            } else {
                Desc::shape(shape)
            };
            Claim::Objects(vec![Group {
                count: same.len() as u8,
                desc,
            }])
        }
        Category::Position => {
            let (a, b) = (&objects[0], &objects[1]);
            let holding: Vec<Relation> = Relation::ALL
                .into_iter()
                .filter(|r| r.holds_between(a.cell, b.cell))
                .collect();
            let relation = *holding.choose(rng).expect("distinct cells");
            let with_colour = rng.random_bool(0.5);
            let desc = |o: &Object| {
                if with_colour {
                    Desc::coloured(o.shape, o.colour)
                } else {
                    Desc::shape(o.shape)
                }
            };
            Claim::Relation {
                a: desc(a),
                relation,
                b: desc(b),
            }
        }
    }
}

/// Every object with all its attributes: "a small red circle at the top
/// left and a large blue square in the center".
pub fn full_claim(scene: &Scene) -> Claim {
    Claim::Objects(
        scene
            .objects
            .iter()
            .map(|o| Group {
                count: 1,
                desc: Desc::full(o),
            })
            .collect(),
    )
}

/// The scene's captions: one of its category, one describing it in full,
/// each in a framing drawn from `rng`.
pub fn captions(scene: &Scene, rng: &mut StdRng) -> Vec<Caption> {
    let framed = |claim: Claim, category, rng: &mut StdRng| {
        let (before, after) = FRAMES.choose(rng).expect("frames");
        Caption {
            text: format!("{before}{}{after}", claim.phrase()),
            claim,
            category,
        }
    };
    let category = category_claim(scene, rng);
    let first = framed(category, Some(scene.category), rng);
    let second = framed(full_claim(scene), None, rng);
    vec![first, second]
}

/// Why a caption could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("nothing to read: the caption is empty")]
    Empty,
    #[error("cannot read {0:?}: expected an object like \"a small red circle at the top left\"")]
    Object(String),
    #[error("{0:?}: a relation compares one object with one object")]
    RelationCount(String),
}

/// Reads a caption in the world's language back into a claim. Accepts the
/// framings, articles, number words or digits 1 to 4, "big"/"little"
/// and "middle"/"centre" as synonyms; case and a final full stop are ignored.
pub fn parse(text: &str) -> Result<Claim, ParseError> {
    let mut body = text.trim().trim_end_matches('.').trim().to_lowercase();
    for (before, after) in FRAMES {
        if !before.is_empty() {
            if let Some(rest) = body.strip_prefix(before) {
                body = rest.to_string();
            }
        }
        if !after.is_empty() {
            if let Some(rest) = body.strip_suffix(after) {
                body = rest.to_string();
            }
        }
    }
    let body = body.split_whitespace().collect::<Vec<_>>().join(" ");
    if body.is_empty() {
        return Err(ParseError::Empty);
    }
    for relation in Relation::ALL {
        let phrases = [
            relation.phrase(),
            relation.phrase().trim_start_matches("to the "),
        ];
        for phrase in phrases {
            if let Some((a, b)) = body.split_once(&format!(" {phrase} ")) {
                let single = |text: &str| match parse_group(text)? {
                    Group { count: 1, desc } => Ok(desc),
                    _ => Err(ParseError::RelationCount(text.to_string())),
                };
                return Ok(Claim::Relation {
                    a: single(a)?,
                    relation,
                    b: single(b)?,
                });
            }
        }
    }
    let groups = body
        .split(", ")
        .flat_map(|part| part.split(" and "))
        .map(|part| parse_group(part.trim_start_matches("and ").trim()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Claim::Objects(groups))
}

fn parse_group(text: &str) -> Result<Group, ParseError> {
    let bad = || ParseError::Object(text.to_string());
    let (head, place) = split_place(text).ok_or_else(bad)?;
    let mut words: Vec<&str> = head.split(' ').collect();
    let count = match words.first().copied() {
        Some("a" | "an") => 1,
        Some(word) => match NUMBERS.iter().position(|n| *n == word) {
            Some(n) if n > 0 => n as u8,
            _ => match word.parse::<u8>() {
                Ok(n @ 1..=4) => n,
                _ => return Err(bad()),
            },
        },
        None => return Err(bad()),
    };
    words.remove(0);
    let noun = words.pop().ok_or_else(bad)?;
    let shape = Shape::ALL
        .into_iter()
        .find(|s| noun == s.name() || noun == s.plural())
        .ok_or_else(bad)?;
    let (mut size, mut colour) = (None, None);
    for word in words {
        if let Some(s) = parse_size(word) {
            size = Some(s);
        } else if let Some(c) = Colour::ALL.into_iter().find(|c| c.name() == word) {
            colour = Some(c);
        } else {
            return Err(bad());
        }
    }
    Ok(Group {
        count,
        desc: Desc {
            shape,
            colour,
            size,
            cell: place,
        },
    })
}

fn parse_size(word: &str) -> Option<Size> {
    match word {
        "small" | "little" | "tiny" => Some(Size::Small),
        "large" | "big" => Some(Size::Large),
        _ => None,
    }
}

/// Splits "red circle at the top left" into the words before the place and
/// the place; `None` when a place phrase names no cell.
fn split_place(text: &str) -> Option<(&str, Option<Cell>)> {
    for preposition in [" at the ", " in the ", " on the "] {
        if let Some((head, place)) = text.split_once(preposition) {
            let place = match place {
                "middle" | "centre" => "center",
                other => other,
            };
            let cell = Cell::all().find(|c| c.name() == place)?;
            return Some((head, Some(cell)));
        }
    }
    Some((text, None))
}
