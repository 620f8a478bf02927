//! Shared helpers for the model tests: fixture discovery and comparisons.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use ulm_model::ops::Pass;
use ulm_model::Janus;

/// Root of the Janus fixture directories: `$JANUS_FIXTURES` or the repo copy.
pub fn janus_fixture_root() -> PathBuf {
    std::env::var_os("JANUS_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/janus"))
}

/// Every fixture directory (a directory with a `config.json`) under the root.
pub fn janus_fixture_dirs() -> Vec<PathBuf> {
    let root = janus_fixture_root();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("cannot read fixture root {}: {e}", root.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("config.json").exists())
        .collect();
    dirs.sort();
    assert!(
        !dirs.is_empty(),
        "no fixture directories under {}",
        root.display()
    );
    dirs
}

/// The device the parity tests run on: `ULM_TEST_DEVICE`, `cpu` unless set
/// (`cuda` on a GPU machine, with a build of the `cuda` feature).
pub fn test_device() -> Device {
    let spec = std::env::var("ULM_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    ulm_model::bundle::parse_device(&spec).expect("ULM_TEST_DEVICE names a device")
}

pub struct Case {
    pub json: serde_json::Value,
    pub tensors: HashMap<String, Tensor>,
}

impl Case {
    /// `None` when the fixture directory has no such case.
    pub fn load(dir: &Path, name: &str) -> Option<Case> {
        let json_path = dir.join("cases").join(format!("{name}.json"));
        let text = std::fs::read_to_string(&json_path).ok()?;
        let json = serde_json::from_str(&text).expect("case json");
        let tensors = candle_core::safetensors::load(
            dir.join("cases").join(format!("{name}.safetensors")),
            &test_device(),
        )
        .expect("case safetensors");
        Some(Case { json, tensors })
    }

    pub fn t(&self, name: &str) -> &Tensor {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("case has no tensor {name}"))
    }

    pub fn u32s(&self, name: &str) -> Vec<u32> {
        self.t(name)
            .flatten_all()
            .and_then(|t| t.to_dtype(DType::U32))
            .and_then(|t| t.to_vec1())
            .expect("integer tensor")
    }

    pub fn ids(&self, key: &str) -> Vec<u32> {
        self.json[key]
            .as_array()
            .unwrap_or_else(|| panic!("json has no list {key}"))
            .iter()
            .map(|v| v.as_u64().expect("id") as u32)
            .collect()
    }

    pub fn str(&self, key: &str) -> &str {
        self.json[key]
            .as_str()
            .unwrap_or_else(|| panic!("json has no string {key}"))
    }

    pub fn f64(&self, key: &str) -> f64 {
        self.json[key]
            .as_f64()
            .unwrap_or_else(|| panic!("json has no number {key}"))
    }
}

/// Largest absolute difference; panics on a shape mismatch.
pub fn max_abs_diff(actual: &Tensor, expected: &Tensor) -> f32 {
    allclose_excess(actual, expected, 0.0).1
}

/// An elementwise tolerance, as numpy's `allclose`:
/// `|actual - expected| <= atol + rtol * |expected|`. Absolute error alone
/// does not scale: the same implementation is off by more on larger values.
#[derive(Debug, Clone, Copy)]
pub struct Tol {
    pub atol: f32,
    pub rtol: f32,
}

impl Tol {
    pub const fn new(atol: f32, rtol: f32) -> Self {
        Self { atol, rtol }
    }
}

/// The largest `|actual - expected| - rtol * |expected|` (compared with
/// `atol`) and the largest absolute difference.
pub fn allclose_excess(actual: &Tensor, expected: &Tensor, rtol: f32) -> (f32, f32) {
    let flat = |t: &Tensor| {
        t.to_device(&Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| t.flatten_all())
            .unwrap()
    };
    let (a, e) = (flat(actual), flat(expected));
    assert_eq!(
        a.dims(),
        e.dims(),
        "element counts differ: {:?} vs {:?}",
        actual.shape(),
        expected.shape()
    );
    let diff = (a - &e).unwrap().abs().unwrap();
    let allowed = (e.abs().unwrap() * rtol as f64).unwrap();
    let scalar = |t: Tensor| t.max(0).unwrap().to_scalar::<f32>().unwrap();
    (scalar((&diff - allowed).unwrap()), scalar(diff))
}

/// Collects named comparisons and fails once with all of them, or when no
/// case was checked (a fixture directory without cases must not pass).
#[derive(Default)]
pub struct Report {
    pub lines: Vec<String>,
    pub failures: Vec<String>,
    /// Cases loaded and compared.
    pub cases: usize,
}

impl Report {
    pub fn close(&mut self, what: &str, actual: &Tensor, expected: &Tensor, tol: Tol) {
        let (excess, diff) = allclose_excess(actual, expected, tol.rtol);
        let line = format!(
            "{what}: max abs diff {diff:.3e} (atol {:.0e} + rtol {:.0e} * |expected|)",
            tol.atol, tol.rtol
        );
        if excess.is_nan() || excess > tol.atol {
            self.failures.push(line.clone());
        }
        self.lines.push(line);
    }

    pub fn equal<T: PartialEq + std::fmt::Debug>(&mut self, what: &str, actual: T, expected: T) {
        if actual == expected {
            self.lines.push(format!("{what}: equal"));
        } else {
            self.failures
                .push(format!("{what}: {actual:?} != {expected:?}"));
        }
    }

    pub fn check(&mut self, what: &str, ok: bool, detail: String) {
        let line = format!("{what}: {detail}");
        if !ok {
            self.failures.push(line.clone());
        }
        self.lines.push(line);
    }

    /// Loads case `name` of `dir` and counts it; none when the directory
    /// has no such case.
    pub fn case(&mut self, dir: &Path, name: &str) -> Option<Case> {
        let case = Case::load(dir, name)?;
        self.cases += 1;
        Some(case)
    }

    pub fn finish(self, title: &str) {
        println!("== {title}: {} cases", self.cases);
        assert!(self.cases > 0, "{title}: no case was checked");
        for l in &self.lines {
            println!("   {l}");
        }
        assert!(
            self.failures.is_empty(),
            "{title}: {} mismatches:\n{}",
            self.failures.len(),
            self.failures.join("\n")
        );
    }
}

/// Input embeddings `[1, T, H]` of one understanding row: token embeddings
/// with the image positions taken from `image_embeds`.
pub fn row_embeds(model: &Janus, ids: &[u32], mask: &[bool], image_embeds: &Tensor) -> Tensor {
    let ids = Tensor::new(ids, model.device())
        .and_then(|t| t.unsqueeze(0))
        .unwrap();
    model
        .merge_image_embeds(&ids, &[mask.to_vec()], Some(image_embeds))
        .unwrap()
}

/// Hidden states `[T, H]` of one row of embeddings `[1, T, H]`, all
/// positions attended causally, without a cache.
pub fn full_hidden(model: &Janus, embeds: &Tensor) -> Tensor {
    let t = embeds.dim(1).unwrap();
    let lm = &model.language_model;
    let ctx = lm
        .context(&[(0..t as u32).collect()], &[vec![true; t]])
        .unwrap();
    lm.forward_hidden(embeds, &ctx, None, Pass::Inference)
        .and_then(|h| h.squeeze(0))
        .unwrap()
}
