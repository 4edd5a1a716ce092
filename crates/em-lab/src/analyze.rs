//! `cargo xtask analyze`: what EM did to a model, beyond accuracy.
//!
//! - `fidelity`: per tensor, how large the EM update is next to the error each GGUF type makes when
//!   quantizing the tuned weights: an update smaller than the quantization error may not survive
//!   the model a user serves.
//! - `logits`: mean, standard deviation and skew of the next-token logits of base and tuned models
//!   on the same sampled answers (the reference reports EM shifts them right), with a histogram plot.
//! - `curves`: entropy and pass rate over training steps from `metrics.jsonl`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use plotters::prelude::*;
use serde::Serialize;

use em_convert::arch::Hparams;
use em_convert::quant::{self, OutType, TensorRole};
use em_convert::read_json;
use em_convert::safetensors_io::HfTensors;
use em_store::write_atomic;

/// One tensor's EM update next to its quantization errors (all as root-mean-square values).
#[derive(Debug, Clone, Serialize)]
pub struct FidelityRow {
    pub tensor: String,
    pub update_rms: f64,
    /// (GGUF type name, type the rules chose for this tensor, RMS quantization error of the tuned tensor)
    pub quant_rms: Vec<(String, String, f64)>,
}

/// The GGUF types a user is likely to serve.
const FIDELITY_TYPES: [OutType; 3] = [OutType::F16, OutType::Q8_0, OutType::Q4KM];

/// Per tensor: RMS of (tuned − base) and RMS of (quantize(tuned) − tuned) for f16, q8_0, q4_k_m.
pub fn fidelity(base: &Path, tuned: &Path) -> Result<Vec<FidelityRow>> {
    let config_path = tuned.join("config.json");
    let hp = Hparams::from_hf_config(&read_json(&config_path)?, &config_path)?;
    let (a, b) = (HfTensors::open(base)?, HfTensors::open(tuned)?);
    let has_output = b.contains("lm_head.weight") && !hp.tie_word_embeddings;
    let mut rows = vec![];
    for name in b.names() {
        if !a.contains(&name) {
            bail!(
                "{}: tensor {name} is not in the base model {}",
                tuned.display(),
                base.display()
            );
        }
        let (tb, tt) = (a.load_f32(&name)?, b.load_f32(&name)?);
        if tb.dims() != tt.dims() {
            bail!(
                "{}: tensor {name} has shape {:?}, base has {:?}",
                tuned.display(),
                tt.dims(),
                tb.dims()
            );
        }
        let update_rms = rms(&(&tt - &tb)?)?;
        let gguf_name = hp.hf_to_gguf_name(&name).unwrap_or_else(|| name.clone());
        let shape = tt.dims().to_vec();
        let role = TensorRole {
            gguf_name: &gguf_name,
            shape: &shape,
            has_output,
            n_layers: hp.num_layers,
        };
        let mut quant_rms = vec![];
        for out in FIDELITY_TYPES {
            let choice = quant::choose(out, &role);
            let values = hp.hf_to_gguf_values(&name, tt.clone())?;
            let err = quantization_rms(&values, choice.dtype)?;
            quant_rms.push((out_name(out), format!("{:?}", choice.dtype), err));
        }
        rows.push(FidelityRow {
            tensor: name,
            update_rms,
            quant_rms,
        });
    }
    Ok(rows)
}

/// The command-line name of a GGUF type (`q4_k_m`).
pub fn out_name(t: OutType) -> String {
    serde_json::to_value(t)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_else(|| format!("{t:?}"))
}

fn rms(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?
        .sqr()?
        .mean_all()?
        .to_scalar::<f64>()?
        .sqrt())
}

/// RMS error of storing `t` as `dtype` and reading it back.
fn quantization_rms(t: &Tensor, dtype: GgmlDType) -> Result<f64> {
    let back = match dtype {
        GgmlDType::F32 => return Ok(0.0),
        GgmlDType::F16 => t.to_dtype(DType::F16)?.to_dtype(DType::F32)?,
        GgmlDType::BF16 => t.to_dtype(DType::BF16)?.to_dtype(DType::F32)?,
        q => QTensor::quantize(t, q)?.dequantize(&Device::Cpu)?,
    };
    rms(&(back - t)?)
}

pub fn write_fidelity(rows: &[FidelityRow], out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    write_atomic(
        &out.join("fidelity.json"),
        &(serde_json::to_string_pretty(rows)? + "\n"),
    )?;
    let mut md = String::from("| tensor | EM update RMS |");
    for t in FIDELITY_TYPES {
        md += &format!(" {} error RMS (update/error) |", out_name(t));
    }
    md += "\n|---|---|";
    md += &"---|".repeat(FIDELITY_TYPES.len());
    md += "\n";
    for r in rows {
        md += &format!("| {} | {:.2e} |", r.tensor, r.update_rms);
        for (_, dtype, err) in &r.quant_rms {
            let ratio = if *err > 0.0 {
                r.update_rms / err
            } else {
                f64::INFINITY
            };
            md += &format!(" {err:.2e} [{dtype}] ({ratio:.2}) |");
        }
        md += "\n";
    }
    let summary = fidelity_summary(rows);
    md += &format!("\n{summary}\n");
    write_atomic(&out.join("fidelity.md"), &md)?;
    println!("{summary}");
    println!("{}", out.join("fidelity.md").display());
    Ok(())
}

/// One line per GGUF type: in how many tensors the EM update exceeds the quantization error.
pub fn fidelity_summary(rows: &[FidelityRow]) -> String {
    let changed: Vec<&FidelityRow> = rows.iter().filter(|r| r.update_rms > 0.0).collect();
    let mut lines = vec![format!(
        "{} of {} tensors changed by EM",
        changed.len(),
        rows.len()
    )];
    for (i, t) in FIDELITY_TYPES.iter().enumerate() {
        let survive = changed
            .iter()
            .filter(|r| r.update_rms > r.quant_rms[i].2)
            .count();
        lines.push(format!(
            "{}: the update is larger than the quantization error in {survive} of {} changed tensors",
            out_name(*t),
            changed.len()
        ));
    }
    lines.join("\n")
}

/// Moments of a set of logits.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Moments {
    pub mean: f64,
    pub std: f64,
    pub skew: f64,
    pub n: usize,
}

/// Per-position logit moments averaged over response positions, base vs tuned, and histograms of
/// centred logits (each position's logits minus their mean) for the plot.
#[derive(Debug, Clone, Serialize)]
pub struct LogitShift {
    pub base: Moments,
    pub tuned: Moments,
    pub n_positions: usize,
    #[serde(skip)]
    pub base_hist: Vec<f64>,
    #[serde(skip)]
    pub tuned_hist: Vec<f64>,
    #[serde(skip)]
    pub hist_range: (f64, f64),
}

/// (prompt, response) pairs from JSONL: lines with string `prompt` and `response`, or eval
/// result lines (`prompt` and `samples[].response`, one pair per sample).
pub fn read_pairs(path: &Path, limit: usize) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let mut pairs = vec![];
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| anyhow::anyhow!("{}:{}: malformed JSON: {e}", path.display(), i + 1))?;
        let text_of = |v: &serde_json::Value, k: &str| v.get(k)?.as_str().map(String::from);
        let responses: Option<Vec<String>> = match v.get("samples") {
            Some(samples) => samples
                .as_array()
                .and_then(|a| a.iter().map(|s| text_of(s, "response")).collect()),
            None => text_of(&v, "response").map(|r| vec![r]),
        };
        let (Some(prompt), Some(responses)) = (text_of(&v, "prompt"), responses) else {
            bail!(
                "{}:{}: needs string fields \"prompt\" and \"response\" (or an eval result line with \"prompt\" and \"samples\")",
                path.display(),
                i + 1
            );
        };
        for response in responses {
            pairs.push((prompt.clone(), response));
            if pairs.len() == limit {
                return Ok(pairs);
            }
        }
    }
    if pairs.is_empty() {
        bail!("{}: no (prompt, response) pairs", path.display());
    }
    Ok(pairs)
}

const HIST_BINS: usize = 60;
const HIST_RANGE: (f64, f64) = (-15.0, 25.0);

/// Logit statistics of two HF models over the response positions of the same texts.
pub fn logit_shift(base: &Path, tuned: &Path, pairs: &[(String, String)]) -> Result<LogitShift> {
    let tokenizer_path = tuned.join("tokenizer.json");
    let tokenizer = em_convert::tokenizer::load_hf_tokenizer(&tokenizer_path)?;
    let encode = |s: &str| -> Result<Vec<u32>> {
        Ok(tokenizer
            .encode(s, false)
            .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?
            .get_ids()
            .to_vec())
    };
    let mut sequences = vec![];
    for (prompt, response) in pairs {
        let p = encode(prompt)?;
        let r = encode(response)?;
        if !r.is_empty() && !p.is_empty() {
            sequences.push((p, r));
        }
    }
    let stats = |dir: &Path| -> Result<(Moments, Vec<f64>, usize)> {
        let model = em_train::models::CausalLm::from_hf_dir(dir, DType::F32, &Device::Cpu)?;
        let mut acc = [0f64; 3];
        let mut hist = vec![0f64; HIST_BINS];
        let mut n = 0usize;
        for (p, r) in &sequences {
            let ids: Vec<u32> = p.iter().chain(r).copied().collect();
            let input = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
            let logits = model.forward(&input)?.squeeze(0)?.to_dtype(DType::F32)?;
            // The positions whose logits predict response tokens.
            let rows = logits.narrow(0, p.len() - 1, r.len())?.to_vec2::<f32>()?;
            for row in rows {
                let m = moments(&row);
                acc[0] += m.mean;
                acc[1] += m.std;
                acc[2] += m.skew;
                n += 1;
                let width = (HIST_RANGE.1 - HIST_RANGE.0) / HIST_BINS as f64;
                for &x in &row {
                    let c = (x as f64 - m.mean - HIST_RANGE.0) / width;
                    if c >= 0.0 && (c as usize) < HIST_BINS {
                        hist[c as usize] += 1.0;
                    }
                }
            }
        }
        let total: f64 = hist.iter().sum::<f64>().max(1.0);
        hist.iter_mut().for_each(|h| *h /= total);
        let k = n.max(1) as f64;
        Ok((
            Moments {
                mean: acc[0] / k,
                std: acc[1] / k,
                skew: acc[2] / k,
                n,
            },
            hist,
            n,
        ))
    };
    let (b, bh, n) = stats(base)?;
    let (t, th, _) = stats(tuned)?;
    Ok(LogitShift {
        base: b,
        tuned: t,
        n_positions: n,
        base_hist: bh,
        tuned_hist: th,
        hist_range: HIST_RANGE,
    })
}

/// Mean, standard deviation and skewness of one logit vector.
pub fn moments(xs: &[f32]) -> Moments {
    let n = xs.len() as f64;
    let mean = xs.iter().map(|&x| x as f64).sum::<f64>() / n;
    let (mut m2, mut m3) = (0.0, 0.0);
    for &x in xs {
        let d = x as f64 - mean;
        m2 += d * d;
        m3 += d * d * d;
    }
    let var = m2 / n;
    let std = var.sqrt();
    let skew = if std > 0.0 {
        (m3 / n) / (var * std)
    } else {
        0.0
    };
    Moments {
        mean,
        std,
        skew,
        n: xs.len(),
    }
}

/// Writes logit_shift.json and the histogram plot; returns the plot's path.
pub fn write_logit_shift(shift: &LogitShift, out: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    write_atomic(
        &out.join("logit_shift.json"),
        &(serde_json::to_string_pretty(shift)? + "\n"),
    )?;
    let svg = out.join("logit_shift.svg");
    {
        let root = SVGBackend::new(&svg, (800, 480)).into_drawing_area();
        root.fill(&WHITE)?;
        let ymax = shift
            .base_hist
            .iter()
            .chain(&shift.tuned_hist)
            .fold(0f64, |m, &x| m.max(x))
            * 1.1;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "Logits minus their per-position mean, on the same answers",
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(shift.hist_range.0..shift.hist_range.1, 0f64..ymax.max(1e-9))?;
        chart
            .configure_mesh()
            .x_desc("centred logit")
            .y_desc("fraction")
            .draw()?;
        let width = (shift.hist_range.1 - shift.hist_range.0) / shift.base_hist.len() as f64;
        let line = |h: &[f64]| -> Vec<(f64, f64)> {
            h.iter()
                .enumerate()
                .map(|(i, &y)| (shift.hist_range.0 + (i as f64 + 0.5) * width, y))
                .collect()
        };
        let label =
            |name: &str, m: &Moments| format!("{name}: std {:.2}, skew {:.2}", m.std, m.skew);
        chart
            .draw_series(LineSeries::new(
                line(&shift.base_hist),
                BLUE.stroke_width(2),
            ))?
            .label(label("base", &shift.base))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
        chart
            .draw_series(LineSeries::new(
                line(&shift.tuned_hist),
                RED.stroke_width(2),
            ))?
            .label(label("EM-tuned", &shift.tuned))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
    }
    println!(
        "logits over {} response positions: base mean {:.3} std {:.3} skew {:.3}; tuned mean {:.3} std {:.3} skew {:.3}",
        shift.n_positions, shift.base.mean, shift.base.std, shift.base.skew, shift.tuned.mean, shift.tuned.std, shift.tuned.skew
    );
    println!("{}", svg.display());
    Ok(svg)
}

/// Plots every numeric field among entropy/loss and pass rate over `step` from metrics.jsonl.
pub fn plot_curves(metrics: &Path, out: &Path) -> Result<PathBuf> {
    let text = std::fs::read_to_string(metrics)
        .with_context(|| format!("{}: cannot read", metrics.display()))?;
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| anyhow::anyhow!("{}:{}: malformed JSON: {e}", metrics.display(), i + 1))?;
        let step = v
            .get("step")
            .and_then(|s| s.as_f64())
            .unwrap_or(i as f64 + 1.0);
        for key in ["entropy", "loss", "pass_rate"] {
            if let Some(y) = v.get(key).and_then(|y| y.as_f64()) {
                series.entry(key.to_string()).or_default().push((step, y));
            }
        }
    }
    if series.is_empty() {
        bail!(
            "{}: no entropy, loss or pass_rate fields",
            metrics.display()
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    let svg = out.join("training_curves.svg");
    {
        let root = SVGBackend::new(&svg, (800, 480)).into_drawing_area();
        root.fill(&WHITE)?;
        let panels = root.split_evenly((1, 2));
        let groups: [(&str, &[&str]); 2] = [
            ("entropy (nats/token)", &["entropy", "loss"]),
            ("samples' pass rate", &["pass_rate"]),
        ];
        for (panel, (title, keys)) in panels.iter().zip(groups) {
            let points: Vec<&(f64, f64)> = keys
                .iter()
                .filter_map(|k| series.get(*k))
                .flatten()
                .collect();
            if points.is_empty() {
                continue;
            }
            let (x0, x1) = points
                .iter()
                .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
            let (y0, y1) = points
                .iter()
                .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
            let pad = ((y1 - y0) * 0.1).max(1e-3);
            let mut chart = ChartBuilder::on(panel)
                .caption(title, ("sans-serif", 16))
                .margin(10)
                .x_label_area_size(30)
                .y_label_area_size(50)
                .build_cartesian_2d(x0..x1.max(x0 + 1.0), (y0 - pad)..(y1 + pad))?;
            chart.configure_mesh().x_desc("step").draw()?;
            for (k, color) in keys.iter().zip([BLUE, RED]) {
                if let Some(s) = series.get(*k) {
                    chart
                        .draw_series(LineSeries::new(s.iter().copied(), color.stroke_width(2)))?
                        .label(*k)
                        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
                }
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()?;
        }
        root.present()?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moments_of_a_known_sample() {
        let m = moments(&[1.0, 2.0, 3.0, 10.0]);
        assert!((m.mean - 4.0).abs() < 1e-12);
        assert!((m.std - 3.5355339).abs() < 1e-6);
        assert!(m.skew > 1.0, "right tail gives positive skew: {}", m.skew);
        assert!(moments(&[2.0, 2.0]).skew == 0.0);
    }

    #[test]
    fn quantization_error_orders_the_types() {
        let t = Tensor::randn(0f32, 1.0, (8, 256), &Device::Cpu).unwrap();
        let f16 = quantization_rms(&t, GgmlDType::F16).unwrap();
        let q8 = quantization_rms(&t, GgmlDType::Q8_0).unwrap();
        let q4 = quantization_rms(&t, GgmlDType::Q4K).unwrap();
        assert!(0.0 < f16 && f16 < q8 && q8 < q4, "{f16} {q8} {q4}");
    }
}
