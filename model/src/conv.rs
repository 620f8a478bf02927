//! 2-D convolution for the training pass on the CPU, as im2col and one GEMM
//! forward and backward. candle's CPU backward of `conv2d` takes the input
//! gradient through a direct `conv_transpose2d` loop and the kernel gradient
//! through a convolution whose kernel is the whole image; both are several
//! times slower than the GEMMs they amount to, and together most of a VQ
//! training step.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::ops::Pass;

/// The geometry of one convolution.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    batch: usize,
    channels: usize,
    height: usize,
    width: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl Geometry {
    fn out_h(&self) -> usize {
        (self.height + 2 * self.padding - self.kernel) / self.stride + 1
    }

    fn out_w(&self) -> usize {
        (self.width + 2 * self.padding - self.kernel) / self.stride + 1
    }

    /// Rows of the column matrix: `channels * kernel * kernel`.
    fn rows(&self) -> usize {
        self.channels * self.kernel * self.kernel
    }

    /// Columns of the column matrix: one per output position of every image.
    fn cols(&self) -> usize {
        self.batch * self.out_h() * self.out_w()
    }

    /// For row (c, ky, kx): calls `f(column, input index)` for every output
    /// position whose receptive field covers an input pixel (padding is zero).
    fn for_each_tap(&self, row: usize, mut f: impl FnMut(usize, usize)) {
        let k = self.kernel;
        let (c, ky, kx) = (row / (k * k), (row / k) % k, row % k);
        let (oh, ow) = (self.out_h(), self.out_w());
        for b in 0..self.batch {
            let image = (b * self.channels + c) * self.height * self.width;
            for oy in 0..oh {
                let Some(iy) = (oy * self.stride + ky).checked_sub(self.padding) else {
                    continue;
                };
                if iy >= self.height {
                    continue;
                }
                for ox in 0..ow {
                    let Some(ix) = (ox * self.stride + kx).checked_sub(self.padding) else {
                        continue;
                    };
                    if ix < self.width {
                        f((b * oh + oy) * ow + ox, image + iy * self.width + ix);
                    }
                }
            }
        }
    }
}

fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: f32 only");
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: contiguous input only"),
    }
}

/// `[B, C, H, W]` to the column matrix `[C*k*k, B*OH*OW]`.
struct Im2Col(Geometry);

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(storage, layout, self.name())?;
        let g = self.0;
        let mut cols = vec![0f32; g.rows() * g.cols()];
        cols.par_chunks_mut(g.cols())
            .enumerate()
            .for_each(|(row, out)| g.for_each_tap(row, |col, i| out[col] = x[i]));
        Ok((CpuStorage::F32(cols), Shape::from((g.rows(), g.cols()))))
    }
}

/// The column matrix `[C*k*k, B*OH*OW]` summed back onto the pixels it was
/// taken from: `[C, B, H, W]` (channel first, so that channels are
/// independent and run in parallel).
struct Col2Im(Geometry);

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let cols = f32_slice(storage, layout, self.name())?;
        let g = self.0;
        let plane = g.height * g.width;
        let per_channel = g.batch * plane;
        let taps = g.kernel * g.kernel;
        let mut x = vec![0f32; g.channels * per_channel];
        x.par_chunks_mut(per_channel)
            .enumerate()
            .for_each(|(c, out)| {
                for row in c * taps..(c + 1) * taps {
                    let src = &cols[row * g.cols()..(row + 1) * g.cols()];
                    // Indices are of [B, C, H, W]; this channel's block is [B, H, W].
                    g.for_each_tap(row, |col, i| {
                        let (b, pixel) = (i / (g.channels * plane), i % plane);
                        out[b * plane + pixel] += src[col];
                    });
                }
            });
        let shape = Shape::from((g.channels, g.batch, g.height, g.width));
        Ok((CpuStorage::F32(x), shape))
    }
}

/// `conv2d(x, w)` with output `[C_out, B, OH, OW]`, channel first: that is
/// the GEMM's natural layout, and the backward's too.
struct GemmConv2d {
    stride: usize,
    padding: usize,
}

impl GemmConv2d {
    fn geometry(&self, x: &Layout, w: &Layout) -> Result<(Geometry, usize)> {
        let (batch, channels, height, width) = x.shape().dims4()?;
        let (c_out, _, kernel, _) = w.shape().dims4()?;
        let g = Geometry {
            batch,
            channels,
            height,
            width,
            kernel,
            stride: self.stride,
            padding: self.padding,
        };
        Ok((g, c_out))
    }
}

impl CustomOp2 for GemmConv2d {
    fn name(&self) -> &'static str {
        "gemm-conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, c_out) = self.geometry(xl, wl)?;
        let (cols, _) = Im2Col(g).cpu_fwd(xs, xl)?;
        // The weight is read in place: `[C_out, C, k, k]` is `[C_out, C*k*k]`.
        f32_slice(ws, wl, self.name())?;
        let (m, k, n) = (c_out, g.rows(), g.cols());
        let y = ws.matmul(
            &cols,
            (1, m, n, k),
            &Layout::contiguous_with_offset((m, k), wl.start_offset()),
            &Layout::contiguous((k, n)),
        )?;
        Ok((y, Shape::from((c_out, g.batch, g.out_h(), g.out_w()))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (g, c_out) = self.geometry(x.layout(), w.layout())?;
        let grad = grad.contiguous()?.reshape((c_out, g.cols()))?;
        let cols = x.apply_op1_no_bwd(&Im2Col(g))?;
        let grad_w = grad.matmul(&cols.t()?)?.reshape(w.shape())?;
        let grad_cols = w.reshape((c_out, g.rows()))?.t()?.matmul(&grad)?;
        let grad_x = grad_cols
            .apply_op1_no_bwd(&Col2Im(g))?
            .permute((1, 0, 2, 3))?
            .contiguous()?;
        Ok((Some(grad_x), Some(grad_w)))
    }
}

/// `conv2d` of `x` `[B, C, H, W]` by `w` `[C_out, C, k, k]` (no dilation,
/// no groups). The training pass on the CPU in f32 runs as GEMMs (see the
/// module); everything else is candle's `conv2d`.
pub fn conv2d(x: &Tensor, w: &Tensor, padding: usize, stride: usize, pass: Pass) -> Result<Tensor> {
    let gemm = pass == Pass::Training && x.device().is_cpu() && x.dtype() == DType::F32;
    if !gemm {
        return x.conv2d(w, padding, stride, 1, 1);
    }
    x.contiguous()?
        .apply_op2(&w.contiguous()?, GemmConv2d { stride, padding })?
        .permute((1, 0, 2, 3))
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    /// The GEMM convolution against candle's: the same output, and the same
    /// gradients for input and kernel, at every stride and padding the VQ
    /// uses (and 1x1).
    #[test]
    fn gemm_convolution_matches_candles_forward_and_backward() {
        let dev = &Device::Cpu;
        for (k, stride, padding, h) in [(3, 1, 1, 9), (3, 2, 0, 9), (1, 1, 0, 6), (3, 1, 0, 7)] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 3, h, h), dev).unwrap()).unwrap();
            let w = Var::from_tensor(&Tensor::randn(0f32, 1., (4, 3, k, k), dev).unwrap()).unwrap();
            // A weighting of the output, so every position's gradient differs.
            let run = |pass| {
                let y = conv2d(&x, &w, padding, stride, pass).unwrap();
                let weights = Tensor::randn(0f32, 1., y.shape(), dev).unwrap();
                (y, weights)
            };
            let (reference, weights) = run(Pass::Inference);
            let (ours, _) = run(Pass::Training);
            let close = |a: &Tensor, b: &Tensor| {
                let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
                diff.to_scalar::<f32>().unwrap()
            };
            assert_eq!(ours.dims(), reference.dims());
            assert!(close(&ours, &reference) < 1e-4, "k{k} s{stride} p{padding}");
            let grads = |y: &Tensor| {
                let g = (y * &weights)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                (g.get(&x).unwrap().clone(), g.get(&w).unwrap().clone())
            };
            let (gx_ref, gw_ref) = grads(&reference);
            let (gx, gw) = grads(&ours);
            assert!(
                close(&gx, &gx_ref) < 1e-4,
                "input grad k{k} s{stride} p{padding}"
            );
            assert!(
                close(&gw, &gw_ref) < 1e-3,
                "kernel grad k{k} s{stride} p{padding}"
            );
        }
    }
}
