//! The fused CPU kernels against candle's ops on the same inputs: every
//! kernel at shapes that exercise its strides, masks, groups and edges,
//! and the VQ decoder end to end (channels last against the NCHW path).

use candle_core::{DType, Device, Tensor, D};
use ulm_model::demo::{build_demo, DEFAULT_SEED};
use ulm_model::kernels;
use ulm_model::ops::Pass;

fn randn(shape: &[usize], seed: u64) -> Tensor {
    // Deterministic without a global seed: a hash of the index.
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n as u64)
        .map(|i| {
            let mut x = (i ^ (seed << 32)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            x ^= x >> 29;
            x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x ^= x >> 32;
            (x % 20_001) as f32 / 10_000.0 - 1.0
        })
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn max_abs(a: &Tensor) -> f32 {
    a.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// softmax(q k^T * scale + bias) v with candle's ops, `[B, Tq, H * D]`.
fn reference_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
) -> Tensor {
    let (b, h, tq, d) = q.dims4().unwrap();
    let hkv = k.dim(1).unwrap();
    let repeat = |x: &Tensor| {
        let (b, n, t, d) = x.dims4().unwrap();
        x.unsqueeze(2)
            .unwrap()
            .broadcast_as((b, n, h / hkv, t, d))
            .unwrap()
            .reshape((b, h, t, d))
            .unwrap()
    };
    let (k, v) = (repeat(k), repeat(v));
    let mut scores = (q.contiguous().unwrap().matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
    if let Some(bias) = bias {
        scores = scores.broadcast_add(bias).unwrap();
    }
    candle_nn::ops::softmax(&scores, D::Minus1)
        .unwrap()
        .matmul(&v.contiguous().unwrap())
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((b, tq, h * d))
        .unwrap()
}

#[test]
fn attention_matches_candle_with_grouped_heads_strided_caches_and_masks() {
    let (b, h, hkv, tq, tk, d) = (2, 4, 2, 5, 9, 8);
    // Queries as the model has them: projected [B, T, H, D], transposed.
    let q = randn(&[b, tq, h, d], 1).transpose(1, 2).unwrap();
    // Keys and values as the cache holds them: the first tk of 16 positions.
    let k = randn(&[b, hkv, 16, d], 2).narrow(2, 0, tk).unwrap();
    let v = randn(&[b, hkv, 16, d], 3).narrow(2, 0, tk).unwrap();
    assert!(!q.is_contiguous() && !k.is_contiguous());
    // Causal over the last tq keys, and the first key of row 1 padding.
    let mut mask = vec![0f32; b * tq * tk];
    for row in 0..b {
        for i in 0..tq {
            for j in 0..tk {
                if j > tk - tq + i || (row == 1 && j == 0) {
                    mask[(row * tq + i) * tk + j] = -1e9;
                }
            }
        }
    }
    let bias = Tensor::from_vec(mask, (b, 1, tq, tk), &Device::Cpu).unwrap();
    for bias in [None, Some(&bias)] {
        let ours = kernels::attention(&q, &k, &v, bias, 0.35).unwrap();
        let want = reference_attention(&q, &k, &v, bias, 0.35);
        assert!(max_diff(&ours, &want) < 2e-6, "{}", max_diff(&ours, &want));
    }
    // One query (a decode step) over every key, no mask.
    let q1 = q.narrow(2, 0, 1).unwrap();
    let ours = kernels::attention(&q1, &k, &v, None, 0.35).unwrap();
    assert!(max_diff(&ours, &reference_attention(&q1, &k, &v, None, 0.35)) < 2e-6);
    // Shapes that do not fit are refused, not read out of bounds.
    let odd = randn(&[b, 3, tk, d], 4);
    assert!(kernels::attention(&q, &odd, &odd, None, 1.0).is_err());
}

#[test]
fn gelu_and_swiglu_match_candle() {
    let x = (randn(&[3, 1000], 5) * 6.0).unwrap();
    let up = randn(&[3, 1000], 6);
    let gelu = kernels::gelu_erf(&x).unwrap();
    assert!(max_diff(&gelu, &x.gelu_erf().unwrap()) < 2e-6);
    let swiglu = kernels::swiglu(&x, &up).unwrap();
    let want = (x.silu().unwrap() * &up).unwrap();
    assert!(max_diff(&swiglu, &want) < 2e-6);
}

/// NCHW `[B, C, H, W]` of channels-last `x`.
fn nchw(x: &Tensor) -> Tensor {
    kernels::channels_first(x).unwrap()
}

#[test]
fn conv3x3_matches_candle_with_upsampling_residuals_and_odd_sizes() {
    for (c, c_out, side, upsample) in [(8, 16, 7, false), (16, 3, 5, true), (32, 32, 12, false)] {
        let x = randn(&[2, side, side, c], 7);
        let w = (randn(&[c_out, c, 3, 3], 8) * 0.2).unwrap();
        let bias = randn(&[c_out], 9);
        let out_side = if upsample { 2 * side } else { side };
        let residual = randn(&[2, out_side, out_side, c_out], 10);
        let input = if upsample {
            nchw(&x).upsample_nearest2d(out_side, out_side).unwrap()
        } else {
            nchw(&x)
        };
        let plain = input
            .conv2d(&w, 1, 1, 1, 1)
            .unwrap()
            .broadcast_add(&bias.reshape((1, c_out, 1, 1)).unwrap())
            .unwrap();
        let ours = kernels::conv3x3(&x, &w, &bias, upsample, None).unwrap();
        assert!(max_diff(&nchw(&ours), &plain) < 1e-4, "c {c} up {upsample}");
        let onto = kernels::conv3x3(&x, &w, &bias, upsample, Some(&residual)).unwrap();
        let want = (plain + nchw(&residual)).unwrap();
        assert!(max_diff(&nchw(&onto), &want) < 1e-4, "residual, c {c}");
    }
}

#[test]
fn conv1x1_and_group_norm_match_candle() {
    let x = randn(&[2, 6, 5, 64], 11).affine(3.0, 0.5).unwrap();
    let w = randn(&[16, 64, 1, 1], 12);
    let bias = randn(&[16], 13);
    let ours = nchw(&kernels::conv1x1(&x, &w, &bias).unwrap());
    let want = nchw(&x)
        .conv2d(&w, 0, 1, 1, 1)
        .unwrap()
        .broadcast_add(&bias.reshape((1, 16, 1, 1)).unwrap())
        .unwrap();
    assert!(max_diff(&ours, &want) < 1e-4);

    let (gw, gb) = ((randn(&[64], 14) + 1.0).unwrap(), randn(&[64], 15));
    let groups = 32;
    let x64 = nchw(&x).to_dtype(DType::F64).unwrap();
    let g = x64.reshape((2, groups, 2 * 6 * 5)).unwrap();
    let centered = g
        .broadcast_sub(&g.mean_keepdim(D::Minus1).unwrap())
        .unwrap();
    let var = centered.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
    let normed = centered
        .broadcast_div(&(var + 1e-6).unwrap().sqrt().unwrap())
        .unwrap()
        .reshape((2, 64, 6, 5))
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .broadcast_mul(&gw.reshape((1, 64, 1, 1)).unwrap())
        .unwrap()
        .broadcast_add(&gb.reshape((1, 64, 1, 1)).unwrap())
        .unwrap();
    let ours = nchw(&kernels::group_norm(&x, &gw, &gb, groups, 1e-6, false).unwrap());
    assert!(max_diff(&ours, &normed) < 1e-5);
    let ours = nchw(&kernels::group_norm(&x, &gw, &gb, groups, 1e-6, true).unwrap());
    assert!(max_diff(&ours, &normed.silu().unwrap()) < 1e-5);
    assert!(kernels::group_norm(&x, &gw, &gb, 48, 1e-6, false).is_err());
}

/// The demo VQ decoder: the channels-last kernels (inference) against the
/// NCHW ops of the training pass, on codes and on a batch of two.
#[test]
fn the_channels_last_vq_decoder_decodes_what_the_nchw_one_does() {
    let (model, _) = build_demo(DEFAULT_SEED, DType::F32, &Device::Cpu).unwrap();
    let vq = &model.gen_vision;
    let n = model.cfg.gen_vision.image_tokens() as u32;
    let codes = Tensor::from_vec(
        (0..2 * n).map(|i| (i * 37 + 5) % 512).collect::<Vec<u32>>(),
        (2, n as usize),
        &Device::Cpu,
    )
    .unwrap();
    let entries = vq.codebook_entries(&codes).unwrap();
    let fused = vq.decode(&entries, Pass::Inference).unwrap();
    let plain = vq.decode(&entries, Pass::Training).unwrap();
    assert_eq!(fused.dims(), [2, 3, 64, 64]);
    assert!(max_abs(&plain) > 0.1);
    assert!(
        max_diff(&fused, &plain) < 1e-4 * max_abs(&plain),
        "{}",
        max_diff(&fused, &plain)
    );
}
