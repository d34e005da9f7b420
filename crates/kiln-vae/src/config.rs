//! VAE configuration: presets, validation, serde (saved as a run's `config.toml`).

use serde::{Deserialize, Serialize};

/// Encoder/decoder family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Fully connected (the chapter's VAE): `hidden` are layer widths.
    Mlp,
    /// Convolutional: `hidden` are channel counts of stride-2 4x4 convolutions.
    Conv,
}

/// The decoder's likelihood p(x|z).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Likelihood {
    /// Bernoulli per pixel: binary cross-entropy summed over pixels (the chapter's).
    Bernoulli,
    /// Gaussian per pixel with mean sigmoid(decoder output): MSE-like. With
    /// `learned`, one log-variance is learned; otherwise `logvar` is fixed.
    Gaussian {
        /// Learn a global log-variance.
        learned: bool,
        /// The (initial) log-variance.
        logvar: f64,
    },
}

/// A VAE's architecture and objective.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaeConfig {
    /// Encoder/decoder family.
    pub arch: Arch,
    /// Image channels.
    pub channels: usize,
    /// Image side (square images).
    pub image_size: usize,
    /// Hidden widths (MLP) or channels (conv), encoder order; the decoder mirrors them.
    pub hidden: Vec<usize>,
    /// Latent dimension.
    pub latent: usize,
    /// Weight of the KL term (β-VAE; 1 is the plain ELBO).
    pub beta: f64,
    /// Decoder likelihood.
    pub likelihood: Likelihood,
    /// Condition encoder and decoder on a class label (one-hot) when set.
    pub num_classes: Option<usize>,
}

impl Default for VaeConfig {
    fn default() -> Self {
        Self::mlp_chapter()
    }
}

impl VaeConfig {
    /// The chapter's VAE exactly: 3072-512-128-32 MLP, Bernoulli likelihood.
    pub fn mlp_chapter() -> Self {
        Self {
            arch: Arch::Mlp,
            channels: 3,
            image_size: 32,
            hidden: vec![512, 128],
            latent: 32,
            beta: 1.0,
            likelihood: Likelihood::Bernoulli,
            num_classes: None,
        }
    }

    /// A small convolutional VAE for 32x32 RGB: 3-32-64 stride-2 convolutions,
    /// latent 32.
    pub fn conv() -> Self {
        Self {
            arch: Arch::Conv,
            hidden: vec![32, 64],
            ..Self::mlp_chapter()
        }
    }

    /// About how many bytes one training step holds at its peak per image
    /// of a batch, on top of the weights and optimizer state: every
    /// layer's saved output and the gradients in flight, and the per-pixel
    /// terms of the reconstruction loss (the Bernoulli likelihood's
    /// cross-entropy keeps more of them than the Gaussian's).
    ///
    /// Floats per pixel (18.5 Bernoulli, 11.5 Gaussian) and per encoder
    /// output (6 for an MLP's units, 12 for a conv layer's elements; the
    /// decoder mirrors them) were measured with a counting allocator on
    /// MLP and conv VAEs at 32x32 and 64x64; the estimate lies within 1.0
    /// to 1.15 times the measured peak (`tests/activation_memory.rs`
    /// checks three). Saturating.
    pub fn training_bytes_per_image(&self) -> u64 {
        let d = self.input_dim() as u64;
        let pixel_halves = match self.likelihood {
            Likelihood::Bernoulli => 37,
            Likelihood::Gaussian { .. } => 23,
        };
        let hidden_halves = match self.arch {
            Arch::Mlp => self
                .hidden
                .iter()
                .fold(0u64, |a, &h| a.saturating_add(h as u64))
                .saturating_mul(12),
            Arch::Conv => self
                .hidden
                .iter()
                .enumerate()
                .fold(0u64, |a, (i, &h)| {
                    let side = (self.image_size >> (i + 1)) as u64;
                    a.saturating_add((h as u64).saturating_mul(side * side))
                })
                .saturating_mul(24),
        };
        // Half-floats to bytes.
        d.saturating_mul(pixel_halves)
            .saturating_add(hidden_halves)
            .saturating_mul(2)
    }

    /// Values per image (`C*H*W`).
    pub fn input_dim(&self) -> usize {
        self.channels * self.image_size * self.image_size
    }

    /// Number of scalar parameters [`crate::Vae::new`] makes for this
    /// config, computed without making them (to size a model before it is
    /// built: the MLP's first and last layers grow with the image's pixels).
    pub fn num_params(&self) -> u64 {
        // Saturating: widths come from files, and a product that wrapped
        // would pass the memory check as a small model.
        let linear = |i: usize, o: usize| (i as u64).saturating_add(1).saturating_mul(o as u64);
        let conv = |i: usize, o: usize| {
            (i as u64)
                .saturating_mul(16)
                .saturating_add(1)
                .saturating_mul(o as u64)
        };
        let cond = self.num_classes.unwrap_or(0);
        let d = self.input_dim();
        let mut n = 0u64;
        let enc_out = match self.arch {
            Arch::Mlp => {
                let mut prev = d + cond;
                for &h in &self.hidden {
                    n = n.saturating_add(linear(prev, h));
                    prev = h;
                }
                let mut prev = self.latent + cond;
                for &h in self.hidden.iter().rev().chain([&d]) {
                    n = n.saturating_add(linear(prev, h));
                    prev = h;
                }
                self.hidden.last().copied().unwrap_or(d + cond)
            }
            Arch::Conv => {
                let mut prev = self.channels + cond;
                for &h in &self.hidden {
                    n = n.saturating_add(conv(prev, h));
                    prev = h;
                }
                let side = self.image_size >> self.hidden.len();
                let top = self.hidden.last().copied().unwrap_or(1);
                n = n.saturating_add(linear(self.latent + cond, top.saturating_mul(side * side)));
                let chans: Vec<usize> = self
                    .hidden
                    .iter()
                    .rev()
                    .copied()
                    .chain([self.channels])
                    .collect();
                n = chans
                    .windows(2)
                    .map(|w| conv(w[0], w[1]))
                    .fold(n, u64::saturating_add);
                prev.saturating_mul(side * side)
            }
        };
        n = n.saturating_add(linear(enc_out, self.latent).saturating_mul(2));
        if let Likelihood::Gaussian { learned: true, .. } = self.likelihood {
            n = n.saturating_add(1);
        }
        n
    }

    /// Checks every field, naming the bad one.
    pub fn validate(&self) -> Result<(), crate::VaeError> {
        let bad = |field: &str, msg: String| {
            Err(crate::VaeError::Config {
                field: field.into(),
                msg,
            })
        };
        if self.channels == 0 {
            return bad("channels", "must be at least 1".into());
        }
        if self.image_size == 0 {
            return bad("image_size", "must be at least 1".into());
        }
        if self.latent == 0 {
            return bad("latent", "must be at least 1".into());
        }
        if self.hidden.is_empty() || self.hidden.contains(&0) {
            return bad(
                "hidden",
                format!("needs at least one non-zero width, got {:?}", self.hidden),
            );
        }
        if !(self.beta.is_finite() && self.beta >= 0.0) {
            return bad(
                "beta",
                format!("must be finite and >= 0, got {}", self.beta),
            );
        }
        if let Likelihood::Gaussian { logvar, .. } = self.likelihood {
            if !logvar.is_finite() {
                return bad("likelihood.logvar", format!("must be finite, got {logvar}"));
            }
        }
        if self.num_classes == Some(0) {
            return bad("num_classes", "must be at least 1 when set".into());
        }
        if self.arch == Arch::Conv {
            // Each stride-2 4x4 convolution (padding 1) halves the side
            // exactly only when it is even, and the transposed ones double
            // it back: the side must be a multiple of 2^layers.
            let n = self.hidden.len();
            let f = 1usize.checked_shl(n as u32).filter(|f| *f <= 1 << 20);
            let ok = f.is_some_and(|f| self.image_size.is_multiple_of(f));
            if !ok {
                let accepted = match f {
                    Some(f) => format!("a multiple of {f} ({f}, {}, {}, ...)", 2 * f, 3 * f),
                    None => "fewer layers: no image side can be halved that often".into(),
                };
                return bad(
                    "image_size",
                    format!(
                        "a conv VAE with {n} stride-2 layers halves the side {n} times; \
                         expected {accepted}, found {}",
                        self.image_size
                    ),
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The count made without building matches the model's variables, for
    /// each architecture and option that adds parameters.
    #[test]
    fn num_params_counts_what_the_model_makes() {
        let mut configs = vec![VaeConfig::mlp_chapter(), VaeConfig::conv()];
        let mut c = VaeConfig::mlp_chapter();
        c.hidden = vec![40, 24];
        c.image_size = 12;
        c.num_classes = Some(5);
        c.likelihood = Likelihood::Gaussian {
            learned: true,
            logvar: 0.0,
        };
        configs.push(c);
        let mut c = VaeConfig::conv();
        c.hidden = vec![8, 16, 4];
        c.image_size = 16;
        c.channels = 1;
        c.num_classes = Some(3);
        configs.push(c);
        for c in configs {
            let vs = kiln_core::vars::VarStore::new(0);
            crate::Vae::new(
                &c,
                vs.builder(kiln_core::DType::F32, &kiln_core::Device::Cpu),
            )
            .unwrap();
            assert_eq!(c.num_params(), vs.num_params() as u64, "{c:?}");
        }
        // The chapter's MLP at 1024x1024: its first and last layers alone
        // hold 2 x 3,145,728 x 512 weights.
        let mut c = VaeConfig::mlp_chapter();
        c.image_size = 1024;
        assert!(c.num_params() > 2 * 3_145_728 * 512);
    }

    #[test]
    fn presets_validate_and_round_trip_through_toml() {
        for c in [VaeConfig::mlp_chapter(), VaeConfig::conv()] {
            c.validate().unwrap();
            let back: VaeConfig =
                serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
            assert_eq!(back, c);
        }
        let mut c = VaeConfig::conv();
        c.image_size = 30;
        assert!(c.validate().unwrap_err().to_string().contains("image_size"));
        let mut c = VaeConfig::mlp_chapter();
        c.beta = -1.0;
        assert!(c.validate().unwrap_err().to_string().contains("beta"));
        let e = serde_json::from_str::<VaeConfig>(r#"{"arch":"mlp","channels":3,"image_size":32,"hidden":[4],"latent":2,"beta":1,"likelihood":{"kind":"bernoulli"},"num_classes":null,"bogus":1}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus"), "{e}");
    }

    /// A conv VAE refuses sides its stride-2 layers cannot halve, naming the
    /// field, the value and the sides it takes; the MLP takes any side.
    #[test]
    fn conv_image_size_names_the_sides_it_takes() {
        for (side, hidden) in [
            (3, vec![8, 8]),
            (1, vec![8, 8]),
            (6, vec![8, 8]),
            (12, vec![8; 3]),
        ] {
            let c = VaeConfig {
                image_size: side,
                hidden: hidden.clone(),
                ..VaeConfig::conv()
            };
            let e = c.validate().unwrap_err().to_string();
            let f = 1 << hidden.len();
            assert!(
                e.contains("`image_size`")
                    && e.contains(&format!("found {side}"))
                    && e.contains(&format!("a multiple of {f} ({f}, {}", 2 * f)),
                "{e}"
            );
        }
        let c = VaeConfig {
            hidden: vec![1; 70],
            ..VaeConfig::conv()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("fewer layers"));
        for side in [4, 8, 12, 32] {
            VaeConfig {
                image_size: side,
                ..VaeConfig::conv()
            }
            .validate()
            .unwrap();
        }
        for side in [1, 2, 3, 5] {
            VaeConfig {
                image_size: side,
                ..VaeConfig::mlp_chapter()
            }
            .validate()
            .unwrap();
        }
    }
}
