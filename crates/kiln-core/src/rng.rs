//! A seeded random generator that kiln owns.
//!
//! candle's CPU backend cannot be seeded (`Device::set_seed` fails on CPU) and its
//! `Tensor::rand`/`randn`, `candle_nn::Init` and dropout draw from a thread RNG, so
//! nothing built on them is reproducible. Every random draw in kiln — weight
//! initialisation, data order, augmentation, masks, dropout, sampling — goes
//! through [`SeededRng`] instead. Its full state (seed, stream, position) can be
//! saved in a checkpoint and restored bit-exactly.

use candle_core::{Device, Result, Shape, Tensor};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

/// The complete, serialisable state of a [`SeededRng`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// The 256-bit ChaCha key.
    pub key: [u8; 32],
    /// The ChaCha stream id.
    pub stream: u64,
    /// Position in the stream, in 32-bit words.
    pub word_pos: u128,
}

impl RngState {
    /// Encodes the state as a short hex string (for checkpoint metadata).
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64 + 16 + 32 + 2);
        for b in self.key {
            s.push_str(&format!("{b:02x}"));
        }
        s.push(':');
        s.push_str(&format!("{:016x}", self.stream));
        s.push(':');
        s.push_str(&format!("{:032x}", self.word_pos));
        s
    }

    /// Parses a string written by [`RngState::to_hex`].
    pub fn from_hex(s: &str) -> std::result::Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 3 || parts[0].len() != 64 {
            return Err(format!(
                "rng state {s:?}: expected `<64 hex key>:<16 hex stream>:<32 hex position>`"
            ));
        }
        let mut key = [0u8; 32];
        for (i, b) in key.iter_mut().enumerate() {
            *b = u8::from_str_radix(&parts[0][2 * i..2 * i + 2], 16)
                .map_err(|e| format!("rng state key: {e}"))?;
        }
        let stream =
            u64::from_str_radix(parts[1], 16).map_err(|e| format!("rng state stream: {e}"))?;
        let word_pos =
            u128::from_str_radix(parts[2], 16).map_err(|e| format!("rng state position: {e}"))?;
        Ok(Self {
            key,
            stream,
            word_pos,
        })
    }
}

/// SplitMix64 finaliser: a cheap, well-mixed hash used to derive child seeds.
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A reproducible random generator (ChaCha8) with tensor helpers.
///
/// Draws are sequential, so results do not depend on the number of threads.
/// For parallel work, give each item its own generator with [`SeededRng::derive`].
///
/// ```
/// use kiln_core::rng::SeededRng;
/// use kiln_core::Device;
/// let mut a = SeededRng::new(7);
/// let mut b = SeededRng::new(7);
/// let x = a.normal(&[2, 3], 0.0, 1.0, &Device::Cpu).unwrap();
/// let y = b.normal(&[2, 3], 0.0, 1.0, &Device::Cpu).unwrap();
/// assert_eq!(x.to_vec2::<f32>().unwrap(), y.to_vec2::<f32>().unwrap());
/// ```
#[derive(Debug, Clone)]
pub struct SeededRng {
    inner: ChaCha8Rng,
}

impl SeededRng {
    /// A generator seeded from a single `u64`.
    pub fn new(seed: u64) -> Self {
        Self {
            inner: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// A generator for one item of parallel work, derived from a base seed and a
    /// path of keys (e.g. `[epoch, sample_index]`), independent of any other
    /// generator's position. The same inputs always give the same stream.
    pub fn derive(seed: u64, keys: &[u64]) -> Self {
        let mut h = splitmix64(seed);
        for &k in keys {
            h = splitmix64(h ^ splitmix64(k));
        }
        Self::new(h)
    }

    /// Draws a fresh, independent child generator (advances `self`).
    pub fn fork(&mut self) -> Self {
        Self::new(self.inner.next_u64())
    }

    /// The generator's full state, for checkpoints.
    pub fn state(&self) -> RngState {
        RngState {
            key: self.inner.get_seed(),
            stream: self.inner.get_stream(),
            word_pos: self.inner.get_word_pos(),
        }
    }

    /// Restores a generator from [`SeededRng::state`].
    pub fn from_state(state: &RngState) -> Self {
        let mut inner = ChaCha8Rng::from_seed(state.key);
        inner.set_stream(state.stream);
        inner.set_word_pos(state.word_pos);
        Self { inner }
    }

    /// A uniform `f32` in `[lo, hi)`.
    pub fn uniform_f32(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.inner.random::<f32>()
    }

    /// A standard-normal `f32`.
    pub fn normal_f32(&mut self) -> f32 {
        StandardNormal.sample(&mut self.inner)
    }

    /// A uniform integer in `[0, n)`. `n` must be positive.
    pub fn below(&mut self, n: usize) -> usize {
        self.inner.random_range(0..n)
    }

    /// `true` with probability `p`.
    pub fn bernoulli(&mut self, p: f64) -> bool {
        self.inner.random_bool(p.clamp(0.0, 1.0))
    }

    /// `n` values uniform in `[lo, hi)`.
    pub fn uniform_vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform_f32(lo, hi)).collect()
    }

    /// `n` values from N(mean, std²).
    pub fn normal_vec(&mut self, n: usize, mean: f32, std: f32) -> Vec<f32> {
        (0..n).map(|_| mean + std * self.normal_f32()).collect()
    }

    /// A random permutation of `0..n` (Fisher–Yates).
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        self.shuffle(&mut p);
        p
    }

    /// Shuffles a slice in place (Fisher–Yates).
    pub fn shuffle<T>(&mut self, xs: &mut [T]) {
        for i in (1..xs.len()).rev() {
            let j = self.inner.random_range(0..=i);
            xs.swap(i, j);
        }
    }

    /// An f32 tensor of uniform values in `[lo, hi)`.
    pub fn uniform<S: Into<Shape>>(
        &mut self,
        shape: S,
        lo: f32,
        hi: f32,
        device: &Device,
    ) -> Result<Tensor> {
        let shape = shape.into();
        let v = self.uniform_vec(shape.elem_count(), lo, hi);
        Tensor::from_vec(v, shape, device)
    }

    /// An f32 tensor of N(mean, std²) values.
    pub fn normal<S: Into<Shape>>(
        &mut self,
        shape: S,
        mean: f32,
        std: f32,
        device: &Device,
    ) -> Result<Tensor> {
        let shape = shape.into();
        let v = self.normal_vec(shape.elem_count(), mean, std);
        Tensor::from_vec(v, shape, device)
    }

    /// An f32 tensor of normals shaped like `t`, on `t`'s device (`torch.randn_like`).
    pub fn normal_like(&mut self, t: &Tensor) -> Result<Tensor> {
        self.normal(t.shape().clone(), 0.0, 1.0, t.device())
    }

    /// An f32 keep-mask: 1.0 with probability `p_keep`, else 0.0.
    pub fn bernoulli_mask<S: Into<Shape>>(
        &mut self,
        shape: S,
        p_keep: f64,
        device: &Device,
    ) -> Result<Tensor> {
        self.bernoulli_mask_scaled(shape, p_keep, 1.0, device)
    }

    /// An f32 mask: `value` with probability `p_keep`, else 0.0 (inverted
    /// dropout's mask with its `1/p_keep` scale built in). Draws the same
    /// sequence as [`Self::bernoulli_mask`].
    pub fn bernoulli_mask_scaled<S: Into<Shape>>(
        &mut self,
        shape: S,
        p_keep: f64,
        value: f32,
        device: &Device,
    ) -> Result<Tensor> {
        let shape = shape.into();
        let v: Vec<f32> = (0..shape.elem_count())
            .map(|_| if self.bernoulli(p_keep) { value } else { 0.0 })
            .collect();
        Tensor::from_vec(v, shape, device)
    }
}

impl RngCore for SeededRng {
    fn next_u32(&mut self) -> u32 {
        self.inner.next_u32()
    }
    fn next_u64(&mut self) -> u64 {
        self.inner.next_u64()
    }
    fn fill_bytes(&mut self, dst: &mut [u8]) {
        self.inner.fill_bytes(dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_draws_and_state_round_trips() {
        let mut a = SeededRng::new(42);
        let _ = a.uniform_vec(17, 0.0, 1.0);
        let st = a.state();
        let hex = st.to_hex();
        let back = RngState::from_hex(&hex).unwrap();
        assert_eq!(st, back);
        let mut b = SeededRng::from_state(&back);
        assert_eq!(a.normal_vec(33, 0.0, 1.0), b.normal_vec(33, 0.0, 1.0));
        assert_eq!(a.permutation(50), b.permutation(50));
    }

    #[test]
    fn different_seeds_differ_and_derive_is_stable() {
        let mut a = SeededRng::new(1);
        let mut b = SeededRng::new(2);
        assert_ne!(a.uniform_vec(8, 0.0, 1.0), b.uniform_vec(8, 0.0, 1.0));
        let mut c = SeededRng::derive(5, &[1, 2]);
        let mut d = SeededRng::derive(5, &[1, 2]);
        let mut e = SeededRng::derive(5, &[2, 1]);
        let (x, y, z) = (c.next_u64(), d.next_u64(), e.next_u64());
        assert_eq!(x, y);
        assert_ne!(x, z);
    }

    #[test]
    fn distributions_have_the_right_moments() {
        let mut r = SeededRng::new(3);
        let v = r.normal_vec(200_000, 1.0, 2.0);
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / v.len() as f32;
        assert!((mean - 1.0).abs() < 0.02, "mean {mean}");
        assert!((var - 4.0).abs() < 0.06, "var {var}");
        let u = r.uniform_vec(100_000, -1.0, 3.0);
        assert!(u.iter().all(|&x| (-1.0..3.0).contains(&x)));
        let um = u.iter().sum::<f32>() / u.len() as f32;
        assert!((um - 1.0).abs() < 0.02, "uniform mean {um}");
        let mut p = r.permutation(100);
        p.sort_unstable();
        assert_eq!(p, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn bad_hex_state_is_rejected() {
        assert!(RngState::from_hex("zz").is_err());
        assert!(RngState::from_hex(&format!("{}:xyz:0", "0".repeat(64))).is_err());
    }
}
