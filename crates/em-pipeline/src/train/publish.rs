//! The seam between training and sampling: the weights being trained, published as the model file
//! the sampler loads next — the sampling GGUF refreshed in place, or under an adapter llama.cpp's
//! LoRA GGUF of the current factors next to a base written once.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use candle_core::{Tensor, Var};
use em_convert::refresh::{GgufRefresh, RefreshStats};
use em_train::lora::LoraConfig;
use em_train::models::{CausalLm, ModelConfig};

use super::options::RefreshType;
use super::store::ADAPTER_GGUF;
use crate::{AdaptedBackend, Backend, Result};

/// Where the loop publishes the weights it trains, for the sampler to draw the next responses
/// from.
pub trait Publish {
    /// Makes `weights` (values by HF name) what [`Publish::model_path`] holds; returns what was
    /// written.
    fn publish(&mut self, weights: &mut dyn FnMut(&str) -> Result<Tensor>) -> Result<RefreshStats>;
    /// The model file a sampler loads.
    fn model_path(&self) -> &Path;
}

impl Publish for GgufRefresh {
    fn publish(&mut self, weights: &mut dyn FnMut(&str) -> Result<Tensor>) -> Result<RefreshStats> {
        GgufRefresh::publish(self, weights)
    }
    fn model_path(&self) -> &Path {
        self.path()
    }
}

/// Publishes an adapter: llama.cpp's LoRA GGUF of the current factors, rewritten whole (it is
/// small) next to a base GGUF written once.
pub struct AdapterRefresh {
    lora: LoraConfig,
    config: ModelConfig,
    names: Vec<String>,
    path: PathBuf,
}

impl AdapterRefresh {
    /// Publishes `model`'s adapter factors (its parameters) to the LoRA GGUF at `path`.
    pub fn new(model: &CausalLm, path: &Path) -> Result<Self> {
        let lora = model
            .adapter()
            .context("an adapter refresh needs a model under an adapter")?;
        Ok(Self {
            lora: lora.clone(),
            config: model.config().clone(),
            names: model.parameters().into_iter().map(|(n, _)| n).collect(),
            path: path.to_path_buf(),
        })
    }
}

impl Publish for AdapterRefresh {
    fn publish(&mut self, weights: &mut dyn FnMut(&str) -> Result<Tensor>) -> Result<RefreshStats> {
        let t0 = Instant::now();
        let factors = self
            .names
            .iter()
            .map(|n| Ok((n.clone(), weights(n)?)))
            .collect::<Result<Vec<_>>>()?;
        let adapter = em_train::lora::peft_adapter(&self.lora, &factors, None)?;
        let bytes = em_convert::lora::write_lora_gguf(
            &adapter,
            &self.config,
            &self.path,
            em_convert::lora::LoraGgufType::F32,
        )?;
        Ok(RefreshStats {
            bytes,
            tensors: factors.len(),
            seconds: t0.elapsed().as_secs_f64(),
        })
    }

    fn model_path(&self) -> &Path {
        &self.path
    }
}

/// A run's publisher and what samples what it publishes: the backend itself, or under an adapter
/// the backend with the adapter applied to the base GGUF.
pub struct Publisher<'b> {
    publish: Box<dyn Publish>,
    backend: &'b dyn Backend,
    adapted: Option<AdaptedBackend<'b>>,
}

impl<'b> Publisher<'b> {
    /// Publishes `model` (the trained weights, or a model under an adapter) from the HF directory
    /// `source` into the scratch directory `work`; under an adapter, on the base GGUF `base`
    /// (`source` converted at `refresh_type`), else one written into `work` once.
    pub fn new(
        backend: &'b dyn Backend,
        source: &Path,
        model: &CausalLm,
        refresh_type: RefreshType,
        work: &Path,
        base: Option<&Path>,
    ) -> Result<Self> {
        std::fs::create_dir_all(work)
            .with_context(|| format!("{}: cannot create", work.display()))?;
        let out_type = refresh_type.out_type();
        if model.adapter().is_none() {
            let shapes: Vec<(String, Vec<usize>)> = model
                .parameters()
                .iter()
                .map(|(n, v)| (n.clone(), v.dims().to_vec()))
                .collect();
            let refresh = GgufRefresh::new(source, &shapes, out_type, &work.join("model.gguf"))?;
            return Ok(Self {
                publish: Box::new(refresh),
                backend,
                adapted: None,
            });
        }
        // The base is written once; only the adapter changes between updates.
        let base = match base {
            Some(base) => base.to_path_buf(),
            None => {
                let base = work.join(format!(
                    "base.{}.gguf",
                    format!("{out_type:?}").to_lowercase()
                ));
                if !base.is_file() {
                    em_convert::hf_to_gguf(source, &base, out_type)?;
                }
                base
            }
        };
        Ok(Self {
            publish: Box::new(AdapterRefresh::new(model, &work.join(ADAPTER_GGUF))?),
            backend,
            adapted: Some(AdaptedBackend::new(backend, &base)?),
        })
    }

    /// Publishes the current values of `params`.
    pub fn publish(&mut self, params: &[(String, Var)]) -> Result<RefreshStats> {
        let by_name: HashMap<&str, &Var> = params.iter().map(|(n, v)| (n.as_str(), v)).collect();
        self.publish.publish(&mut |name| {
            Ok(by_name
                .get(name)
                .with_context(|| format!("no parameter {name}"))?
                .as_tensor()
                .clone())
        })
    }

    /// The model file the last publish wrote.
    pub fn model_path(&self) -> &Path {
        self.publish.model_path()
    }

    /// What samples the published weights.
    pub fn sampler(&self) -> &dyn Backend {
        match &self.adapted {
            Some(a) => a,
            None => self.backend,
        }
    }
}
