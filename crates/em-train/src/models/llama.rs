//! Llama 2/3 and SmolLM2 (`LlamaForCausalLM`): pre-norm decoder, SwiGLU MLP, GQA, rotary embedding
//! with optional "linear" or "llama3" scaling, per-layer sliding windows and optional q/k head
//! norms. The decoder here also serves Qwen2, Qwen3 and Mistral: how they differ is configuration,
//! set by their em-config family files ([`em_config::qwen2`], [`em_config::qwen3`],
//! [`em_config::mistral`], [`em_config::llama`]).

use candle_core::{DType, Device, Result, Tensor};

use super::{ModelConfig, ModelError, Weights};
use crate::layers::{
    Attention, Embedding, LayerContext, Linear, Mlp, Positions, ProjectionTape, RmsNorm,
    RotaryEmbedding,
};

/// One pre-norm decoder layer.
#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
    window: Option<usize>,
}

impl DecoderLayer {
    fn forward(&self, x: &Tensor, pos: Positions<'_>) -> Result<Tensor> {
        let h = self
            .self_attn
            .forward(&self.input_layernorm.forward(x)?, pos)?;
        let x = (x + h)?;
        let h = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x)?, pos.projections)?;
        x + h
    }
}

/// Attention and MLP of layer `i` (`model.layers.{i}.self_attn`, `.mlp`), biases as `cfg` says.
pub(crate) fn load_attention_and_mlp(
    cfg: &ModelConfig,
    w: &mut Weights,
    i: usize,
) -> std::result::Result<(Attention, Mlp), ModelError> {
    let p = format!("model.layers.{i}");
    let (hs, hd) = (cfg.hidden_size, cfg.head_dim);
    let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
    let attn = Attention {
        q_proj: w.linear(&format!("{p}.self_attn.q_proj"), hs, nh * hd, cfg.qkv_bias)?,
        k_proj: w.linear(&format!("{p}.self_attn.k_proj"), hs, nkv * hd, cfg.qkv_bias)?,
        v_proj: w.linear(&format!("{p}.self_attn.v_proj"), hs, nkv * hd, cfg.qkv_bias)?,
        o_proj: w.linear(&format!("{p}.self_attn.o_proj"), nh * hd, hs, cfg.o_bias)?,
        q_norm: qk_norm(cfg, w, &format!("{p}.self_attn.q_norm"))?,
        k_norm: qk_norm(cfg, w, &format!("{p}.self_attn.k_norm"))?,
        num_heads: nh,
        num_kv_heads: nkv,
        head_dim: hd,
        scale: 1.0 / cfg.query_pre_attn_scalar.sqrt(),
        softcap: cfg.attn_logit_softcapping,
    };
    let im = cfg.intermediate_size;
    let mlp = Mlp {
        gate_proj: w.linear(&format!("{p}.mlp.gate_proj"), hs, im, cfg.mlp_bias)?,
        up_proj: w.linear(&format!("{p}.mlp.up_proj"), hs, im, cfg.mlp_bias)?,
        down_proj: w.linear(&format!("{p}.mlp.down_proj"), im, hs, cfg.mlp_bias)?,
        act: cfg.hidden_act,
    };
    Ok((attn, mlp))
}

/// A per-head RMS norm over `head_dim` at `prefix` when `cfg.qk_norm` (Qwen3), else none.
fn qk_norm(
    cfg: &ModelConfig,
    w: &mut Weights,
    prefix: &str,
) -> std::result::Result<Option<RmsNorm>, ModelError> {
    cfg.qk_norm
        .then(|| w.rms_norm(prefix, cfg.head_dim, cfg.rms_norm_eps))
        .transpose()
}

/// The LM head: `lm_head.weight`, or the embedding table when tied.
pub(crate) fn load_lm_head(
    cfg: &ModelConfig,
    w: &mut Weights,
    embed: &Embedding,
) -> std::result::Result<Linear, ModelError> {
    if cfg.tie_word_embeddings {
        Ok(Linear::new(embed.weight().clone(), None))
    } else {
        w.linear("lm_head", cfg.hidden_size, cfg.vocab_size, false)
    }
}

/// The Llama-family decoder (also Qwen2) and its LM head.
#[derive(Debug, Clone)]
pub struct Model {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rotary: RotaryEmbedding,
}

impl Model {
    /// Takes every weight `cfg` needs from `w`.
    pub fn load(cfg: &ModelConfig, w: &mut Weights) -> std::result::Result<Self, ModelError> {
        let (hs, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        let embed_tokens = Embedding::new(
            w.param("model.embed_tokens.weight", &[cfg.vocab_size, hs])?,
            cfg.pad_token_id,
        );
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for (i, window) in cfg.layer_windows.iter().enumerate() {
            let input_layernorm =
                w.rms_norm(&format!("model.layers.{i}.input_layernorm"), hs, eps)?;
            let (self_attn, mlp) = load_attention_and_mlp(cfg, w, i)?;
            let post_attention_layernorm = w.rms_norm(
                &format!("model.layers.{i}.post_attention_layernorm"),
                hs,
                eps,
            )?;
            layers.push(DecoderLayer {
                input_layernorm,
                self_attn,
                post_attention_layernorm,
                mlp,
                window: *window,
            });
        }
        let norm = w.rms_norm("model.norm", hs, eps)?;
        let lm_head = load_lm_head(cfg, w, &embed_tokens)?;
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            rotary: RotaryEmbedding::new(cfg.head_dim, &cfg.rope),
        })
    }

    /// The input embedding.
    pub fn embed_tokens_mut(&mut self) -> &mut Embedding {
        &mut self.embed_tokens
    }

    /// Input embeddings `[batch, seq, hidden]` for `ids` `[batch, seq]`.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        self.embed_tokens.forward(ids)
    }

    /// The rope tables and masks every layer of a `seq_len` batch uses.
    pub fn layer_context(
        &self,
        seq_len: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<LayerContext> {
        let windows: Vec<_> = self.layers.iter().map(|l| l.window).collect();
        LayerContext::new(seq_len, dtype, device, &self.rotary, None, &windows)
    }

    /// Number of decoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Every decoder layer's attention and MLP projections.
    pub fn projections(&self) -> impl Iterator<Item = &Linear> {
        self.layers.iter().flat_map(|l| {
            l.self_attn
                .projections()
                .into_iter()
                .chain(l.mlp.projections())
        })
    }

    /// Decoder layer `i` on `x` `[batch, seq, hidden]`, its MLP products on `tape`.
    pub fn layer(
        &self,
        i: usize,
        x: &Tensor,
        ctx: &LayerContext,
        tape: Option<&ProjectionTape>,
    ) -> Result<Tensor> {
        let layer = &self.layers[i];
        let mut pos = ctx.for_window(layer.window);
        pos.projections.tape = tape;
        layer.forward(x, pos)
    }

    /// The final norm, giving the hidden states the LM head reads.
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        self.norm.forward(x)
    }

    /// The LM head.
    pub fn lm_head(&self) -> &Linear {
        &self.lm_head
    }
}
