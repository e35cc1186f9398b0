//! CPU kernels of the candle adapter for what candle runs as several passes: bias + GELU,
//! bias + residual + LayerNorm, and self-attention over packed (unpadded) sequences. Each is a
//! candle custom op on contiguous F32 data, spread over the rayon pool of the caller and
//! compiled for the best SIMD level the CPU has (pulp picks it at run time; safe code only).

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape};
use rayon::prelude::*;

/// Rows handed to one rayon task.
const ROWS_PER_TASK: usize = 16;

fn contiguous<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: F32 tensors only");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: contiguous tensors only");
    };
    Ok(&data[start..end])
}

/// Work compiled for the CPU's best SIMD level: `pulp` checks the CPU once and calls
/// `run` inside a function built with those target features; everything `run` calls is
/// `#[inline(always)]` so that it is built with them too.
trait Kernel {
    type Output;
    /// `FMA`: whether `f32::mul_add` is a single instruction here (else it would be a slow
    /// library call, and `madd` multiplies and adds instead).
    fn run<const FMA: bool>(self) -> Self::Output;
}

struct Dispatch<K, const FMA: bool>(K);

impl<K: Kernel, const FMA: bool> pulp::WithSimd for Dispatch<K, FMA> {
    type Output = K::Output;
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) -> K::Output {
        self.0.run::<FMA>()
    }
}

/// Whether the SIMD level pulp dispatches to has fused multiply-add.
fn has_fma() -> bool {
    static FMA: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FMA.get_or_init(|| {
        #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
        {
            // Every level above scalar (x86-64-v3 and up) has FMA.
            !matches!(pulp::Arch::new(), pulp::Arch::Scalar)
        }
        #[cfg(target_arch = "aarch64")]
        {
            true
        }
        #[cfg(not(any(target_arch = "x86", target_arch = "x86_64", target_arch = "aarch64")))]
        {
            false
        }
    })
}

fn simd<K: Kernel>(k: K) -> K::Output {
    if has_fma() {
        pulp::Arch::new().dispatch(Dispatch::<K, true>(k))
    } else {
        pulp::Arch::new().dispatch(Dispatch::<K, false>(k))
    }
}

/// `a * b + c`, fused where the CPU has it.
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// erf(x) for f32: the rational approximation Eigen and XLA use, clamped to ±4 where erf is
/// ±1 to f32 precision (error about 1e-7).
#[inline(always)]
pub(super) fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10_f32;
    p = p * x2 + 2.770_681_4e-8;
    p = p * x2 + -2.101_024e-6;
    p = p * x2 + -5.692_506_4e-5;
    p = p * x2 + -7.349_906_3e-4;
    p = p * x2 + -2.954_6e-3;
    p = p * x2 + -1.609_603_3e-2;
    p *= x;
    let mut q = -1.456_607_2e-5_f32;
    q = q * x2 + -2.133_740_6e-4;
    q = q * x2 + -1.682_827e-3;
    q = q * x2 + -7.373_329e-3;
    q = q * x2 + -1.426_474e-2;
    p / q
}

/// exp(x) for f32 (Cephes' expf: range reduction by ln 2 and a degree-6 polynomial, relative
/// error about 1e-7), in a form the compiler vectorises. Inputs below -87 give about 1e-38.
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5e-1;
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Sum of `xs` over eight lanes, so that the compiler can vectorise it.
#[inline(always)]
fn sum(xs: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut chunks = xs.chunks_exact(8);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    chunks.remainder().iter().sum::<f32>() + acc.iter().sum::<f32>()
}

/// Sum of squared distances from `mean`, over eight lanes.
#[inline(always)]
fn sum_sq_dev(xs: &[f32], mean: f32) -> f32 {
    let mut acc = [0f32; 8];
    let mut chunks = xs.chunks_exact(8);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += (x - mean) * (x - mean);
        }
    }
    chunks.remainder().iter().map(|&x| (x - mean) * (x - mean)).sum::<f32>() + acc.iter().sum::<f32>()
}

/// Maximum of `xs` over eight lanes.
#[inline(always)]
fn max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let mut chunks = xs.chunks_exact(8);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = a.max(x);
        }
    }
    chunks.remainder().iter().chain(&acc).copied().fold(f32::NEG_INFINITY, f32::max)
}

#[inline(always)]
fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// `gelu(x + bias)` (erf form) of x [rows, n] and bias [n].
pub(super) struct BiasGelu;

impl CustomOp2 for BiasGelu {
    fn name(&self) -> &'static str {
        "bias-gelu"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        bias: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let src = contiguous(x, xl, self.name())?;
        let bias = contiguous(bias, bl, self.name())?;
        let n = bias.len();
        if n == 0 || src.len() % n != 0 {
            candle_core::bail!("bias-gelu: bias of {n} does not divide {} values", src.len());
        }
        let mut dst = vec![0f32; src.len()];
        dst.par_chunks_mut(n * ROWS_PER_TASK)
            .zip(src.par_chunks(n * ROWS_PER_TASK))
            .for_each(|(dst, src)| simd(BiasGeluRows { dst, src, bias }));
        Ok((CpuStorage::F32(dst), xl.shape().clone()))
    }
}

struct BiasGeluRows<'a> {
    dst: &'a mut [f32],
    src: &'a [f32],
    bias: &'a [f32],
}

impl Kernel for BiasGeluRows<'_> {
    type Output = ();
    #[inline(always)]
    fn run<const FMA: bool>(self) {
        let n = self.bias.len();
        for (d, s) in self.dst.chunks_exact_mut(n).zip(self.src.chunks_exact(n)) {
            for ((d, &x), &b) in d.iter_mut().zip(s).zip(self.bias) {
                *d = gelu_erf(x + b);
            }
        }
    }
}

/// `LayerNorm(x + bias + residual)` of x and residual [rows, h]; `params` is [3, h]: the
/// dense layer's bias, the norm's weight and the norm's bias.
pub(super) struct BiasResidualLayerNorm {
    pub eps: f32,
}

impl CustomOp3 for BiasResidualLayerNorm {
    fn name(&self) -> &'static str {
        "bias-residual-layer-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        residual: &CpuStorage,
        rl: &Layout,
        params: &CpuStorage,
        pl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let src = contiguous(x, xl, self.name())?;
        let res = contiguous(residual, rl, self.name())?;
        let params = contiguous(params, pl, self.name())?;
        let h = params.len() / 3;
        if h == 0 || params.len() != 3 * h || src.len() % h != 0 || res.len() != src.len() {
            candle_core::bail!("bias-residual-layer-norm: shapes do not match");
        }
        let eps = self.eps;
        let mut dst = vec![0f32; src.len()];
        dst.par_chunks_mut(h * ROWS_PER_TASK)
            .zip(src.par_chunks(h * ROWS_PER_TASK).zip(res.par_chunks(h * ROWS_PER_TASK)))
            .for_each(|(dst, (src, res))| simd(AddNormRows { dst, src, res, params, eps }));
        Ok((CpuStorage::F32(dst), xl.shape().clone()))
    }
}

struct AddNormRows<'a> {
    dst: &'a mut [f32],
    src: &'a [f32],
    res: &'a [f32],
    params: &'a [f32],
    eps: f32,
}

impl Kernel for AddNormRows<'_> {
    type Output = ();
    #[inline(always)]
    fn run<const FMA: bool>(self) {
        let h = self.params.len() / 3;
        let (bias, rest) = self.params.split_at(h);
        let (weight, beta) = rest.split_at(h);
        let inv_h = 1.0 / h as f32;
        let rows = self.dst.chunks_exact_mut(h).zip(self.src.chunks_exact(h).zip(self.res.chunks_exact(h)));
        for (d, (s, r)) in rows {
            for ((d, &x), (&r, &b)) in d.iter_mut().zip(s).zip(r.iter().zip(bias)) {
                *d = x + r + b;
            }
            let mean = sum(d) * inv_h;
            let inv_std = 1.0 / (sum_sq_dev(d, mean) * inv_h + self.eps).sqrt();
            for (d, (&w, &b)) in d.iter_mut().zip(weight.iter().zip(beta)) {
                *d = (*d - mean) * inv_std * w + b;
            }
        }
    }
}

/// Self-attention of sequences packed one after another: qkv [tokens, 3·h] (queries already
/// scaled by 1/√head_dim) and its bias [3·h] → context [tokens, h]. No padding and no mask:
/// each sequence attends to itself only.
pub(super) struct PackedAttention<'a> {
    pub lens: &'a [usize],
    pub heads: usize,
}

impl CustomOp2 for PackedAttention<'_> {
    fn name(&self) -> &'static str {
        "packed-attention"
    }

    fn cpu_fwd(
        &self,
        qkv: &CpuStorage,
        ql: &Layout,
        bias: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let qkv = contiguous(qkv, ql, self.name())?;
        let bias = contiguous(bias, bl, self.name())?;
        let h3 = bias.len();
        let h = h3 / 3;
        let tokens: usize = self.lens.iter().sum();
        if h == 0 || h3 != 3 * h || h % self.heads != 0 || qkv.len() != tokens * h3 {
            candle_core::bail!("packed-attention: shapes do not match");
        }
        let d = h / self.heads;
        // One task per (sequence, head); each returns its [len, d] block of the context.
        let mut tasks = Vec::with_capacity(self.lens.len() * self.heads);
        let mut row = 0;
        for &len in self.lens {
            for head in 0..self.heads {
                tasks.push((row, len, head));
            }
            row += len;
        }
        let blocks: Vec<Vec<f32>> = tasks
            .par_iter()
            .map(|&(row, len, head)| {
                let rows = &qkv[row * h3..(row + len) * h3];
                simd(Attend { rows, bias, h, d, head, len })
            })
            .collect();
        let mut dst = vec![0f32; tokens * h];
        for (&(row, len, head), block) in tasks.iter().zip(&blocks) {
            for (t, src) in block.chunks_exact(d).enumerate().take(len) {
                let at = (row + t) * h + head * d;
                dst[at..at + d].copy_from_slice(src);
            }
        }
        Ok((CpuStorage::F32(dst), Shape::from((tokens, h))))
    }
}

/// One head of one sequence: `rows` [len, 3·h] → context [len, d].
struct Attend<'a> {
    rows: &'a [f32],
    bias: &'a [f32],
    h: usize,
    d: usize,
    head: usize,
    len: usize,
}

impl Kernel for Attend<'_> {
    type Output = Vec<f32>;
    #[inline(always)]
    fn run<const FMA: bool>(self) -> Vec<f32> {
        let Attend { rows, bias, h, d, head, len } = self;
        attend::<FMA>(rows, bias, h, d, head, len)
    }
}

/// Keys per block of the score computation: one SIMD register of scores.
const KEY_BLOCK: usize = 8;
/// Queries computed together, for independent multiply-add chains and fewer loads.
const QUERY_BLOCK: usize = 4;

#[inline(always)]
fn attend<const FMA: bool>(
    rows: &[f32],
    bias: &[f32],
    h: usize,
    d: usize,
    head: usize,
    len: usize,
) -> Vec<f32> {
    let h3 = 3 * h;
    let (qo, ko, vo) = (head * d, h + head * d, 2 * h + head * d);
    let (bq, bk, bv) = (&bias[qo..qo + d], &bias[ko..ko + d], &bias[vo..vo + d]);
    // Keys in blocks of KEY_BLOCK, each block [d, KEY_BLOCK] (keys past the end are zero), so
    // that a query's scores against a block are KEY_BLOCK lanes of multiply-adds over d.
    let blocks = len.div_ceil(KEY_BLOCK);
    let stride = blocks * KEY_BLOCK;
    let mut kb = vec![0f32; blocks * d * KEY_BLOCK];
    // Values [len, d]; both with their biases added.
    let mut v = Vec::with_capacity(len * d);
    for (j, r) in rows.chunks_exact(h3).enumerate() {
        let block = &mut kb[(j / KEY_BLOCK) * d * KEY_BLOCK..][..d * KEY_BLOCK];
        for (c, (&x, &b)) in r[ko..ko + d].iter().zip(bk).enumerate() {
            block[c * KEY_BLOCK + j % KEY_BLOCK] = x + b;
        }
        v.extend(r[vo..vo + d].iter().zip(bv).map(|(&x, &b)| x + b));
    }
    let mut out = vec![0f32; len * d];
    // Queries [QUERY_BLOCK, d] and their scores [QUERY_BLOCK, stride].
    let mut q = vec![0f32; QUERY_BLOCK * d];
    let mut scores = vec![0f32; QUERY_BLOCK * stride];
    for (qrows, o) in rows.chunks(QUERY_BLOCK * h3).zip(out.chunks_mut(QUERY_BLOCK * d)) {
        let nq = qrows.len() / h3;
        for (qi, r) in q.chunks_exact_mut(d).zip(qrows.chunks_exact(h3)) {
            for ((q, &x), &b) in qi.iter_mut().zip(&r[qo..qo + d]).zip(bq) {
                *q = x + b;
            }
        }
        for (bi, block) in kb.chunks_exact(d * KEY_BLOCK).enumerate() {
            let mut acc = [[0f32; KEY_BLOCK]; QUERY_BLOCK];
            for (c, kc) in block.chunks_exact(KEY_BLOCK).enumerate() {
                for (a, qi) in acc.iter_mut().zip(q.chunks_exact(d)) {
                    let qc = qi[c];
                    for (a, &k) in a.iter_mut().zip(kc) {
                        *a = madd::<FMA>(qc, k, *a);
                    }
                }
            }
            for (a, s) in acc.iter().zip(scores.chunks_exact_mut(stride)) {
                s[bi * KEY_BLOCK..(bi + 1) * KEY_BLOCK].copy_from_slice(a);
            }
        }
        for s in scores.chunks_exact_mut(stride).take(nq) {
            let s = &mut s[..len];
            let m = max(s);
            for x in s.iter_mut() {
                *x = exp(*x - m);
            }
            let inv = 1.0 / sum(s);
            for x in s.iter_mut() {
                *x *= inv;
            }
        }
        for (j, vj) in v.chunks_exact(d).enumerate() {
            for (oi, s) in o.chunks_exact_mut(d).zip(scores.chunks_exact(stride)) {
                let p = s[j];
                for (o, &x) in oi.iter_mut().zip(vj) {
                    *o = madd::<FMA>(p, x, *o);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_and_exp_approximations_are_accurate() {
        for i in -2000..=2000 {
            let x = i as f32 / 250.0;
            let want = libm_erf(f64::from(x));
            let got = f64::from(erf(x));
            assert!((got - want).abs() < 1e-6, "erf({x}) = {got}, want {want}");
        }
        for i in -800..=800 {
            let x = i as f32 / 10.0;
            let want = f64::from(x).exp();
            let got = f64::from(exp(x));
            assert!(((got - want) / want).abs() < 1e-6, "exp({x}) = {got}, want {want}");
        }
    }

    /// erf by its series / continued fraction in f64, for the test only.
    fn libm_erf(x: f64) -> f64 {
        // Abramowitz–Stegun 7.1.26 is too coarse; integrate exp(-t²) with Simpson instead.
        let n = 2000;
        let hstep = x / n as f64;
        let mut s = 0.0;
        for k in 0..=n {
            let t = k as f64 * hstep;
            let w = if k == 0 || k == n {
                1.0
            } else if k % 2 == 1 {
                4.0
            } else {
                2.0
            };
            s += w * (-t * t).exp();
        }
        s * hstep / 3.0 * 2.0 / std::f64::consts::PI.sqrt()
    }
}
