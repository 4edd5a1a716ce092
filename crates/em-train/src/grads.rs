//! What the objective and the optimizer share: [`Gradients`] (the objective fills them, AdamW
//! reads them), [`TrainError`], the dtype both accumulate in, and the piecewise loops that keep
//! in-place updates' temporaries small. Below both; depends only on [`crate::accumulate`].

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

/// Errors of the objective and the optimizer; each names the sequence or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A sequence has no prompt token (the first response token would have no predicting logit).
    #[error("sequence {index}: empty prompt")]
    EmptyPrompt {
        /// 0-based index of the sequence.
        index: usize,
    },
    /// A sequence has no response token.
    #[error("sequence {index}: empty response")]
    EmptyResponse {
        /// 0-based index of the sequence.
        index: usize,
    },
    /// A token id is not in the model's vocabulary.
    #[error("sequence {index}: token id {token} is not below the vocabulary size {vocab}")]
    TokenOutOfRange {
        /// 0-based index of the sequence.
        index: usize,
        /// The offending id.
        token: u32,
        /// The model's vocabulary size.
        vocab: usize,
    },
    /// No sequences were given.
    #[error("no sequences")]
    NoSequences,
    /// Optimizer state that does not fit the model.
    #[error("{path}: {message}")]
    BadState {
        /// The state file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A tensor operation failed.
    #[error("{context}: {source}")]
    Candle {
        /// What was being done.
        context: String,
        /// candle's error.
        source: candle_core::Error,
    },
}

/// Adds `context` to a candle error.
pub(crate) fn ctx<T>(r: candle_core::Result<T>, context: &str) -> Result<T, TrainError> {
    r.map_err(|source| TrainError::Candle {
        context: context.to_string(),
        source,
    })
}

/// Gradients of every parameter, summed over micro-batches, in f32 (f64 for an f64 model).
#[derive(Debug, Clone)]
pub struct Gradients {
    params: Vec<(String, Var)>,
    grads: Vec<Option<Tensor>>,
    /// Whether `grads[i]` is storage of its own, which may be written in place (a gradient
    /// taken from a store can share storage with another parameter's).
    owned: Vec<bool>,
}

impl Gradients {
    /// Empty (all zero) gradients for `params`.
    pub fn new(params: Vec<(String, Var)>) -> Self {
        let grads = vec![None; params.len()];
        let owned = vec![false; params.len()];
        Self {
            params,
            grads,
            owned,
        }
    }

    /// Adds every parameter's gradient found in `store`.
    pub(crate) fn add(&mut self, store: &GradStore) -> candle_core::Result<()> {
        for i in 0..self.params.len() {
            if let Some(g) = store.get(self.params[i].1.as_tensor()) {
                self.add_at(i, g)?;
            }
        }
        Ok(())
    }

    fn add_at(&mut self, i: usize, g: &Tensor) -> candle_core::Result<()> {
        let g = g.to_dtype(accumulate_dtype(self.params[i].1.dtype()))?;
        let (sum, owned) = match self.grads[i].take() {
            Some(a) if self.owned[i] && a.is_contiguous() => {
                if crate::accumulate::add_in_place(&a, &g)? {
                    self.grads[i] = Some(a);
                    return Ok(());
                }
                let (acc, g) = (a.flatten_all()?, g.flatten_all()?);
                for (start, len) in pieces(acc.elem_count()) {
                    let piece = (acc.narrow(0, start, len)? + g.narrow(0, start, len)?)?;
                    acc.slice_set(&piece, 0, start)?;
                }
                (a, true)
            }
            Some(a) => ((a + g)?, true),
            None => (g, false),
        };
        self.grads[i] = Some(sum);
        self.owned[i] = owned;
        Ok(())
    }

    fn index_of(&self, var: &Tensor) -> candle_core::Result<usize> {
        let id = var.id();
        match self
            .params
            .iter()
            .position(|(_, v)| v.as_tensor().id() == id)
        {
            Some(i) => Ok(i),
            None => candle_core::bail!("not a parameter of this model"),
        }
    }

    /// Adds `g` to the gradient of the parameter whose tensor is `var`.
    pub(crate) fn add_to(&mut self, var: &Tensor, g: &Tensor) -> candle_core::Result<()> {
        let i = self.index_of(var)?;
        self.add_at(i, g)
    }

    /// Sinks for those of `weights` that are parameters on the fused path (CPU, f32/f64): each
    /// one's accumulator, created zero where no gradient has arrived yet, for the fused
    /// projections to add their gradients to in place (see [`crate::layers::GradientSinks`]).
    pub(crate) fn sinks<'a>(
        &mut self,
        weights: impl IntoIterator<Item = &'a Tensor>,
    ) -> candle_core::Result<crate::layers::GradientSinks> {
        let mut sinks = vec![];
        for w in weights {
            if !w.is_variable() || !crate::fused::fusable(w) {
                continue;
            }
            let i = self.index_of(w)?;
            let acc = match self.grads[i].take() {
                Some(g) if self.owned[i] && g.is_contiguous() && g.dtype() == w.dtype() => g,
                Some(g) => g.to_dtype(w.dtype())?.copy()?,
                None => w.zeros_like()?,
            };
            sinks.push((w.clone(), acc.clone()));
            self.grads[i] = Some(acc);
            self.owned[i] = true;
        }
        Ok(crate::layers::GradientSinks::new(sinks))
    }

    /// Adds `aᵀ·b` (`a` `[k, out]`, `b` `[k, in]`) to the gradient of `var` `[out, in]` in its
    /// own storage: the LM head's weight gradient over many row chunks costs one `[out, in]`.
    pub(crate) fn add_transposed_product(
        &mut self,
        var: &Tensor,
        a: &Tensor,
        b: &Tensor,
    ) -> candle_core::Result<()> {
        let i = self.index_of(var)?;
        let dtype = accumulate_dtype(var.dtype());
        let acc = match self.grads[i].take() {
            Some(g) if self.owned[i] && g.is_contiguous() => g,
            Some(g) => g.copy()?,
            None => var.zeros_like()?.to_dtype(dtype)?,
        };
        crate::accumulate::add_transposed_product(&acc, &a.to_dtype(dtype)?, &b.to_dtype(dtype)?)?;
        self.grads[i] = Some(acc);
        self.owned[i] = true;
        Ok(())
    }

    /// The parameters with their gradients (`None`: no gradient reached it, i.e. zero).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Var, Option<&Tensor>)> {
        self.params
            .iter()
            .zip(&self.grads)
            .map(|((n, v), g)| (n.as_str(), v, g.as_ref()))
    }

    /// The gradient of parameter `name`.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        let i = self.params.iter().position(|(n, _)| n == name)?;
        self.grads[i].as_ref()
    }

    /// The global L2 norm over all gradients (as `torch.nn.utils.clip_grad_norm_` computes it),
    /// summed on the gradients' device; one number comes back to the host.
    pub fn global_norm(&self) -> candle_core::Result<f64> {
        let mut sq: Option<Tensor> = None;
        for g in self.grads.iter().flatten() {
            if let Some(fused) = crate::fused::sum_of_squares(g)? {
                let s = Tensor::new(fused, g.device())?;
                sq = Some(match sq {
                    Some(acc) => (acc + s)?,
                    None => s,
                });
                continue;
            }
            let flat = g.flatten_all()?;
            for (start, len) in pieces(flat.elem_count()) {
                let s = flat
                    .narrow(0, start, len)?
                    .sqr()?
                    .sum_all()?
                    .to_dtype(DType::F64)?;
                sq = Some(match sq {
                    Some(acc) => (acc + s)?,
                    None => s,
                });
            }
        }
        Ok(sq.map_or(Ok(0.0), |s| s.to_scalar::<f64>())?.sqrt())
    }

    /// Multiplies every gradient by `factor`: in place, piece by piece, where the gradient's
    /// storage is its own.
    pub fn scale(&mut self, factor: f64) -> candle_core::Result<()> {
        for (g, owned) in self.grads.iter_mut().zip(&mut self.owned) {
            match g {
                Some(t) if *owned && crate::fused::scale_in_place(t, factor)? => {}
                Some(t) if *owned && t.is_contiguous() => {
                    let flat = t.flatten_all()?;
                    for (start, len) in pieces(flat.elem_count()) {
                        let piece = flat.narrow(0, start, len)?.affine(factor, 0.0)?;
                        flat.slice_set(&piece, 0, start)?;
                    }
                }
                Some(t) => {
                    *t = t.affine(factor, 0.0)?;
                    *owned = true;
                }
                None => {}
            }
        }
        Ok(())
    }

    /// Clips like `clip_grad_norm_(max_norm)`: scales by `min(1, max_norm / (norm + 1e-6))`;
    /// returns the norm before clipping.
    pub fn clip_norm(&mut self, max_norm: f64) -> candle_core::Result<f64> {
        let norm = self.global_norm()?;
        let coef = (max_norm / (norm + 1e-6)).min(1.0);
        self.scale(coef)?;
        Ok(norm)
    }

    /// Every gradient under its parameter's HF name (zeros where none arrived), for saving.
    pub fn named_tensors(&self) -> candle_core::Result<Vec<(String, Tensor)>> {
        self.params
            .iter()
            .zip(&self.grads)
            .map(|((n, v), g)| {
                let t = match g {
                    Some(g) => g.clone(),
                    None => v
                        .as_tensor()
                        .zeros_like()?
                        .to_dtype(accumulate_dtype(v.dtype()))?,
                };
                Ok((n.clone(), t))
            })
            .collect()
    }
}

/// The dtype gradients and optimizer moments are kept in for parameters of `dtype`.
pub fn accumulate_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Elements updated at once. AdamW runs in pieces of this size, written back in place, so that
/// its temporaries are a few MB rather than several copies of the largest tensor (the embedding:
/// 0.6 GB in f32 for a 151,936-token vocabulary at 1,024 wide, 2.2 GB at 3,584). The arithmetic
/// is elementwise, so the result does not depend on it.
pub(crate) const PIECE: usize = 1 << 20;

/// `(start, len)` of each piece of `n` elements.
pub(crate) fn pieces(n: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n).step_by(PIECE).map(move |s| (s, PIECE.min(n - s)))
}
