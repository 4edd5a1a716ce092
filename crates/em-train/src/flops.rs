//! What one EM update computes, in FLOPs counted from the shapes: the matmuls of the trunk and
//! the LM head, and attention as em-train's own kernels compute it (their causal blocks, their
//! recomputation), so the count follows the kernels it describes. `bench em-step` divides it by
//! the update's time.

use crate::models::ModelConfig;
use crate::Sequence;

/// FLOPs of one update over `sequences` (padded per micro-batch to equal lengths here); with
/// `frozen` weights the backward forms no weight gradient (the adapter's own products are
/// negligible at small ranks and not counted). `fused`: em-train's CPU path, whose attention
/// computes only the causal blocks (two products forward; five backward, one recomputing the
/// scores) and whose recomputation replays the projections' products (full fine-tuning).
pub fn update_flops(
    cfg: &ModelConfig,
    sequences: &[Sequence],
    recompute: bool,
    frozen: bool,
    fused: bool,
) -> f64 {
    let (h, i) = (cfg.hidden_size as f64, cfg.intermediate_size as f64);
    let (q, kv) = (
        (cfg.num_attention_heads * cfg.head_dim) as f64,
        (cfg.num_key_value_heads * cfg.head_dim) as f64,
    );
    let linear_per_layer = h * q + 2.0 * h * kv + q * h + 3.0 * h * i;
    let layers = cfg.num_hidden_layers as f64;
    let (mut trunk, mut attention, mut head) = (0.0, 0.0, 0.0);
    for s in sequences {
        let t = s.len() as f64;
        trunk += 2.0 * t * linear_per_layer * layers;
        // One product (QKᵀ or PV) over the scores computed, for every head and layer.
        let scores = if fused {
            crate::fused::scores_computed(s.len(), None) as f64
        } else {
            t * t
        };
        attention += 2.0 * scores * q * layers;
        head += 2.0 * s.response_ids.len() as f64 * cfg.vocab_size as f64 * h;
    }
    let weight_passes = if frozen { 2.0 } else { 3.0 };
    let (attention_products, replays_trunk) = if fused {
        (7.0 + if recompute { 2.0 } else { 0.0 }, !frozen)
    } else {
        (6.0 + if recompute { 2.0 } else { 0.0 }, false)
    };
    weight_passes * (trunk + head)
        + attention_products * attention
        + if recompute && !replays_trunk {
            trunk
        } else {
            0.0
        }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ModelConfig {
        let raw = serde_json::json!({
            "model_type": "qwen2", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "tie_word_embeddings": true, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0
        });
        ModelConfig::from_value(raw, std::path::Path::new("config.json")).unwrap()
    }

    #[test]
    fn the_count_follows_the_shapes_and_the_kernels() {
        let cfg = config();
        let seq = |prompt: usize, response: usize| Sequence {
            prompt_ids: vec![1; prompt],
            response_ids: vec![2; response],
        };
        let short = [seq(10, 20)];
        // Composed, no recompute, every weight trained: 3 × (trunk + head) + 6 × attention.
        let (h, i, q, kv, l, t) = (32.0, 64.0, 32.0, 16.0, 2.0, 30.0);
        let trunk = 2.0 * t * (h * q + 2.0 * h * kv + q * h + 3.0 * h * i) * l;
        let head = 2.0 * 20.0 * 64.0 * h;
        let attention = 2.0 * t * t * q * l;
        let expected = 3.0 * (trunk + head) + 6.0 * attention;
        let got = update_flops(&cfg, &short, false, false, false);
        assert!(
            (got - expected).abs() < 1e-6 * expected,
            "{got} vs {expected}"
        );
        // A frozen base forms no weight gradient; recomputing runs the trunk once more.
        assert!(update_flops(&cfg, &short, false, true, false) < got);
        assert!(update_flops(&cfg, &short, true, false, false) > got);
        // On a long sequence the fused attention skips the blocks above the diagonal.
        let long = [seq(100, 2000)];
        assert!(
            update_flops(&cfg, &long, false, false, true)
                < update_flops(&cfg, &long, false, false, false)
        );
    }
}
