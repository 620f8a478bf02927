//! Scenes: a plain background and 1 to 4 non-overlapping objects, each in
//! its own cell of a 3 x 3 grid, drawn deterministically from a seed.
//!
//! A scene is built for one of GenEval's prompt categories, so that the
//! caption of that category describes it exactly (nothing unmentioned is
//! added to a "two objects" scene, for instance): a model trained on these
//! pairs learns to draw what it is asked and nothing else.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// Side of the grid that objects are placed on.
pub const GRID: usize = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Shape {
    Circle,
    Square,
    Triangle,
}

impl Shape {
    pub const ALL: [Shape; 3] = [Shape::Circle, Shape::Square, Shape::Triangle];

    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
        }
    }

    pub fn plural(self) -> &'static str {
        match self {
            Shape::Circle => "circles",
            Shape::Square => "squares",
            Shape::Triangle => "triangles",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Colour {
    Red,
    Orange,
    Yellow,
    Green,
    Blue,
    Purple,
}

impl Colour {
    pub const ALL: [Colour; 6] = [
        Colour::Red,
        Colour::Orange,
        Colour::Yellow,
        Colour::Green,
        Colour::Blue,
        Colour::Purple,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Orange => "orange",
            Colour::Yellow => "yellow",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Purple => "purple",
        }
    }

    /// The colour's pixels. Pairwise RGB distances are at least 100, so a
    /// blurred or re-encoded image still reads back to the right name.
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [215, 25, 30],
            Colour::Orange => [250, 130, 0],
            Colour::Yellow => [235, 225, 20],
            Colour::Green => [25, 165, 45],
            Colour::Blue => [30, 70, 225],
            Colour::Purple => [145, 40, 180],
        }
    }
}

/// The plain background every scene is drawn on.
pub const BACKGROUND: [u8; 3] = [232, 232, 232];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Size {
    Small,
    Large,
}

impl Size {
    pub fn name(self) -> &'static str {
        match self {
            Size::Small => "small",
            Size::Large => "large",
        }
    }

    /// Half the object's extent, as a share of the image side (a cell is
    /// a third of it).
    pub fn half_extent(self) -> f32 {
        match self {
            Size::Small => 0.1,
            Size::Large => 0.155,
        }
    }
}

/// A cell of the 3 x 3 grid, row 0 at the top.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Cell {
    pub row: u8,
    pub col: u8,
}

impl Cell {
    pub fn all() -> impl Iterator<Item = Cell> {
        (0..GRID as u8).flat_map(|row| (0..GRID as u8).map(move |col| Cell { row, col }))
    }

    /// "top left", "top", "center", ...: how captions and answers name it.
    pub fn name(self) -> &'static str {
        const NAMES: [[&str; GRID]; GRID] = [
            ["top left", "top", "top right"],
            ["left", "center", "right"],
            ["bottom left", "bottom", "bottom right"],
        ];
        NAMES[self.row as usize][self.col as usize]
    }

    /// The phrase that places an object there: "at the top left", "in the center".
    pub fn phrase(self) -> String {
        match (self.row, self.col) {
            (1, 1) => "in the center".to_string(),
            (1, _) => format!("on the {}", self.name()),
            _ => format!("at the {}", self.name()),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Object {
    pub shape: Shape,
    pub colour: Colour,
    pub size: Size,
    pub cell: Cell,
}

impl Object {
    /// Centre in image-side units (0 to 1): the centre of its cell. Objects
    /// sit exactly there, so that at a side of 48 every object covers the
    /// same 2 x 2 VQ codes and the same SigLIP patch wherever it is, and the
    /// image tokenizer has few patterns to learn.
    pub fn centre(&self) -> [f32; 2] {
        let cell = 1.0 / GRID as f32;
        [
            (self.cell.col as f32 + 0.5) * cell,
            (self.cell.row as f32 + 0.5) * cell,
        ]
    }

    /// What the object is.
    pub fn key(&self) -> (Shape, Colour, Size, Cell) {
        (self.shape, self.colour, self.size, self.cell)
    }
}

/// GenEval's prompt categories; each scene is built for one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    SingleObject,
    TwoObjects,
    Counting,
    Colours,
    Position,
    ColourAttribution,
}

impl Category {
    pub const ALL: [Category; 6] = [
        Category::SingleObject,
        Category::TwoObjects,
        Category::Counting,
        Category::Colours,
        Category::Position,
        Category::ColourAttribution,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Category::SingleObject => "single_object",
            Category::TwoObjects => "two_objects",
            Category::Counting => "counting",
            Category::Colours => "colours",
            Category::Position => "position",
            Category::ColourAttribution => "colour_attribution",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Scene {
    pub category: Category,
    pub objects: Vec<Object>,
}

impl Scene {
    /// The scene drawn from `seed`.
    pub fn from_seed(seed: u64) -> Scene {
        let mut rng = StdRng::seed_from_u64(seed);
        let category = Category::ALL[rng.random_range(0..Category::ALL.len())];
        Scene::of_category(category, &mut rng)
    }

    pub fn of_category(category: Category, rng: &mut StdRng) -> Scene {
        let mut cells: Vec<Cell> = Cell::all().collect();
        cells.shuffle(rng);
        let shapes = distinct(rng, &Shape::ALL);
        let colours = distinct(rng, &Colour::ALL);
        // The counting scene's choices, drawn up front: `object` below
        // holds the generator.
        let n = 2 + rng.random_range(0..3usize);
        let same_colour = rng.random_bool(0.5);
        let extra = rng.random_bool(0.3);
        let mut object = |shape, colour, cell| Object {
            shape,
            colour,
            size: if rng.random_bool(0.5) {
                Size::Small
            } else {
                Size::Large
            },
            cell,
        };
        let objects = match category {
            Category::SingleObject | Category::Colours => {
                vec![object(shapes[0], colours[0], cells[0])]
            }
            // Distinct cells differ in row or column, so one of "left of",
            // "right of", "above", "below" holds.
            Category::TwoObjects | Category::ColourAttribution | Category::Position => vec![
                object(shapes[0], colours[0], cells[0]),
                object(shapes[1], colours[1], cells[1]),
            ],
            Category::Counting => {
                let mut objects: Vec<Object> = (0..n)
                    .map(|i| {
                        let colour = if same_colour { colours[0] } else { colours[i] };
                        object(shapes[0], colour, cells[i])
                    })
                    .collect();
                // Now and then an object of another shape, which a count
                // of the first shape must leave out.
                if n < 4 && extra {
                    objects.push(object(shapes[1], colours[n], cells[n]));
                }
                objects
            }
        };
        Scene { category, objects }
    }

    /// The objects' content in a fixed order: two scenes with the same
    /// content are the same scene for the splits.
    pub fn content(&self) -> Vec<(Shape, Colour, Size, Cell)> {
        let mut keys: Vec<_> = self.objects.iter().map(Object::key).collect();
        keys.sort();
        keys
    }
}

fn distinct<T: Copy>(rng: &mut StdRng, items: &[T]) -> Vec<T> {
    let mut items = items.to_vec();
    items.shuffle(rng);
    items
}
