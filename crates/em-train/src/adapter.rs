//! What an adapter is, as data: its targets, rank and alpha ([`LoraConfig`]), where its factors
//! come from ([`AdapterSource`]) and PEFT's names for them. The lowest of the adapter modules:
//! [`crate::models`] builds adapted layers from these, and [`crate::lora`] (which works on whole
//! models) re-exports them, the public paths being `em_train::lora::…`.

use std::collections::HashMap;

use candle_core::{DType, Tensor};

/// A linear layer of the decoder an adapter can sit on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// `self_attn.q_proj`
    Q,
    /// `self_attn.k_proj`
    K,
    /// `self_attn.v_proj`
    V,
    /// `self_attn.o_proj`
    O,
    /// `mlp.gate_proj`
    Gate,
    /// `mlp.up_proj`
    Up,
    /// `mlp.down_proj`
    Down,
}

impl Target {
    /// Every target, in the order of `--targets`' default.
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];

    /// The HF module name (`q_proj`, …).
    pub fn module(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }

    /// `q`, `k`, `v`, `o`, `gate`, `up`, `down`, or the module names themselves.
    pub fn parse(s: &str) -> Result<Target, String> {
        let s = s.trim();
        Target::ALL
            .into_iter()
            .find(|t| t.module() == s || t.module().trim_end_matches("_proj") == s)
            .ok_or_else(|| {
                format!("unknown LoRA target {s:?} (expected q, k, v, o, gate, up or down)")
            })
    }
}

/// Rank, alpha and targets of an adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// `r`: the inner dimension of `B·A`.
    pub rank: usize,
    /// `lora_alpha`: the update is scaled by `alpha / rank`.
    pub alpha: f64,
    /// The linear layers adapted, in every decoder layer.
    pub targets: Vec<Target>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 8.0,
            targets: Target::ALL.to_vec(),
        }
    }
}

impl LoraConfig {
    /// `alpha / rank`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank.max(1) as f64
    }

    /// Whether the linear layer at `prefix` (`model.layers.3.mlp.up_proj`) is adapted.
    pub fn targets_module(&self, prefix: &str) -> bool {
        prefix.starts_with("model.layers.")
            && prefix
                .rsplit('.')
                .next()
                .is_some_and(|m| self.targets.iter().any(|t| t.module() == m))
    }

    /// The targets' module names, as PEFT's `target_modules`.
    pub fn target_modules(&self) -> Vec<String> {
        self.targets
            .iter()
            .map(|t| t.module().to_string())
            .collect()
    }
}

/// PEFT's names of the factors of the layer at `prefix`: `base_model.model.{prefix}.lora_A.weight`
/// and `….lora_B.weight`.
pub fn peft_names(prefix: &str) -> (String, String) {
    (
        format!("base_model.model.{prefix}.lora_A.weight"),
        format!("base_model.model.{prefix}.lora_B.weight"),
    )
}

/// The layer prefix of a PEFT factor name, and whether it is A.
pub fn parse_peft_name(name: &str) -> Option<(&str, bool)> {
    let rest = name.strip_prefix("base_model.model.")?;
    if let Some(p) = rest.strip_suffix(".lora_A.weight") {
        return Some((p, true));
    }
    rest.strip_suffix(".lora_B.weight").map(|p| (p, false))
}

/// The dtype adapter factors train in for a model in `dtype`: f32 under a bf16/f16 base (the
/// factors are small; their updates would vanish in bf16), the model's own otherwise.
pub fn factor_dtype(dtype: DType) -> DType {
    match dtype {
        DType::BF16 | DType::F16 => DType::F32,
        d => d,
    }
}

/// Where an adapter's factors come from.
#[derive(Debug)]
pub enum AdapterSource {
    /// A fresh adapter: A as PEFT initialises it from this seed (each layer's stream from the seed
    /// and the layer's name), B zero.
    Init {
        /// The seed.
        seed: u64,
    },
    /// Saved factors under their PEFT names (a checkpoint being resumed).
    Tensors {
        /// The factors.
        tensors: HashMap<String, Tensor>,
        /// Where they came from, for errors.
        origin: String,
    },
}

impl AdapterSource {
    /// Factors left over after every targeted layer took its own (a saved adapter for layers
    /// this configuration does not target).
    pub(crate) fn unused(&self) -> Vec<String> {
        match self {
            AdapterSource::Init { .. } => vec![],
            AdapterSource::Tensors { tensors, .. } => {
                let mut names: Vec<String> = tensors.keys().cloned().collect();
                names.sort();
                names
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_by_short_and_module_name() {
        assert_eq!(Target::parse("q").unwrap(), Target::Q);
        assert_eq!(Target::parse("down_proj").unwrap(), Target::Down);
        assert!(Target::parse("lm_head")
            .unwrap_err()
            .contains("unknown LoRA target"));
        let c = LoraConfig::default();
        assert!(c.targets_module("model.layers.0.self_attn.q_proj"));
        assert!(!c.targets_module("lm_head"));
        assert_eq!(
            parse_peft_name(&peft_names("model.layers.1.mlp.up_proj").1),
            Some(("model.layers.1.mlp.up_proj", false))
        );
    }
}
