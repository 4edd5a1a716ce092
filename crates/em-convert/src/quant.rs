//! Which GGUF type each tensor gets, following llama.cpp's rules, with its fallbacks for shapes a
//! type cannot take.

use candle_core::quantized::GgmlDType;

/// The output types `convert` offers (written by the names the command line takes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum OutType {
    F32,
    F16,
    Bf16,
    #[cfg_attr(feature = "clap", value(name = "q8_0"))]
    #[serde(rename = "q8_0")]
    Q8_0,
    #[cfg_attr(feature = "clap", value(name = "q4_0"))]
    #[serde(rename = "q4_0")]
    Q4_0,
    #[cfg_attr(feature = "clap", value(name = "q4_k_m"))]
    #[serde(rename = "q4_k_m")]
    Q4KM,
    #[cfg_attr(feature = "clap", value(name = "q6_k"))]
    #[serde(rename = "q6_k")]
    Q6K,
}

impl OutType {
    /// llama_ftype, stored as `general.file_type`.
    pub fn file_type(self) -> u32 {
        match self {
            OutType::F32 => 0,
            OutType::F16 => 1,
            OutType::Q4_0 => 2,
            OutType::Q8_0 => 7,
            OutType::Q4KM => 15,
            OutType::Q6K => 18,
            OutType::Bf16 => 32,
        }
    }

    pub fn is_quantized(self) -> bool {
        !matches!(self, OutType::F32 | OutType::F16 | OutType::Bf16)
    }
}

/// Where a tensor sits, as llama.cpp's type rules see it.
pub struct TensorRole<'a> {
    pub gguf_name: &'a str,
    pub shape: &'a [usize],
    /// Whether the model has a separate `output.weight` (if not, `token_embd` doubles as the output).
    pub has_output: bool,
    pub n_layers: usize,
}

/// The type chosen for a tensor, and the type the rules wanted when a fallback was needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    pub dtype: GgmlDType,
    pub wanted: GgmlDType,
}

/// llama.cpp's choice of type for one tensor (convert_hf_to_gguf for f32/f16/bf16/q8_0, llama-quantize
/// for q4_0, q4_k_m and q6_k). One-dimensional tensors (norms, biases) stay f32.
pub fn choose(out: OutType, role: &TensorRole) -> Choice {
    let f32_ = GgmlDType::F32;
    if role.shape.len() < 2 || !role.gguf_name.ends_with(".weight") {
        return Choice {
            dtype: f32_,
            wanted: f32_,
        };
    }
    let is_output = role.gguf_name == "output.weight"
        || (!role.has_output && role.gguf_name == "token_embd.weight");
    let wanted = match out {
        OutType::F32 => f32_,
        OutType::F16 => GgmlDType::F16,
        OutType::Bf16 => GgmlDType::BF16,
        OutType::Q8_0 => GgmlDType::Q8_0,
        OutType::Q6K => GgmlDType::Q6K,
        OutType::Q4_0 if is_output => GgmlDType::Q6K,
        OutType::Q4_0 => GgmlDType::Q4_0,
        OutType::Q4KM if is_output => GgmlDType::Q6K,
        OutType::Q4KM => {
            let layer = layer_index(role.gguf_name);
            let more_bits = |i: usize, n: usize| {
                i < n / 8 || i >= 7 * n / 8 || (i as isize - (n / 8) as isize) % 3 == 2
            };
            let sensitive =
                role.gguf_name.contains("attn_v.weight") || role.gguf_name.contains("ffn_down");
            match layer {
                Some(i) if sensitive && more_bits(i, role.n_layers) => GgmlDType::Q6K,
                _ => GgmlDType::Q4K,
            }
        }
    };
    Choice {
        dtype: fallback(wanted, role.shape[role.shape.len() - 1]),
        wanted,
    }
}

/// llama.cpp's fallback when the row length is not a multiple of the type's block.
fn fallback(wanted: GgmlDType, row: usize) -> GgmlDType {
    if row.is_multiple_of(wanted.block_size()) {
        return wanted;
    }
    let next = match wanted {
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q5K => GgmlDType::Q5_1,
        GgmlDType::Q6K => GgmlDType::Q8_0,
        _ => GgmlDType::F16,
    };
    if row.is_multiple_of(next.block_size()) {
        next
    } else {
        GgmlDType::F16
    }
}

fn layer_index(gguf_name: &str) -> Option<usize> {
    gguf_name
        .strip_prefix("blk.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pick(out: OutType, name: &str, shape: &[usize], has_output: bool) -> Choice {
        choose(
            out,
            &TensorRole {
                gguf_name: name,
                shape,
                has_output,
                n_layers: 24,
            },
        )
    }

    #[test]
    fn q4_k_m_follows_llama_cpp() {
        let q = |name: &str| pick(OutType::Q4KM, name, &[512, 512], true).dtype;
        assert_eq!(q("output.weight"), GgmlDType::Q6K);
        assert_eq!(q("token_embd.weight"), GgmlDType::Q4K);
        assert_eq!(
            pick(OutType::Q4KM, "token_embd.weight", &[512, 512], false).dtype,
            GgmlDType::Q6K
        );
        assert_eq!(q("blk.0.attn_q.weight"), GgmlDType::Q4K);
        // use_more_bits(i, 24): i < 3, i >= 21, or (i - 3) % 3 == 2.
        for (i, more) in [
            (0, true),
            (2, true),
            (3, false),
            (5, true),
            (6, false),
            (8, true),
            (20, true),
            (21, true),
            (23, true),
        ] {
            let want = if more { GgmlDType::Q6K } else { GgmlDType::Q4K };
            assert_eq!(q(&format!("blk.{i}.attn_v.weight")), want, "attn_v {i}");
            assert_eq!(q(&format!("blk.{i}.ffn_down.weight")), want, "ffn_down {i}");
            assert_eq!(q(&format!("blk.{i}.ffn_up.weight")), GgmlDType::Q4K);
        }
        assert_eq!(
            pick(OutType::Q4KM, "blk.0.attn_norm.weight", &[512], true).dtype,
            GgmlDType::F32
        );
        assert_eq!(
            pick(OutType::Q4KM, "blk.0.attn_q.bias", &[512], true).dtype,
            GgmlDType::F32
        );
    }

    #[test]
    fn shapes_a_type_cannot_take_fall_back_like_llama_cpp() {
        let c = pick(OutType::Q4KM, "blk.1.attn_q.weight", &[64, 576], true);
        assert_eq!((c.dtype, c.wanted), (GgmlDType::Q5_0, GgmlDType::Q4K));
        assert_eq!(
            pick(OutType::Q4KM, "output.weight", &[64, 576], true).dtype,
            GgmlDType::Q8_0
        );
        assert_eq!(
            pick(OutType::Q6K, "blk.1.ffn_up.weight", &[64, 48], true).dtype,
            GgmlDType::F16
        );
        assert_eq!(
            pick(OutType::Q8_0, "blk.1.ffn_up.weight", &[64, 40], true).dtype,
            GgmlDType::F16
        );
        assert_eq!(
            pick(OutType::Q8_0, "blk.1.ffn_up.weight", &[64, 64], true).dtype,
            GgmlDType::Q8_0
        );
    }
}
