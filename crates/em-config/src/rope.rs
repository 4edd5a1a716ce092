//! Rotary embedding parameters from either layout: transformers 4.x's top-level base plus
//! `rope_scaling`, or transformers 5's `rope_parameters` object.

use std::path::Path;

use serde_json::Value;

use crate::{ConfigError, ConfigSource};

/// How rotary frequencies are rescaled for long contexts (HF `rope_type`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// `rope_type: "linear"`: every frequency divided by `factor`.
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// `rope_type: "llama3"`: low frequencies divided by `factor`, high ones kept, smooth between.
    Llama3 {
        /// The divisor for low frequencies.
        factor: f64,
        /// Wavelengths above `original_max_position_embeddings / low_freq_factor` are scaled.
        low_freq_factor: f64,
        /// Wavelengths below `original_max_position_embeddings / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The context length of pre-training.
        original_max_position_embeddings: usize,
    },
}

impl RopeScaling {
    /// The HF `rope_type`.
    pub fn rope_type(&self) -> &'static str {
        match self {
            Self::Linear { .. } => "linear",
            Self::Llama3 { .. } => "llama3",
        }
    }
}

/// Rotary position embedding parameters: base and optional scaling.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeParams {
    /// The base θ of the frequencies.
    pub theta: f64,
    /// Optional long-context rescaling.
    pub scaling: Option<RopeScaling>,
}

/// The scaling a `rope_scaling` (4.x) or `rope_parameters` (5.x) object asks for; `None` for
/// `rope_type: "default"` or no type. `origin` names the file on error.
pub fn parse_scaling(obj: &Value, origin: &Path) -> Result<Option<RopeScaling>, ConfigError> {
    let kind = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |key: &str| -> Result<f64, ConfigError> {
        obj.get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| ConfigError::Invalid {
                path: origin.to_path_buf(),
                message: format!("rope scaling \"{kind}\" needs a number \"{key}\""),
            })
    };
    Ok(match kind {
        "default" => None,
        "linear" => Some(RopeScaling::Linear {
            factor: num("factor")?,
        }),
        "llama3" => Some(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
        }),
        other => {
            return Err(ConfigError::Unsupported {
                path: origin.to_path_buf(),
                what: format!("rope scaling type \"{other}\""),
            })
        }
    })
}

/// Where one rotary embedding's parameters may be given.
pub(crate) struct RopeSource<'v> {
    /// The 4.x key of the base (`rope_theta`, `rope_local_base_freq`).
    pub theta_key: &'static str,
    /// Its value, when present.
    pub theta: Option<f64>,
    /// The 4.x `rope_scaling` object, when this embedding has one.
    pub scaling: Option<&'v Value>,
    /// Where the 5.x object lives, for messages (`rope_parameters`, `rope_parameters.full_attention`).
    pub params_key: &'static str,
    /// The 5.x object, when present.
    pub params: Option<&'v Value>,
}

/// Resolves one rotary embedding from either layout. The base is required; both layouts in one
/// file must agree.
pub(crate) fn resolve_rope(src: &ConfigSource, r: RopeSource) -> Result<RopeParams, ConfigError> {
    let params = r.params.filter(|v| !v.is_null());
    if let Some(p) = params {
        if !p.is_object() {
            return Err(src.invalid(format!("{} must be an object", r.params_key)));
        }
    }
    let params_theta =
        match params.and_then(|p| p.get("rope_theta")) {
            None | Some(Value::Null) => None,
            Some(v) => Some(v.as_f64().ok_or_else(|| {
                src.invalid(format!("{}.rope_theta must be a number", r.params_key))
            })?),
        };
    let theta = match (r.theta, params_theta) {
        (Some(a), Some(b)) if a != b => {
            return Err(src.invalid(format!(
                "{} = {a} and {}.rope_theta = {b} disagree",
                r.theta_key, r.params_key
            )))
        }
        (_, Some(b)) => b,
        (Some(a), None) => a,
        (None, None) => {
            return Err(src.missing(r.theta_key, &[format!("{}.rope_theta", r.params_key)]))
        }
    };
    let from_params = match params {
        Some(p) => parse_scaling(p, src.origin)?,
        None => None,
    };
    let from_scaling = match r.scaling.filter(|v| !v.is_null()) {
        Some(s) => parse_scaling(s, src.origin)?,
        None => None,
    };
    let scaling = match (from_scaling, from_params) {
        (Some(a), Some(b)) if a != b => {
            return Err(src.invalid(format!(
                "rope_scaling ({a:?}) and {} ({b:?}) disagree",
                r.params_key
            )))
        }
        (a, b) => a.or(b),
    };
    Ok(RopeParams { theta, scaling })
}
