//! Gemma3, text only (`Gemma3ForCausalLM`, e.g. gemma-3-270m): embeddings scaled by
//! `sqrt(hidden_size)`, `(1 + w)` RMS norms before and after both attention and MLP, RMS norms on
//! each query/key head, scores scaled by `query_pre_attn_scalar^-1/2`, sliding-window layers with
//! their own rotary base (`rope_local_base_freq`), GELU-tanh MLP and tied embeddings. Its
//! configuration is resolved by [`em_config::gemma3`].

use candle_core::{DType, Device, Result, Tensor};

use super::llama::load_lm_head;
use super::{ModelConfig, ModelError, Weights};
use crate::layers::{
    Attention, Embedding, LayerContext, Linear, Mlp, Positions, ProjectionTape, RmsNorm,
    RotaryEmbedding,
};

/// One decoder layer with norms before and after attention and MLP.
#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    pre_feedforward_layernorm: RmsNorm,
    mlp: Mlp,
    post_feedforward_layernorm: RmsNorm,
    window: Option<usize>,
}

impl DecoderLayer {
    fn forward(&self, x: &Tensor, pos: Positions<'_>) -> Result<Tensor> {
        let h = self
            .self_attn
            .forward(&self.input_layernorm.forward(x)?, pos)?;
        let x = (x + self.post_attention_layernorm.forward(&h)?)?;
        let h = self.mlp.forward(
            &self.pre_feedforward_layernorm.forward(&x)?,
            pos.projections,
        )?;
        x + self.post_feedforward_layernorm.forward(&h)?
    }
}

/// The Gemma3 text decoder and its LM head.
#[derive(Debug, Clone)]
pub struct Model {
    embed_tokens: Embedding,
    embed_scale: f64,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    final_logit_softcapping: Option<f64>,
    global_rotary: RotaryEmbedding,
    local_rotary: RotaryEmbedding,
}

impl Model {
    /// Takes every weight `cfg` needs from `w`.
    pub fn load(cfg: &ModelConfig, w: &mut Weights) -> std::result::Result<Self, ModelError> {
        let (hs, hd, eps) = (cfg.hidden_size, cfg.head_dim, cfg.rms_norm_eps);
        let (nh, nkv, im) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.intermediate_size,
        );
        let embed_tokens = Embedding::new(
            w.param("model.embed_tokens.weight", &[cfg.vocab_size, hs])?,
            cfg.pad_token_id,
        );
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for (i, window) in cfg.layer_windows.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let norm = |w: &mut Weights, name: &str, dim: usize| {
                w.rms_norm_unit_offset(&format!("{p}.{name}"), dim, eps)
            };
            let input_layernorm = norm(w, "input_layernorm", hs)?;
            let self_attn = Attention {
                q_proj: w.linear(&format!("{p}.self_attn.q_proj"), hs, nh * hd, cfg.qkv_bias)?,
                k_proj: w.linear(&format!("{p}.self_attn.k_proj"), hs, nkv * hd, cfg.qkv_bias)?,
                v_proj: w.linear(&format!("{p}.self_attn.v_proj"), hs, nkv * hd, cfg.qkv_bias)?,
                o_proj: w.linear(&format!("{p}.self_attn.o_proj"), nh * hd, hs, cfg.o_bias)?,
                q_norm: Some(norm(w, "self_attn.q_norm", hd)?),
                k_norm: Some(norm(w, "self_attn.k_norm", hd)?),
                num_heads: nh,
                num_kv_heads: nkv,
                head_dim: hd,
                scale: 1.0 / cfg.query_pre_attn_scalar.sqrt(),
                softcap: cfg.attn_logit_softcapping,
            };
            let post_attention_layernorm = norm(w, "post_attention_layernorm", hs)?;
            let pre_feedforward_layernorm = norm(w, "pre_feedforward_layernorm", hs)?;
            let mlp = Mlp {
                gate_proj: w.linear(&format!("{p}.mlp.gate_proj"), hs, im, false)?,
                up_proj: w.linear(&format!("{p}.mlp.up_proj"), hs, im, false)?,
                down_proj: w.linear(&format!("{p}.mlp.down_proj"), im, hs, false)?,
                act: cfg.hidden_act,
            };
            let post_feedforward_layernorm = norm(w, "post_feedforward_layernorm", hs)?;
            layers.push(DecoderLayer {
                input_layernorm,
                self_attn,
                post_attention_layernorm,
                pre_feedforward_layernorm,
                mlp,
                post_feedforward_layernorm,
                window: *window,
            });
        }
        let norm = w.rms_norm_unit_offset("model.norm", hs, eps)?;
        let lm_head = load_lm_head(cfg, w, &embed_tokens)?;
        Ok(Self {
            embed_tokens,
            embed_scale: (hs as f64).sqrt(),
            layers,
            norm,
            lm_head,
            final_logit_softcapping: cfg.final_logit_softcapping,
            global_rotary: RotaryEmbedding::new(hd, &cfg.rope),
            local_rotary: RotaryEmbedding::new(hd, &cfg.local_rope),
        })
    }

    /// The input embedding.
    pub fn embed_tokens_mut(&mut self) -> &mut Embedding {
        &mut self.embed_tokens
    }

    /// Input embeddings `[batch, seq, hidden]` for `ids` `[batch, seq]`, scaled by √hidden.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let x = self.embed_tokens.forward(ids)?;
        // transformers multiplies by the scale cast to the weight dtype.
        let scale = match x.dtype() {
            DType::BF16 => half::bf16::from_f64(self.embed_scale).to_f64(),
            DType::F16 => half::f16::from_f64(self.embed_scale).to_f64(),
            DType::F32 => self.embed_scale as f32 as f64,
            _ => self.embed_scale,
        };
        x * scale
    }

    /// The rope tables (global and local) and masks every layer of a `seq_len` batch uses.
    pub fn layer_context(
        &self,
        seq_len: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<LayerContext> {
        let windows: Vec<_> = self.layers.iter().map(|l| l.window).collect();
        LayerContext::new(
            seq_len,
            dtype,
            device,
            &self.global_rotary,
            Some(&self.local_rotary),
            &windows,
        )
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

    /// The LM head (the embedding table: Gemma3 ties them).
    pub fn lm_head(&self) -> &Linear {
        &self.lm_head
    }

    /// The final soft-capping of the logits, applied by [`super::CausalLm::cap_logits`].
    pub fn final_logit_softcapping(&self) -> Option<f64> {
        self.final_logit_softcapping
    }
}
