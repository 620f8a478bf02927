//! The verifier: reads a scene back from pixels and checks a caption's
//! claim against what it read. It is the ground truth of evaluation and a
//! reward for generation.
//!
//! Reading is colour segmentation (each pixel to the nearest palette colour,
//! or background when none is near), 4-connected components per colour,
//! and geometry: a triangle has a quarter of its area in its top half, a
//! square fills its bounding box, a circle fills pi/4 of it.

use image::RgbImage;
use serde::Serialize;

use crate::caption::{Claim, Desc, Group, Relation};
use crate::scene::{Cell, Colour, Object, Scene, Shape, Size, BACKGROUND, GRID};

/// An object as read from pixels.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Seen {
    pub shape: Shape,
    pub colour: Colour,
    pub size: Size,
    pub cell: Cell,
    /// Centre of the bounding box, in image-side units (0 to 1).
    pub centre: [f32; 2],
    /// Pixels in the component.
    pub area: u32,
}

impl Seen {
    pub fn key(&self) -> (Shape, Colour, Size, Cell) {
        (self.shape, self.colour, self.size, self.cell)
    }
}

/// A pixel farther than this (RGB distance) from every palette colour is
/// background: blends at the edges of blurred shapes fall here instead of
/// inventing a third colour.
const MAX_COLOUR_DISTANCE: f32 = 80.0;
/// Components smaller than this share of the image are noise. A small
/// triangle covers about 2 % of it.
const MIN_AREA: f32 = 0.003;
/// Fill of the bounding box above which a blob is a square (pi/4 for a
/// circle, 1 for a square).
const SQUARE_FILL: f32 = 0.89;
/// Top-half to bottom-half area below which a blob is a triangle (1/3 for
/// the triangle, 1 for the others).
const TRIANGLE_BALANCE: f32 = 0.6;
/// Bounding-box side, as a share of the image, that separates small (0.2)
/// from large (0.31).
const LARGE_EXTENT: f32 = 0.25;
/// How far apart two centres must be, as a share of the image, for one to
/// be left of (or above) the other.
const RELATION_MARGIN: f32 = 0.1;

fn label(pixel: [u8; 3]) -> Option<Colour> {
    let distance = |c: [u8; 3]| {
        pixel
            .iter()
            .zip(c)
            .map(|(&a, b)| (a as f32 - b as f32).powi(2))
            .sum::<f32>()
            .sqrt()
    };
    let (colour, d) = Colour::ALL
        .into_iter()
        .map(|c| (c, distance(c.rgb())))
        .min_by(|a, b| a.1.total_cmp(&b.1))?;
    (d <= MAX_COLOUR_DISTANCE && d < distance(BACKGROUND)).then_some(colour)
}

/// The objects in `image`, in reading order (top to bottom, left to right).
pub fn read(image: &RgbImage) -> Vec<Seen> {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let labels: Vec<Option<Colour>> = image.pixels().map(|p| label(p.0)).collect();
    let mut visited = vec![false; w * h];
    let mut seen = Vec::new();
    let min_area = (MIN_AREA * (w * h) as f32).max(1.0) as usize;
    for start in 0..w * h {
        let Some(colour) = labels[start] else {
            continue;
        };
        if visited[start] {
            continue;
        }
        visited[start] = true;
        let mut stack = vec![start];
        let mut pixels = Vec::new();
        while let Some(i) = stack.pop() {
            pixels.push(i);
            let (x, y) = (i % w, i / w);
            let neighbours = [
                (x > 0).then(|| i - 1),
                (x + 1 < w).then(|| i + 1),
                (y > 0).then(|| i - w),
                (y + 1 < h).then(|| i + w),
            ];
            for j in neighbours.into_iter().flatten() {
                if !visited[j] && labels[j] == Some(colour) {
                    visited[j] = true;
                    stack.push(j);
                }
            }
        }
        if pixels.len() >= min_area {
            seen.push(describe(&pixels, colour, w, h));
        }
    }
    seen.sort_by(|a, b| {
        a.cell
            .cmp(&b.cell)
            .then(a.centre[0].total_cmp(&b.centre[0]))
    });
    seen
}

fn describe(pixels: &[usize], colour: Colour, w: usize, h: usize) -> Seen {
    let xs = pixels.iter().map(|i| i % w);
    let ys = pixels.iter().map(|i| i / w);
    let (x0, x1) = (xs.clone().min().unwrap_or(0), xs.max().unwrap_or(0));
    let (y0, y1) = (ys.clone().min().unwrap_or(0), ys.max().unwrap_or(0));
    let (bw, bh) = ((x1 - x0 + 1) as f32, (y1 - y0 + 1) as f32);
    let area = pixels.len() as f32;
    // Rows above the box's middle against rows below it; the middle row of
    // an odd box counts half to each.
    let middle = (y0 + y1) as f32 / 2.0;
    let (mut top, mut bottom) = (0.0f32, 0.0f32);
    for y in pixels.iter().map(|i| (i / w) as f32) {
        if y < middle {
            top += 1.0;
        } else if y > middle {
            bottom += 1.0;
        } else {
            top += 0.5;
            bottom += 0.5;
        }
    }
    let shape = if top < TRIANGLE_BALANCE * bottom {
        Shape::Triangle
    } else if area >= SQUARE_FILL * bw * bh {
        Shape::Square
    } else {
        Shape::Circle
    };
    let centre = [
        (x0 + x1 + 1) as f32 / 2.0 / w as f32,
        (y0 + y1 + 1) as f32 / 2.0 / h as f32,
    ];
    let size = if bw.max(bh) >= LARGE_EXTENT * w.max(h) as f32 {
        Size::Large
    } else {
        Size::Small
    };
    let grid = |c: f32| ((c * GRID as f32) as u8).min(GRID as u8 - 1);
    Seen {
        shape,
        colour,
        size,
        cell: Cell {
            row: grid(centre[1]),
            col: grid(centre[0]),
        },
        centre,
        area: pixels.len() as u32,
    }
}

impl Desc {
    pub fn matches(&self, seen: &Seen) -> bool {
        self.shape == seen.shape
            && self.colour.is_none_or(|c| c == seen.colour)
            && self.size.is_none_or(|s| s == seen.size)
            && self.cell.is_none_or(|c| c == seen.cell)
    }
}

impl Relation {
    /// Whether the relation holds between the read objects `a` and `b`.
    pub fn holds(self, a: &Seen, b: &Seen) -> bool {
        let [dx, dy] = [b.centre[0] - a.centre[0], b.centre[1] - a.centre[1]];
        match self {
            Relation::LeftOf => dx > RELATION_MARGIN,
            Relation::RightOf => -dx > RELATION_MARGIN,
            Relation::Above => dy > RELATION_MARGIN,
            Relation::Below => -dy > RELATION_MARGIN,
        }
    }
}

/// Whether exactly `group.count` objects match the group's description.
fn counted(group: &Group, seen: &[Seen]) -> bool {
    seen.iter().filter(|s| group.desc.matches(s)).count() == group.count as usize
}

/// Whether the claim holds of the objects read from an image.
pub fn check(claim: &Claim, seen: &[Seen]) -> bool {
    match claim {
        Claim::Objects(groups) => groups.iter().all(|g| counted(g, seen)),
        Claim::Relation { a, relation, b } => seen.iter().enumerate().any(|(i, x)| {
            a.matches(x)
                && seen
                    .iter()
                    .enumerate()
                    .any(|(j, y)| i != j && b.matches(y) && relation.holds(x, y))
        }),
    }
}

/// What a full caption lays out, as the verifier would read its rendering:
/// each object where the caption puts it. `None` unless the claim names
/// every attribute of each of its objects, one object per cell (a plan
/// that a scene could be drawn from).
pub fn laid_out(claim: &Claim) -> Option<Vec<Seen>> {
    let Claim::Objects(groups) = claim else {
        return None;
    };
    let mut seen: Vec<Seen> = Vec::with_capacity(groups.len());
    for group in groups {
        let desc = group.desc;
        let (Some(colour), Some(size), Some(cell), 1) =
            (desc.colour, desc.size, desc.cell, group.count)
        else {
            return None;
        };
        if seen.iter().any(|s| s.cell == cell) {
            return None;
        }
        let object = Object {
            shape: desc.shape,
            colour,
            size,
            cell,
        };
        seen.push(Seen {
            shape: desc.shape,
            colour,
            size,
            cell,
            centre: object.centre(),
            area: 0,
        });
    }
    Some(seen)
}

/// Whether what was read is exactly the scene: the same objects with the
/// same shape, colour, size and cell, none missing and none extra.
pub fn is_scene(seen: &[Seen], scene: &Scene) -> bool {
    let mut keys: Vec<_> = seen.iter().map(Seen::key).collect();
    keys.sort();
    keys == scene.content()
}

/// Partial credit for a claim, in [0, 1], as a dense reward for learning to
/// draw it: the share of groups with the right count; for a relation, a
/// quarter for each side present and a half for the relation. It is 1
/// exactly when [`check`] holds.
pub fn score(claim: &Claim, seen: &[Seen]) -> f64 {
    match claim {
        Claim::Objects(groups) if groups.is_empty() => 1.0,
        Claim::Objects(groups) => {
            let right = groups.iter().filter(|g| counted(g, seen)).count();
            right as f64 / groups.len() as f64
        }
        Claim::Relation { a, b, .. } => {
            if check(claim, seen) {
                return 1.0;
            }
            let present = |d: &Desc| seen.iter().any(|s| d.matches(s));
            0.25 * (present(a) as u8 + present(b) as u8) as f64
        }
    }
}
