//! AdamW and the learning-rate schedule, written out.
//!
//! Burn's own AdamW keys its state by `ParamId` and decays every parameter. Kiln keys the
//! moments by the parameter's Hugging Face name (so a checkpoint restores them to the right
//! tensors in any process), decays matrices only (never norms or biases), and clips on the
//! global gradient norm rather than per tensor.
//!
//! The update is written once, [`AdamWScalars::update`], for one element:
//!
//! ```text
//! g' = g · scale                      (scale: the clip factor, clip_scale)
//! m' = β1·m + (1 − β1)·g'             v' = β2·v + (1 − β2)·g'²
//! p' = p − shrink·p − lr · (m'·k1) / (√(v'·k2) + ε)     k1, k2: bias corrections, shrink = lr·decay
//! ```
//!
//! The CPU kernels' engine runs it over flat buffers; Burn's graph runs the same formula as
//! tensor ops ([`AdamW::step`]), or, on the GPU backends, as one CubeCL kernel per parameter
//! (`optim_cube.rs`), which a test checks against this function.

use std::collections::HashMap;

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, ElementConversion, Tensor, TensorData};
use kiln_models::checkpoint::HostTensor;
use kiln_models::params::{map_named, MapNamed};
use kiln_models::vocab_pad::VocabPad;
use kiln_recipes::OptimSection;

/// Linear warmup from 0 to `lr`, then cosine decay to `min_lr` at `total` steps.
/// `step` counts from 1 (the first optimizer step).
pub fn learning_rate(o: &OptimSection, step: usize, total: usize) -> f64 {
    if o.warmup_steps > 0 && step <= o.warmup_steps {
        return o.lr * step as f64 / o.warmup_steps as f64;
    }
    let decay = total.saturating_sub(o.warmup_steps).max(1);
    let progress = ((step - o.warmup_steps.min(step)) as f64 / decay as f64).min(1.0);
    o.min_lr + 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()) * (o.lr - o.min_lr)
}

/// The factor that clips a gradient of global norm `norm` to `clip` (1 when `clip` is 0 or the
/// norm is within it).
pub fn clip_scale(norm: f64, clip: f64) -> f64 {
    if clip > 0.0 && norm > clip {
        clip / (norm + 1e-6)
    } else {
        1.0
    }
}

/// The scalars of one AdamW update: learning rate, `lr · weight_decay` (0 for vectors), the
/// betas, the bias corrections `1 / (1 − βᵗ)` and epsilon.
#[derive(Clone, Copy, Debug)]
pub struct AdamWScalars {
    pub lr: f32,
    pub shrink: f32,
    pub b1: f32,
    pub b2: f32,
    pub k1: f32,
    pub k2: f32,
    pub eps: f32,
}

impl AdamWScalars {
    /// Step `t` (counted from 1) at learning rate `lr`, for a parameter of rank `rank` (matrices
    /// are decayed, vectors not).
    pub fn new(c: &OptimSection, t: u64, lr: f64, rank: usize) -> Self {
        let t = t as i32;
        let decay = if rank >= 2 { c.weight_decay } else { 0.0 };
        Self {
            lr: lr as f32,
            shrink: (lr * decay) as f32,
            b1: c.beta1 as f32,
            b2: c.beta2 as f32,
            k1: (1.0 / (1.0 - c.beta1.powi(t))) as f32,
            k2: (1.0 / (1.0 - c.beta2.powi(t))) as f32,
            eps: c.eps as f32,
        }
    }

    /// The update of one element with gradient `g` and clip factor `scale`.
    #[inline(always)]
    pub fn update(&self, p: &mut f32, g: f32, m: &mut f32, v: &mut f32, scale: f32) {
        let g = g * scale;
        *m = *m * self.b1 + g * (1.0 - self.b1);
        *v = *v * self.b2 + g * g * (1.0 - self.b2);
        let update = (*m * self.k1) / ((*v * self.k2).sqrt() + self.eps);
        *p = *p - *p * self.shrink - update * self.lr;
    }
}

/// The moments of one parameter, flattened.
pub struct Moments<B: Backend> {
    pub m: Tensor<B, 1>,
    pub v: Tensor<B, 1>,
}

/// AdamW's configuration, step count, and (on Burn's graph) moments by parameter name. The CPU
/// kernels' engine takes the moments into its flat buffers on its first step.
pub struct AdamW<B: Backend> {
    pub cfg: OptimSection,
    /// Optimizer steps taken (for bias correction).
    pub t: u64,
    /// Moments as Burn tensors, by parameter name.
    pub state: HashMap<String, Moments<B>>,
    /// A padded vocabulary (`kiln_models::vocab_pad`): the embedding's and head's moments are
    /// held padded, and saved at the true size.
    pub pad: Option<VocabPad>,
}

/// Sums the squares of every gradient, on the device; or, with `collected` (for a backend's
/// one-op sum), only collects the gradients.
struct SquaredNorm<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    acc: Option<Tensor<B::InnerBackend, 1>>,
    collected: Option<Vec<FloatTensor<B::InnerBackend>>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for SquaredNorm<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
            if let Some(all) = &mut self.collected {
                all.push(g.into_primitive().tensor());
                return;
            }
            let s = g.square().sum(); // [1]
            self.acc = Some(match self.acc.take() {
                Some(a) => a + s,
                None => s,
            });
        }
    }
}

/// The global L2 norm of all gradients, as a device tensor `[1]` (no host read: on a GPU the
/// clip and the update are queued behind the backward pass instead of waiting for it).
/// `fused`: sum the squares through the backend's one op ([`SquaredNormFn`]) where it has one.
pub fn global_grad_norm<B: AutodiffBackend, M: AutodiffModule<B>>(model: &M, grads: &GradientsParams, fused: bool) -> Option<Tensor<B::InnerBackend, 1>> {
    let f = if fused { kiln_models::registry::registered::<SquaredNormFn<B::InnerBackend>>() } else { None };
    let mut v = SquaredNorm::<B> { grads, acc: None, collected: f.map(|_| Vec::new()) };
    model.visit(&mut v);
    match (f, v.collected) {
        (Some(f), Some(all)) if !all.is_empty() => Some(f(all).sqrt()),
        _ => v.acc.map(|a| a.sqrt()),
    }
}

/// A backend's AdamW update of one parameter as one op: `(p, g, m, v, clip scale [1])` ->
/// `(p', m', v')`, all f32 and `[N]` but the scale. Registered per backend (`register`).
pub type AdamWFn<B> = fn(Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>, AdamWScalars) -> [Tensor<B, 1>; 3];

/// A backend's sum of the squares of all gradients (any shapes) as one op: `[1]`.
pub type SquaredNormFn<B> = fn(Vec<FloatTensor<B>>) -> Tensor<B, 1>;

/// The update registered for backend `B`, if any.
pub fn registered<B: Backend>() -> Option<AdamWFn<B>> {
    kiln_models::registry::registered::<AdamWFn<B>>()
}

/// One AdamW step over Burn's parameters, by name.
struct Step<'a, B: AutodiffBackend> {
    opt: &'a mut AdamW<B::InnerBackend>,
    grads: &'a mut GradientsParams,
    lr: f64,
    /// The clip factor, `[1]` on the device (`None`: no clipping; the one-kernel update then sets
    /// it to 1 on first use).
    scale: Option<Tensor<B::InnerBackend, 1>>,
    /// The backend's one-kernel update, where one is registered (optim_cube.rs).
    fused: Option<AdamWFn<B::InnerBackend>>,
}

impl<B: AutodiffBackend> MapNamed<B> for Step<'_, B> {
    fn map<const D: usize>(&mut self, name: &str, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) else {
            return param;
        };
        let s = AdamWScalars::new(&self.opt.cfg, self.opt.t, self.lr, D);
        let shape = g.shape();
        let n = shape.num_elements();
        let device = g.device();
        let st = self.opt.state.remove(name).unwrap_or_else(|| Moments {
            m: Tensor::zeros([n], &device),
            v: Tensor::zeros([n], &device),
        });
        let (id, tensor, mapper) = param.consume();
        let p = tensor.inner(); // [..]
        let f32s = [p.dtype(), g.dtype(), st.m.dtype(), st.v.dtype()].iter().all(|d| *d == DType::F32);
        let (p, m, v) = match self.fused.filter(|_| f32s) {
            // One kernel (optim_cube.rs).
            Some(update) => {
                // Without clipping, a factor of 1 (made once a step, kept in `scale`).
                let scale = self.scale.get_or_insert_with(|| Tensor::ones([1], &device)).clone(); // [1]
                let [p, m, v] = update(p.reshape([n]), g.reshape([n]), st.m, st.v, scale, s);
                (p.reshape(shape), m, v)
            }
            // The same formula as tensor ops.
            None => {
                let g = match &self.scale {
                    Some(c) => g.reshape([n]) * c.clone(), // [N] * [1]
                    None => g.reshape([n]),                // [N]
                };
                let m = st.m * s.b1 + g.clone() * (1.0 - s.b1);
                let v = st.v * s.b2 + g.square() * (1.0 - s.b2);
                let update = (m.clone() * s.k1) / ((v.clone() * s.k2).sqrt() + s.eps); // [N]
                let p = if s.shrink > 0.0 { p.clone() - p * s.shrink } else { p };
                (p - update.reshape(shape) * s.lr, m, v)
            }
        };
        self.opt.state.insert(name.to_string(), Moments { m, v });
        Param::from_mapped_value(id, Tensor::from_inner(p).require_grad(), mapper)
    }
}

impl<B: Backend> AdamW<B> {
    pub fn new(cfg: OptimSection) -> Self {
        Self { cfg, t: 0, state: HashMap::new(), pad: None }
    }

    /// Clips `grads` to the global norm `cfg.grad_clip` (when positive) and takes one step.
    /// Returns the gradient norm before clipping.
    ///
    /// The norm and the clip factor stay on the device and the norm is read once every update is
    /// queued, so a GPU never idles between the backward pass and the update. With `KILN_STEP_SYNC=1`
    /// the norm is read first instead (the host clock then splits a step into its phases).
    pub fn step<A, M>(&mut self, model: M, mut grads: GradientsParams, lr: f64) -> (M, f64)
    where
        A: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<A>,
    {
        let Some(norm) = global_grad_norm::<A, M>(&model, &grads, self.cfg.fused) else {
            return (model, 0.0);
        };
        let read = |t: Tensor<B, 1>| t.into_scalar().elem::<f64>();
        let early = crate::perf::step_sync().then(|| read(norm.clone()));
        let clip = self.cfg.grad_clip;
        // clip_scale on the device: clip / (norm + 1e-6) where norm > clip, else 1.
        let scale = (clip > 0.0).then(|| {
            let s = (norm.clone() + 1e-6).recip() * clip;
            s.mask_fill(norm.clone().lower_equal_elem(clip), 1.0)
        });
        self.t += 1;
        let fused = if self.cfg.fused { registered::<B>() } else { None };
        let mut s = Step::<A> { opt: self, grads: &mut grads, lr, scale, fused };
        let model = map_named(model, &mut s);
        (model, early.unwrap_or_else(|| read(norm)))
    }

    /// Holds the moments of a model whose vocabulary is padded as `pad`: the embedding's and
    /// head's, restored at their true size, are padded with zeros (what a padded row or column's
    /// moments always are), and [`AdamW::to_host`] saves them at the true size again.
    pub fn pad_vocab(&mut self, pad: Option<VocabPad>, device: &B::Device) {
        self.pad = pad;
        let Some(p) = pad else { return };
        for (name, s) in self.state.iter_mut().filter(|(n, _)| VocabPad::pads(n)) {
            for t in [&mut s.m, &mut s.v] {
                let v = p.pad_flat(name, t.to_data().convert::<f32>().to_vec().unwrap_or_default());
                let len = v.len();
                *t = Tensor::from_data(TensorData::new(v, [len]), device);
            }
        }
    }

    /// The moments as host tensors, `<name>.exp_avg` and `<name>.exp_avg_sq`, sorted by name
    /// (a padded vocabulary's at the true size).
    pub fn to_host(&self) -> Vec<HostTensor> {
        let mut names: Vec<&String> = self.state.keys().collect();
        names.sort();
        let mut out = Vec::new();
        for n in names {
            let s = &self.state[n];
            for (suffix, t) in [("exp_avg", &s.m), ("exp_avg_sq", &s.v)] {
                let v: Vec<f32> = t.to_data().convert::<f32>().to_vec().unwrap_or_default();
                let v = match self.pad {
                    Some(p) => p.unpad_flat(n, v),
                    None => v,
                };
                out.push((format!("{n}.{suffix}"), vec![v.len()], v));
            }
        }
        out
    }

    /// Takes one parameter's moments out as host vectors (for the CPU kernels' flat buffers).
    pub fn take_host(&mut self, name: &str) -> Option<(Vec<f32>, Vec<f32>)> {
        let st = self.state.remove(name)?;
        let host = |t: &Tensor<B, 1>| t.to_data().convert::<f32>().to_vec::<f32>().unwrap_or_default();
        Some((host(&st.m), host(&st.v)))
    }

    /// Restores moments saved by [`AdamW::to_host`], checked against the model's parameters
    /// (`expected`: name -> element count): every moment must belong to a parameter of the same
    /// size, and every parameter must have both moments.
    pub fn load_host(
        &mut self,
        mut tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
        expected: &HashMap<String, usize>,
        device: &B::Device,
    ) -> anyhow::Result<()> {
        let names: Vec<String> = tensors.keys().filter_map(|k| k.strip_suffix(".exp_avg").map(str::to_string)).collect();
        for n in names {
            let (_, m) = tensors.remove(&format!("{n}.exp_avg")).unwrap_or_default();
            let (_, v) = tensors
                .remove(&format!("{n}.exp_avg_sq"))
                .ok_or_else(|| anyhow::anyhow!("optimizer state: '{n}.exp_avg_sq' missing"))?;
            if m.len() != v.len() {
                anyhow::bail!("optimizer state for '{n}': moments of different sizes");
            }
            let len = m.len();
            match expected.get(&n) {
                None => anyhow::bail!("optimizer state for '{n}', which is not a parameter of this model"),
                Some(&e) if e != len => anyhow::bail!("optimizer state for '{n}' has {len} values; the parameter has {e}"),
                _ => {}
            }
            self.state.insert(
                n,
                Moments {
                    m: Tensor::from_data(TensorData::new(m, [len]), device),
                    v: Tensor::from_data(TensorData::new(v, [len]), device),
                },
            );
        }
        if let Some(k) = tensors.keys().next() {
            anyhow::bail!("optimizer state: unexpected tensor '{k}'");
        }
        if let Some(missing) = expected.keys().find(|k| !self.state.contains_key(*k)) {
            anyhow::bail!("optimizer state: no moments for parameter '{missing}'");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_min() {
        let o = OptimSection { lr: 1.0, min_lr: 0.1, warmup_steps: 10, ..Default::default() };
        assert!((learning_rate(&o, 1, 100) - 0.1).abs() < 1e-12);
        assert!((learning_rate(&o, 10, 100) - 1.0).abs() < 1e-12);
        assert!((learning_rate(&o, 55, 100) - 0.55).abs() < 1e-12);
        assert!((learning_rate(&o, 100, 100) - 0.1).abs() < 1e-12);
        assert!((learning_rate(&o, 150, 100) - 0.1).abs() < 1e-12);
        let no_warm = OptimSection { warmup_steps: 0, ..o };
        assert!((learning_rate(&no_warm, 0, 100) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn update_follows_the_formula() {
        // First step, no decay, clip factor 0.5: m = 0.1·g', v = 0.01·g'², bias-corrected back to
        // g' and g'², so the step is lr · g' / (|g'| + eps) = lr (sign of g).
        let c = OptimSection { beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.5, ..Default::default() };
        let s = AdamWScalars::new(&c, 1, 0.01, 1);
        assert_eq!(s.shrink, 0.0, "vectors are not decayed");
        let (mut p, mut m, mut v) = (1.0f32, 0.0f32, 0.0f32);
        s.update(&mut p, 4.0, &mut m, &mut v, 0.5);
        assert!((m - 0.2).abs() < 1e-6 && (v - 0.04).abs() < 1e-6, "{m} {v}");
        assert!((p - 0.99).abs() < 1e-6, "{p}");
        let decayed = AdamWScalars::new(&c, 1, 0.01, 2);
        assert!((decayed.shrink - 0.005).abs() < 1e-9);
        assert_eq!(clip_scale(2.0, 1.0), 1.0 / (2.0 + 1e-6));
        assert_eq!(clip_scale(0.5, 1.0), 1.0);
        assert_eq!(clip_scale(5.0, 0.0), 1.0);
    }
}
