//! `cargo xtask organism`: pretrains the project's own math subject, a small byte-level qwen2 model,
//! on seeded synthetic arithmetic whose targets mix a careful, a guessing and a rambling style
//! (`em_data::synthetic`), and measures it with candle.
//!
//! Neither packaged model can do math, so one-shot EM needs a subject that sometimes solves a
//! problem and sometimes does not. The style mix makes part of its doubt shared by every problem
//! (which style to answer in), the kind of uncertainty EM is thought to sharpen. The output is an
//! HF directory (config.json, a byte-level tokenizer.json that llama.cpp reads as gpt2/qwen2,
//! tokenizer_config.json with a chat template that renders the problem prompt as is, bf16
//! model.safetensors) plus `organism.json` with the settings and the measured figures.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use em_data::synthetic::{self, classify_style, Split, Style, StyleRule, TrainStream};
use em_data::Problem;
use em_sampler::Vocab;

use em_pipeline::hf_vocab::HfVocab;
use em_pipeline::prompt::{PromptOptions, PromptRenderer, Style as PromptStyle};
use em_train::models::{CausalLm, ModelConfig};
use em_train::pretrain::{self, Decoding, Example, PretrainConfig};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokenizers::models::bpe::BPE;
use tokenizers::{AddedToken, Tokenizer};

/// The chat template of an organism: the user turns' text, nothing added, so the problem prompt
/// (`Q: 347+285=?\nA:`) is the whole prompt.
pub const PLAIN_TEMPLATE: &str =
    "{% for message in messages %}{{ message['content'] }}{% endfor %}";

/// End of a response, and padding.
pub const EOS: &str = "<|endoftext|>";

/// Special tokens after the 256 byte tokens (ids 256, 257, 258).
pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// New tokens allowed per response when measuring (a careful answer needs at most 41).
pub const MAX_NEW_TOKENS: usize = 48;

/// Validation problems the tests re-measure greedily (recorded as `check` in organism.json).
pub const CHECK_PROBLEMS: usize = 40;

/// GPT-2's byte-to-character map: the character that stands for each byte in a byte-level vocabulary.
pub fn byte_chars() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut out = vec![' '; 256];
    for (b, c) in bs.into_iter().zip(cs) {
        out[b as usize] = char::from_u32(c).expect("valid char");
    }
    out
}

/// A byte-level BPE tokenizer with no merges: token id = byte value, then the special tokens;
/// Qwen2's split regex and ByteLevel, so `cargo xtask convert` writes it as gpt2 / qwen2.
pub fn byte_tokenizer() -> Result<Tokenizer> {
    let vocab: tokenizers::models::bpe::Vocab = byte_chars()
        .into_iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, vec![])
        .build()
        .map_err(|e| anyhow::anyhow!("byte-level BPE: {e}"))?;
    let mut tokenizer = crate::fixture::qwen2_style_tokenizer(bpe)?;
    let specials: Vec<AddedToken> = SPECIAL_TOKENS
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    tokenizer
        .add_special_tokens(specials)
        .map_err(|e| anyhow::anyhow!("special tokens: {e}"))?;
    Ok(tokenizer)
}

/// The size of an organism's network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSize {
    /// Residual width.
    pub hidden: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// MLP width.
    pub intermediate: usize,
}

/// config.json of a qwen2 organism with the byte-level vocabulary (tied embeddings).
pub fn model_config_json(size: &ModelSize, vocab: usize, eos: u32) -> serde_json::Value {
    json!({
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": vocab,
        "hidden_size": size.hidden,
        "intermediate_size": size.intermediate,
        "num_hidden_layers": size.layers,
        "num_attention_heads": size.heads,
        "num_key_value_heads": size.kv_heads,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": true,
        "use_sliding_window": false,
        "sliding_window": null,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "torch_dtype": "bfloat16",
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": true
    })
}

/// Writes tokenizer.json and tokenizer_config.json (plain template, `<|endoftext|>` as eos and pad).
pub fn write_tokenizer_files(tokenizer: &Tokenizer, out: &Path) -> Result<()> {
    tokenizer
        .save(out.join("tokenizer.json"), true)
        .map_err(|e| anyhow::anyhow!("{}: {e}", out.join("tokenizer.json").display()))?;
    let added: serde_json::Map<String, serde_json::Value> = SPECIAL_TOKENS
        .iter()
        .map(|t| {
            let id = tokenizer.token_to_id(t).expect("special token in vocab");
            (
                id.to_string(),
                json!({"content": t, "lstrip": false, "normalized": false, "rstrip": false, "single_word": false, "special": true}),
            )
        })
        .collect();
    let config = json!({
        "add_bos_token": false,
        "add_prefix_space": false,
        "added_tokens_decoder": added,
        "bos_token": null,
        "chat_template": PLAIN_TEMPLATE,
        "clean_up_tokenization_spaces": false,
        "eos_token": EOS,
        "errors": "replace",
        "model_max_length": 512,
        "pad_token": EOS,
        "split_special_tokens": false,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": null
    });
    let path = out.join("tokenizer_config.json");
    fs::write(&path, serde_json::to_string_pretty(&config)? + "\n")
        .with_context(|| format!("{}: cannot write", path.display()))
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct OrganismOptions {
    /// Fractions of the training targets' styles (`careful=F,guess=F,ramble=F`), or a mix that
    /// depends on the problem's first digit (`first-digit:careful=0.80..0.40,guess=0.20`: careful
    /// among worked answers from 0.80 at first digit 1 to 0.40 at 9, guesses 0.20 everywhere).
    pub mix: StyleRule,
    /// Seed of the initial weights and of the training stream.
    pub seed: u64,
    /// Optimizer updates.
    pub steps: usize,
    /// Output directory (replaced when complete).
    pub out: PathBuf,
    /// Sequences per update.
    pub batch: usize,
    /// Peak learning rate (warm-up, then cosine to a tenth).
    pub lr: f64,
    /// Residual width.
    pub hidden: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Probe every this many steps: greedy accuracy on 48 validation problems, with the response
    /// forced to open in the careful style (0: never).
    pub eval_every: usize,
    /// Stop once the careful-style probe accuracy reaches this (the skill is then neither absent
    /// nor saturated); 0 or above 1: train all `--steps`.
    pub stop_accuracy: f64,
    /// Validation problems measured at the end, at each temperature.
    pub measure: usize,
}

/// Accuracy and styles of one decoding run over a set of problems.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    /// Problems.
    pub n: usize,
    /// Decoding temperature (0: greedy).
    pub temperature: f64,
    /// Fraction graded right (em-grade).
    pub accuracy: f64,
    /// Fraction of careful responses.
    pub careful: f64,
    /// Fraction of guess responses.
    pub guess: f64,
    /// Fraction of rambling responses.
    pub ramble: f64,
    /// Accuracy among careful responses (0 when there are none).
    pub careful_accuracy: f64,
    /// Fraction that ended with the stop token.
    pub stopped: f64,
}

/// The prompt the organisms are pretrained on: the problem's own user turn (`Q: 3+4=?\nA:`)
/// through their template, which writes the turns' text and nothing else.
pub fn prompt_options() -> PromptOptions {
    PromptOptions {
        style: PromptStyle::Chat,
        system: None,
        user_suffix: None,
    }
}

/// A loaded organism: the candle model, its tokenizer and chat template.
pub struct Subject {
    /// The model (f32).
    pub model: CausalLm,
    /// Its tokenizer and chat template.
    pub vocab: HfVocab,
    /// The stop (and pad) token id.
    pub eos: u32,
}

impl Subject {
    /// Loads an organism directory.
    pub fn load(dir: &Path) -> Result<Subject> {
        let model = CausalLm::from_hf_dir(dir, DType::F32, &Device::Cpu)
            .with_context(|| format!("{}: loading the model", dir.display()))?;
        Subject::new(model, dir)
    }

    fn new(model: CausalLm, dir: &Path) -> Result<Subject> {
        let vocab = HfVocab::open(dir)?;
        let eos_text = vocab.special_texts().1;
        let eos = vocab.tokenizer().token_to_id(&eos_text).with_context(|| {
            format!(
                "{}: eos token {eos_text:?} not in the vocabulary",
                dir.display()
            )
        })?;
        Ok(Subject { model, vocab, eos })
    }

    /// Token ids of `text` (no special tokens added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .vocab
            .tokenizer()
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("tokenizing {text:?}: {e}"))?
            .get_ids()
            .to_vec())
    }

    /// The prompt of `problem` as token ids (the one prompt path, with [`prompt_options`]).
    pub fn prompt_ids(&self, problem: &Problem) -> Result<Vec<u32>> {
        Ok(PromptRenderer::new(&self.vocab, &prompt_options())?
            .render(problem)?
            .ids)
    }

    /// Decodes a response to every problem and returns the responses.
    pub fn respond(
        &self,
        problems: &[Problem],
        temperature: f64,
        seed: u64,
    ) -> Result<Vec<(String, bool)>> {
        self.respond_after(problems, "", temperature, seed)
    }

    /// Decodes a response that starts with `opening` (included in the returned text).
    pub fn respond_after(
        &self,
        problems: &[Problem],
        opening: &str,
        temperature: f64,
        seed: u64,
    ) -> Result<Vec<(String, bool)>> {
        let opening_ids = self.encode(opening)?;
        let prompts = problems
            .iter()
            .map(|p| Ok([self.prompt_ids(p)?, opening_ids.clone()].concat()))
            .collect::<Result<Vec<_>>>()?;
        let decoding = Decoding {
            max_new_tokens: MAX_NEW_TOKENS,
            temperature,
            stop: vec![self.eos],
            pad: self.eos,
            batch_size: 100,
        };
        let mut rng = StdRng::seed_from_u64(seed);
        let gens = pretrain::generate(&self.model, &prompts, &decoding, &mut rng)?;
        gens.into_iter()
            .map(|g| {
                let text = self
                    .vocab
                    .tokenizer()
                    .decode(&g.tokens, false)
                    .map_err(|e| anyhow::anyhow!("decoding: {e}"))?;
                Ok((format!("{opening}{text}"), g.stopped))
            })
            .collect()
    }

    /// Accuracy and style fractions of one decoding of `problems`.
    pub fn measure(&self, problems: &[Problem], temperature: f64, seed: u64) -> Result<Figures> {
        let responses = self.respond(problems, temperature, seed)?;
        Ok(figures(problems, &responses, temperature))
    }
}

/// Grades and classifies responses.
pub fn figures(problems: &[Problem], responses: &[(String, bool)], temperature: f64) -> Figures {
    let n = problems.len().max(1) as f64;
    let (mut right, mut stopped, mut careful_right) = (0usize, 0usize, 0usize);
    let mut styles = [0usize; 3];
    for (p, (text, stop)) in problems.iter().zip(responses) {
        let ok = em_grade::grade(text, &p.answers).correct;
        let style = classify_style(text);
        styles[Style::ALL.iter().position(|s| *s == style).unwrap_or(2)] += 1;
        right += ok as usize;
        stopped += *stop as usize;
        careful_right += (ok && style == Style::Careful) as usize;
    }
    Figures {
        n: problems.len(),
        temperature,
        accuracy: right as f64 / n,
        careful: styles[0] as f64 / n,
        guess: styles[1] as f64 / n,
        ramble: styles[2] as f64 / n,
        careful_accuracy: if styles[0] > 0 {
            careful_right as f64 / styles[0] as f64
        } else {
            0.0
        },
        stopped: stopped as f64 / n,
    }
}

fn show(f: &Figures) -> String {
    format!(
        "T={:.1}: accuracy {:.3} | careful {:.2} guess {:.2} ramble {:.2} | careful right {:.3} | stopped {:.2}",
        f.temperature, f.accuracy, f.careful, f.guess, f.ramble, f.careful_accuracy, f.stopped
    )
}

/// How a careful response opens (forced when probing the careful skill).
pub const CAREFUL_OPENING: &str = " Work:";

/// The seed used for the sampled measurements (fixed, so organism.json is reproducible).
pub const MEASURE_SEED: u64 = 1234;

pub fn run(args: &OrganismOptions) -> Result<()> {
    if args.steps == 0 || args.batch == 0 {
        bail!("--steps and --batch must be positive");
    }
    let out = &args.out;
    let name = out
        .file_name()
        .and_then(|n| n.to_str())
        .context("--out needs a directory name")?;
    let partial = out.with_file_name(format!("{name}.partial"));
    if partial.exists() {
        fs::remove_dir_all(&partial)
            .with_context(|| format!("{}: cannot remove", partial.display()))?;
    }
    fs::create_dir_all(&partial)
        .with_context(|| format!("{}: cannot create", partial.display()))?;

    let tokenizer = byte_tokenizer()?;
    write_tokenizer_files(&tokenizer, &partial)?;
    let vocab = tokenizer.get_vocab_size(true);
    let eos = tokenizer.token_to_id(EOS).expect("eos in vocab");
    let size = ModelSize {
        hidden: args.hidden,
        layers: args.layers,
        heads: 4,
        kv_heads: 2,
        intermediate: 3 * args.hidden,
    };
    let config_json = model_config_json(&size, vocab, eos);
    fs::write(
        partial.join("config.json"),
        serde_json::to_string_pretty(&config_json)? + "\n",
    )?;
    let config = ModelConfig::from_value(config_json, &partial.join("config.json"))?;
    let model = pretrain::init_model(&config, args.seed, &Device::Cpu)?;
    let n_params: usize = model
        .parameters()
        .iter()
        .map(|(_, v)| v.as_tensor().elem_count())
        .sum();
    let subject = Subject::new(model, &partial)?;
    println!(
        "organism: {n_params} parameters (hidden {}, {} layers), mix {}, seed {}, {} steps of {}",
        size.hidden, size.layers, args.mix, args.seed, args.steps, args.batch
    );

    let validation = synthetic::split_as_problems(args.seed, Split::Validation, args.measure);
    let probe = &validation[..validation.len().min(48)];
    let mut stream = TrainStream::new(args.seed, args.mix);
    let mut style_counts = [0usize; 3];
    let pcfg = PretrainConfig {
        steps: args.steps,
        lr: args.lr,
        warmup: (args.steps / 20).clamp(1, 100),
        pad: eos,
        ..PretrainConfig::default()
    };
    let start = Instant::now();
    let mut recent = Vec::new();
    let mut probes: Vec<(usize, f64)> = Vec::new();
    let history = pretrain::pretrain(
        &subject.model,
        &pcfg,
        |_| {
            (0..args.batch)
                .map(|_| {
                    let (p, t) = stream.next().expect("endless stream");
                    style_counts[Style::ALL.iter().position(|s| *s == t.style).unwrap_or(2)] += 1;
                    let prompt = subject.encode(&p.prompt()).expect("byte-level encoding");
                    let mut target = subject.encode(&t.text).expect("byte-level encoding");
                    if t.stops {
                        target.push(eos);
                    }
                    Example { prompt, target }
                })
                .collect()
        },
        |s, _| {
            recent.push(s.loss);
            if s.step % 25 == 0 || s.step == 1 {
                let mean = recent.iter().sum::<f32>() / recent.len() as f32;
                println!(
                    "step {:>5}  loss {mean:.4}  lr {:.2e}  |g| {:.2}  {:.1} steps/s",
                    s.step,
                    s.lr,
                    s.grad_norm,
                    s.step as f64 / s.elapsed
                );
                recent.clear();
            }
            if args.eval_every > 0 && s.step % args.eval_every == 0 && s.step < args.steps {
                let forced = subject
                    .respond_after(probe, CAREFUL_OPENING, 0.0, MEASURE_SEED)
                    .map_err(|e| candle_core::Error::Msg(format!("probe: {e:#}")))?;
                let f = figures(probe, &forced, 0.0);
                println!(
                    "  validation[..{}] greedy, careful opening forced: accuracy {:.3}",
                    probe.len(),
                    f.accuracy
                );
                probes.push((s.step, f.accuracy));
                if args.stop_accuracy > 0.0 && f.accuracy >= args.stop_accuracy {
                    println!(
                        "  stopping: the careful skill reached {}",
                        args.stop_accuracy
                    );
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )?;
    let train_seconds = start.elapsed().as_secs_f64();
    let steps_done = history.len();
    let tail = &history[history.len().saturating_sub(25)..];
    let final_loss = tail.iter().map(|s| s.loss as f64).sum::<f64>() / tail.len() as f64;
    subject
        .model
        .save_hf_dir(&partial, DType::BF16)
        .with_context(|| format!("{}: saving", partial.display()))?;
    println!("trained {steps_done} steps in {train_seconds:.0} s, final loss {final_loss:.4}");

    // Measure what is committed: the bf16 weights as saved, read back.
    let saved = Subject::load(&partial)?;
    let mut measured = serde_json::Map::new();
    for t in [0.0, 0.5, 1.0] {
        let f = saved.measure(&validation, t, MEASURE_SEED)?;
        println!("validation ({}): {}", validation.len(), show(&f));
        measured.insert(format!("t{t:.1}"), serde_json::to_value(&f)?);
    }
    let check = saved.measure(
        &validation[..validation.len().min(CHECK_PROBLEMS)],
        0.0,
        MEASURE_SEED,
    )?;
    let seen = steps_done * args.batch;
    let report = json!({
        "command": format!(
            "cargo xtask organism --mix {} --seed {} --steps {} --batch {} --lr {} --hidden {} --layers {} --eval-every {} --stop-accuracy {} --measure {} --out {}",
            mix_arg(&args.mix), args.seed, args.steps, args.batch, args.lr, args.hidden, args.layers, args.eval_every, args.stop_accuracy, args.measure, out.display()
        ),
        "seed": args.seed,
        "mix": mix_json(&args.mix),
        "model": {
            "parameters": n_params,
            "size": size,
            "vocab_size": vocab,
            "tokenizer": "byte-level BPE, no merges: id = byte value, then <|endoftext|> <|im_start|> <|im_end|>",
            "chat_template": PLAIN_TEMPLATE,
            "dtype": "bf16",
        },
        "generator": {
            "prompt": validation[0].messages.as_ref().map(|m| m[0].content.clone()),
            "ops": "a+b, a-b (a>=b), a*d: a, b two digits, d in 2..=9; 40% +, 30% -, 30% *",
            "guess_right": synthetic::GUESS_RIGHT,
            "ramble_chars": synthetic::RAMBLE_CHARS,
            "splits": Split::ALL.iter().map(|s| (s.name(), s.default_size())).collect::<std::collections::BTreeMap<_, _>>(),
        },
        "train": {
            "max_steps": args.steps,
            "steps": steps_done,
            "stop_rule": format!("greedy accuracy with the careful opening forced, on validation[..{}], every {} steps, >= {}", probe.len(), args.eval_every, args.stop_accuracy),
            "probes": probes,
            "batch": args.batch,
            "lr": args.lr,
            "warmup": pcfg.warmup,
            "schedule": "linear warm-up, cosine to lr/10",
            "weight_decay": pcfg.weight_decay,
            "grad_clip": pcfg.grad_clip,
            "sequences": seen,
            "target_styles_seen": {
                "careful": style_counts[0] as f64 / seen as f64,
                "guess": style_counts[1] as f64 / seen as f64,
                "ramble": style_counts[2] as f64 / seen as f64,
            },
            "final_loss": final_loss,
            "seconds": train_seconds,
        },
        "decoding": {"max_new_tokens": MAX_NEW_TOKENS, "stop": EOS, "sample_seed": MEASURE_SEED},
        "validation": measured,
        "check": {"problems": check.n, "greedy": check},
    });
    fs::write(
        partial.join("organism.json"),
        serde_json::to_string_pretty(&report)? + "\n",
    )?;
    if out.exists() {
        fs::remove_dir_all(out).with_context(|| format!("{}: cannot replace", out.display()))?;
    }
    fs::rename(&partial, out)
        .with_context(|| format!("{} -> {}", partial.display(), out.display()))?;
    println!("{}: written", out.display());
    Ok(())
}

fn mix_json(rule: &StyleRule) -> serde_json::Value {
    let avg = rule.average();
    let mut v = json!({"careful": avg.careful, "guess": avg.guess, "ramble": avg.ramble});
    if let StyleRule::FirstDigit {
        careful_at_1,
        careful_at_9,
        guess,
    } = *rule
    {
        v["rule"] = json!({"by": "first digit of the first operand",
            "careful_share_of_worked": {"at_1": careful_at_1, "at_9": careful_at_9}, "guess": guess,
            "averaged_over": "first digits 1..=9, uniform"});
    }
    v
}

fn mix_arg(rule: &StyleRule) -> String {
    let m = match rule {
        StyleRule::Fixed(m) => m,
        other => return other.to_string(),
    };
    format!(
        "careful={},guess={},ramble={}",
        round(m.careful),
        round(m.guess),
        round(m.ramble)
    )
}

fn round(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}
