//! A synthetic world of coloured shapes, simple enough for a small model to
//! learn in minutes and precise enough to check automatically: scenes drawn
//! from a seed ([`scene`]), rendered at any size ([`render`]), described in
//! varied English covering GenEval's categories ([`caption`]), asked about
//! ([`question`]), and read back from pixels by a verifier ([`verify`]).
//!
//! Examples are split into train, validation and test by a hash of the
//! scene's content, so the splits never share a scene, however many
//! examples are drawn.

pub mod caption;
pub mod question;
pub mod render;
pub mod scene;
pub mod verify;

use image::RgbImage;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::Serialize;

use caption::Caption;
use question::Question;
use scene::{Category, Scene};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    Train,
    Validation,
    Test,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Validation, Split::Test];

    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Validation => "validation",
            Split::Test => "test",
        }
    }

    /// The split a scene belongs to: 90 % train, 5 % validation, 5 % test
    /// of all scene contents.
    pub fn of(scene: &Scene) -> Split {
        let text = format!("{:?}", scene.content());
        match fnv1a(text.as_bytes()) % 100 {
            0..90 => Split::Train,
            90..95 => Split::Validation,
            _ => Split::Test,
        }
    }
}

/// FNV-1a, stable across platforms and releases.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// SplitMix64's finaliser: spreads nearby inputs over all of `u64`.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A scene with its captions and questions.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Example {
    pub split: Split,
    /// The seed the scene was drawn from.
    pub seed: u64,
    pub scene: Scene,
    pub captions: Vec<Caption>,
    pub questions: Vec<Question>,
}

impl Example {
    /// The example drawn from `seed`, whatever split its scene falls in.
    pub fn from_seed(seed: u64) -> Example {
        let scene = Scene::from_seed(seed);
        let mut rng = StdRng::seed_from_u64(mix(seed ^ 0x7465_7874));
        let captions = caption::captions(&scene, &mut rng);
        let questions = question::questions(&scene, &mut rng);
        Example {
            split: Split::of(&scene),
            seed,
            scene,
            captions,
            questions,
        }
    }

    /// The `index`-th example of `split` in the world of `world_seed`:
    /// seeds are tried in a fixed order until one's scene is in the split.
    pub fn nth(world_seed: u64, split: Split, index: u64) -> Example {
        let base = mix(world_seed ^ mix(index.wrapping_mul(3) + split as u64));
        (0u64..)
            .map(|attempt| Example::from_seed(mix(base.wrapping_add(attempt))))
            .find(|e| e.split == split)
            .expect("every split holds a share of the scenes")
    }

    pub fn image(&self, side: u32) -> RgbImage {
        render::render(&self.scene, side)
    }
}

/// The examples of `split`, in order, endlessly.
pub fn examples(world_seed: u64, split: Split) -> impl Iterator<Item = Example> {
    (0u64..).map(move |i| Example::nth(world_seed, split, i))
}

/// The first `n` test examples of `category`: the generation prompts every
/// evaluation of the world draws from (in-process or over HTTP), so their
/// numbers stay comparable.
pub fn test_prompts(world_seed: u64, category: Category, n: usize) -> Vec<Example> {
    examples(world_seed, Split::Test)
        .filter(|e| e.scene.category == category)
        .take(n)
        .collect()
}
