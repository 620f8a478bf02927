//! The VQ decoder's convolutions and group norms on the CPU in f32, on
//! images laid out `[B, H, W, C]` (channels last). A 3x3 convolution is one
//! GEMM per band of output rows: the band's patches (`[pixels, 9 C]`,
//! copied in contiguous runs of `C` channels) by the kernel reordered to
//! `[9 C, C_out]`, with the pixels as the GEMM's long side; the nearest 2x
//! upsampling before a decoder convolution is folded into the patch copy.
//! Group norm takes its statistics in one parallel pass (f64 sums) and
//! applies scale, shift and optionally swish in another.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use super::{contiguous, math};

/// Target size of one band's patch matrix: small enough to stay in cache.
const BAND_BYTES: usize = 1 << 18;

/// `[B, H, W, C]` dims of a channels-last layout.
fn dims(l: &Layout, op: &str) -> Result<(usize, usize, usize, usize)> {
    match *l.dims() {
        [b, h, w, c] => Ok((b, h, w, c)),
        _ => candle_core::bail!("{op}: [B, H, W, C] input only"),
    }
}

/// A pointer that crosses into rayon tasks writing disjoint rows.
#[derive(Clone, Copy)]
struct Rows(*mut f32);
unsafe impl Send for Rows {}
unsafe impl Sync for Rows {}

impl Rows {
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// 3x3 convolution, stride 1, padding 1, of a `[B, H, W, C]` input (read
/// nearest-upsampled to `[B, 2H, 2W, C]` when `upsample`) by a weight
/// `[C_out, C, 3, 3]` plus a bias `[C_out]`, plus `residual` (the output's
/// shape) when given: `[B, H', W', C_out]`.
pub(super) struct Conv3x3 {
    pub upsample: bool,
    pub residual: Option<Tensor>,
}

thread_local! {
    /// Each thread's patch matrix, reused across bands and calls.
    static PATCHES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl CustomOp3 for Conv3x3 {
    fn name(&self) -> &'static str {
        "cpu-conv3x3-nhwc"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, bias) = (
            contiguous(xs, xl, self.name())?,
            contiguous(ws, wl, self.name())?,
            contiguous(bs, bl, self.name())?,
        );
        let (batch, in_h, in_w, c) = dims(xl, self.name())?;
        let c_out = bias.len();
        if wl.dims() != [c_out, c, 3, 3] {
            candle_core::bail!(
                "conv3x3: weight {:?} for {c} -> {c_out} channels",
                wl.dims()
            );
        }
        let f = if self.upsample { 2 } else { 1 };
        let (h, wd) = (in_h * f, in_w * f);
        // [C_out, C, ky, kx] -> [(ky, kx, C), C_out], the patches' order.
        let k = 9 * c;
        let mut kernel = vec![0f32; k * c_out];
        kernel
            .par_chunks_mut(c * c_out)
            .enumerate()
            .for_each(|(tap, block)| {
                for ci in 0..c {
                    for o in 0..c_out {
                        block[ci * c_out + o] = w[(o * c + ci) * 9 + tap];
                    }
                }
            });
        let len = batch * h * wd * c_out;
        let residual_guard = self.residual.as_ref().map(|t| t.storage_and_layout());
        let residual = match &residual_guard {
            Some((storage, layout)) => {
                let cpu: &CpuStorage = match &**storage {
                    candle_core::Storage::Cpu(cpu) => cpu,
                    _ => candle_core::bail!("conv3x3: the residual is not on the CPU"),
                };
                if layout.dims() != [batch, h, wd, c_out] {
                    candle_core::bail!("conv3x3: residual {:?}", layout.dims());
                }
                Some(contiguous(cpu, layout, self.name())?)
            }
            None => None,
        };
        // The GEMMs accumulate onto bias (+ residual); every element is
        // written here before any is read.
        let mut out = Vec::<f32>::with_capacity(len);
        out.spare_capacity_mut()
            .par_chunks_mut(c_out)
            .enumerate()
            .for_each(|(p, px)| match residual {
                Some(r) => {
                    let r = &r[p * c_out..(p + 1) * c_out];
                    for ((o, &b), &r) in px.iter_mut().zip(bias).zip(r) {
                        o.write(b + r);
                    }
                }
                None => {
                    for (o, &b) in px.iter_mut().zip(bias) {
                        o.write(b);
                    }
                }
            });
        // SAFETY: the loop above initialised all `len` elements.
        unsafe { out.set_len(len) };
        let band_rows = (BAND_BYTES / (4 * k * wd)).clamp(1, h);
        let bands = h.div_ceil(band_rows);
        let tasks = batch * bands;
        let threads = rayon::current_num_threads();
        // Many bands: one per task; few (deep, small levels): one after the
        // other, each GEMM on every thread.
        let (inner, parallel) = if tasks >= 2 * threads {
            (Parallelism::None, true)
        } else {
            (Parallelism::Rayon(threads), false)
        };
        let dst = Rows(out.as_mut_ptr());
        let run = |task: usize| {
            let (image, band) = (task / bands, task % bands);
            let y0 = band * band_rows;
            let rows = band_rows.min(h - y0);
            let pixels = rows * wd;
            let out_at = (image * h * wd + y0 * wd) * c_out;
            let multiply = |patches: *const f32, pixels: usize| {
                // SAFETY: each task writes its own band of output rows, inside
                // `out`; `patches` holds `pixels` rows of `k` values.
                unsafe {
                    gemm(
                        pixels,
                        c_out,
                        k,
                        dst.at(out_at),
                        1,
                        c_out as isize,
                        true,
                        patches,
                        1,
                        k as isize,
                        kernel.as_ptr(),
                        1,
                        c_out as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        inner,
                    );
                }
            };
            let src = &x[image * in_h * in_w * c..(image + 1) * in_h * in_w * c];
            PATCHES.with_borrow_mut(|patches| {
                if patches.len() < pixels * k {
                    patches.resize(pixels * k, 0.0);
                }
                for (p, patch) in patches[..pixels * k].chunks_mut(k).enumerate() {
                    let (oy, ox) = (y0 + p / wd, p % wd);
                    for (tap, run) in patch.chunks_mut(c).enumerate() {
                        let (sy, sx) =
                            ((oy + tap / 3).checked_sub(1), (ox + tap % 3).checked_sub(1));
                        match (sy.filter(|&s| s < h), sx.filter(|&s| s < wd)) {
                            (Some(sy), Some(sx)) => {
                                let at = ((sy / f) * in_w + sx / f) * c;
                                run.copy_from_slice(&src[at..at + c]);
                            }
                            // Zero padding.
                            _ => run.fill(0.0),
                        }
                    }
                }
                multiply(patches.as_ptr(), pixels);
            });
        };
        if parallel {
            (0..tasks).into_par_iter().for_each(run);
        } else {
            (0..tasks).for_each(run);
        }
        Ok((CpuStorage::F32(out), Shape::from((batch, h, wd, c_out))))
    }
}

/// Group norm of a `[B, H, W, C]` input with weight and bias `[C]`,
/// optionally followed by swish.
pub(super) struct GroupNorm {
    pub groups: usize,
    pub eps: f64,
    pub swish: bool,
}

/// Pixels per parallel task of the group norm; also how many values a
/// channel's f32 partial sums cover before they join the f64 totals.
const NORM_PIXELS: usize = 256;

/// Per channel of `[pixels, c]` data, the sum of the values, or of their
/// squared deviations from `center` (f32 within a task, f64 across them).
fn channel_sums(x: &[f32], c: usize, center: Option<&[f32]>) -> Vec<f64> {
    x.par_chunks(NORM_PIXELS * c)
        .map(|chunk| {
            math::vectorized(|| {
                let mut acc = vec![0f32; c];
                for px in chunk.chunks_exact(c) {
                    let (acc, px) = (&mut acc[..c], &px[..c]);
                    match center {
                        None => (0..c).for_each(|ch| acc[ch] += px[ch]),
                        Some(m) => {
                            let m = &m[..c];
                            (0..c).for_each(|ch| {
                                let d = px[ch] - m[ch];
                                acc[ch] += d * d;
                            })
                        }
                    }
                }
                acc.into_iter().map(f64::from).collect::<Vec<f64>>()
            })
        })
        .reduce(
            || vec![0f64; c],
            |mut a, b| {
                a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                a
            },
        )
}

/// Channel totals summed over each group of `per_group` channels.
fn group_totals(sums: &[f64], per_group: usize) -> impl Iterator<Item = f64> + '_ {
    sums.chunks(per_group).map(|g| g.iter().sum())
}

impl CustomOp3 for GroupNorm {
    fn name(&self) -> &'static str {
        "cpu-group-norm-nhwc"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, weight, bias) = (
            contiguous(xs, xl, self.name())?,
            contiguous(ws, wl, self.name())?,
            contiguous(bs, bl, self.name())?,
        );
        let (batch, h, w, c) = dims(xl, self.name())?;
        let g = self.groups;
        if g == 0 || c % g != 0 || weight.len() != c || bias.len() != c {
            candle_core::bail!("group norm: {c} channels, {g} groups");
        }
        let per_group = c / g;
        let plane = h * w;
        let n = (plane * per_group) as f64;
        let mut out = vec![0f32; x.len()];
        for image in 0..batch {
            let src = &x[image * plane * c..(image + 1) * plane * c];
            // Two passes, as the reference: the mean, then the squared
            // deviations from it.
            let sums = channel_sums(src, c, None);
            let mean: Vec<f64> = group_totals(&sums, per_group).map(|s| s / n).collect();
            let mean_of: Vec<f32> = (0..c).map(|ch| mean[ch / per_group] as f32).collect();
            let squares = channel_sums(src, c, Some(&mean_of));
            let var: Vec<f64> = group_totals(&squares, per_group).map(|s| s / n).collect();
            // y = x * scale[c] + shift[c]
            let mut scale = vec![0f32; c];
            let mut shift = vec![0f32; c];
            for ch in 0..c {
                let inv = 1.0 / (var[ch / per_group] + self.eps).sqrt();
                let wgt = weight[ch] as f64;
                scale[ch] = (inv * wgt) as f32;
                shift[ch] = (bias[ch] as f64 - mean[ch / per_group] * inv * wgt) as f32;
            }
            out[image * plane * c..(image + 1) * plane * c]
                .par_chunks_mut(NORM_PIXELS * c)
                .zip(src.par_chunks(NORM_PIXELS * c))
                .for_each(|(o, s)| {
                    math::vectorized(|| {
                        for (o, s) in o.chunks_exact_mut(c).zip(s.chunks_exact(c)) {
                            let (o, s, a, b) = (&mut o[..c], &s[..c], &scale[..c], &shift[..c]);
                            if self.swish {
                                for ch in 0..c {
                                    o[ch] = math::silu(s[ch] * a[ch] + b[ch]);
                                }
                            } else {
                                for ch in 0..c {
                                    o[ch] = s[ch] * a[ch] + b[ch];
                                }
                            }
                        }
                    })
                });
        }
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}
