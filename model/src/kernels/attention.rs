//! Scaled dot-product attention on the CPU in f32, one task per (row,
//! head): a GEMM for the scores, scale, additive mask and softmax in one
//! pass over them, a GEMM for the values written straight into the
//! `[B, Tq, H * D]` layout the output projection reads. Queries, keys and
//! values are read in place through their strides (slices of the KV cache,
//! heads of a fused QKV projection), and a key/value head serves
//! `H / Hkv` query heads without being repeated.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use super::{f32_storage, math};

pub(super) struct Attention {
    pub scale: f32,
    /// Additive mask `[B, 1, Tq, Tk]` (contiguous, f32), or none when every
    /// key is visible to every query.
    pub bias: Option<Tensor>,
}

/// A 4-D view `[B, H, T, D]`: its element offset and strides.
#[derive(Clone, Copy)]
struct View {
    start: usize,
    strides: [usize; 4],
}

impl View {
    fn of(layout: &Layout) -> Result<(Self, [usize; 4])> {
        let dims: [usize; 4] = layout
            .dims()
            .try_into()
            .map_err(|_| candle_core::Error::Msg("attention: 4-D inputs only".into()))?;
        let strides: [usize; 4] = layout
            .stride()
            .try_into()
            .map_err(|_| candle_core::Error::Msg("attention: 4-D inputs only".into()))?;
        Ok((
            Self {
                start: layout.start_offset(),
                strides,
            },
            dims,
        ))
    }

    fn at(&self, b: usize, h: usize) -> usize {
        self.start + b * self.strides[0] + h * self.strides[1]
    }
}

/// A pointer that crosses into rayon tasks; each task writes a disjoint
/// part of the output.
#[derive(Clone, Copy)]
struct Out(*mut f32);
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// Through a method, so that closures capture the `Send` wrapper and
    /// not the raw pointer field.
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "cpu-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (
            f32_storage(qs, "attention")?,
            f32_storage(ks, "attention")?,
            f32_storage(vs, "attention")?,
        );
        let (qv, [b, h, tq, d]) = View::of(ql)?;
        let (kv, [kb, hkv, tk, kd]) = View::of(kl)?;
        let (vv, vdims) = View::of(vl)?;
        if kb != b || kd != d || vdims != [b, hkv, tk, d] || hkv == 0 || h % hkv != 0 {
            candle_core::bail!(
                "attention: q {:?}, k {:?}, v {:?} do not fit",
                ql.dims(),
                kl.dims(),
                vl.dims()
            );
        }
        let bias_guard = self.bias.as_ref().map(|t| t.storage_and_layout());
        let bias: Option<&[f32]> = match &bias_guard {
            Some((storage, layout)) => {
                let candle_core::Storage::Cpu(storage) = &**storage else {
                    candle_core::bail!("attention: the mask is not on the CPU");
                };
                if layout.dims() != [b, 1, tq, tk] || !layout.is_contiguous() {
                    candle_core::bail!(
                        "attention: mask {:?} for [{b}, 1, {tq}, {tk}]",
                        layout.dims()
                    );
                }
                let data = f32_storage(storage, "attention mask")?;
                Some(&data[layout.start_offset()..layout.start_offset() + b * tq * tk])
            }
            None => None,
        };
        let group = h / hkv;
        let mut out = vec![0f32; b * tq * h * d];
        let dst = Out(out.as_mut_ptr());
        (0..b * h).into_par_iter().for_each(|task| {
            let (row, head) = (task / h, task % h);
            let kv_head = head / group;
            let mut scores = vec![0f32; tq * tk];
            let (qo, ko, vo) = (qv.at(row, head), kv.at(row, kv_head), vv.at(row, kv_head));
            // SAFETY: the views were checked against the storages' layouts
            // by candle; every (row, head) task writes its own columns.
            unsafe {
                gemm(
                    tq,
                    tk,
                    d,
                    scores.as_mut_ptr(),
                    1,
                    tk as isize,
                    false,
                    q.as_ptr().add(qo),
                    qv.strides[3] as isize,
                    qv.strides[2] as isize,
                    k.as_ptr().add(ko),
                    kv.strides[2] as isize,
                    kv.strides[3] as isize,
                    0.0,
                    self.scale,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
            math::vectorized(|| {
                for (i, s) in scores.chunks_mut(tk).enumerate() {
                    if let Some(bias) = bias {
                        let m = &bias[(row * tq + i) * tk..(row * tq + i + 1) * tk];
                        s.iter_mut().zip(m).for_each(|(s, m)| *s += m);
                    }
                    math::softmax_in_place(s);
                }
            });
            let out_at = row * tq * h * d + head * d;
            unsafe {
                gemm(
                    tq,
                    d,
                    tk,
                    dst.at(out_at),
                    1,
                    (h * d) as isize,
                    false,
                    scores.as_ptr(),
                    1,
                    tk as isize,
                    v.as_ptr().add(vo),
                    vv.strides[3] as isize,
                    vv.strides[2] as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, tq, h * d))))
    }
}
